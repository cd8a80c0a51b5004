"""The Socket.IO layer: client events to requests, and each socket a member of the service's rooms."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import socketio
from engineio import packet as eio_packet
from socketio import packet as sio_packet

from server.config import Settings
from server.core.conversation import ConversationService
from server.core.errors import ErrorCode, ServiceError
from server.rooms.hub import Outgoing, RoomHub
from server.transport import fast_json
from server.transport.clients import REQUESTS, Ack, ClientConnection, ConnectionGate, trace_of
from server.transport.origins import origin_matcher
from server.upstream import engineio
from server.upstream.socketio import GuardedServer

log = logging.getLogger(__name__)


def create_sio(settings: Settings) -> GuardedServer:
    """python-socketio for its protocol only: the session rooms are the service's (rooms/hub.py)."""
    engineio.install()
    sio = GuardedServer(
        async_mode="asgi",  # without it aiohttp mode wins whenever aiohttp is importable
        cors_allowed_origins=origin_matcher(settings.cors_origin_list),
        max_http_buffer_size=settings.packet_limit,
        json=fast_json,
        logger=False,
        engineio_logger=False,
    )
    sio.eio.send_queue_limit = settings.send_queue_limit_bytes  # read by server/upstream/engineio.py
    return sio


def socketio_packet(name: str, data: Any) -> eio_packet.Packet:
    """An event as the Engine.IO packet every Socket.IO member of a room is sent (encoded once).
    binary=False: events are JSON documents, so python-socketio's scan of every packet for bytes
    is skipped (docs/performance.md)."""
    encoded = sio_packet.Packet(sio_packet.EVENT, namespace="/", data=[name, data], binary=False).encode()
    return eio_packet.Packet(eio_packet.MESSAGE, encoded)


class SocketIOMember:
    """A Socket.IO socket as a member of session rooms: events go straight onto its Engine.IO queue."""

    def __init__(self, sid: str, eio: Any, eio_sid: str) -> None:
        self.connection_id = sid
        self._eio = eio
        self._eio_sid = eio_sid

    async def send(self, event: Outgoing) -> None:
        await self._eio.send_packet(self._eio_sid, event.encoded(socketio_packet))


def register_handlers(
    sio: GuardedServer, service: Callable[[], ConversationService], hub: Callable[[], RoomHub], gate: ConnectionGate
) -> None:
    """Socket.IO events to client requests: decode, run, answer. The rest is in transport/clients.py."""
    clients: dict[str, ClientConnection] = {}  # socket -> its connection
    members: dict[str, SocketIOMember] = {}
    hooks = _Hooks(gate, clients)
    sio.hooks = hooks

    for name in REQUESTS:
        sio.on(name, _request_handler(name, clients, service, gate))

    # python-socketio also hands a client's *events* named "connect" or "disconnect" to these
    # handlers. A real connect or disconnect runs while the socket is pending, i.e. not yet (or
    # no longer) "connected"; a client event only arrives from a connected socket.
    def lifecycle(sid: str) -> bool:
        return not sio.manager.is_connected(sid, "/")

    async def connect(sid: str, environ: Any = None, auth: Any = None, *_: Any) -> None:
        if not lifecycle(sid):
            return
        # Refused here, before the socket can join any room.
        eio_sid = sio.manager.eio_sid_from_sid(sid, "/")
        token = auth.get("token") if isinstance(auth, dict) else None
        try:
            client = await gate.admit(sid, "socketio", _client_address(environ), token, hooks.held(eio_sid))
        except ServiceError as exc:
            raise socketio.exceptions.ConnectionRefusedError(exc.code.value) from None
        client.trace = trace_of(auth.get("traceparent"), auth.get("tracestate")) if isinstance(auth, dict) else None
        clients[sid] = client
        members[sid] = member = SocketIOMember(sid, sio.eio, eio_sid)
        hub().connect(member)
        gate.close_at_expiry(client, lambda: _close_expired(sio, hub(), member, eio_sid))
        if client.identity is not None:  # its user's session events reach it, joined or not
            await hub().follow_user(sid, client.identity.user_id)

    async def disconnect(sid: str, *_reason: Any) -> None:
        if not lifecycle(sid):
            return
        client = clients.pop(sid, None)
        if client is None:
            return
        hub().disconnect(members.pop(sid))
        gate.release(client)
        try:
            await service().disconnect(sid)
        except Exception:
            log.exception("failed to clean up after %s disconnected", sid)

    sio.on("connect", connect)
    sio.on("disconnect", disconnect)


def _request_handler(
    name: str, clients: dict[str, ClientConnection], service: Callable[[], ConversationService], gate: ConnectionGate
) -> Callable[..., Awaitable[Ack]]:
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


def _close_expired(sio: GuardedServer, hub: RoomHub, member: SocketIOMember, eio_sid: str) -> None:
    """Its token expired: out of its sessions' rooms at once, then its Engine.IO transport closed.
    Not a Socket.IO DISCONNECT, after which socket.io-client would not reconnect: it reconnects by
    itself, asking its `auth` function for a fresh token."""
    hub.disconnect(member)
    socket = sio.eio.sockets.get(eio_sid)
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
