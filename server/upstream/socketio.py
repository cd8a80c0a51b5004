"""python-socketio, patched. What is patched, and why:

1. `DirectEmitManager.emit` (the client manager's room emit): python-socketio starts a task per
   recipient and waits for them all, i.e. a task, a wait and a turn of the loop per chunk; this
   encodes the packet once and puts it on each recipient's Engine.IO queue in the calling task,
   through the server's private `_send_eio_packet`. It also hands each room event to a listener
   (the plain WebSocket clients' hub). Emits with an ack callback keep the library's path.
2. `RedisManager._redis_connect` / `_publish`: a bounded pool that waits (the default fails an
   emit once 100 are in flight), and while Redis is away one log line and one retry a second
   instead of two errors and a reconnect at every emit.
3. `GuardedServer._handle_eio_message`: a message that is not a Socket.IO packet a client may send
   closes its connection with one log line; python-socketio raised out of its handler task (a
   traceback per message) and left the connection open. An event whose JSON is well formed but
   refused by the parser (nested thousands deep, an integer of thousands of digits) is answered
   through its ack instead (`ClientHooks.unreadable_event`), and the connection stays open:
   python-socketio closed it, or raised RecursionError out of its handler task.
4. `GuardedServer._handle_eio_connect` / `_handle_eio_disconnect` tell `ClientHooks` of every
   Engine.IO connection from its handshake to its close (the connections per address count it
   whether or not it ever connects to Socket.IO).

Why python-socketio's public API cannot do 3 and 4 (GuardedServer):
- (3) a client's message reaches the service's handlers only once the private `_handle_eio_message`
  has decoded and dispatched it, and its decoding errors are raised there; a `serializer` class
  (public) decodes it, but has no connection to close nor ack to answer.
- (4) python-socketio registers its own handlers for Engine.IO's connect and disconnect (`eio.on`
  keeps one handler per event: ours would replace its), and its own `connect` and `disconnect`
  events are per namespace, so a connection that never connects to one raises neither.

`PATCHED` holds the sha256 of each upstream piece this relies on, as in the version pinned in
constraints.txt: the service does not start when the installed version or a piece differs
(server/upstream/guard.py), and tests/test_upstream.py fails, so an upgrade is read first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any, Protocol

import socketio
from engineio import packet as eio_packet
from redis.asyncio import BlockingConnectionPool, Redis
from socketio import packet as sio_packet

log = logging.getLogger(__name__)

DISTRIBUTION = "python-socketio"
PINNED = "5.18.1"
PATCHED: dict[object, str] = {
    socketio.AsyncManager.emit: "01ccd5b82b4f955e4f2e4d07b5fbf09cacef868e9f61bc2abe56d92118a5f3ac",
    socketio.AsyncServer._send_eio_packet: "64cf72a2ab7d75b1d4cc1469416cde6ad7e949f74693924381dc05560e9ae929",
    socketio.AsyncServer._handle_eio_message: "bef50fc0e1635921c922995dba721d05d1c5ccc95d6a6b7647a1db75c4e6032e",
    socketio.AsyncServer._handle_eio_connect: "76704886d944a7e648d24c37acb921c9866a58a6c1086f2cd9917ec0386e3517",
    socketio.AsyncServer._handle_eio_disconnect: "9344593148b66fd9b4e7614e7a1427f641c74c8cbf1d85263c0ca70d8bfeace5",
    sio_packet.Packet.decode: "61ad7904b539f4728d84d0db1a2051a762676a85ab5bacfaf83f3b3465190a8a",
    socketio.AsyncRedisManager._redis_connect: "da4530c936323c252b3525c979986934b83a23d0e2a929e5ce89bb6cd3cfff95",
    socketio.AsyncRedisManager._publish: "033e4da7cc8768b45283323b44859bc6102b7cd9e9d1022c42d84cf0f2a617b1",
}


class RoomListener(Protocol):
    def deliver(self, room: str, event: str, data: Any) -> None:
        """Called with every room event, in the emitting task (must not block)."""
        ...


class DirectEmitManager(socketio.AsyncManager):  # type: ignore[misc]
    """A room emit that queues the packet for each recipient in the calling task.

    python-socketio's own emit starts a task per recipient and waits for them all: for one
    Engine.IO queue put each, that is a task, a wait and a turn of the loop per chunk. Here the
    packet is encoded once and put on each recipient's queue in order, one after another (a put
    on Engine.IO's unbounded queue does not wait). A recipient that fails is skipped and logged,
    as python-socketio's unawaited task would have been. Emits with an ack callback keep the
    library's path. One difference: Engine.IO closes a socket whose pings stopped when a packet
    is sent to it, and that close (with its disconnect handler) now runs in the emitting task.
    Measured in docs/performance.md.
    """

    # Hears every room event too: the session rooms' plain WebSocket clients (set by create_sio).
    listener: RoomListener | None = None

    async def emit(
        self,
        event: str,
        data: Any,
        namespace: str,
        room: Any = None,
        skip_sid: Any = None,
        callback: Any = None,
        to: Any = None,
        **kwargs: Any,
    ) -> None:
        room = to or room
        if self.listener is not None and isinstance(room, str):
            self.listener.deliver(room, event, data)
        if callback is not None or namespace not in self.rooms:
            await super().emit(event, data, namespace, room=room, skip_sid=skip_sid, callback=callback, **kwargs)
            return
        skipped = skip_sid if isinstance(skip_sid, list) else [skip_sid]
        payload = list(data) if isinstance(data, tuple) else [] if data is None else [data]
        # binary=False: room events are JSON documents (`payload()`, or another process's emit
        # read back from Redis as JSON), so python-socketio's recursive scan of every packet for
        # bytes is skipped (docs/performance.md).
        encoded = self.server.packet_class(
            sio_packet.EVENT, namespace=namespace, data=[event, *payload], binary=False
        ).encode()
        pkt = eio_packet.Packet(eio_packet.MESSAGE, encoded)
        for sid, eio_sid in self.get_participants(namespace, room):
            if sid in skipped:
                continue
            try:
                await self.server._send_eio_packet(eio_sid, pkt)
            except Exception as exc:
                log.debug("could not send %s to %s: %r", event, sid, exc)


class RedisManager(socketio.AsyncRedisManager, DirectEmitManager):  # type: ignore[misc]
    """Room emits reach the sockets of every process (this process's own are served first).

    While Redis is away, python-socketio would try to reconnect, and log two errors, at every
    emit: at chunk rates that floods the log and slows the stream. This says it once, and tries
    Redis again at most once a second; local sockets are served all along.
    """

    connected: bool
    redis: Redis | None
    _down_since: float | None = None
    _next_try = 0.0

    def _redis_connect(self) -> None:
        # python-socketio's default pool fails an emit ("Too many connections") once 100 are
        # in flight, which a busy process reaches; a bounded pool that waits is what it needs.
        pool = BlockingConnectionPool.from_url(self.redis_url, max_connections=64, timeout=2, **self.redis_options)
        old, self.redis = getattr(self, "redis", None), Redis.from_pool(pool)
        if old is not None:
            self._closing = asyncio.ensure_future(old.aclose())
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        self.connected = True

    async def _publish(self, data: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._down_since is not None and loop.time() < self._next_try:
            return None
        try:
            if not self.connected or self.redis is None:
                self._redis_connect()
            assert self.redis is not None
            result = await self.redis.publish(self.channel, self.json.dumps(data))
        except Exception as exc:
            self.connected = False
            if self._down_since is None:
                self._down_since = loop.time()
                log.error("cannot publish to Redis (%r): other processes miss this process's events", exc)
            self._next_try = loop.time() + 1.0
            return None
        if self._down_since is not None:
            log.warning("publishing to Redis again after %.1f s", loop.time() - self._down_since)
            self._down_since = None
        return result


# The Socket.IO packets a client may send (CONNECT_ERROR is the server's to send).
_CLIENT_PACKETS = frozenset(
    {
        sio_packet.CONNECT,
        sio_packet.DISCONNECT,
        sio_packet.EVENT,
        sio_packet.ACK,
        sio_packet.BINARY_EVENT,
        sio_packet.BINARY_ACK,
    }
)


class ClientHooks(Protocol):
    """What the service does at the edges of a client's life that python-socketio has no handler for."""

    def opened(self, eio_sid: str, environ: Any) -> None:
        """An Engine.IO connection completed its handshake."""
        ...

    def closed(self, eio_sid: str) -> None:
        """That Engine.IO connection closed (once per `opened`)."""
        ...

    def unreadable_event(self, sid: str, event: str, problem: str) -> Any:
        """The ack for an event whose payload the JSON parser refused; None: no answer."""
        ...


class GuardedServer(socketio.AsyncServer):  # type: ignore[misc]
    """python-socketio's server, except that an Engine.IO message that is not a Socket.IO packet a
    client may send (`42[`, `42{}`, an unknown type, a binary frame no binary event announced)
    closes its connection with one log line, and an event whose payload is well-formed JSON the
    parser refuses is answered through its ack. python-socketio raises out of its handler task
    instead: a traceback per message, and the connection stays open for more."""

    hooks: ClientHooks | None = None  # set by the service (transport/socketio_app.py)

    async def _handle_eio_connect(self, eio_sid: str, environ: Any) -> None:
        await super()._handle_eio_connect(eio_sid, environ)
        if self.hooks is not None:
            self.hooks.opened(eio_sid, environ)

    async def _handle_eio_disconnect(self, eio_sid: str, reason: Any) -> None:
        try:
            await super()._handle_eio_disconnect(eio_sid, reason)
        finally:
            if self.hooks is not None:
                self.hooks.closed(eio_sid)

    async def _handle_eio_message(self, eio_sid: str, data: Any) -> None:
        if eio_sid not in self._binary_packet:  # else: an attachment the packet before announced
            problem = _malformed(self.packet_class, data)
            if isinstance(problem, UnreadableEvent):
                await self._answer_unreadable(eio_sid, problem)
                return
            if problem is not None:
                await self._close_malformed(eio_sid, problem)
                return
        try:
            await super()._handle_eio_message(eio_sid, data)
        except ValueError as exc:  # python-socketio's word for a packet out of place ("Unexpected ...")
            await self._close_malformed(eio_sid, str(exc))

    async def _answer_unreadable(self, eio_sid: str, event: UnreadableEvent) -> None:
        namespace = event.namespace or "/"
        sid = self.manager.sid_from_eio_sid(eio_sid, namespace)
        if sid is None or not self.manager.is_connected(sid, namespace) or self.hooks is None:
            return  # as python-socketio ignores an event to a namespace the client has not connected to
        ack = self.hooks.unreadable_event(sid, event.name, event.problem)
        if ack is not None and event.id is not None:
            await self._send_packet(
                eio_sid, self.packet_class(sio_packet.ACK, namespace=namespace, id=event.id, data=[ack])
            )

    async def _close_malformed(self, eio_sid: str, problem: str) -> None:
        self._binary_packet.pop(eio_sid, None)
        socket = self.eio.sockets.get(eio_sid)
        if socket is None or socket.closing:  # closed by an earlier malformed packet
            return
        log.info("closing Socket.IO connection %s: a malformed packet (%s)", eio_sid, problem)
        # Engine.IO's `disconnect` would wait until the client takes its CLOSE packet: over
        # long-polling, until a poll that a hostile client never sends (holding this POST open).
        await socket.close(wait=False, reason=self.eio.reason.SERVER_DISCONNECT)
        self.eio.sockets.pop(eio_sid, None)
        # After its CLOSE packet, end the writer too, which closes the WebSocket (or answers a
        # pending poll): a client that ignores the packet is not left connected.
        await socket.queue.put(None)


class UnreadableEvent:
    """An EVENT packet whose header reads but whose JSON the parser refused (well formed, too deep or
    with too large a number)."""

    def __init__(self, name: str, namespace: str | None, id: int | None, problem: str) -> None:
        self.name, self.namespace, self.id, self.problem = name, namespace, id, problem


class _Unparsed(str):
    """The JSON text of a packet, left unparsed."""


class _Verbatim:
    """Stands in for the json module: a packet decoded with it reads its header only."""

    @staticmethod
    def loads(text: str, **_options: Any) -> _Unparsed:
        return _Unparsed(text)


class _Header(sio_packet.Packet):  # type: ignore[misc]
    json = _Verbatim


_EVENT_NAME_START = re.compile(r"\[\s*")
_STRING = json.JSONDecoder()


def _malformed(packet_class: Any, data: Any) -> str | UnreadableEvent | None:
    """Why `data` is no Socket.IO packet a client may send, or None when it is one."""
    try:
        pkt = packet_class(encoded_packet=data)
    except json.JSONDecodeError as exc:
        return f"undecodable: {type(exc).__name__}"
    except (ValueError, RecursionError) as exc:  # the header, or JSON the parser refuses
        return _unreadable(data, exc) or f"undecodable: {type(exc).__name__}"
    except (TypeError, IndexError) as exc:
        return f"undecodable: {type(exc).__name__}"
    if pkt.packet_type not in _CLIENT_PACKETS:
        return f"packet type {pkt.packet_type}"
    if pkt.packet_type in (sio_packet.EVENT, sio_packet.BINARY_EVENT) and not (
        isinstance(pkt.data, list) and pkt.data and isinstance(pkt.data[0], str)
    ):
        return "an event that is not [name, ...]"
    return None


def _unreadable(data: Any, error: Exception) -> UnreadableEvent | None:
    """The event in a text packet whose header reads and whose JSON is refused by the parser (not
    malformed: an ordinary client library can send it), or None."""
    if not isinstance(data, str):
        return None
    try:
        header = _Header(encoded_packet=data)
    except (ValueError, TypeError, IndexError):
        return None  # the header itself is malformed
    text = header.data
    if header.packet_type != sio_packet.EVENT or not isinstance(text, _Unparsed):
        return None
    start = _EVENT_NAME_START.match(text)
    if start is None or text[start.end() : start.end() + 1] != '"':
        return None
    try:
        name, _ = _STRING.raw_decode(text, start.end())
    except ValueError:
        return None
    problem = "JSON nested too deeply" if isinstance(error, RecursionError) else "a number too large"
    return UnreadableEvent(name, header.namespace, header.id, problem)
