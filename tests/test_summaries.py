"""The summary job: only after the last tab leaves and the grace period, once per emptying."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from server.core import summaries
from tests.conftest import ServerFactory, TabFactory
from tests.harness import wait_for_summary


async def test_summary_is_written_only_after_the_last_tab_leaves(
    start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await start_server(summary_delay_seconds=0.3)
    first = await connect(server)
    second = await connect(server, "polling")
    sid = (await first.join())["session"]["session_id"]
    await second.join(sid)
    ack = await first.call("message", {"session_id": sid, "text": "How's the weather in Delhi?"})
    await first.turn(ack["turn_id"])

    await first.close()
    await asyncio.sleep(0.8)  # well past the grace period: one tab is still in
    session = await server.runtime.repo.get_session(sid)
    assert session.summary is None and session.end_time is None and session.duration_seconds is None

    assert await second.call("leave", {"session_id": sid}) == {"ok": True}
    left_at = datetime.now().astimezone()
    session = await wait_for_summary(server, sid)
    assert "1 user messages and 1 answers" in session.summary and "get_weather ×1" in session.summary
    assert "How's the weather in Delhi?" in session.summary and "not an LLM" in session.summary
    assert abs((session.end_time - left_at).total_seconds()) < 1
    assert session.duration_seconds == round((session.end_time - session.start_time).total_seconds())


async def test_a_rejoin_within_the_grace_period_cancels_the_summary(
    start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await start_server(summary_delay_seconds=0.5)
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    await tab.call("leave", {"session_id": sid})
    await asyncio.sleep(0.2)
    await tab.join(sid)  # back before the grace period ends
    await asyncio.sleep(0.8)
    assert (await server.runtime.repo.get_session(sid)).summary is None
    await tab.call("leave", {"session_id": sid})
    await wait_for_summary(server, sid)


async def test_a_summarised_session_reopens_and_is_summarised_again(
    start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await start_server(summary_delay_seconds=0.05)
    calls: list[int] = []
    provider = server.runtime.provider
    original = provider.summarise

    async def counting(conversation):  # type: ignore[no-untyped-def]
        calls.append(len(conversation))
        return await original(conversation)

    provider.summarise = counting
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    ack = await tab.call("message", {"session_id": sid, "text": "first visit"})
    await tab.turn(ack["turn_id"])
    await tab.call("leave", {"session_id": sid})
    first = await wait_for_summary(server, sid)
    await asyncio.sleep(0.3)
    assert calls == [2]  # once per emptying, not again while it stays empty

    joined = await tab.join(sid)
    assert joined["session"]["summary"] == first.summary  # still there while reopened
    ack = await tab.call("message", {"session_id": sid, "text": "second visit"})
    await tab.turn(ack["turn_id"])
    await tab.call("leave", {"session_id": sid})
    async with asyncio.timeout(5):
        while (session := await server.runtime.repo.get_session(sid)).summary == first.summary:
            await asyncio.sleep(0.05)
    assert "2 user messages and 2 answers" in session.summary and "second visit" in session.summary
    assert session.end_time > first.end_time and session.duration_seconds >= first.duration_seconds
    assert calls == [2, 4]


async def test_an_empty_session_is_closed_without_asking_the_model(
    start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await start_server(summary_delay_seconds=0.05)
    asked: list[object] = []

    async def summarise(conversation):  # type: ignore[no-untyped-def]
        asked.append(conversation)
        return "should not be used"

    server.runtime.provider.summarise = summarise
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    await tab.call("leave", {"session_id": sid})
    session = await wait_for_summary(server, sid)
    assert session.summary == "No messages were exchanged in this session." and asked == []
    assert session.end_time is not None and session.duration_seconds == 0


async def test_the_rescan_for_due_summaries_outlives_an_unexpected_failure(
    start_server: ServerFactory, connect: TabFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(summaries, "RESCAN_SECONDS", 0.2)
    server = await start_server(summary_delay_seconds=0.1)
    repo = server.runtime.repo
    real = repo.due_summaries
    failures = 0

    async def fails_once(limit: int) -> Any:
        nonlocal failures
        if failures == 0:
            failures += 1
            raise RuntimeError("a bug, or a row nobody expected")
        return await real(limit)

    monkeypatch.setattr(repo, "due_summaries", fails_once)
    await asyncio.sleep(0.5)  # a rescan failed meanwhile
    assert failures == 1
    # A summary left due by a process that stopped (nothing in this process waits for it).
    sid = str(uuid.uuid4())
    await repo.ensure_session(sid, None, datetime.now(UTC) - timedelta(minutes=5))
    await repo.mark_emptied(sid, datetime.now(UTC) - timedelta(minutes=1))
    session = await wait_for_summary(server, sid, timeout=5)
    assert session.summary == "No messages were exchanged in this session."
