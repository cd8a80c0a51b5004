"""python-socketio, patched. What is patched, and why:

1. `GuardedServer._handle_eio_message`: a message that is not a Socket.IO packet a client may send
   closes its connection with one log line; python-socketio raised out of its handler task (a
   traceback per message) and left the connection open. An event whose JSON is well formed but
   refused by the parser (nested thousands deep, an integer of thousands of digits) is answered
   through its ack instead (`ClientHooks.unreadable_event`), and the connection stays open:
   python-socketio closed it, or raised RecursionError out of its handler task.
2. `GuardedServer._handle_eio_connect` / `_handle_eio_disconnect` tell `ClientHooks` of every
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

import json
import logging
import re
from typing import Any, Protocol

import socketio
from socketio import packet as sio_packet

log = logging.getLogger(__name__)

DISTRIBUTION = "python-socketio"
PINNED = "5.18.1"
PATCHED: dict[object, str] = {
    socketio.AsyncServer._handle_eio_message: "bef50fc0e1635921c922995dba721d05d1c5ccc95d6a6b7647a1db75c4e6032e",
    socketio.AsyncServer._handle_eio_connect: "76704886d944a7e648d24c37acb921c9866a58a6c1086f2cd9917ec0386e3517",
    socketio.AsyncServer._handle_eio_disconnect: "9344593148b66fd9b4e7614e7a1427f641c74c8cbf1d85263c0ca70d8bfeace5",
    sio_packet.Packet.decode: "61ad7904b539f4728d84d0db1a2051a762676a85ab5bacfaf83f3b3465190a8a",
}


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
