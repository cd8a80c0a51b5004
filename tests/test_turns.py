"""A turn end to end over real sockets: events, fields, storage, tabs, tools, cancel, catch-up."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime
from typing import Any

import httpx
import pytest

from server.providers.offline import echo_answer
from tests.conftest import ServerFactory, TabFactory
from tests.fakes import SLOW_SECONDS, open_meteo_app
from tests.harness import RunningServer, Tab, free_port, serving, wait_for_summary

Events = list[tuple[str, dict[str, Any]]]


def assert_well_formed_turn(events: Events, session_id: str, turn_id: str) -> dict[str, Any]:
    """One user_message, then chunks and tools in order, then exactly one done; returns the done."""
    names = [name for name, _ in events]
    assert names[0] == "user_message"
    assert names.count("user_message") == 1
    assert names.count("done") == 1 and names[-1] == "done"
    for _, data in events:
        assert data["session_id"] == session_id and data["turn_id"] == turn_id
    chunks = [data for name, data in events if name == "chunk"]
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    assert all(set(c) == {"session_id", "turn_id", "index", "text"} for c in chunks)
    assert all(isinstance(c["index"], int) and isinstance(c["text"], str) and c["text"] for c in chunks)
    done = events[-1][1]
    assert "".join(c["text"] for c in chunks) == done["text"]
    assert set(done) == {"session_id", "turn_id", "text", "finish_reason", "usage", "event_id", "error"}
    return done


async def start_turn(tab: Tab, session_id: str, text: str, **extra: Any) -> dict[str, Any]:
    ack: dict[str, Any] = await tab.call("message", {"session_id": session_id, "text": text, **extra})
    assert ack["ok"], ack
    return ack


async def whole_turn(tab: Tab, session_id: str, text: str) -> tuple[Events, dict[str, Any]]:
    """Send a message and wait for its turn: every event of it, and its well-formed `done`."""
    ack = await start_turn(tab, session_id, text)
    events = await tab.turn(ack["turn_id"])
    return events, assert_well_formed_turn(events, session_id, ack["turn_id"])


async def test_a_turn_streams_every_event_with_every_field(
    server: RunningServer, connect: TabFactory, transport: str, http: httpx.AsyncClient
) -> None:
    tab = await connect(server, transport)
    joined = await tab.join(user_id="ada")
    session = joined["session"]
    sid = session["session_id"]
    assert uuid.UUID(sid)
    assert session["user_id"] == "ada" and session["summary"] is None and session["end_time"] is None
    assert datetime.fromisoformat(session["start_time"]).tzinfo is not None
    assert joined["history"] == [] and joined["active_turn"] is None

    ack = await start_turn(tab, sid, "hello there", client_message_id="m-1")
    assert set(ack) == {"ok", "turn_id", "event_id"} and isinstance(ack["event_id"], int)
    events = await tab.turn(ack["turn_id"])
    done = assert_well_formed_turn(events, sid, ack["turn_id"])

    user_message = events[0][1]
    assert user_message == {
        "session_id": sid,
        "turn_id": ack["turn_id"],
        "event_id": ack["event_id"],
        "text": "hello there",
        "client_message_id": "m-1",
        "attachments": [],
    }
    assert done["finish_reason"] == "stop" and done["error"] is None
    assert "not an LLM" in done["text"] and len(done["text"].split()) >= 12
    assert len([n for n, _ in events if n == "chunk"]) == len(done["text"].split())  # a word at a time
    assert done["usage"]["input_tokens"] > 0 and done["usage"]["output_tokens"] > 0
    assert isinstance(done["event_id"], int) and done["event_id"] > ack["event_id"]

    stored = (await http.get(f"/api/sessions/{sid}/events")).json()["events"]
    assert [(e["event_id"], e["event_type"], e["content"]) for e in stored] == [
        (ack["event_id"], "user_message", "hello there"),
        (done["event_id"], "ai_message", done["text"]),
    ]
    assert all(datetime.fromisoformat(e["timestamp"]).tzinfo is not None for e in stored)
    assert tab.named("presence") == [{"session_id": sid, "clients": 1}]


async def test_the_offline_scripts_input_tokens_are_every_word_of_the_conversation(
    start_server: ServerFactory, connect: TabFactory
) -> None:
    """The script counts a turn's prompt from where the last turn's count ended (O(new items)): the
    total must still be the whole conversation's, turn after turn, and after a restart that builds
    the conversation again from storage."""
    server = await start_server()
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    words = 0
    for text in ("one two three", "four five", "six seven eight nine", "ten"):
        _, done = await whole_turn(tab, sid, text)
        words += len(text.split())
        assert done["usage"]["input_tokens"] == words
        words += len(done["text"].split())
    await tab.close()
    await server.stop()

    restarted = await start_server(sqlite_path=server.settings.sqlite_path)
    tab = await connect(restarted)
    assert len((await tab.join(sid))["history"]) == 8
    _, done = await whole_turn(tab, sid, "after the restart")
    assert done["usage"]["input_tokens"] == words + 3


async def test_two_tabs_see_the_same_turn_and_presence(server: RunningServer, connect: TabFactory) -> None:
    first = await connect(server, "websocket")
    second = await connect(server, "polling")
    sid = (await first.join())["session"]["session_id"]
    joined = await second.join(sid)
    assert joined["session"]["session_id"] == sid
    await first.wait_for(lambda _: first.named("presence")[-1]["clients"] == 2)
    assert second.named("presence") == [{"session_id": sid, "clients": 2}]

    ack = await start_turn(second, sid, "same stream for both tabs please")
    seen_by_first = await first.turn(ack["turn_id"])
    seen_by_second = await second.turn(ack["turn_id"])
    assert seen_by_first == seen_by_second
    assert_well_formed_turn(seen_by_first, sid, ack["turn_id"])

    # Joining a room the socket is already in changes nothing.
    await second.join(sid)
    assert await server.runtime.coordination.member_count(sid) == 2
    assert len(second.named("presence")) == 1

    assert (await second.call("leave", {"session_id": sid})) == {"ok": True}
    await first.wait_for(lambda _: first.named("presence")[-1]["clients"] == 1)
    await second.close()
    ack = await start_turn(first, sid, "only one tab now")
    await first.turn(ack["turn_id"])
    assert not [d for n, d in second.events if d.get("turn_id") == ack["turn_id"]]


async def test_disconnect_leaves_every_joined_session(server: RunningServer, connect: TabFactory) -> None:
    watcher_a, watcher_b, leaver = [await connect(server) for _ in range(3)]
    sid_a = (await watcher_a.join())["session"]["session_id"]
    sid_b = (await watcher_b.join())["session"]["session_id"]
    await leaver.join(sid_a)
    await leaver.join(sid_b)
    await leaver.close()
    await watcher_a.wait_for(lambda _: watcher_a.named("presence")[-1] == {"session_id": sid_a, "clients": 1})
    await watcher_b.wait_for(lambda _: watcher_b.named("presence")[-1] == {"session_id": sid_b, "clients": 1})


async def test_join_with_an_unknown_uuid_creates_that_session(
    server: RunningServer, connect: TabFactory, http: httpx.AsyncClient
) -> None:
    tab = await connect(server)
    wanted = str(uuid.uuid4())
    joined = await tab.join(wanted.upper(), user_id="grace")
    assert joined["session"]["session_id"] == wanted  # canonical form
    body = (await http.get(f"/api/sessions/{wanted}")).json()
    assert body == joined["session"]
    assert set(body) == {
        "session_id",
        "user_id",
        "start_time",
        "end_time",
        "summary",
        "duration_seconds",
        "title",
        "updated_at",
    }


async def test_weather_tool_call_and_result(
    server: RunningServer, connect: TabFactory, http: httpx.AsyncClient
) -> None:
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    events, done = await whole_turn(tab, sid, "How's the weather in Delhi?")
    names = [n for n, _ in events]
    assert names[:3] == ["user_message", "tool_call", "tool_result"]
    call, result = events[1][1], events[2][1]
    assert call["name"] == "get_weather" and call["args"] == {"location": "Delhi"} and call["call_id"]
    assert result["call_id"] == call["call_id"] and result["name"] == "get_weather" and result["error"] is None
    assert result["result"]["location"] == "Delhi" and result["result"]["temperature_c"] == 24.5
    assert result["result"]["conditions"] == "mainly clear"
    assert "Delhi" in done["text"] and "24.5" in done["text"] and done["finish_reason"] == "stop"

    stored = (await http.get(f"/api/sessions/{sid}/events")).json()["events"]
    assert [e["event_type"] for e in stored] == ["user_message", "tool_call", "tool_result", "ai_message"]
    assert json.loads(stored[1]["content"]) == {"call_id": call["call_id"], "name": "get_weather", "args": call["args"]}
    stored_result = json.loads(stored[2]["content"])
    assert stored_result["call_id"] == call["call_id"] and stored_result["result"] == result["result"]


async def test_weather_for_an_unknown_place_is_a_tool_error_and_the_turn_goes_on(
    server: RunningServer, connect: TabFactory
) -> None:
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    events, done = await whole_turn(tab, sid, "what is the weather in Atlantis?")
    result = next(d for n, d in events if n == "tool_result")
    assert result["result"] is None and result["error"]["code"] == "unknown_location"
    assert "Atlantis" in result["error"]["message"]
    assert done["finish_reason"] == "stop" and "could not answer for Atlantis" in done["text"]


async def test_a_place_found_without_coordinates_is_a_tool_error(server: RunningServer, connect: TabFactory) -> None:
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    events, done = await whole_turn(tab, sid, "How's the weather in Nullplace?")
    result = next(d for n, d in events if n == "tool_result")
    assert result["result"] is None
    assert result["error"] == {
        "code": "weather_unavailable",
        "message": "the weather service sent a place without coordinates",
    }
    assert done["finish_reason"] == "stop" and done["error"] is None


async def test_weather_arguments_off_its_schema_are_invalid_arguments_and_the_service_is_not_asked(
    start_server: ServerFactory, connect: TabFactory
) -> None:
    open_meteo = open_meteo_app()
    async with serving(open_meteo) as url:
        server = await start_server(weather_geocoding_url=url, weather_forecast_url=url)
        tab = await connect(server)
        sid = (await tab.join())["session"]["session_id"]
        for args, where in (({"location": "  "}, "(location)"), ({"location": 5}, "(location)"), ({}, "'location'")):
            events, done = await whole_turn(tab, sid, f"use get_weather with {json.dumps(args)}")
            result = next(d for n, d in events if n == "tool_result")
            assert result["result"] is None and result["error"]["code"] == "invalid_arguments", result
            assert result["error"]["message"].startswith("invalid arguments for get_weather")
            assert where in result["error"]["message"], result
            assert done["finish_reason"] == "stop" and done["error"] is None
        events, _ = await whole_turn(tab, sid, 'use get_weather with {"location": " Paris "}')
        assert next(d for n, d in events if n == "tool_result")["result"]["location"] == "Paris"
    assert [request[0] for request in open_meteo.state.requests] == ["search", "forecast"]


async def test_weather_service_unreachable_is_a_tool_error(start_server: ServerFactory, connect: TabFactory) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    server = await start_server(weather_geocoding_url=dead, weather_forecast_url=dead)
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    events, done = await whole_turn(tab, sid, "How's the weather in Paris?")
    result = next(d for n, d in events if n == "tool_result")
    assert result["error"] == {"code": "weather_unavailable", "message": "the weather service could not be reached"}
    assert done["finish_reason"] == "stop" and done["error"] is None


async def test_every_offline_tool_call_has_an_id_of_its_own(
    server: RunningServer, connect: TabFactory, http: httpx.AsyncClient
) -> None:
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    calls = []
    for place in ("Delhi", "Paris", "Delhi"):
        events, _ = await whole_turn(tab, sid, f"How's the weather in {place}?")
        calls += [d["call_id"] for n, d in events if n == "tool_call"]
    assert len(calls) == 3 and len(set(calls)) == 3, calls
    stored = (await http.get(f"/api/sessions/{sid}/events")).json()["events"]
    stored_calls = [json.loads(e["content"])["call_id"] for e in stored if e["event_type"] == "tool_call"]
    assert stored_calls == calls


async def test_each_tool_failure_logs_one_warning_without_the_arguments(
    start_server: ServerFactory, connect: TabFactory, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    server = await start_server(weather_geocoding_url=dead, weather_forecast_url=dead)
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    with caplog.at_level(logging.WARNING, logger="server"):
        await whole_turn(tab, sid, "How's the weather in Zanzibarville?")
        await whole_turn(tab, sid, "How's the weather in Zanzibarville?")
    failures = [r for r in caplog.records if "tool get_weather failed" in r.getMessage()]
    assert [r.levelno for r in failures] == [logging.WARNING, logging.WARNING]
    assert all("weather_unavailable (ConnectError)" in r.getMessage() for r in failures)
    assert "Zanzibarville" not in caplog.text


async def test_cancel_mid_turn_stores_the_partial_text(
    start_server: ServerFactory, connect: TabFactory, transport: str
) -> None:
    server = await start_server(offline_chunk_delay_ms=30)
    tab = await connect(server, transport)
    other = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    await other.join(sid)
    ack = await start_turn(tab, sid, "tell me something long")
    await tab.wait_for(lambda _: len(tab.named("chunk")) >= 3)
    cancelled = await other.call("cancel", {"session_id": sid})
    assert cancelled == {"ok": True, "turn_id": ack["turn_id"]}
    events = await tab.turn(ack["turn_id"])
    done = assert_well_formed_turn(events, sid, ack["turn_id"])
    assert done["finish_reason"] == "cancelled" and done["error"] is None
    full = echo_answer("tell me something long")
    assert len(done["text"]) >= len("[offline scripted ") and full.startswith(done["text"])
    assert len(done["text"]) < len(full)
    assert await other.turn(ack["turn_id"]) == events

    history = (await tab.join(sid))["history"]
    assert history[-1]["event_type"] == "ai_message" and history[-1]["content"] == done["text"]
    assert history[-1]["event_id"] == done["event_id"]
    # The session is free again.
    again = await start_turn(tab, sid, "and now?")
    assert (await tab.turn(again["turn_id"]))[-1][1]["finish_reason"] == "stop"


async def test_cancel_while_a_tool_runs_answers_the_call_and_stops(server: RunningServer, connect: TabFactory) -> None:
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    ack = await start_turn(tab, sid, "How's the weather in Slowtown?")
    await tab.wait_for(lambda _: tab.named("tool_call"))
    assert (await tab.call("cancel", {"session_id": sid}))["ok"]
    events = await tab.turn(ack["turn_id"], timeout=SLOW_SECONDS - 1)  # not waiting for the tool
    done = assert_well_formed_turn(events, sid, ack["turn_id"])
    assert [n for n, _ in events] == ["user_message", "tool_call", "tool_result", "done"]
    result = events[2][1]
    assert result["call_id"] == events[1][1]["call_id"] and result["error"]["code"] == "cancelled"
    assert done["finish_reason"] == "cancelled" and done["text"] == ""
    history = (await tab.join(sid))["history"]
    # Every stored call has its stored result, so the history stays valid for a model.
    assert [e["event_type"] for e in history] == ["user_message", "tool_call", "tool_result", "ai_message"]


async def test_a_tab_joining_mid_turn_catches_up(start_server: ServerFactory, connect: TabFactory) -> None:
    server = await start_server(offline_chunk_delay_ms=25)
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    ack = await start_turn(tab, sid, "a long enough answer for a late tab")
    await tab.wait_for(lambda _: len(tab.named("chunk")) >= 4)
    late = await connect(server, "polling")
    joined = await late.join(sid)
    active = joined["active_turn"]
    assert active["turn_id"] == ack["turn_id"] and active["next_index"] >= 4
    assert [e["event_type"] for e in joined["history"]] == ["user_message"]
    done = (await late.turn(ack["turn_id"]))[-1][1]
    live = [c for c in late.named("chunk") if c["index"] >= active["next_index"]]
    assert [c["index"] for c in live] == list(range(active["next_index"], active["next_index"] + len(live)))
    assert active["text"] + "".join(c["text"] for c in live) == done["text"]


async def test_history_replays_after_an_event_id(server: RunningServer, connect: TabFactory) -> None:
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    first = await start_turn(tab, sid, "first message")
    first_done = (await tab.turn(first["turn_id"]))[-1][1]
    second = await start_turn(tab, sid, "second message")
    second_done = (await tab.turn(second["turn_id"]))[-1][1]

    reloaded = await connect(server)
    full = (await reloaded.join(sid))["history"]
    assert [e["event_id"] for e in full] == [
        first["event_id"],
        first_done["event_id"],
        second["event_id"],
        second_done["event_id"],
    ]
    assert [e["content"] for e in full][::2] == ["first message", "second message"]
    assert set(full[0]) == {"event_id", "event_type", "content", "timestamp", "attachments"}  # a user message

    tail = (await reloaded.join(sid, after_event_id=first_done["event_id"]))["history"]
    assert [e["event_id"] for e in tail] == [second["event_id"], second_done["event_id"]]
    assert (await reloaded.join(sid, after_event_id=second_done["event_id"]))["history"] == []


async def test_a_retried_message_is_stored_once_and_answered_like_the_first(
    start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await start_server(offline_chunk_delay_ms=10)
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    payload = {"session_id": sid, "text": "exactly once", "client_message_id": "retry-me"}
    first = await tab.call("message", payload)
    during = await tab.call("message", payload)  # while its turn runs: not busy, the same answer
    assert first["ok"] and during == first
    await tab.turn(first["turn_id"])
    after = await tab.call("message", payload)
    assert after == first
    history = (await tab.join(sid))["history"]
    assert [e["event_type"] for e in history] == ["user_message", "ai_message"]
    assert len(tab.named("done")) == 1 and len(tab.named("user_message")) == 1

    # The same id in another session is another message.
    other_sid = (await tab.join())["session"]["session_id"]
    elsewhere = await tab.call("message", {**payload, "session_id": other_sid})
    assert elsewhere["ok"] and elsewhere["turn_id"] != first["turn_id"]
    await tab.turn(elsewhere["turn_id"])


async def test_a_turn_goes_on_when_its_last_tab_leaves(start_server: ServerFactory, connect: TabFactory) -> None:
    server = await start_server(offline_chunk_delay_ms=15, summary_delay_seconds=0.05)
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    ack = await start_turn(tab, sid, "keep going without me")
    await tab.wait_for(lambda _: tab.named("chunk"))
    await tab.close()

    session = await wait_for_summary(server, sid)
    stored = await server.runtime.repo.list_events(sid)
    assert [e.event_type for e in stored] == ["user_message", "ai_message"]
    assert stored[1].turn_id == ack["turn_id"] and stored[1].content == echo_answer("keep going without me")
    # The summary waited for the turn, so it covers the answer too.
    assert "1 user messages and 1 answers" in session.summary


async def test_a_message_without_a_callback_has_the_same_effects(server: RunningServer, connect: TabFactory) -> None:
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    await tab.client.emit("message", {"session_id": sid, "text": "no ack wanted"})  # no callback
    await tab.wait_for(lambda _: tab.named("done"))
    user_message, done = tab.named("user_message")[0], tab.named("done")[0]
    assert user_message["text"] == "no ack wanted" and done["turn_id"] == user_message["turn_id"]
    stored = await server.runtime.repo.list_events(sid)
    assert [(e.event_type, e.content) for e in stored] == [
        ("user_message", "no ack wanted"),
        ("ai_message", done["text"]),
    ]
