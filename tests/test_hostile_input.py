"""Input a client library can send that used to disconnect instead of being refused, over a real
`python -m server` and real clients (python-socketio on both transports, `websockets` on the plain
WebSocket): a message of escaped emoji is counted in characters; JSON nested thousands deep or an
integer of thousands of digits is `invalid_payload`; NUL in an id is `invalid_payload` on
PostgreSQL. Each refusal leaves the socket open (the next message gets its turn), and the log
holds no traceback."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import engineio.json
import pytest
from socketio import packet as sio_packet
from websockets.asyncio.client import connect

from tests.harness import Tab, logged_server
from tests.pg import scratch_database
from tests.test_plain_ws import Plain

EMOJI = "\U0001f600"  # python-socketio's encoder writes it as two \uXXXX escapes: 12 bytes
MAX_CHARS = 8000  # MAX_MESSAGE_CHARS's default
DEEP = "[" * 30_000 + "]" * 30_000
HUGE = "1" * 5_000


@pytest.fixture
def python_socketio_json(monkeypatch: pytest.MonkeyPatch) -> None:
    """python-socketio's own encoder (an in-process server of an earlier test may have put the
    service's, which writes UTF-8 unescaped, on the shared packet class)."""
    monkeypatch.setattr(sio_packet.Packet, "json", engineio.json)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    async with logged_server(tmp_path, OFFLINE_CHUNK_DELAY_MS="0") as (_, url, log_path):
        yield url, log_path


async def opened(url: str, transport: str, tabs: list[Tab]) -> tuple[Tab, str]:
    tab = Tab(url, transport)
    tabs.append(tab)
    await tab.connect()
    return tab, (await tab.join())["session"]["session_id"]


async def still_works(tab: Tab, session_id: str) -> None:
    """The socket is connected and a following valid message gets its turn."""
    assert tab.client.connected
    ack = await tab.call("message", {"session_id": session_id, "text": "still here"})
    assert ack["ok"], ack
    assert (await tab.turn(ack["turn_id"]))[-1][1]["finish_reason"] == "stop"


async def raw_call(tab: Tab, event_json: str, timeout: float = 10) -> Any:
    """Send an EVENT whose JSON is written by hand (Python's encoder refuses what it holds) with an
    ack id, as python-socketio's `call` would; its ack."""
    answered: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    ack_id = tab.client._generate_ack_id("/", lambda *args: answered.set_result(args[0] if args else None))
    await tab.client.eio.send(f"2{ack_id}{event_json}")
    return await asyncio.wait_for(answered, timeout)


def assert_no_traceback(log_path: Path) -> None:
    log = log_path.read_text()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


def plain_url(url: str, session_id: str, query: str = "") -> str:
    return url.replace("http://", "ws://") + f"/ws/session/{session_id}" + (f"?{query}" if query else "")


# ----------------------------------------------------------------------------- escaped emoji


@pytest.mark.usefixtures("python_socketio_json")
async def test_escaped_emoji_are_counted_in_characters_on_socketio(
    served: tuple[str, Path], transport: str, tabs: list[Tab]
) -> None:
    url, log_path = served
    tab, session_id = await opened(url, transport, tabs)
    for count in (6000, MAX_CHARS):  # 72,000 and 96,000 bytes once escaped: over 64 KiB
        ack = await tab.call("message", {"session_id": session_id, "text": EMOJI * count})
        assert ack["ok"], (count, ack)
        await tab.turn(ack["turn_id"])
    one_more = await tab.call("message", {"session_id": session_id, "text": EMOJI * (MAX_CHARS + 1)})
    assert one_more["error"]["code"] == "message_too_long"
    await still_works(tab, session_id)
    assert_no_traceback(log_path)


async def test_escaped_emoji_are_counted_in_characters_on_the_plain_websocket(served: tuple[str, Path]) -> None:
    url, log_path = served
    async with connect(plain_url(url, str(uuid.uuid4()))) as ws:
        client = Plain(ws)
        await client.wait_for(lambda f: f[:1])
        for count, code in ((6000, None), (MAX_CHARS, None), (MAX_CHARS + 1, "message_too_long")):
            command = json.dumps({"event": "message", "data": {"text": EMOJI * count}})  # escaped
            ack = await client.ack(command)
            if code is None:
                assert ack["ok"], (count, ack)
                await client.turn(ack["turn_id"])
            else:
                assert ack["error"]["code"] == code
        ack = await client.ack("still here")
        assert ack["ok"] and (await client.turn(ack["turn_id"]))[-1][1]["finish_reason"] == "stop"
    assert_no_traceback(log_path)


# ----------------------------------------------------------------------------- deep and huge JSON


def unreadable_events(session_id: str) -> dict[str, str]:
    return {
        "nested 30,000 deep": f'["message",{DEEP}]',
        "a field nested 30,000 deep": f'["message",{{"session_id":"{session_id}","text":{DEEP}}}]',
        "an integer of 5,000 digits": f'["message",{{"session_id":"{session_id}","text":"hi","n":{HUGE}}}]',
        "a join with one": f'["join",{{"after_event_id":{HUGE}}}]',
    }


async def test_deep_or_huge_json_in_an_event_is_answered_invalid_payload(
    served: tuple[str, Path], transport: str, tabs: list[Tab]
) -> None:
    url, log_path = served
    tab, session_id = await opened(url, transport, tabs)
    for name, event_json in unreadable_events(session_id).items():
        ack = await raw_call(tab, event_json)
        assert ack["ok"] is False and ack["error"]["code"] == "invalid_payload", (name, ack)
        await still_works(tab, session_id)
    # An event of a name the contract does not define is ignored, readable or not.
    await tab.client.eio.send(f'27["dance",{DEEP}]')
    await still_works(tab, session_id)
    assert_no_traceback(log_path)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ('{"event":"message","data":' + DEEP + "}", "invalid_payload"),
        ('{"event":"message","data":{"text":"hi","n":' + HUGE + "}}", "invalid_payload"),
        ('{"event":"message","data":{"text":"hi"', "invalid_payload"),  # begins with {, no JSON object
        (DEEP, "message_too_long"),  # no object: the text of a message (60,000 characters)
    ],
    ids=["nested-30000", "integer-5000-digits", "not-json", "array-nested-30000"],
)
async def test_deep_or_huge_json_on_the_plain_websocket_is_refused(
    served: tuple[str, Path], frame: str, code: str
) -> None:
    url, log_path = served
    async with connect(plain_url(url, str(uuid.uuid4()))) as ws:
        client = Plain(ws)
        await client.wait_for(lambda f: f[:1])
        ack = await client.ack(frame)
        assert ack["ok"] is False and ack["error"]["code"] == code, ack
        ack = await client.ack("still here")
        assert ack["ok"] and (await client.turn(ack["turn_id"]))[-1][1]["finish_reason"] == "stop"
    assert_no_traceback(log_path)


# ----------------------------------------------------------------------------- NUL and lone surrogates on PostgreSQL


@pytest.fixture
async def on_postgres(tmp_path: Path) -> AsyncIterator[tuple[str, Path, str]]:
    async with (
        scratch_database() as dsn,
        logged_server(tmp_path, STORAGE_BACKEND="postgres", DATABASE_URL=dsn, OFFLINE_CHUNK_DELAY_MS="0") as (
            _,
            url,
            log_path,
        ),
    ):
        yield url, log_path, dsn


async def stored(dsn: str, session_id: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT event_type, content FROM events WHERE session_id = $1 ORDER BY event_id", session_id
        )
    finally:
        await conn.close()
    return [(row["event_type"], row["content"]) for row in rows]


@pytest.mark.usefixtures("python_socketio_json")
async def test_nul_and_lone_surrogates_are_invalid_payload_on_postgres(
    on_postgres: tuple[str, Path, str], transport: str, tabs: list[Tab]
) -> None:
    url, log_path, dsn = on_postgres
    tab, session_id = await opened(url, transport, tabs)
    refusals = {
        "NUL in user_id": ("join", {"user_id": "kim\x00"}, "invalid_payload"),
        "lone surrogate in user_id": ("join", {"user_id": "kim\udc80"}, "invalid_payload"),
        "NUL in client_message_id": (
            "message",
            {"session_id": session_id, "text": "hi", "client_message_id": "c-\x00"},
            "invalid_payload",
        ),
        "lone surrogate in client_message_id": (
            "message",
            {"session_id": session_id, "text": "hi", "client_message_id": "c-\udc80"},
            "invalid_payload",
        ),
        "lone surrogate in text": ("message", {"session_id": session_id, "text": "hi \ud800"}, "invalid_payload"),
        "NUL in session_id": ("message", {"session_id": session_id[:-1] + "\x00", "text": "hi"}, "invalid_session_id"),
        "both: invalid_payload first": (
            "message",
            {"session_id": session_id[:-1] + "\x00", "text": "hi", "client_message_id": "\x00"},
            "invalid_payload",
        ),
    }
    for name, (event, payload, code) in refusals.items():
        ack = await tab.call(event, payload)
        assert ack["ok"] is False and ack["error"]["code"] == code, (name, ack)
        await still_works(tab, session_id)
    kinds = [kind for kind, _ in await stored(dsn, session_id)]
    assert kinds == ["user_message", "ai_message"] * len(refusals)  # only the valid ones
    assert_no_traceback(log_path)


async def test_nul_on_the_plain_websocket_is_invalid_payload_on_postgres(on_postgres: tuple[str, Path, str]) -> None:
    url, log_path, dsn = on_postgres
    session_id = str(uuid.uuid4())
    async with connect(plain_url(url, session_id, "user_id=kim%00")) as ws:
        client = Plain(ws)
        closed = await client.until_closed()
    assert client.frames[0][1]["code"] == "invalid_payload" and (closed.code, closed.reason) == (
        4400,
        "invalid_payload",
    )

    async with connect(plain_url(url, session_id, "user_id=kim")) as ws:
        client = Plain(ws)
        await client.wait_for(lambda f: f[:1])
        for data in ({"text": "hi", "client_message_id": "c-\x00"}, {"text": "hi \ud800"}):
            ack = await client.ack(json.dumps({"event": "message", "data": data}))
            assert ack["ok"] is False and ack["error"]["code"] == "invalid_payload", (data, ack)
        ack = await client.ack("still here")
        assert ack["ok"] and (await client.turn(ack["turn_id"]))[-1][1]["finish_reason"] == "stop"
    assert [kind for kind, _ in await stored(dsn, session_id)] == ["user_message", "ai_message"]
    assert_no_traceback(log_path)
