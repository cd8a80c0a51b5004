"""The plain WebSocket endpoint, `/ws/session/{session_id}` (docs/protocol.md, The plain WebSocket endpoint).

A second door into the same rooms: the client joins the session in its URL when it connects and
leaves it when it closes; every text frame is a request (plain text is a `message`), answered by
one `ack` frame before any event it causes; the session's events arrive as `{event, data}` frames
with the Socket.IO events' payloads. Everything a transport shares (identity, limits, the error
order) is transport/clients.py; this module decodes frames and encodes events.

Delivery: each connection is a member of the service's rooms (rooms/hub.py), as a Socket.IO socket
is; an event is encoded as a frame once for all the plain clients of a room.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from server.core.conversation import ConversationService, parse_session_id
from server.core.errors import ErrorCode, ServiceError
from server.rooms.hub import SESSION_EVENT_NAMES, Outgoing, RoomHub
from server.transport import fast_json
from server.transport.clients import REQUESTS, TOKEN_EXPIRED, ClientConnection, ConnectionGate, trace_of
from server.transport.tokens import bearer_token

log = logging.getLogger(__name__)

CLOSE_CODES = {
    ErrorCode.INVALID_SESSION_ID: 4400,
    ErrorCode.INVALID_PAYLOAD: 4400,
    ErrorCode.UNAUTHORIZED: 4401,
    ErrorCode.FORBIDDEN: 4403,
    ErrorCode.SESSION_DELETED: 4404,
    ErrorCode.RATE_LIMITED: 4429,
}
# Marked added in docs/protocol.md: storage or shared state could not take the join; retrying is safe.
TRY_AGAIN_LATER = 1013
GOING_AWAY = 1001
MESSAGE_TOO_BIG = 1009


def frame(event: str, data: Any) -> str:
    return fast_json.dumps({"event": event, "data": data})


class PlainClient:
    """One plain WebSocket: frames wait in order in its queue, and a writer task sends them.

    While one of its requests runs, the events for it are held, so its `ack` goes out before the
    events the request caused (a `user_message`, the first chunks)."""

    def __init__(
        self, websocket: WebSocket, connection: ClientConnection, session_id: str, send_limit: int | None = None
    ) -> None:
        self.websocket = websocket
        self.connection = connection
        self.session_id = session_id  # the URL's (as given: an invalid one is refused at the join)
        self._queue: asyncio.Queue[str | tuple[int, str]] = asyncio.Queue()  # a frame, or (close code, reason)
        self._held: list[str] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # SEND_QUEUE_LIMIT_BYTES: what waits for the client (queued or held, not yet written).
        self._limit = send_limit
        self._waiting = 0
        self._oversized_waiting = False
        self.dropped = asyncio.Event()  # it let more than the limit wait: disconnected
        self.ended = False  # `end` queued its last frames: nothing is sent after them
        self._writer: asyncio.Task[None] | None = None

    @property
    def connection_id(self) -> str:
        return self.connection.connection_id

    async def send(self, event: Outgoing) -> None:
        """An event of one of its rooms (the hub's `Member`). Its frames are its session's only: the
        session events of the user's other sessions (which a Socket.IO list hears) are not sent."""
        if event.name in SESSION_EVENT_NAMES and event.data.get("session_id") != self.session_id:
            return
        self.put(event.encoded(frame))
        if event.name == "session_deleted":
            self.close(CLOSE_CODES[ErrorCode.SESSION_DELETED], ErrorCode.SESSION_DELETED.value)

    def put(self, text: str) -> None:
        if self.ended or self.dropped.is_set() or not self._count(text):
            return
        if self._held is not None:
            self._held.append(text)
        else:
            self._queue.put_nowait(text)

    def _count(self, text: str) -> bool:
        """Count a frame that will wait; False (and the client dropped) past the limit."""
        if self._limit is None:
            return True
        if len(text) > self._limit and not self._oversized_waiting:
            self._oversized_waiting = True  # one frame larger than the limit still goes out
        elif self._waiting + len(text) > self._limit:
            self._drop()
            return False
        else:
            self._waiting += len(text)
        return True

    def _written(self, text: str) -> None:
        if self._limit is not None and len(text) > self._limit:
            self._oversized_waiting = False
        else:
            self._waiting = max(0, self._waiting - len(text))

    def _drop(self) -> None:
        log.warning(
            "disconnecting plain WebSocket %s: more than %d bytes waited for it (it stopped reading)",
            self.connection_id,
            self._limit,
        )
        self.dropped.set()
        self._held = None
        while not self._queue.empty():
            self._queue.get_nowait()
        self._waiting = 0
        if self._writer is not None:
            self._writer.cancel()  # blocked on the stalled connection

    @contextlib.asynccontextmanager
    async def holding(self) -> AsyncIterator[list[str]]:
        """Hold events while a request runs; what the block appends to the list goes out first."""
        first: list[str] = []
        self._held = []
        try:
            yield first
        finally:
            held, self._held = self._held or [], None
            if not self.ended:
                for text in [*first, *held]:
                    self._queue.put_nowait(text)

    def close(self, code: int, reason: str = "") -> None:
        """Close once the frames queued so far are sent."""
        if not self.ended and not self.dropped.is_set():
            self._queue.put_nowait((code, reason))

    def end(self, last: str, code: int, reason: str) -> None:
        """End the stream now: what waits for the client is dropped, `last` and the close go out,
        and nothing after them (a request being served is answered to no one)."""
        if self.ended or self.dropped.is_set():
            return
        self.ended = True
        self._held = None
        while not self._queue.empty():
            self._queue.get_nowait()
        self._waiting = 0
        self._queue.put_nowait(last)
        self._queue.put_nowait((code, reason))

    async def receive(self) -> Message | None:
        """The client's next message; None once it is dropped (a request being served finishes first)."""
        message = asyncio.ensure_future(self.websocket.receive())
        dropped = asyncio.ensure_future(self.dropped.wait())
        await asyncio.wait({message, dropped}, return_when=asyncio.FIRST_COMPLETED)
        dropped.cancel()
        if message.done():
            return message.result()
        message.cancel()
        await asyncio.wait([message])
        return None

    async def write(self) -> None:
        """The writer: sends frames in order until a close code, or until the socket is gone."""
        self._writer = asyncio.current_task()
        try:
            await self._write()
        except asyncio.CancelledError:
            if not self.dropped.is_set():
                raise
        finally:
            if not self.closed.done():
                self.closed.set_result(None)

    async def _write(self) -> None:
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, tuple):
                    with contextlib.suppress(RuntimeError, OSError):
                        await self.websocket.close(code=item[0], reason=item[1])
                    return
                await self.websocket.send_text(item)
                self._written(item)
        except (WebSocketDisconnect, RuntimeError, OSError):
            return  # the client went away; the reader notices too


class PlainClients:
    """The plain WebSocket connections open in this process (shutdown closes them)."""

    def __init__(self) -> None:
        self._open: set[PlainClient] = set()

    def add(self, client: PlainClient) -> None:
        self._open.add(client)

    def discard(self, client: PlainClient) -> None:
        self._open.discard(client)

    def close_all(self, code: int) -> list[PlainClient]:
        clients = list(self._open)
        for client in clients:
            client.close(code)
        return clients


async def serve_plain_client(
    websocket: WebSocket,
    session_id: str,
    *,
    service: ConversationService,
    gate: ConnectionGate,
    hub: RoomHub,
    open_clients: PlainClients,
    origin_allowed: Any,
    packet_limit: int,
    send_limit: int | None = None,
) -> None:
    """The whole life of one plain WebSocket connection."""
    origin = websocket.headers.get("origin")
    if origin is not None and not _allowed(origin_allowed, origin):
        await websocket.close(code=1008)  # before the handshake completes: HTTP 403
        return
    await websocket.accept()
    query = websocket.query_params
    address = websocket.client.host if websocket.client else "unknown"
    token = query.get("token") or bearer_token(websocket.headers.get("authorization"))
    connection_id = f"ws:{uuid.uuid4().hex}"
    try:
        connection = await gate.admit(connection_id, "websocket", address, token)
    except ServiceError as exc:
        await _refuse(websocket, exc)
        return
    connection.trace = trace_of(websocket.headers.get("traceparent"), websocket.headers.get("tracestate"))
    client = PlainClient(websocket, connection, _canonical(session_id), send_limit)
    hub.connect(client)
    open_clients.add(client)

    def expire() -> None:
        # Out of its session's room at once; the error frame and 4401 are the last it gets.
        hub.disconnect(client)
        error = ServiceError(ErrorCode.UNAUTHORIZED, TOKEN_EXPIRED)
        client.end(frame("error", error.as_dict()), CLOSE_CODES[ErrorCode.UNAUTHORIZED], error.code.value)

    gate.close_at_expiry(connection, expire)
    writer = asyncio.create_task(client.write(), name=f"plain writer {connection_id}")
    try:
        if await _join(client, service, session_id, query):
            await _read(client, service, session_id, packet_limit)
    finally:
        try:
            await service.disconnect(connection_id)  # closing is leaving: presence, the last-leave summary
        except Exception:
            log.exception("failed to clean up after %s disconnected", connection_id)
        hub.disconnect(client)
        open_clients.discard(client)
        gate.release(connection)
        client.close(1000)
        await asyncio.wait([writer])  # a dropped client's writer ends cancelled


async def _join(client: PlainClient, service: ConversationService, session_id: str, query: Any) -> bool:
    """Join the URL's session: the `session` frame first, or a refusal (error frame, close code)."""
    payload: dict[str, Any] = {"session_id": session_id}
    for name in ("after_event_id", "history_limit"):
        if name in query:
            try:
                payload[name] = int(query[name])
            except ValueError:
                payload[name] = query[name]  # refused as invalid_payload below
    if "user_id" in query and not client.connection.authenticating:
        payload["user_id"] = query["user_id"]
    model, action = REQUESTS["join"]
    async with client.holding() as first:
        ack = await client.connection.request(service, action, model, payload)
        if ack["ok"]:
            first.append(frame("session", {k: v for k, v in ack.items() if k != "ok"}))
            return True
        first.append(frame("error", ack["error"]))
    code = ack["error"]["code"]
    client.close(_close_code(code), reason=code)
    return False


def _canonical(session_id: str) -> str:
    try:
        return parse_session_id(session_id)
    except ServiceError:
        return session_id  # refused at the join


def _close_code(code: str) -> int:
    try:
        return CLOSE_CODES.get(ErrorCode(code), TRY_AGAIN_LATER)
    except ValueError:
        return TRY_AGAIN_LATER


async def _read(client: PlainClient, service: ConversationService, session_id: str, packet_limit: int) -> None:
    while True:
        try:
            received = await client.receive()
        except (WebSocketDisconnect, RuntimeError):
            return
        if received is None or received["type"] == "websocket.disconnect":
            return
        text, data = received.get("text"), received.get("bytes")
        size = len(text) if text is not None else len(data or b"")
        if size > packet_limit:
            log.info("closing plain WebSocket %s: a frame of %d characters", client.connection_id, size)
            client.close(MESSAGE_TOO_BIG)
            return
        request, payload, problem = _command(text, session_id)
        async with client.holding() as first:
            if problem is not None:
                ack = client.connection.undecodable(problem)
            else:
                assert request is not None
                model, action = REQUESTS[request]
                ack = await client.connection.request(service, action, model, payload)
            first.append(frame("ack", {"request": request, **ack}))


# The requests a plain WebSocket client may send (its session is the URL's: no join or leave).
COMMANDS = ("message", "cancel", "approve_tool")


def _command(text: str | None, session_id: str) -> tuple[str | None, Any, str | None]:
    """A frame as a request: (its name, its payload, why it is no request, if it is not)."""
    if text is None:
        return "message", None, "a binary frame is not a request"
    try:
        # As Socket.IO reads its packets: an integer of more than 100 digits is refused too.
        decoded = fast_json.loads(text)
    except (ValueError, RecursionError) as exc:
        if text.startswith("{"):  # meant as a command: refused rather than taken as text
            return None, None, f"a frame that begins with {{ but is no JSON object ({_unreadable(exc)})"
        decoded = None
    if not isinstance(decoded, dict) or "event" not in decoded:
        return "message", {"session_id": session_id, "text": text}, None
    name = decoded["event"]
    if name not in COMMANDS:
        return None, None, "an unknown command (message, cancel and approve_tool are known) is not a request"
    data = decoded.get("data", {})
    if not isinstance(data, dict):
        return name, data, None  # refused by the payload's validation, as on Socket.IO
    return name, {**data, "session_id": session_id}, None  # the URL's session, whatever `data` says


def _unreadable(error: Exception) -> str:
    if isinstance(error, RecursionError):
        return "nested too deeply"
    if isinstance(error, json.JSONDecodeError):
        return "not valid JSON"
    return "a number too large"


async def _refuse(websocket: WebSocket, error: ServiceError) -> None:
    with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
        await websocket.send_text(frame("error", error.as_dict()))
        if websocket.application_state is not WebSocketState.DISCONNECTED:
            await websocket.close(code=_close_code(error.code.value), reason=error.code.value)


def _allowed(matcher: Any, origin: str) -> bool:
    return matcher == "*" or bool(callable(matcher) and matcher(origin))
