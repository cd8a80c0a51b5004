"""What storage tells a reloaded tab, over a real server: how each answer ended, rows written by
others with plain SQL, and a session's end even when its summary fails."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from datetime import datetime

import httpx

from tests.conftest import ServerFactory, TabFactory


async def test_history_tells_a_failed_and_a_cancelled_answer_from_an_empty_one(
    start_server: ServerFactory, connect: TabFactory
) -> None:
    # Gemini without a key: every turn ends in `done` error provider_not_configured.
    failing = await start_server(llm_provider="gemini", gemini_api_key=None)
    tab = await connect(failing)
    sid = (await tab.join())["session"]["session_id"]
    ack = await tab.call("message", {"session_id": sid, "text": "hello"})
    done = (await tab.turn(ack["turn_id"]))[-1][1]
    assert done["finish_reason"] == "error" and done["error"]["code"] == "provider_not_configured"
    answer = (await tab.join(sid))["history"][-1]
    assert answer["event_type"] == "ai_message" and answer["content"] == ""
    assert (answer["finish_reason"], answer["error"]) == ("error", done["error"])

    slow = await start_server(offline_chunk_delay_ms=50)
    tab = await connect(slow)
    sid = (await tab.join())["session"]["session_id"]
    ack = await tab.call("message", {"session_id": sid, "text": "a long answer, please"})
    await tab.wait_for(lambda ev: any(n == "chunk" for n, _ in ev))
    assert (await tab.call("cancel", {"session_id": sid}))["ok"]
    await tab.turn(ack["turn_id"])
    finished = await tab.call("message", {"session_id": sid, "text": "and now all of it"})
    await tab.turn(finished["turn_id"], timeout=20)
    async with httpx.AsyncClient(base_url=slow.url) as http:
        events = (await http.get(f"/api/sessions/{sid}/events")).json()["events"]
    answers = [e for e in events if e["event_type"] == "ai_message"]
    assert [(a["finish_reason"], a["error"]) for a in answers] == [("cancelled", None), ("stop", None)]
    assert all("finish_reason" not in e for e in events if e["event_type"] != "ai_message")


async def test_rows_written_with_the_original_designs_sql_join_the_conversation(
    start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await start_server()
    sid = "0b7e6a52-9f57-4d1c-8a3e-5d2f1c0e9a11"
    with contextlib.closing(sqlite3.connect(server.settings.sqlite_path)) as db, db:
        db.execute("insert into sessions (session_id, user_id) values (?, 'ops')", (sid,))
        db.execute(
            "insert into events (session_id, event_type, content) values (?, 'user_message', 'from SQL')", (sid,)
        )
        db.execute("insert into events (session_id, event_type, content) values (?, 'ai_message', 'answered')", (sid,))
        # Not the JSON this service writes for tool events: listed, and left out of what the model reads.
        db.execute(
            "insert into events (session_id, event_type, content) values (?, 'tool_call', 'get_weather')", (sid,)
        )
    tab = await connect(server)
    joined = await tab.join(sid)
    assert joined["session"]["user_id"] == "ops"
    assert [(e["event_type"], e["content"]) for e in joined["history"]] == [
        ("user_message", "from SQL"),
        ("ai_message", "answered"),
        ("tool_call", "get_weather"),
    ]
    assert joined["history"][1]["finish_reason"] is None
    ack = await tab.call("message", {"session_id": sid, "text": "and from the service"})
    done = (await tab.turn(ack["turn_id"]))[-1][1]
    assert done["finish_reason"] == "stop", done


async def test_a_failing_summary_does_not_hold_back_the_sessions_end(
    start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await start_server(llm_provider="gemini", gemini_api_key=None, summary_delay_seconds=0.1)
    tried = asyncio.Event()
    provider = server.runtime.provider
    failing = provider.summarise

    async def summarise(conversation):  # type: ignore[no-untyped-def]
        try:
            return await failing(conversation)
        finally:
            tried.set()

    provider.summarise = summarise
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    ack = await tab.call("message", {"session_id": sid, "text": "something to summarise"})
    await tab.turn(ack["turn_id"])
    assert (await tab.call("leave", {"session_id": sid}))["ok"]
    left_at = datetime.now().astimezone()
    async with asyncio.timeout(5):
        while (session := await server.runtime.repo.get_session(sid)).end_time is None:
            await asyncio.sleep(0.05)
    assert abs((session.end_time - left_at).total_seconds()) < 1
    assert session.duration_seconds == round((session.end_time - session.start_time).total_seconds())
    await asyncio.wait_for(tried.wait(), 5)  # the summary was tried, and failed: it stays due, retried on its own
    session = await server.runtime.repo.get_session(sid)
    assert session.summary is None and session.end_time is not None
    assert [due for due, _ in await server.runtime.repo.due_summaries(10)] == [sid]
