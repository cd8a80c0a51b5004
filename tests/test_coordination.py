"""Coordination on the real Redis, seen from one server process: a turn that loses its lock stops,
background loops that fail are logged and go on, and every task the service starts is tracked."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from server.coordination.redis import RedisCoordination, redis_client
from server.core.tasks import TaskTracker
from tests.conftest import ServerFactory, TabFactory
from tests.harness import REDIS_URL, ROOT, RunningServer, Tab


async def turn_under_way(
    start_server: ServerFactory, connect: TabFactory, redis_channel: str
) -> tuple[RunningServer, Tab, str, dict[str, Any]]:
    """A server on Redis with a short lock, and a tab whose turn has streamed its first chunk."""
    server = await start_server(
        redis_url=REDIS_URL, redis_channel=redis_channel, turn_lock_seconds=0.6, offline_chunk_delay_ms=100
    )
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    ack = await tab.call("message", {"session_id": sid, "text": "a long answer, please"})
    await tab.wait_for(lambda ev: any(n == "chunk" for n, _ in ev))
    return server, tab, sid, ack


async def test_a_turn_whose_lock_expired_and_was_taken_stops_with_an_error(
    start_server: ServerFactory, connect: TabFactory, redis_channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    _, tab, sid, ack = await turn_under_way(start_server, connect, redis_channel)
    # As if Redis had been away past the lock's expiry and another process had taken the session.
    redis = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        await redis.set(f"{redis_channel}:turn:{sid}", "another-turn another-process", px=5000)
        with caplog.at_level(logging.ERROR, logger="server"):
            done = (await tab.turn(ack["turn_id"], timeout=3))[-1][1]
        assert done["finish_reason"] == "error" and done["error"]["code"] == "turn_lock_lost", done
        assert len([n for n, d in tab.events if n == "chunk" and d["turn_id"] == ack["turn_id"]]) < 12
        assert "lost its session lock" in caplog.text
        # The other holder's lock is left alone.
        assert await redis.get(f"{redis_channel}:turn:{sid}") == "another-turn another-process"
    finally:
        await redis.aclose()
    stored = (await tab.join(sid))["history"][-1]
    assert (stored["event_type"], stored["finish_reason"]) == ("ai_message", "error")


async def test_a_turn_taken_for_dead_and_ended_elsewhere_stops_without_a_done_of_its_own(
    start_server: ServerFactory, connect: TabFactory, redis_channel: str
) -> None:
    server, tab, sid, ack = await turn_under_way(start_server, connect, redis_channel)
    # Another process takes this one for dead (its heartbeat late) and ends the turn: it claims the
    # lock, stores the answer, sends the turn's one `done` (here: notes it), and frees the session.
    tasks = TaskTracker()
    other = await RedisCoordination.open(redis_client(REDIS_URL), redis_channel, 0.6, tasks)
    ended: list[tuple[str, str]] = []

    async def end(session_id: str, turn_id: str, text: str) -> None:
        ended.append((session_id, turn_id))

    other.on_turn_orphaned(end)
    try:
        await other._end_orphan(server.runtime.coordination._process, sid, ack["turn_id"])
        assert ended == [(sid, ack["turn_id"])]
        async with asyncio.timeout(3):
            while server.runtime.service._turns.get(sid) is not None:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert not [d for n, d in tab.events if n == "done"], tab.events
        assert await server.runtime.repo.find_event(sid, f"ai:{ack['turn_id']}") is None  # the other's to write
        # The session is free for the next message.
        assert (await tab.call("message", {"session_id": sid, "text": "again"}))["ok"]
    finally:
        await other.aclose()
        await other._redis.aclose()
        await tasks.close()


async def test_a_turn_ended_elsewhere_before_its_own_end_sends_no_done(redis_channel: str) -> None:
    tasks = TaskTracker()
    mine = await RedisCoordination.open(redis_client(REDIS_URL), redis_channel, 15, tasks)
    other = await RedisCoordination.open(redis_client(REDIS_URL), redis_channel, 15, tasks)
    ended: list[str] = []

    async def end(session_id: str, turn_id: str, text: str) -> None:
        ended.append(turn_id)

    other.on_turn_orphaned(end)
    try:
        assert await mine.acquire_turn("s1", "t1")
        await other._end_orphan(mine._process, "s1", "t1")  # taken for dead: ended there
        assert ended == ["t1"]
        assert not await mine.turn_ending("s1", "t1")
        # A turn whose own process said it sends its `done` (then died) is not ended again: its
        # session is only freed.
        assert await mine.acquire_turn("s2", "t2")
        assert await mine.turn_ending("s2", "t2")
        assert await mine.turn_ending("s2", "t2")  # the same process asking again
        await other._end_orphan(mine._process, "s2", "t2")
        assert ended == ["t1"]
        assert await other.running_turn("s2") is None
    finally:
        await mine.aclose()
        await mine._redis.aclose()
        await other.aclose()
        await other._redis.aclose()
        await tasks.close()


async def test_a_background_loop_that_fails_is_logged_and_goes_on(
    redis_channel: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    tasks = TaskTracker()
    coordination = await RedisCoordination.open(redis_client(REDIS_URL), redis_channel, 0.3, tasks)
    beat = coordination._beat
    beats = 0

    async def fails_once() -> None:
        nonlocal beats
        beats += 1
        if beats == 1:
            raise RuntimeError("not a Redis error")
        await beat()

    monkeypatch.setattr(coordination, "_beat", fails_once)
    try:
        with caplog.at_level(logging.ERROR):
            for _ in range(50):
                if beats >= 3:
                    break
                await asyncio.sleep(0.05)
        assert beats >= 3  # still beating after the failure
        assert "RuntimeError: not a Redis error" in caplog.text
    finally:
        await coordination.aclose()
        await coordination._redis.aclose()
        await tasks.close()


async def test_every_task_the_service_starts_is_tracked(
    start_server: ServerFactory, connect: TabFactory, redis_channel: str
) -> None:
    server = await start_server(redis_url=REDIS_URL, redis_channel=redis_channel, offline_chunk_delay_ms=50)
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    # A slow tool: the turn's generation and its tool call run while we look.
    ack = await tab.call("message", {"session_id": sid, "text": "How's the weather in Slowtown?"})
    await tab.wait_for(lambda ev: any(n == "tool_call" for n, _ in ev))
    ours = [ROOT / "server" / "core", ROOT / "server" / "coordination"]
    started_here = [
        task for task in asyncio.all_tasks() if any(Path(_code_file(task)).is_relative_to(folder) for folder in ours)
    ]
    names = sorted(task.get_name() for task in started_here)
    assert any(name.startswith("tool get_weather") for name in names), names
    assert any(name.startswith("generate ") for name in names) and "redis heartbeat" in names, names
    untracked = [task.get_name() for task in started_here if task not in server.runtime.tasks]
    assert untracked == []
    assert (await tab.call("cancel", {"session_id": sid}))["turn_id"] == ack["turn_id"]
    await tab.turn(ack["turn_id"])


def _code_file(task: asyncio.Task[Any]) -> str:
    code = getattr(task.get_coro(), "cr_code", None)
    return code.co_filename if code is not None else ""
