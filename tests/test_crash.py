"""A process killed mid-turn (kill -9): its turn still ends in one `done`, and the stored
conversation stays one a model accepts (contract: Faults, "A process dies mid-turn")."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from server.storage.postgres import PostgresRepository
from tests.conftest import Spawner
from tests.fake_gemini import HANG, FakeGemini, Pause, Reply, call_part, chunk, text_chunk, text_response
from tests.harness import REDIS_URL, Tab
from tests.pg import scratch_database
from tests.test_cluster import cluster_env

CHUNKS_BEFORE_KILL = 5


@contextlib.asynccontextmanager
async def hanging_server() -> AsyncIterator[str]:
    """An HTTP endpoint that accepts connections and never answers: a tool call that stays in flight."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


def cut_off_reply(moment: str) -> Reply:
    """The model's answer the kill cuts: mid-text, or once it asked for a tool that never answers."""
    if moment == "text":
        events: list[Any] = []
        for n in range(CHUNKS_BEFORE_KILL):
            events += [Pause(0.05), text_chunk(f"part{n} ")]
        return Reply(events=[*events, HANG])
    return Reply(events=[chunk([{"text": "Checking. "}, call_part("get_weather", {"location": "Delhi"}, "c1")])])


async def kill(process: asyncio.subprocess.Process) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    await process.wait()


async def stored_events(url: str, session_id: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(f"{url}/api/sessions/{session_id}/events")
        assert response.status_code == 200, response.text
        events: list[dict[str, Any]] = response.json()["events"]
        return events


async def wait_for_answer(url: str, session_id: str, timeout: float = 15) -> list[dict[str, Any]]:
    """The session's events once its cut-off turn has its answer, read without joining it."""
    async with asyncio.timeout(timeout):
        while True:
            events = await stored_events(url, session_id)
            if any(e["event_type"] == "ai_message" for e in events):
                return events
            await asyncio.sleep(0.1)


async def start_cut_off_turn(
    tab: Tab, fake_gemini: FakeGemini, moment: str, *, also: Tab | None = None
) -> tuple[str, str]:
    """Join (`also` too), send a message whose turn will be cut off, wait until it is mid-way:
    (session, turn)."""
    fake_gemini.stream(cut_off_reply(moment))
    session_id = (await tab.join())["session"]["session_id"]
    if also is not None:
        await also.join(session_id)
    ack = await tab.call("message", {"session_id": session_id, "text": "hello there", "client_message_id": "m-1"})
    assert ack["ok"], ack
    turn_id = ack["turn_id"]
    if moment == "text":
        await tab.wait_for(lambda ev: len([1 for n, d in ev if n == "chunk"]) >= CHUNKS_BEFORE_KILL)
    else:
        await tab.wait_for(lambda ev: any(n == "tool_call" for n, _ in ev))
    return session_id, turn_id


def assert_ended_as_interrupted(events: list[dict[str, Any]], moment: str) -> None:
    types = [e["event_type"] for e in events]
    expected = (
        ["user_message", "ai_message"]
        if moment == "text"
        else ["user_message", "tool_call", "tool_result", "ai_message"]
    )
    assert types == expected, types
    answer = events[-1]
    assert answer["finish_reason"] == "error" and answer["error"]["code"] == "interrupted", answer
    if moment == "tool":
        result = events[2]["content"]
        assert '"call_id": "c1"' in result and '"interrupted"' in result, result


@pytest.fixture(params=["sqlite", "postgres"])
async def storage_env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    if request.param == "sqlite":
        yield {}
        return
    async with scratch_database() as dsn:
        await (await PostgresRepository.open(dsn)).aclose()
        yield {"STORAGE_BACKEND": "postgres", "DATABASE_URL": dsn, "OUTBOX_PATH": str(tmp_path / "outbox.db")}


@pytest.mark.parametrize("moment", ["text", "tool"])
async def test_a_turn_cut_off_by_a_kill_ends_at_the_next_start(
    storage_env: dict[str, str], spawn: Spawner, fake_gemini: FakeGemini, moment: str
) -> None:
    async with hanging_server() as weather:
        env = {
            "LLM_PROVIDER": "gemini",
            "GEMINI_API_KEY": "crash-key",
            "GEMINI_BASE_URL": fake_gemini.url,
            "WEATHER_GEOCODING_URL": weather,
            "WEATHER_FORECAST_URL": weather,
            **storage_env,
        }
        process, url = await spawn(sys.executable, "-m", "server", **env)
        tab = await Tab(url).connect()
        session_id, turn_id = await start_cut_off_turn(tab, fake_gemini, moment)
        if moment == "tool":  # killed once the call is stored (sent at once, it is stored right after)
            async with asyncio.timeout(5):
                while "tool_call" not in [e["event_type"] for e in await stored_events(url, session_id)]:
                    await asyncio.sleep(0.05)
        await kill(process)
        await tab.close()

        # The next start ends it on its own, without anyone using the session.
        _, url = await spawn(sys.executable, "-m", "server", **env)
        serving = time.monotonic()
        assert_ended_as_interrupted(await wait_for_answer(url, session_id), moment)
        print(f"ended {time.monotonic() - serving:.2f} s after the restarted service answered /healthz")

        tab = await Tab(url).connect()
        try:
            joined = await tab.join(session_id)
            assert joined["active_turn"] is None
            # The cut-off message retried: answered like the first, and nothing starts.
            retry = await tab.call(
                "message", {"session_id": session_id, "text": "hello there", "client_message_id": "m-1"}
            )
            assert retry == {"ok": True, "turn_id": turn_id, "event_id": joined["history"][0]["event_id"]}, retry
            # The conversation sent to the model answers every call it holds.
            fake_gemini.stream(Reply(events=[text_response("Fine again.")]))
            ack = await tab.call("message", {"session_id": session_id, "text": "are you back?"})
            assert ack["ok"], ack
            done = (await tab.turn(ack["turn_id"]))[-1][1]
            assert done["finish_reason"] == "stop" and done["text"] == "Fine again.", done
            assert not [d for d in tab.named("user_message") if d["turn_id"] == turn_id]
            contents = fake_gemini.calls()[-1].contents
            calls = [p["functionCall"]["name"] for c in contents for p in c["parts"] if "functionCall" in p]
            answers = [p["functionResponse"]["name"] for c in contents for p in c["parts"] if "functionResponse" in p]
            assert calls == answers == (["get_weather"] if moment == "tool" else []), contents
        finally:
            await tab.close()


@pytest.fixture
async def database() -> AsyncIterator[str]:
    async with scratch_database() as dsn:
        await (await PostgresRepository.open(dsn)).aclose()
        yield dsn


def shared_env(fake_gemini: FakeGemini, redis_channel: str, database: str) -> dict[str, str]:
    """test_cluster's processes, with TURN_LOCK_SECONDS as shipped: the contract's 20 s bound is for
    the defaults."""
    env = cluster_env(fake_gemini, redis_channel, database)
    del env["TURN_LOCK_SECONDS"]
    return env


@pytest.mark.parametrize("moment", ["text", "tool"])
async def test_a_turn_whose_process_dies_ends_for_the_tabs_of_the_other_process(
    database: str, spawn: Spawner, fake_gemini: FakeGemini, redis_channel: str, tmp_path: Path, moment: str
) -> None:
    async with hanging_server() as weather:
        env = {**shared_env(fake_gemini, redis_channel, database), "WEATHER_GEOCODING_URL": weather}
        env["WEATHER_FORECAST_URL"] = weather
        running, url_a = await spawn(sys.executable, "-m", "server", OUTBOX_PATH=str(tmp_path / "a.db"), **env)
        _, url_b = await spawn(sys.executable, "-m", "server", OUTBOX_PATH=str(tmp_path / "b.db"), **env)
        tab_a, tab_b = await Tab(url_a).connect(), await Tab(url_b).connect()
        try:
            session_id, turn_id = await start_cut_off_turn(tab_a, fake_gemini, moment, also=tab_b)
            if moment == "text":
                await tab_b.wait_for(lambda ev: len([1 for n, _ in ev if n == "chunk"]) >= CHUNKS_BEFORE_KILL)
            else:
                await tab_b.wait_for(lambda ev: any(n == "tool_call" for n, _ in ev))
                async with asyncio.timeout(5):  # stored (it is sent first, stored right after)
                    while "tool_call" not in [e["event_type"] for e in await stored_events(url_b, session_id)]:
                        await asyncio.sleep(0.05)
            died = time.monotonic()
            await kill(running)

            turn = await tab_b.turn(turn_id, timeout=20)
            within = time.monotonic() - died
            done = turn[-1][1]
            assert done["finish_reason"] == "error" and done["error"]["code"] == "interrupted", done
            seen = "".join(d["text"] for d in tab_b.named("chunk") if d["turn_id"] == turn_id)
            assert done["text"] and seen.startswith(done["text"]), (done["text"], seen)
            assert done["event_id"] is not None
            results = [d for n, d in turn if n == "tool_result"]
            if moment == "tool":
                assert [(r["call_id"], r["error"]["code"]) for r in results] == [("c1", "interrupted")], turn
            else:
                assert not results
            print(f"done reached the other process's tab {within:.1f} s after the kill")

            # No ghost: a tab joining now sees no turn, and the session takes a message at once.
            late = await Tab(url_b).connect()
            try:
                assert (await late.join(session_id))["active_turn"] is None
            finally:
                await late.close()
            fake_gemini.stream(Reply(events=[text_response("Back.")]))
            ack = await tab_b.call("message", {"session_id": session_id, "text": "still there?"})
            assert ack["ok"], ack
            assert (await tab_b.turn(ack["turn_id"]))[-1][1]["finish_reason"] == "stop"
            contents = fake_gemini.calls()[-1].contents
            calls = [p["functionCall"]["name"] for c in contents for p in c["parts"] if "functionCall" in p]
            answers = [p["functionResponse"]["name"] for c in contents for p in c["parts"] if "functionResponse" in p]
            assert calls == answers == (["get_weather"] if moment == "tool" else []), contents
            events = await stored_events(url_b, session_id)
            stored = [e for e in events if e["event_type"] == "ai_message"]
            assert [a["error"]["code"] if a["error"] else None for a in stored] == ["interrupted", None], stored
            assert stored[0]["content"] == done["text"]
        finally:
            await tab_a.close()
            await tab_b.close()


async def test_a_cut_off_turn_is_ended_at_start_when_redis_lost_what_it_knew(
    database: str, spawn: Spawner, fake_gemini: FakeGemini, redis_channel: str, tmp_path: Path
) -> None:
    env = {**shared_env(fake_gemini, redis_channel, database), "OUTBOX_PATH": str(tmp_path / "outbox.db")}
    process, url = await spawn(sys.executable, "-m", "server", **env)
    tab = await Tab(url).connect()
    session_id, _ = await start_cut_off_turn(tab, fake_gemini, "text")
    await kill(process)
    await tab.close()
    # Redis restarted without persistence meanwhile: nothing of the dead process is left there.
    redis = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in redis.scan_iter(f"{redis_channel}:*")]
        assert keys
        await redis.delete(*keys)
    finally:
        await redis.aclose()

    _, url = await spawn(sys.executable, "-m", "server", **env)  # alone: storage's open turns are ended
    assert_ended_as_interrupted(await wait_for_answer(url, session_id), "text")
