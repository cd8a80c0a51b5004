"""The plain WebSocket endpoint, over real sockets: `/ws/session/{session_id}`."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close

from server.transport.clients import TOKEN_EXPIRED
from tests.conftest import ServerFactory, TabFactory
from tests.harness import REDIS_URL, RunningServer, Tab, wait_for_summary
from tests.test_auth import SECRET, refused, token

Frame = tuple[str, Any]


class Plain:
    """A plain WebSocket client that records every frame it receives."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[Frame] = []
        self._changed = asyncio.Event()
        self.ended = False
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                decoded = json.loads(raw)
                self.frames.append((decoded["event"], decoded["data"]))
                self._changed.set()
        except ConnectionClosed:
            pass
        self.ended = True
        self._changed.set()

    async def wait_for(self, predicate: Any, timeout: float = 10) -> Any:
        async def poll() -> Any:
            while True:
                found = predicate(self.frames)
                if found:
                    return found
                if self.ended:
                    raise AssertionError(f"closed before that arrived: {self.frames}")
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(poll(), timeout)

    async def ack(self, sent: str | bytes, timeout: float = 10) -> dict[str, Any]:
        """Send a frame; its ack (the next one after those received so far)."""
        start = len(self.frames)
        await self.ws.send(sent)
        found = await self.wait_for(lambda f: [d for n, d in f[start:] if n == "ack"], timeout)
        answer: dict[str, Any] = found[0]
        return answer

    async def turn(self, turn_id: str, timeout: float = 10) -> list[Frame]:
        """The events of the turn (not the acks), once its `done` arrived."""
        await self.wait_for(lambda f: any(n == "done" and d["turn_id"] == turn_id for n, d in f), timeout)
        return [(n, d) for n, d in self.frames if n != "ack" and isinstance(d, dict) and d.get("turn_id") == turn_id]

    async def until_closed(self, timeout: float = 10) -> Close:
        """The close frame the server sent."""
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        received = self.ws.protocol.close_rcvd
        assert received is not None, "closed without a close frame"
        return received


@asynccontextmanager
async def plain(server: RunningServer, session_id: str, query: str = "", **options: Any) -> AsyncIterator[Plain]:
    url = server.url.replace("http://", "ws://") + f"/ws/session/{session_id}" + (f"?{query}" if query else "")
    async with connect(url, **options) as ws:
        client = Plain(ws)
        yield client
        await ws.close()
        await asyncio.wait([client._reader], timeout=5)


def names(frames: list[Frame]) -> list[str]:
    return [n for n, _ in frames]


async def test_the_postman_flow_plain_text_in_a_streamed_turn_out(server: RunningServer) -> None:
    sid = str(uuid.uuid4())  # unknown: created, as join does
    async with plain(server, sid) as client:
        first = await client.wait_for(lambda f: f[:1])
        assert first[0][0] == "session"
        opened = first[0][1]
        assert set(opened) == {"session", "history", "history_more", "active_turn"}
        assert opened["session"]["session_id"] == sid and opened["history"] == [] and opened["active_turn"] is None
        ack = await client.ack("How's the weather in Delhi ?")
        assert ack["request"] == "message" and ack["ok"] and set(ack) == {"request", "ok", "turn_id", "event_id"}
        turn = await client.turn(ack["turn_id"])
        # The ack comes before every event it caused.
        assert names(client.frames).index("ack") < names(client.frames).index("user_message")
        assert names(turn)[:3] == ["user_message", "tool_call", "tool_result"] and names(turn)[-1] == "done"
        call = turn[1][1]
        assert call["name"] == "get_weather" and call["args"] == {"location": "Delhi"}
        chunks = [d for n, d in turn if n == "chunk"]
        assert [c["index"] for c in chunks] == list(range(len(chunks)))
        done = turn[-1][1]
        assert "".join(c["text"] for c in chunks) == done["text"] and "Delhi" in done["text"]
        assert set(done) == {"session_id", "turn_id", "text", "finish_reason", "usage", "event_id", "error"}
        assert "presence" in names(client.frames)


async def test_json_commands_retries_busy_and_cancel(start_server: ServerFactory) -> None:
    server = await start_server(offline_chunk_delay_ms=40)
    sid = str(uuid.uuid4())
    async with plain(server, sid) as client:
        await client.wait_for(lambda f: f[:1])
        command = {"event": "message", "data": {"text": "a long answer", "client_message_id": "c-1", "session_id": "x"}}
        first = await client.ack(json.dumps(command))
        assert first["ok"], first
        again = await client.ack(json.dumps(command))
        assert {k: again[k] for k in ("ok", "turn_id", "event_id")} == {
            k: first[k] for k in ("ok", "turn_id", "event_id")
        }
        busy = await client.ack(json.dumps({"event": "message", "data": {"text": "another"}}))
        assert busy["error"]["code"] == "busy"
        await client.wait_for(lambda f: any(n == "chunk" for n, _ in f))
        cancelled = await client.ack(json.dumps({"event": "cancel"}))
        assert cancelled == {"request": "cancel", "ok": True, "turn_id": first["turn_id"]}
        done = (await client.turn(first["turn_id"]))[-1][1]
        assert done["finish_reason"] == "cancelled"
        nothing = await client.ack(json.dumps({"event": "cancel"}))
        assert nothing["error"]["code"] == "no_active_turn"
        user_messages = [d for n, d in client.frames if n == "user_message"]
        assert len(user_messages) == 1 and user_messages[0]["client_message_id"] == "c-1"


@pytest.mark.parametrize(
    ("frame", "asked", "code"),
    [
        (b"\x00binary", "message", "invalid_payload"),
        ('{"event": "join", "data": {}}', None, "invalid_payload"),
        ('{"event": "leave"}', None, "invalid_payload"),
        ('{"event": "message", "data": "not an object"}', "message", "invalid_payload"),
        ('{"event": "message", "data": {"text": 5}}', "message", "invalid_payload"),
        ('{"event": "message", "data": {"text": "  "}}', "message", "empty_message"),
        ("x" * 101, "message", "message_too_long"),
    ],
    ids=["binary", "join", "leave", "data-not-object", "text-not-string", "empty", "too-long"],
)
async def test_bad_frames_are_answered_and_the_socket_stays_open(
    start_server: ServerFactory, frame: str | bytes, asked: str | None, code: str
) -> None:
    server = await start_server(max_message_chars=100)
    sid = str(uuid.uuid4())
    async with plain(server, sid) as client:
        await client.wait_for(lambda f: f[:1])
        ack = await client.ack(frame)
        assert (ack["request"], ack["ok"], ack["error"]["code"]) == (asked, False, code)
        if isinstance(frame, bytes):
            assert ack["error"]["message"] == "a binary frame is not a request"
        elif asked is None:
            assert ack["error"]["message"].startswith("an unknown command")
        ok = await client.ack("still here")
        assert ok["ok"]
        await client.turn(ok["turn_id"])
    assert len(await server.runtime.repo.list_events(sid)) == 2  # the refused frame stored nothing


async def test_an_oversized_frame_closes_with_1009(start_server: ServerFactory) -> None:
    server = await start_server(max_message_chars=1000, max_packet_bytes=8192)
    async with plain(server, str(uuid.uuid4())) as client:
        await client.wait_for(lambda f: f[:1])
        await client.ws.send("x" * 20_000)
        closed = await client.until_closed()
    assert closed.code == 1009


@pytest.mark.parametrize(
    ("path", "query", "code", "reason"),
    [
        ("not-a-uuid", "", 4400, "invalid_session_id"),
        (None, "after_event_id=abc", 4400, "invalid_payload"),
    ],
)
async def test_refusals_send_an_error_frame_then_close_with_the_code(
    server: RunningServer, path: str | None, query: str, code: int, reason: str
) -> None:
    sid = path or str(uuid.uuid4())
    async with plain(server, sid, query) as client:
        closed = await client.until_closed()
    assert names(client.frames) == ["error"] and client.frames[0][1]["code"] == reason
    assert (closed.code, closed.reason) == (code, reason)
    if path is None:
        assert await server.runtime.repo.get_session(sid) is None  # a refusal stores nothing


async def test_authentication_by_query_token_or_header_and_ownership(start_server: ServerFactory) -> None:
    server = await start_server(auth_jwt_secret=SECRET, max_connections_per_address=2)
    sid = str(uuid.uuid4())
    async with plain(server, sid) as anonymous:
        closed = await anonymous.until_closed()
    assert (closed.code, closed.reason) == (4401, "unauthorized")
    assert anonymous.frames[0] == ("error", {"code": "unauthorized", "message": "a valid token is needed"})

    async with plain(server, sid, f"token={token('kim')}&user_id=someone-else") as by_query:
        opened = (await by_query.wait_for(lambda f: f[:1]))[0][1]
        assert opened["session"]["user_id"] == "kim"  # the token's subject; user_id ignored
        async with plain(server, sid, additional_headers={"Authorization": f"Bearer {token('kim')}"}) as by_header:
            await by_header.wait_for(lambda f: f[:1])
            assert (await by_header.ack("hello"))["ok"]
        async with plain(server, sid, f"token={token('lee')}") as intruder:
            closed = await intruder.until_closed()
        assert (closed.code, closed.reason) == (4403, "forbidden")
        # Two connections from 127.0.0.1 are open now: the third is refused (Socket.IO ones count too).
        async with plain(server, str(uuid.uuid4()), f"token={token('kim')}") as second:
            await second.wait_for(lambda f: f[:1])
            async with plain(server, str(uuid.uuid4()), f"token={token('kim')}") as over:
                closed = await over.until_closed()
            assert (closed.code, closed.reason) == (4429, "rate_limited")
            assert await refused(server, {"token": token("kim")}) == "rate_limited"  # counted across both doors


async def test_the_message_limit_and_an_expired_token_hold_on_the_plain_door(start_server: ServerFactory) -> None:
    server = await start_server(auth_jwt_secret=SECRET, message_rate_limit=1, offline_chunk_delay_ms=0)
    async with plain(server, str(uuid.uuid4()), f"token={token('max')}") as client:
        await client.wait_for(lambda f: f[:1])
        first = await client.ack("one")
        await client.turn(first["turn_id"])
        assert (await client.ack("two"))["error"]["code"] == "rate_limited"
    # Already past `exp` but within the 10 s leeway for clock skew: accepted, for about 2 s more; then
    # an `error` frame and 4401 end the connection (tests/test_token_expiry.py times it).
    async with plain(server, str(uuid.uuid4()), f"token={token('max', expires_in=-8)}") as client:
        await client.wait_for(lambda f: f[:1])
        closed = await client.until_closed(timeout=5)
    assert (closed.code, closed.reason) == (4401, "unauthorized")
    assert client.frames[-1] == ("error", {"code": "unauthorized", "message": TOKEN_EXPIRED})


async def test_a_mixed_room_sees_the_same_turns_in_the_same_order(
    start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await start_server(offline_chunk_delay_ms=20)
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    async with plain(server, sid) as client:
        await client.wait_for(lambda f: any(n == "presence" and d["clients"] == 2 for n, d in f))
        await tab.wait_for(lambda ev: any(n == "presence" and d["clients"] == 2 for n, d in ev))
        from_tab = await tab.call("message", {"session_id": sid, "text": "How's the weather in Paris?"})
        await client.turn(from_tab["turn_id"])
        from_plain = await client.ack("and hello from the plain door")
        await client.turn(from_plain["turn_id"])
        await tab.turn(from_plain["turn_id"])
        running = await tab.call("message", {"session_id": sid, "text": "x"})
        assert running["ok"]
        refused = await client.ack("now")
        assert refused["error"]["code"] == "busy"  # busy across the two doors
        await client.wait_for(lambda f: any(n == "chunk" and d["turn_id"] == running["turn_id"] for n, d in f))
        assert (await client.ack(json.dumps({"event": "cancel"})))["turn_id"] == running["turn_id"]
        await tab.turn(running["turn_id"])
        await client.turn(running["turn_id"])
        plain_turns = [
            (n, d) for n, d in client.frames if n in ("user_message", "chunk", "tool_call", "tool_result", "done")
        ]
        tab_turns = [
            (n, d) for n, d in tab.events if n in ("user_message", "chunk", "tool_call", "tool_result", "done")
        ]
        assert plain_turns == tab_turns
        assert tab_turns[-1][1]["finish_reason"] == "cancelled"
    await tab.wait_for(lambda ev: ev[-1][0] == "presence" and ev[-1][1]["clients"] == 1)


async def test_a_plain_client_joining_mid_turn_and_replaying_history(
    start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await start_server(offline_chunk_delay_ms=30)
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    ack = await tab.call("message", {"session_id": sid, "text": "tell me something long"})
    await tab.wait_for(lambda ev: len([n for n, _ in ev if n == "chunk"]) >= 3)
    async with plain(server, sid) as late:
        opened = (await late.wait_for(lambda f: f[:1]))[0][1]
        active = opened["active_turn"]
        assert active["turn_id"] == ack["turn_id"] and active["text"]
        done = (await late.turn(ack["turn_id"]))[-1][1]
        live = [d for n, d in late.frames if n == "chunk" and d["index"] >= active["next_index"]]
        assert active["text"] + "".join(c["text"] for c in live) == done["text"]
    history = (await tab.join(sid))["history"]
    after = history[0]["event_id"]
    async with plain(server, sid, f"after_event_id={after}") as replay:
        opened = (await replay.wait_for(lambda f: f[:1]))[0][1]
        assert [e["event_id"] for e in opened["history"]] == [e["event_id"] for e in history[1:]]
        assert opened["history"][-1]["finish_reason"] == "stop"


async def test_closing_is_leaving_and_the_last_plain_client_out_gets_the_summary(server: RunningServer) -> None:
    sid = str(uuid.uuid4())
    async with plain(server, sid) as client:
        await client.wait_for(lambda f: f[:1])
        ack = await client.ack("something to remember")
        await client.turn(ack["turn_id"])
    session = await wait_for_summary(server, sid)
    assert "1 user messages and 1 answers" in session.summary and session.end_time is not None


async def test_shutdown_mid_turn_sends_done_then_closes_with_1001(start_server: ServerFactory) -> None:
    server = await start_server(offline_chunk_delay_ms=100)
    async with plain(server, str(uuid.uuid4())) as client:
        await client.wait_for(lambda f: f[:1])
        ack = await client.ack("a long answer, please")
        await client.wait_for(lambda f: any(n == "chunk" for n, _ in f))
        await server.stop()
        closed = await client.until_closed()
    done = [d for n, d in client.frames if n == "done"]
    assert len(done) == 1 and done[0]["turn_id"] == ack["turn_id"] and done[0]["error"]["code"] == "shutdown"
    assert closed.code == 1001


async def test_a_disallowed_origin_is_refused_at_the_handshake(server: RunningServer) -> None:
    url = server.url.replace("http://", "ws://") + f"/ws/session/{uuid.uuid4()}"
    with pytest.raises(InvalidStatus) as refused_handshake:
        async with connect(url, origin="https://evil.example"):  # type: ignore[arg-type]
            pass
    assert refused_handshake.value.response.status_code == 403
    async with connect(url, origin="http://localhost:3000") as ws:  # type: ignore[arg-type]
        assert json.loads(await ws.recv())["event"] == "session"


async def test_a_mixed_room_across_two_processes_on_redis(
    start_server: ServerFactory, tabs: list[Tab], redis_channel: str, tmp_path: Any
) -> None:
    shared = {
        "redis_url": REDIS_URL,
        "redis_channel": redis_channel,
        "sqlite_path": tmp_path / "shared.db",
        "offline_chunk_delay_ms": 20,
    }
    one, two = await start_server(**shared), await start_server(**shared)
    tab = Tab(two.url)
    tabs.append(tab)
    await tab.connect()
    sid = (await tab.join())["session"]["session_id"]
    async with plain(one, sid) as client:
        await client.wait_for(lambda f: any(n == "presence" and d["clients"] == 2 for n, d in f))
        from_tab = await tab.call("message", {"session_id": sid, "text": "hello from process two"})
        await client.turn(from_tab["turn_id"])
        from_plain = await client.ack("hello from process one")
        assert from_plain["ok"], from_plain
        await tab.turn(from_plain["turn_id"])
        await client.turn(from_plain["turn_id"])
        kinds = ("user_message", "chunk", "done")
        assert [(n, d) for n, d in client.frames if n in kinds] == [(n, d) for n, d in tab.events if n in kinds]
        running = await tab.call("message", {"session_id": sid, "text": "again, at length"})
        assert (await client.ack("me too"))["error"]["code"] == "busy"  # busy across processes and doors
        await client.wait_for(lambda f: any(n == "chunk" and d["turn_id"] == running["turn_id"] for n, d in f))
        assert (await client.ack(json.dumps({"event": "cancel"})))["turn_id"] == running["turn_id"]
        assert (await client.turn(running["turn_id"]))[-1][1]["finish_reason"] == "cancelled"
        assert (await tab.turn(running["turn_id"]))[-1][1]["finish_reason"] == "cancelled"


async def test_a_plain_client_sends_files_with_a_message_and_a_socketio_tab_sees_them(
    server: RunningServer, connect: TabFactory
) -> None:
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    png = b"\x89PNG\r\n\x1a\n" + bytes(64)
    async with httpx.AsyncClient(base_url=server.url) as http:
        files = {"file": ("dot.png", io.BytesIO(png), "image/png")}
        shot = (await http.post(f"/api/sessions/{sid}/attachments", files=files)).json()
    async with plain(server, sid) as client:
        await client.wait_for(lambda f: f[:1])
        foreign = await client.ack(json.dumps({"event": "message", "data": {"text": "hi", "attachments": ["nope"]}}))
        assert foreign["ok"] is False and foreign["error"]["code"] == "invalid_payload", foreign
        message = {"event": "message", "data": {"text": "What is it?", "attachments": [shot["attachment_id"]]}}
        ack = await client.ack(json.dumps(message))
        assert ack["ok"], ack
        turn = await client.turn(ack["turn_id"])
    expected = [{"attachment_id": shot["attachment_id"], "name": "dot.png", "mime_type": "image/png", "size": len(png)}]
    assert turn[0][0] == "user_message" and turn[0][1]["attachments"] == expected
    assert f'"dot.png" (image/png, {len(png)} bytes)' in turn[-1][1]["text"]
    seen = await tab.turn(ack["turn_id"])
    assert seen[0][1]["attachments"] == expected
