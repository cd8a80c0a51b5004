"""Every error code that needs no authentication, their order, and that a refusal changes nothing."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from typing import Any

import pytest
import socketio

from tests.conftest import ServerFactory, TabFactory
from tests.harness import RunningServer, Tab


async def chats_normally(tab: Tab, sid: str, text: str = "still fine") -> None:
    """The socket can still send a message and see its turn through."""
    ack = await tab.call("message", {"session_id": sid, "text": text})
    assert ack["ok"], ack
    await tab.turn(ack["turn_id"])


def error_code(ack: dict[str, Any]) -> str:
    assert ack["ok"] is False and set(ack) == {"ok", "error"}, ack
    assert set(ack["error"]) == {"code", "message"} and ack["error"]["message"], ack
    code: str = ack["error"]["code"]
    return code


async def stored_count(server: RunningServer, session_id: str) -> int:
    return len(await server.runtime.repo.list_events(session_id))


async def joined_tab(server: RunningServer, connect: TabFactory, transport: str = "websocket") -> tuple[Tab, str]:
    tab = await connect(server, transport)
    session_id: str = (await tab.join())["session"]["session_id"]
    return tab, session_id


NOT_AN_OBJECT = ["text", 42, 4.2, True, None, ["session_id"], []]


@pytest.mark.parametrize("event", ["join", "message", "cancel", "leave"])
async def test_a_payload_that_is_not_an_object_is_invalid(
    server: RunningServer, connect: TabFactory, transport: str, event: str
) -> None:
    tab, sid = await joined_tab(server, connect, transport)
    for payload in NOT_AN_OBJECT:
        assert error_code(await tab.call(event, payload)) == "invalid_payload", payload
    assert error_code(await tab.call(event)) == "invalid_payload"  # no payload at all
    assert error_code(await tab.call(event, {"session_id": sid}, {"extra": 1})) == "invalid_payload"
    assert await stored_count(server, sid) == 0
    assert tab.client.connected


@pytest.mark.parametrize(
    ("event", "payload"),
    [
        ("join", {"session_id": 7}),
        ("join", {"user_id": ["u"]}),
        ("join", {"after_event_id": "3"}),
        ("join", {"after_event_id": True}),
        ("join", {"after_event_id": 1.5}),
        ("join", {"after_event_id": 2**70}),
        ("message", {"text": "hi"}),
        ("message", {"session_id": "SID"}),
        ("message", {"session_id": "SID", "text": 5}),
        ("message", {"session_id": "SID", "text": ["hi"]}),
        ("message", {"session_id": "SID", "text": "hi", "client_message_id": 9}),
        ("message", {"session_id": "SID", "text": "lone \ud800 surrogate"}),
        ("message", {"session_id": None, "text": "hi"}),
        ("cancel", {}),
        ("cancel", {"session_id": 1}),
        ("leave", {"session_id": {"id": "SID"}}),
    ],
)
async def test_missing_or_mistyped_fields_are_invalid(
    server: RunningServer, connect: TabFactory, event: str, payload: dict[str, Any]
) -> None:
    tab, sid = await joined_tab(server, connect)
    payload = {k: (sid if v == "SID" else v) for k, v in payload.items()}
    assert error_code(await tab.call(event, payload)) == "invalid_payload"
    assert await stored_count(server, sid) == 0
    # Unknown fields are ignored, so the same socket still works normally.
    ack = await tab.call("message", {"session_id": sid, "text": "still fine", "unknown": {"x": 1}})
    assert ack["ok"], ack
    await tab.turn(ack["turn_id"])


@pytest.mark.parametrize("event", ["join", "message", "cancel", "leave"])
async def test_a_session_id_that_is_not_a_uuid_is_refused(
    server: RunningServer, connect: TabFactory, event: str
) -> None:
    tab, _ = await joined_tab(server, connect)
    for bad in ["", "abc", "12345678-1234-1234-1234-12345678901Z", "../etc/passwd", "a" * 300]:
        ack = await tab.call(event, {"session_id": bad, "text": ""})
        assert error_code(ack) == "invalid_session_id", (bad, ack)


async def test_message_and_cancel_need_a_joined_session(server: RunningServer, connect: TabFactory) -> None:
    owner, sid = await joined_tab(server, connect)
    stranger = await connect(server)
    assert error_code(await stranger.call("message", {"session_id": sid, "text": "hi"})) == "not_joined"
    assert error_code(await stranger.call("cancel", {"session_id": sid})) == "not_joined"
    unknown = str(uuid.uuid4())
    assert error_code(await stranger.call("message", {"session_id": unknown, "text": "hi"})) == "not_joined"
    # Leaving a session one is not in is harmless.
    assert await stranger.call("leave", {"session_id": sid}) == {"ok": True}
    assert await stored_count(server, sid) == 0
    assert not stranger.events and await server.runtime.repo.get_session(unknown) is None
    # After leaving, the owner is not in the session any more either.
    assert await owner.call("leave", {"session_id": sid}) == {"ok": True}
    assert error_code(await owner.call("message", {"session_id": sid, "text": "hi"})) == "not_joined"


async def test_empty_and_too_long_messages(start_server: ServerFactory, connect: TabFactory) -> None:
    server = await start_server(max_message_chars=20)
    tab, sid = await joined_tab(server, connect)
    for empty in ["", "   ", "\n\t \u3000"]:
        assert error_code(await tab.call("message", {"session_id": sid, "text": empty})) == "empty_message"
    too_long = await tab.call("message", {"session_id": sid, "text": "x" * 21})
    assert error_code(too_long) == "message_too_long" and "20" in too_long["error"]["message"]
    assert await stored_count(server, sid) == 0
    await chats_normally(tab, sid, "x" * 20)


async def test_busy_while_a_turn_runs_and_no_active_turn_without_one(
    start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await start_server(offline_chunk_delay_ms=20)
    tab, sid = await joined_tab(server, connect)
    other = await connect(server, "polling")
    await other.join(sid)
    assert error_code(await tab.call("cancel", {"session_id": sid})) == "no_active_turn"
    ack = await tab.call("message", {"session_id": sid, "text": "first"})
    busy = await other.call("message", {"session_id": sid, "text": "second"})
    assert error_code(busy) == "busy"
    await tab.turn(ack["turn_id"])
    assert error_code(await tab.call("cancel", {"session_id": sid})) == "no_active_turn"
    history = await server.runtime.repo.list_events(sid)
    assert [e.content for e in history if e.event_type == "user_message"] == ["first"]
    assert len(other.named("user_message")) == 1


async def test_rate_limit_counts_accepted_messages_per_socket(start_server: ServerFactory, connect: TabFactory) -> None:
    server = await start_server(message_rate_limit=2, offline_chunk_delay_ms=0)
    tab, sid = await joined_tab(server, connect)
    _, other_sid = await joined_tab(server, connect)
    await tab.join(other_sid)
    # Refused messages do not count...
    assert error_code(await tab.call("message", {"session_id": sid, "text": " "})) == "empty_message"
    first = await tab.call("message", {"session_id": sid, "text": "one", "client_message_id": "a"})
    await tab.turn(first["turn_id"])
    # ...nor do retries of an accepted message.
    assert await tab.call("message", {"session_id": sid, "text": "one", "client_message_id": "a"}) == first
    second = await tab.call("message", {"session_id": other_sid, "text": "two"})  # over all its sessions
    await tab.turn(second["turn_id"])
    limited = await tab.call("message", {"session_id": sid, "text": "three"})
    assert error_code(limited) == "rate_limited"
    # Another socket has its own budget.
    fresh = await connect(server)
    await fresh.join(sid)
    assert (await fresh.call("message", {"session_id": sid, "text": "mine"}))["ok"]


async def test_errors_are_answered_in_the_contract_order(start_server: ServerFactory, connect: TabFactory) -> None:
    server = await start_server(message_rate_limit=1, max_message_chars=10, offline_chunk_delay_ms=20)
    tab, sid = await joined_tab(server, connect)
    stranger = await connect(server)
    # invalid_payload before invalid_session_id
    assert error_code(await tab.call("message", {"session_id": "nope", "text": 3})) == "invalid_payload"
    # invalid_session_id before not_joined / empty_message
    assert error_code(await stranger.call("message", {"session_id": "nope", "text": ""})) == "invalid_session_id"
    # not_joined before empty_message / message_too_long
    assert error_code(await stranger.call("message", {"session_id": sid, "text": ""})) == "not_joined"
    assert error_code(await stranger.call("message", {"session_id": sid, "text": "x" * 11})) == "not_joined"
    # not_joined before no_active_turn
    assert error_code(await stranger.call("cancel", {"session_id": sid})) == "not_joined"
    ack = await tab.call("message", {"session_id": sid, "text": "go"})
    assert ack["ok"]
    # message_too_long before rate_limited and busy; rate_limited before busy
    assert error_code(await tab.call("message", {"session_id": sid, "text": "x" * 11})) == "message_too_long"
    assert error_code(await tab.call("message", {"session_id": sid, "text": "again"})) == "rate_limited"
    await tab.turn(ack["turn_id"])


async def test_unknown_events_are_ignored_and_the_socket_stays(server: RunningServer, connect: TabFactory) -> None:
    tab, sid = await joined_tab(server, connect)
    await tab.client.emit("no_such_event", {"session_id": sid})
    await tab.client.emit("connect", {"x": 1})
    with pytest.raises(socketio.exceptions.TimeoutError):
        await tab.call("no_such_event", {"a": 1}, timeout=0.5)  # no answer: the contract does not define it
    assert tab.client.connected
    await chats_normally(tab, sid)


async def test_storage_unavailable_refuses_and_stores_nothing_then_recovers(
    start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await start_server(storage_retry_seconds=0.6)
    tab, sid = await joined_tab(server, connect)

    blocker = sqlite3.connect(server.settings.sqlite_path, isolation_level=None, check_same_thread=False)
    await asyncio.to_thread(blocker.execute, "BEGIN EXCLUSIVE")  # a real lock: every write now times out
    try:
        refused = await tab.call("message", {"session_id": sid, "text": "during the outage", "client_message_id": "o"})
        assert error_code(refused) == "unavailable"
        assert error_code(await tab.call("join", {})) == "unavailable"  # creating a session is a write
        assert not tab.named("user_message")
        # The refused message did not take the session's turn.
        assert await server.runtime.coordination.running_turn(sid) is None
    finally:
        await asyncio.to_thread(blocker.execute, "ROLLBACK")
        blocker.close()

    retried = await tab.call("message", {"session_id": sid, "text": "during the outage", "client_message_id": "o"})
    assert retried["ok"] and isinstance(retried["event_id"], int)
    await tab.turn(retried["turn_id"])
    history = await server.runtime.repo.list_events(sid)
    assert [e.content for e in history if e.event_type == "user_message"] == ["during the outage"]


async def test_client_events_named_like_lifecycle_events_change_nothing(
    server: RunningServer, connect: TabFactory
) -> None:
    """python-socketio hands a client's `connect`/`disconnect` *events* to the lifecycle handlers."""
    tab, sid = await joined_tab(server, connect)
    other = await connect(server)
    await other.join(sid)
    for name in ("disconnect", "connect"):
        await tab.client.emit(name)
        await tab.client.emit(name, {"session_id": sid})
        await tab.client.emit(name, "transport close")
    # Answered after those events were read (a socket's events are handled in order).
    assert (await tab.call("join", {"session_id": sid}))["ok"]
    # Still counted in, still in the room, still allowed to talk.
    assert await server.runtime.coordination.member_count(sid) == 2
    assert other.named("presence")[-1]["clients"] == 2
    ack = await tab.call("message", {"session_id": sid, "text": "still joined"})
    assert ack["ok"], ack
    assert (await other.turn(ack["turn_id"]))[-1][0] == "done"
