"""The Socket.IO layer: translates client events to the core and core events to rooms."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import socketio

from server.config import Settings
from server.core.conversation import ConversationService
from server.core.errors import ErrorCode, ServiceError
from server.core.models import EVENT_NAMES, TurnEvent
from server.transport import fast_json
from server.transport.clients import REQUESTS, Ack, ClientConnection, ConnectionGate
from server.transport.origins import origin_matcher
from server.transport.plain_ws import PlainHub
from server.upstream import engineio
from server.upstream.socketio import DirectEmitManager, GuardedServer, RedisManager

log = logging.getLogger(__name__)


def room(session_id: str) -> str:
    return f"session:{session_id}"


def create_sio(settings: Settings, hub: PlainHub) -> GuardedServer:
    engineio.install()
    manager: DirectEmitManager = DirectEmitManager()
    if settings.redis_url:
        manager = RedisManager(
            settings.redis_url,
            channel=f"{settings.redis_channel}:socketio",
            redis_options={"socket_timeout": 2, "socket_connect_timeout": 2},
        )
    manager.listener = hub
    sio = GuardedServer(
        async_mode="asgi",  # without it aiohttp mode wins whenever aiohttp is importable
        client_manager=manager,
        cors_allowed_origins=origin_matcher(settings.cors_origin_list),
        max_http_buffer_size=settings.packet_limit,
        json=fast_json,
        logger=False,
        engineio_logger=False,
    )
    sio.eio.send_queue_limit = settings.send_queue_limit_bytes  # read by server/upstream/engineio.py
    return sio


class SocketIOEmitter:
    """Delivers to a session's room: its Socket.IO sockets and, through the same room emit, its plain
    WebSocket clients (the manager hands every room event to the hub: see DirectEmitManager)."""

    def __init__(self, sio: socketio.AsyncServer, hub: PlainHub) -> None:
        self._sio = sio
        self._hub = hub

    async def publish(self, session_id: str, event: TurnEvent, *, local: bool = False) -> None:
        await self._sio.emit(EVENT_NAMES[type(event)], event.payload(), room=room(session_id), ignore_queue=local)

    async def add_member(self, member: str, session_id: str) -> None:
        if self._hub.knows(member):
            self._hub.enter(member, room(session_id))
        else:
            await self._sio.enter_room(member, room(session_id))

    async def remove_member(self, member: str, session_id: str) -> None:
        if self._hub.knows(member):
            self._hub.leave(member, room(session_id))
        else:
            await self._sio.leave_room(member, room(session_id))


def register_handlers(sio: GuardedServer, service: Callable[[], ConversationService], gate: ConnectionGate) -> None:
    """Socket.IO events to client requests: decode, run, answer. The rest is in transport/clients.py."""
    clients: dict[str, ClientConnection] = {}  # socket -> its connection
    hooks = _Hooks(gate, clients)
    sio.hooks = hooks

    def handler(name: str) -> Callable[..., Awaitable[Ack]]:
        model, action = REQUESTS[name]

        async def handle(sid: str, *args: Any) -> Ack:
            client = clients.get(sid)
            if client is None:  # an event racing its socket's disconnect
                gate.metrics.refused(ErrorCode.UNAVAILABLE.value)
                return {"ok": False, "error": {"code": "unavailable", "message": "the connection is closing"}}
            if len(args) != 1:
                return client.undecodable("send exactly one payload object")
            return await client.request(service(), action, model, args[0])

        return handle

    for name in REQUESTS:
        sio.on(name, handler(name))

    # python-socketio also hands a client's *events* named "connect" or "disconnect" to these
    # handlers. A real connect or disconnect runs while the socket is pending, i.e. not yet (or
    # no longer) "connected"; a client event only arrives from a connected socket.
    def lifecycle(sid: str) -> bool:
        return not sio.manager.is_connected(sid, "/")

    async def connect(sid: str, environ: Any = None, auth: Any = None, *_: Any) -> None:
        if not lifecycle(sid):
            return
        # Refused here, before the socket can join any room.
        token = auth.get("token") if isinstance(auth, dict) else None
        held = hooks.held(sio.manager.eio_sid_from_sid(sid, "/"))
        try:
            client = await gate.admit(sid, "socketio", _client_address(environ), token, held)
        except ServiceError as exc:
            raise socketio.exceptions.ConnectionRefusedError(exc.code.value) from None
        clients[sid] = client
        gate.close_at_expiry(client, lambda: _close_expired(sio, sid))

    async def disconnect(sid: str, *_reason: Any) -> None:
        if not lifecycle(sid):
            return
        client = clients.pop(sid, None)
        if client is None:
            return
        gate.release(client)
        try:
            await service().disconnect(sid)
        except Exception:
            log.exception("failed to clean up after %s disconnected", sid)

    sio.on("connect", connect)
    sio.on("disconnect", disconnect)


def _close_expired(sio: GuardedServer, sid: str) -> None:
    """Its token expired: out of its sessions' rooms at once, then its Engine.IO transport closed.
    Not a Socket.IO DISCONNECT, after which socket.io-client would not reconnect: it reconnects by
    itself, asking its `auth` function for a fresh token."""
    for name in sio.rooms(sid):
        if name != sid:
            sio.manager.basic_leave_room(sid, "/", name)
    socket = sio.eio.sockets.get(sio.manager.eio_sid_from_sid(sid, "/"))
    if isinstance(socket, engineio.FastWebSocket):
        socket.close_transport()


class _Hooks:
    """Every Engine.IO connection counts against its address from its handshake to its close, so one
    that never connects to Socket.IO (or sends what closes it) counts too; and an event whose
    payload the JSON parser refused is answered `invalid_payload` like any undecodable request."""

    def __init__(self, gate: ConnectionGate, clients: dict[str, ClientConnection]) -> None:
        self._gate = gate
        self._clients = clients
        self._slots: dict[str, tuple[str, bool]] = {}  # Engine.IO connection -> (address, within the limit)

    def opened(self, eio_sid: str, environ: Any) -> None:
        address = _client_address(environ)
        self._slots[eio_sid] = (address, self._gate.hold(address))

    def closed(self, eio_sid: str) -> None:
        slot = self._slots.pop(eio_sid, None)
        if slot is not None:
            self._gate.let_go(slot[0])

    def held(self, eio_sid: str | None) -> bool | None:
        """Whether that connection's handshake was within the limit; None if it was not counted."""
        slot = self._slots.get(eio_sid) if eio_sid is not None else None
        return slot[1] if slot is not None else None

    def unreadable_event(self, sid: str, event: str, problem: str) -> Ack | None:
        client = self._clients.get(sid)
        if client is None or event not in REQUESTS:
            return None  # events of other names are ignored, readable or not
        return client.undecodable(f"the payload cannot be read: {problem}")


def _client_address(environ: Any) -> str:
    """The peer's address (behind a proxy, uvicorn's proxy headers make it the client's)."""
    if isinstance(environ, dict):
        client = environ.get("asgi.scope", {}).get("client")
        if client:
            return str(client[0])
        return str(environ.get("REMOTE_ADDR", "unknown"))
    return "unknown"
