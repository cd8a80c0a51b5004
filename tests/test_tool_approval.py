"""A person approves risky tools: a call to a tool named in TOOL_APPROVAL waits for a decision that
any joined client, on either transport and any process, may give once for all. The tools are a
real MCP server's, which records its calls: "the tool never ran" is what the server saw."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerFactory, TabFactory
from tests.fake_openai import FakeOpenAI, call_delta, call_reply, finish_chunk, text_reply, tool_calls_chunk
from tests.fake_openai import Reply as OpenAIReply
from tests.harness import RunningServer, Tab
from tests.test_mcp import servers_file
from tests.test_metrics import scrape
from tests.test_plain_ws import plain

Events = list[tuple[str, dict[str, Any]]]
ADD = 'use local__add with {"a": 2, "b": 3}'


@pytest.fixture
def start_guarded(start_server: ServerFactory, tmp_path: Path) -> ServerFactory:
    """A server with the test MCP server's tools, `local__add` (and what `approve` names) guarded."""

    async def start(approve: str = "local__add", **overrides: Any) -> RunningServer:
        settings: dict[str, Any] = {
            "mcp_servers_file": servers_file(tmp_path),
            "tool_approval": approve,
            "offline_chunk_delay_ms": 0,
        }
        settings.update(overrides)
        return await start_server(**settings)

    return start


async def in_session(server: RunningServer, connect: TabFactory, tabs: int = 1) -> tuple[list[Tab], str]:
    first = await connect(server)
    sid = (await first.join())["session"]["session_id"]
    others = [await connect(server) for _ in range(tabs - 1)]
    for tab in others:
        await tab.join(sid)
    return [first, *others], sid


async def ask(tab: Tab, sid: str, text: str = ADD) -> str:
    ack = await tab.call("message", {"session_id": sid, "text": text})
    assert ack["ok"], ack
    turn_id: str = ack["turn_id"]
    return turn_id


async def request_of(tab: Tab, turn_id: str) -> dict[str, Any]:
    found = await tab.wait_for(
        lambda ev: [d for n, d in ev if n == "tool_approval_request" and d["turn_id"] == turn_id]
    )
    request: dict[str, Any] = found[0]
    return request


async def decide(tab: Tab, sid: str, call_id: str, approved: bool, reason: str | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {"session_id": sid, "call_id": call_id, "approved": approved}
    if reason is not None:
        payload["reason"] = reason
    answer: dict[str, Any] = await tab.call("approve_tool", payload)
    return answer


def names(events: Events) -> list[str]:
    return [name for name, _ in events]


def of(events: Events, name: str) -> dict[str, Any]:
    (found,) = [data for event, data in events if event == name]
    return found


async def calls_seen(tab: Tab, sid: str) -> list[str]:
    """What the MCP server ran so far (its `seen_so_far` tool, which needs no approval)."""
    events = await tab.turn(await ask(tab, sid, "use local__seen_so_far with {}"))
    calls: list[str] = of(events, "tool_result")["result"]["calls"]
    return calls


async def stored_tool_events(server: RunningServer, sid: str) -> list[dict[str, Any]]:
    rows = await server.runtime.repo.list_events(sid)
    return [json.loads(r.content) for r in rows if r.event_type.value in ("tool_call", "tool_result")]


# ---------------------------------------------------------------------------------------------- decisions


async def test_an_approved_call_runs_and_every_tab_sees_the_request_and_the_decision(
    start_guarded: ServerFactory, connect: TabFactory
) -> None:
    server = await start_guarded()
    (first, second), sid = await in_session(server, connect, tabs=2)
    turn_id = await ask(first, sid)
    request = await request_of(second, turn_id)
    assert (request["name"], request["args"]) == ("local__add", {"a": 2, "b": 3})
    expires_at = datetime.fromisoformat(request["expires_at"])
    assert timedelta(seconds=290) < expires_at - datetime.now(expires_at.tzinfo) <= timedelta(seconds=300)
    await asyncio.sleep(0.3)
    assert not first.named("tool_result")  # nothing runs while it waits (the server's record, below)

    answer = await decide(second, sid, request["call_id"], True, "fine by me")
    assert answer == {"ok": True, "call_id": request["call_id"], "approved": True}
    for tab in (first, second):
        events = await tab.turn(turn_id)
        assert names(events)[:5] == [
            "user_message",
            "tool_call",
            "tool_approval_request",
            "tool_approval_result",
            "tool_result",
        ]
        decided = of(events, "tool_approval_result")
        assert decided == {
            "session_id": sid,
            "turn_id": turn_id,
            "call_id": request["call_id"],
            "approved": True,
            "reason": "fine by me",
        }
        assert of(events, "tool_result")["result"] == {"sum": 5}
        assert of(events, "done")["finish_reason"] == "stop"
    assert await calls_seen(first, sid) == ["add"]

    call, result = (await stored_tool_events(server, sid))[:2]
    assert call["approval"] == "required" and call["expires_at"] == request["expires_at"]
    assert result["approval"] == {"approved": True, "reason": "fine by me"}
    approvals = (await scrape(server.url)).by_label("realtime_tool_approvals_total", "outcome")
    assert approvals == {"approved": 1, "denied": 0, "timeout": 0}


# A person's reason is theirs, even one that reads like the service's own words.
@pytest.mark.parametrize("reason", ["not today", "timed out", "cancelled"])
async def test_a_denied_call_never_runs_and_the_model_is_told_why(
    start_guarded: ServerFactory, connect: TabFactory, reason: str
) -> None:
    server = await start_guarded()
    (tab,), sid = await in_session(server, connect)
    turn_id = await ask(tab, sid)
    request = await request_of(tab, turn_id)
    answer = await decide(tab, sid, request["call_id"], False, f" {reason} ")
    assert answer == {"ok": True, "call_id": request["call_id"], "approved": False}
    events = await tab.turn(turn_id)
    assert of(events, "tool_approval_result")["approved"] is False
    assert of(events, "tool_approval_result")["reason"] == reason  # trimmed
    assert of(events, "tool_result")["error"] == {
        "code": "tool_denied",
        "message": f"a person denied this call: {reason}",
    }
    assert "tool_denied" in of(events, "done")["text"]  # the offline model answers from the error it was told
    # Decided once: a second decision changes nothing.
    again = await decide(tab, sid, request["call_id"], True)
    assert again["error"]["code"] == "no_pending_approval"
    assert await calls_seen(tab, sid) == []
    result = (await stored_tool_events(server, sid))[1]
    assert result["approval"] == {"approved": False, "reason": reason}
    approvals = (await scrape(server.url)).by_label("realtime_tool_approvals_total", "outcome")
    assert approvals == {"approved": 0, "denied": 1, "timeout": 0}


async def test_nobody_deciding_in_time_is_approval_timeout(start_guarded: ServerFactory, connect: TabFactory) -> None:
    server = await start_guarded(tool_approval_timeout_seconds=0.5)
    (tab,), sid = await in_session(server, connect)
    turn_id = await ask(tab, sid)
    request = await request_of(tab, turn_id)
    events = await tab.turn(turn_id)
    assert of(events, "tool_approval_result") == {
        "session_id": sid,
        "turn_id": turn_id,
        "call_id": request["call_id"],
        "approved": False,
        "reason": "timed out",
    }
    assert of(events, "tool_result")["error"]["code"] == "approval_timeout"
    late = await decide(tab, sid, request["call_id"], True)
    assert late["error"]["code"] == "no_pending_approval"
    assert await calls_seen(tab, sid) == []
    result = (await stored_tool_events(server, sid))[1]
    assert result["approval"] == {"approved": False, "reason": "timed out"}
    approvals = (await scrape(server.url)).by_label("realtime_tool_approvals_total", "outcome")
    assert approvals == {"approved": 0, "denied": 0, "timeout": 1}


async def test_cancel_while_a_call_waits_ends_the_turn_and_the_call_never_runs(
    start_guarded: ServerFactory, connect: TabFactory
) -> None:
    server = await start_guarded()
    (tab,), sid = await in_session(server, connect)
    turn_id = await ask(tab, sid)
    request = await request_of(tab, turn_id)
    assert (await tab.call("cancel", {"session_id": sid}))["ok"]
    events = await tab.turn(turn_id)
    assert "tool_approval_result" not in names(events)
    assert of(events, "tool_result")["error"]["code"] == "cancelled"
    assert of(events, "done")["finish_reason"] == "cancelled"
    late = await decide(tab, sid, request["call_id"], True)
    assert late["error"]["code"] == "no_pending_approval"
    assert await calls_seen(tab, sid) == []
    result = (await stored_tool_events(server, sid))[1]
    assert result["approval"] == {"approved": False, "reason": "cancelled"}
    approvals = (await scrape(server.url)).by_label("realtime_tool_approvals_total", "outcome")
    assert approvals == {"approved": 0, "denied": 0, "timeout": 0}  # a cancel is no decision


async def test_two_tabs_deciding_at_once_one_wins(start_guarded: ServerFactory, connect: TabFactory) -> None:
    server = await start_guarded()
    (first, second), sid = await in_session(server, connect, tabs=2)
    turn_id = await ask(first, sid)
    call_id = (await request_of(first, turn_id))["call_id"]
    answers = await asyncio.gather(decide(first, sid, call_id, True), decide(second, sid, call_id, False))
    winners = [a for a in answers if a["ok"]]
    losers = [a for a in answers if not a["ok"]]
    assert len(winners) == 1 and [a["error"]["code"] for a in losers] == ["no_pending_approval"]
    for tab in (first, second):
        events = await tab.turn(turn_id)
        assert names(events).count("tool_approval_result") == 1
        assert of(events, "tool_approval_result")["approved"] is winners[0]["approved"]


async def test_a_tab_joining_while_a_call_waits_sees_it_and_may_decide(
    start_guarded: ServerFactory, connect: TabFactory
) -> None:
    server = await start_guarded()
    (first,), sid = await in_session(server, connect)
    turn_id = await ask(first, sid)
    request = await request_of(first, turn_id)
    late = await connect(server)
    active = (await late.join(sid))["active_turn"]
    assert active["turn_id"] == turn_id
    assert active["pending_approvals"] == [{k: request[k] for k in ("call_id", "name", "args", "expires_at")}]
    assert (await decide(late, sid, request["call_id"], True))["ok"]
    events = await first.turn(turn_id)
    assert of(events, "tool_result")["result"] == {"sum": 5}
    assert (await late.join(sid))["active_turn"] is None


async def test_a_plain_websocket_client_decides(start_guarded: ServerFactory, connect: TabFactory) -> None:
    server = await start_guarded()
    (tab,), sid = await in_session(server, connect)
    async with plain(server, sid) as client:
        await client.wait_for(lambda f: f[:1])  # its `session` frame: it is in the room
        turn_id = await ask(tab, sid)
        await client.wait_for(lambda f: [d for n, d in f if n == "tool_approval_request"])
        (request,) = [d for n, d in client.frames if n == "tool_approval_request"]
        bad = await client.ack(json.dumps({"event": "approve_tool", "data": {"call_id": request["call_id"]}}))
        assert bad["ok"] is False and bad["error"]["code"] == "invalid_payload"
        sent = {"event": "approve_tool", "data": {"call_id": request["call_id"], "approved": True}}
        answer = await client.ack(json.dumps(sent))
        assert answer == {"request": "approve_tool", "ok": True, "call_id": request["call_id"], "approved": True}
        frames = await client.turn(turn_id)
        assert "tool_approval_result" in [n for n, _ in frames]
    events = await tab.turn(turn_id)
    assert of(events, "tool_result")["result"] == {"sum": 5}


async def test_a_tool_not_listed_runs_at_once_and_patterns_match_offered_names(
    start_guarded: ServerFactory, connect: TabFactory
) -> None:
    server = await start_guarded(approve="local__a*, get_weather")
    (tab,), sid = await in_session(server, connect)
    events = await tab.turn(await ask(tab, sid, 'use local__echo with {"text": "hi"}'))
    assert "tool_approval_request" not in names(events) and of(events, "tool_result")["result"] == "hi"
    turn_id = await ask(tab, sid)  # local__add matches local__a*
    await request_of(tab, turn_id)
    assert (await tab.call("cancel", {"session_id": sid}))["ok"]


async def test_approve_tool_refusals_in_the_contracts_order_and_not_against_the_message_limit(
    start_guarded: ServerFactory, connect: TabFactory
) -> None:
    server = await start_guarded(message_rate_limit=1)
    (tab,), sid = await in_session(server, connect)
    stranger = await connect(server)
    cases: list[tuple[Tab, Any, str]] = [
        (tab, {"session_id": sid, "call_id": "c", "approved": "yes"}, "invalid_payload"),
        (tab, {"session_id": sid, "approved": True}, "invalid_payload"),
        (tab, {"session_id": "nope", "call_id": "c", "approved": True}, "invalid_session_id"),
        (stranger, {"session_id": sid, "call_id": "c", "approved": True}, "not_joined"),
        (tab, {"session_id": sid, "call_id": "unknown", "approved": True}, "no_pending_approval"),
    ]
    for client, payload, code in cases * 3:  # more than the message limit allows: not counted
        answer = await client.call("approve_tool", payload)
        assert answer["ok"] is False and answer["error"]["code"] == code, (payload, answer)
    turn_id = await ask(tab, sid)  # the one message of the minute is still there
    request = await request_of(tab, turn_id)
    assert (await decide(tab, sid, request["call_id"], True))["ok"]
    await tab.turn(turn_id)


# ---------------------------------------------------------------------------------------------- model shapes


async def test_parallel_calls_are_each_decided_and_a_call_without_approval_runs_at_once(
    fake_openai: FakeOpenAI, start_guarded: ServerFactory, connect: TabFactory
) -> None:
    fake_openai.stream(
        OpenAIReply(
            events=[
                tool_calls_chunk(
                    call_delta(0, "c_add", "local__add", '{"a": 1, "b": 1}'),
                    call_delta(1, "c_echo", "local__echo", '{"text": "now"}'),
                    call_delta(2, "c_add2", "local__add", '{"a": 2, "b": 2}'),
                    call_delta(3, "c_bad", "local__add", '{"a": '),
                ),
                finish_chunk("tool_calls"),
            ]
        ),
        text_reply("Done with all four."),
    )
    server = await start_guarded(
        llm_provider="openai", openai_base_url=f"{fake_openai.url}/v1", openai_model="m", title_generation=False
    )
    (tab,), sid = await in_session(server, connect)
    turn_id = await ask(tab, sid, "Add things")
    await tab.wait_for(lambda ev: len([n for n, _ in ev if n == "tool_approval_request"]) == 2)
    requests = [d["call_id"] for d in tab.named("tool_approval_request")]
    assert requests == ["c_add", "c_add2"]  # not the call whose arguments cannot be read
    assert await calls_seen_elsewhere(server, connect, fake_openai) == ["echo"]  # ran at once, while two wait
    assert (await decide(tab, sid, "c_add2", True))["ok"]
    assert (await decide(tab, sid, "c_add", False))["ok"]
    events = await tab.turn(turn_id)
    results = {d["call_id"]: d for n, d in events if n == "tool_result"}
    assert results["c_echo"]["result"] == "now"
    assert results["c_add2"]["result"] == {"sum": 4}
    assert results["c_add"]["error"]["code"] == "tool_denied"
    assert results["c_bad"]["error"]["code"] == "invalid_arguments"
    assert of(events, "done")["text"] == "Done with all four."
    # The next model request waited for every result.
    (after,) = [r for r in fake_openai.requests if any(m.get("tool_call_id") == "c_add" for m in r.messages)]
    tools = [m for m in after.messages if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tools] == ["c_add", "c_echo", "c_add2", "c_bad"]


async def test_deleting_the_session_or_shutting_down_while_a_call_waits_never_runs_it(
    start_guarded: ServerFactory, connect: TabFactory
) -> None:
    server = await start_guarded()
    (tab,), sid = await in_session(server, connect)
    turn_id = await ask(tab, sid)
    request = await request_of(tab, turn_id)
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.delete(f"/api/sessions/{sid}")).status_code == 204
    events = await tab.turn(turn_id)
    assert of(events, "done")["finish_reason"] == "cancelled"
    assert "tool_approval_result" not in names(events)
    await tab.wait_for(lambda ev: any(n == "session_deleted" for n, _ in ev))
    late = await decide(tab, sid, request["call_id"], True)
    assert late["error"]["code"] == "session_deleted"

    (other,), second = await in_session(server, connect)
    turn_id = await ask(other, second)
    request = await request_of(other, turn_id)
    assert await calls_seen_elsewhere(server, connect) == []  # the deleted session's call never ran
    await server.stop()  # shutdown while the call waits
    done = of(await other.turn(turn_id), "done")
    assert (done["finish_reason"], done["error"]["code"]) == ("error", "shutdown")
    with sqlite3.connect(server.settings.sqlite_path) as db:  # the server has closed its own
        rows = db.execute("SELECT content FROM events WHERE session_id = ? ORDER BY event_id", (second,)).fetchall()
    assert json.loads(rows[-2][0]) == {
        "call_id": request["call_id"],
        "name": "local__add",
        "error": {"code": "cancelled", "message": "the turn was stopped"},
        "approval": {"approved": False, "reason": "cancelled"},
    }


async def calls_seen_elsewhere(
    server: RunningServer, connect: TabFactory, fake_openai: FakeOpenAI | None = None
) -> list[str]:
    """What the MCP server ran so far, asked in a session of its own (so while another turn runs).
    With the OpenAI stand-in as the model, its next two answers are made to ask it, ahead of the rest."""
    if fake_openai is not None:
        fake_openai.stream_replies.appendleft(text_reply("Seen."))
        fake_openai.stream_replies.appendleft(call_reply(("c_seen", "local__seen_so_far", {})))
    (tab,), sid = await in_session(server, connect)
    return await calls_seen(tab, sid)


async def test_a_cancel_keeps_the_result_of_a_call_that_ran_while_another_waited(
    fake_openai: FakeOpenAI, start_guarded: ServerFactory, connect: TabFactory
) -> None:
    fake_openai.stream(
        OpenAIReply(
            events=[
                tool_calls_chunk(
                    call_delta(0, "c_add", "local__add", '{"a": 1, "b": 1}'),
                    call_delta(1, "c_echo", "local__echo", '{"text": "ran"}'),
                ),
                finish_chunk("tool_calls"),
            ]
        )
    )
    server = await start_guarded(
        llm_provider="openai", openai_base_url=f"{fake_openai.url}/v1", openai_model="m", title_generation=False
    )
    (tab,), sid = await in_session(server, connect)
    turn_id = await ask(tab, sid, "Add and echo")
    await request_of(tab, turn_id)
    assert await calls_seen_elsewhere(server, connect, fake_openai) == ["echo"]
    assert (await tab.call("cancel", {"session_id": sid}))["ok"]
    events = await tab.turn(turn_id)
    results = {d["call_id"]: d for n, d in events if n == "tool_result"}
    assert results["c_add"]["error"]["code"] == "cancelled"
    assert results["c_echo"]["result"] == "ran" and results["c_echo"]["error"] is None  # it ran: not "cancelled"
