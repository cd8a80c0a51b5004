"""python-engineio, patched. What is patched, and why:

1. `AsyncSocket` is replaced (`install`) by `FastWebSocket`, whose WebSocket loop is a copy of
   `AsyncSocket._websocket_handler` with fewer turns of the event loop per packet each way.
   python-engineio waits for each received frame and each packet to send through
   `asyncio.wait_for` on a task of its own, so a packet reaches the handler, and a queued packet
   reaches the socket, three turns of the loop after it is ready; under load the time to a turn's
   first chunk is a count of such turns. This loop reads frames under `asyncio.timeout` (one
   turn), wakes the writer one turn after a packet is queued, and lets `WRITER_REST_TURNS` turns
   pass after each batch it sends (a streaming socket then takes several chunks per wake-up).
   For hostile clients: a frame that is not an Engine.IO packet closes its connection with a
   close frame and one log line (python-engineio raised out of the loop: a traceback per frame),
   and a cancellation of the loop is passed on once the socket is cleaned up, not swallowed.
2. `close_every_socket` (shutdown) also wakes the long-poll of a socket that is closed already:
   python-engineio leaves a poll whose client went away waiting for the ping timeout, and the
   server's shutdown waiting for it.
3. Bounded sends (`SEND_QUEUE_LIMIT_BYTES`, set as the server's `send_queue_limit`): `send`
   counts the bytes of each packet until it is written to the WebSocket or handed to a long-poll,
   and a socket that lets more than the limit wait (a client that stopped reading) is dropped:
   its queue emptied, its writer stopped, its disconnect run. Upstream's queue grows without
   bound, and so does the server with it. One packet larger than the limit is still sent, when
   no other such packet waits (a long history in a `join` answer).
4. A long-polling POST the socket cannot take (over `max_http_buffer_size`, not UTF-8, not an
   Engine.IO payload, an unknown packet) closes the connection at once, is answered 400 and logs
   one line. Upstream's server answers such a POST by closing the socket and waiting until a
   poll takes its CLOSE packet: a client that never polls again held the request, its file
   descriptor and its task until shutdown, which then ran out its grace on them. A closed
   socket's ping task is cancelled too, instead of sleeping out the ping interval.
5. `close_transport` (a token that expired): the connection ends at its transport, with no
   Engine.IO CLOSE packet: socket.io-client and python-engineio's client take that as a lost
   connection and reconnect by themselves (python-engineio's client does not after a CLOSE packet,
   nor socket.io-client after a Socket.IO DISCONNECT). Nothing queued or sent after it goes out.

Why python-engineio's public API cannot do it:
- (1, 3, 4, 5) its server makes each connection's socket as `async_socket.AsyncSocket(self, sid)` in
  its private `_handle_connect`, with no option naming another class, and the loop, `send`, the
  POST handling and the ping task are that class's methods, with no hooks. No option bounds what
  waits for a client (`max_http_buffer_size` bounds one packet), and a bounded `create_queue` would
  make the emitting task wait behind a client that stopped reading instead of dropping it.
- (2) its `disconnect` leaves the pending poll of a socket that is closed already waiting, and its
  `shutdown` only stops its service task: a poll is woken by a None on the socket's `queue`.

`PATCHED` holds the sha256 of each upstream piece this relies on, as in the version pinned in
constraints.txt: the service does not start when the installed version or a piece differs
(server/upstream/guard.py), and tests/test_upstream.py fails, so an upgrade is read first.
Measured in docs/performance.md.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from engineio import async_server, async_socket, exceptions, packet, payload

log = logging.getLogger(__name__)

DISTRIBUTION = "python-engineio"
PINNED = "4.15.1"
_UPSTREAM_SOCKET = async_socket.AsyncSocket  # taken before `install` replaces it
PATCHED: dict[object, str] = {
    _UPSTREAM_SOCKET._websocket_handler: "27f120df4d717a24478b7b0f7389ce19eea8a881dd07e2c81fb1cf2493e006a5",
    _UPSTREAM_SOCKET.poll: "826f58a9f3606db208e5d1266f075ad655b6eeda47b0a5616748624899ca5954",
    _UPSTREAM_SOCKET.close: "faa2e93902543244d2a1b772cdf4074d1615532e98fa6ca896739ca54ad64e76",
    _UPSTREAM_SOCKET.send: "0437276ccba7ab091471e29f4bc6a0f178da7b16a590c707d6c69a97609e6d14",
    _UPSTREAM_SOCKET.handle_post_request: "82dca119a261a95904b8714cc255ab79aaaef0acd4a0ef98d8ef7a116c370ef2",
    _UPSTREAM_SOCKET.schedule_ping: "fe316639159cd70d34cdb911a055fc1a0056ff15615b8460a1ab6593c95e9372",
    # Its POST branch: an EngineIOError from the socket is answered 400 after `disconnect(sid)`.
    async_server.AsyncServer.handle_request: "1a8c878e35166cfe868d2cef40cdeb33af620541363a705c4dd2eea76c0f27af",
}

# Turns of the event loop a streaming socket's writer lets pass between batches.
WRITER_REST_TURNS = 2


class MalformedFrame(ValueError):
    """A WebSocket frame that is not an Engine.IO packet."""


class RefusedPost(exceptions.EngineIOError):  # type: ignore[misc]
    """A long-polling POST the socket does not take (module docstring, 4)."""


# What decoding hostile text raises: JSON nested thousands deep is a RecursionError.
DECODING_ERRORS = (ValueError, TypeError, IndexError, RecursionError)


def decode_frame(frame: str | bytes) -> packet.Packet:
    """The Engine.IO packet in a frame, or MalformedFrame (plain text, an unknown packet type)."""
    try:
        pkt = packet.Packet(encoded_packet=frame)
    except DECODING_ERRORS as exc:
        raise MalformedFrame(type(exc).__name__) from None
    if not 0 <= pkt.packet_type < len(packet.packet_names):
        raise MalformedFrame(f"unknown packet type {pkt.packet_type}")
    return pkt


def packet_size(pkt: packet.Packet) -> int:
    """About the bytes a packet takes on the wire (its data's length: no encoding on the chunk path)."""
    data = pkt.data
    return 1 + (len(data) if isinstance(data, str | bytes) else 0 if data is None else len(str(data)))


class FastWebSocket(async_socket.AsyncSocket):  # type: ignore[misc]
    connected: bool
    last_ping: float | None
    upgraded: bool
    upgrading: bool
    closed: bool
    sid: str
    waiting_bytes = 0  # sent, not yet written to the WebSocket or handed to a long-poll
    oversized_waiting = False  # a packet larger than the limit waits (it is not counted)
    dropped = False  # let too much wait: its packets are dropped, it is disconnected
    transport_closed = False  # closed by close_transport (an expired token)
    _writer: asyncio.Task[None] | None = None
    _reader: asyncio.Task[Any] | None = None  # the task running the WebSocket loop
    _waiting_for_frame = False  # the loop is between frames (cancelling it cuts no request short)
    _post_refused = False  # no poll will come for the CLOSE packet: closing must not wait for one
    _pinger: asyncio.Task[Any] | None = None

    async def handle_post_request(self, environ: dict[str, Any]) -> None:
        """Upstream's, except that a POST the socket cannot take closes it at once (module docstring, 4)."""
        try:
            for pkt in await self._posted_packets(environ):
                await self.receive(pkt)
        except exceptions.UnknownPacketError:
            self._refuse_post("a POST with a packet no client sends")
            raise
        except RefusedPost as exc:
            self._refuse_post(str(exc))
            raise

    async def _posted_packets(self, environ: dict[str, Any]) -> list[packet.Packet]:
        limit = self.server.max_http_buffer_size
        try:
            length = int(environ.get("CONTENT_LENGTH", "0"))
        except ValueError:
            raise RefusedPost("a POST without a usable Content-Length") from None
        if not 0 <= length <= limit:
            raise RefusedPost(f"a POST of {length} bytes (the limit is {limit})")
        body = await environ["wsgi.input"].read(length)
        try:
            packets: list[packet.Packet] = payload.Payload(encoded_payload=body.decode("utf-8")).packets
        except DECODING_ERRORS as exc:
            raise RefusedPost(f"a POST that is no Engine.IO payload ({type(exc).__name__})") from None
        for pkt in packets:
            if not 0 <= pkt.packet_type < len(packet.packet_names):
                raise RefusedPost(f"a POST with packet type {pkt.packet_type}")
        return packets

    def _refuse_post(self, problem: str) -> None:
        # Engine.IO's server answers 400 and runs `disconnect(sid)`, whose close would wait for a poll.
        self._post_refused = True
        log.info("closing Engine.IO connection %s: %s", self.sid, problem)

    async def close(self, wait: bool = True, abort: bool = False, reason: Any = None) -> None:
        await super().close(wait=wait and not self._post_refused, abort=abort, reason=reason)
        pinger = self._pinger
        if pinger is not None and pinger is not asyncio.current_task():  # (a ping's send can close it)
            pinger.cancel()

    def schedule_ping(self) -> None:
        """Upstream's, keeping the task so that `close` can cancel it."""
        if self.last_ping:
            self.last_ping = None
            self._pinger = self.server.start_background_task(self._send_ping)

    async def send(self, pkt: packet.Packet) -> None:
        """Upstream's `send`, counting what waits for the client (module docstring, 3)."""
        if self.dropped or not await self.check_ping_timeout():
            return
        limit: int | None = getattr(self.server, "send_queue_limit", None)
        if limit is not None:
            size = packet_size(pkt)
            if size > limit and not self.oversized_waiting:
                self.oversized_waiting = True
            elif self.waiting_bytes + size > limit:
                self._drop(limit)
                return
            else:
                self.waiting_bytes += size
        self.queue.put_nowait(pkt)  # the queue is unbounded: upstream's `put` never waits either

    def _written(self, pkt: packet.Packet) -> None:
        size = packet_size(pkt)
        limit: int | None = getattr(self.server, "send_queue_limit", None)
        if limit is not None and size > limit:
            self.oversized_waiting = False
        else:
            self.waiting_bytes = max(0, self.waiting_bytes - size)

    async def poll(self) -> list[packet.Packet]:
        packets: list[packet.Packet] = await super().poll()
        if not packets and self.transport_closed:
            # Engine.IO answers this long-poll 400 and forgets the session: a lost connection to the
            # client, without a later request for a session it no longer knows (an ERROR line).
            raise exceptions.QueueEmpty()
        for pkt in packets:
            if pkt is not None:
                self._written(pkt)
        return packets

    def close_transport(self) -> None:
        """End this connection now at its transport (module docstring, 5): the WebSocket is closed
        or the long-poll (the pending one, or the next) answered 400; no CLOSE packet."""
        if self.dropped or self.closing or self.closed:
            return
        self.transport_closed = True
        self._end_now()

    def _is_dropped(self) -> bool:
        return self.dropped  # read again after an await (mypy takes the loop's test for the last word)

    def _drop(self, limit: int) -> None:
        """A client that lets more than `limit` bytes wait: free them now, disconnect it."""
        log.warning(
            "disconnecting Engine.IO connection %s: more than %d bytes waited for it (it stopped reading)",
            self.sid,
            limit,
        )
        self._end_now()

    def _end_now(self) -> None:
        """What waits for the client is dropped and nothing more is queued; a writer blocked on a
        stalled WebSocket and a read loop between frames are stopped (they would wait for the ping
        timeout); its disconnect runs in a task tracked until it ends."""
        self.dropped = True
        while not self.queue.empty():
            self.queue.get_nowait()
            self.queue.task_done()
        self.waiting_bytes = 0
        self.queue.put_nowait(None)  # ends a pending long-poll, or a writer between sends
        if self._writer is not None:
            self._writer.cancel()
        if self._reader is not None and self._waiting_for_frame:
            self._reader.cancel()
        task = asyncio.ensure_future(self.close(wait=False, abort=True, reason=self.server.reason.TRANSPORT_CLOSE))
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    async def _next_batch(self) -> list[packet.Packet]:
        """The packets queued for this socket, waiting for the first one if there is none; [] once
        the socket closes. QueueEmpty when nothing came for a ping interval and timeout."""
        try:
            if self.queue.empty():
                async with asyncio.timeout(self.server.ping_interval + self.server.ping_timeout):
                    first = await self.queue.get()
            else:
                first = self.queue.get_nowait()
            self.queue.task_done()
        except TimeoutError:
            raise exceptions.QueueEmpty() from None
        if first is None:
            return []
        packets = [first]
        while not self.queue.empty():
            pkt = self.queue.get_nowait()
            self.queue.task_done()
            if pkt is None:
                self.queue.put_nowait(None)
                break
            packets.append(pkt)
        return packets

    async def _websocket_handler(self, ws: Any) -> Any:
        """python-engineio's handler for the WebSocket transport, its two waits changed (module docstring)."""

        async def websocket_wait() -> Any:
            data = await ws.wait()
            if data and len(data) > self.server.max_http_buffer_size:
                raise ValueError("packet is too large")
            return data

        async def upgrade_packet() -> packet.Packet | None:
            """The next packet of an upgrade; None once a frame that is none closed the socket."""
            try:
                return decode_frame(await websocket_wait())
            except MalformedFrame as exc:
                self._refuse_frame(exc)
                self.upgrading = False
                await ws.close()
                return None

        if self.connected:
            # the socket was already connected, so this is an upgrade
            self.upgrading = True  # hold packet sends during the upgrade

            try:
                decoded_pkt = await upgrade_packet()
            except OSError:
                return
            if decoded_pkt is None:
                return
            if decoded_pkt.packet_type != packet.PING or decoded_pkt.data != "probe":
                self.server.logger.info("%s: Failed websocket upgrade, no PING packet", self.sid)
                self.upgrading = False
                return
            await ws.send(packet.Packet(packet.PONG, data="probe").encode())
            await self.queue.put(packet.Packet(packet.NOOP))  # end poll

            try:
                decoded_pkt = await upgrade_packet()
            except OSError:
                self.upgrading = False
                return
            if decoded_pkt is None:
                return
            if decoded_pkt.packet_type != packet.UPGRADE:
                self.upgraded = False
                self.server.logger.info(
                    "%s: Failed websocket upgrade, expected UPGRADE packet, received %s instead.",
                    self.sid,
                    packet.packet_names[decoded_pkt.packet_type],
                )
                self.upgrading = False
                return
            self.upgraded = True
            self.upgrading = False
        else:
            self.connected = True
            self.upgraded = True

        async def writer() -> None:
            while True:
                try:
                    packets = await self._next_batch()
                except exceptions.QueueEmpty:
                    break
                if not packets:
                    # empty packet list returned -> connection closed
                    break
                try:
                    for pkt in packets:
                        await ws.send(pkt.encode())
                        self._written(pkt)
                except Exception:  # as python-engineio: a failed send ends the writer
                    break
                for _ in range(WRITER_REST_TURNS):
                    await asyncio.sleep(0)
            await ws.close()

        async def guarded_writer() -> None:
            try:
                await writer()
            except asyncio.CancelledError:
                if not self.dropped:
                    raise
                # Dropped: a close frame would wait on the stalled transport as the packets did.

        writer_task = asyncio.ensure_future(guarded_writer())
        self._writer = writer_task
        self._reader = asyncio.current_task()

        self.server.logger.info("%s: Upgrade to websocket successful", self.sid)

        cancelled = False
        while not self.dropped:
            p = None
            try:
                self._waiting_for_frame = True
                async with asyncio.timeout(self.server.ping_interval + self.server.ping_timeout):
                    p = await websocket_wait()
            except asyncio.CancelledError:
                if self._is_dropped():  # `_drop` ended the read: the connection ends now, not at the ping timeout
                    task = asyncio.current_task()
                    if task is not None:
                        task.uncancel()
                    break
                cancelled = True  # cleaned up below, then passed on
                break
            except Exception:  # as python-engineio: a timeout or a failed read ends the loop
                break
            finally:
                self._waiting_for_frame = False
            if p is None:
                # connection closed by client
                break
            try:
                pkt = decode_frame(p)
            except MalformedFrame as exc:
                self._refuse_frame(exc)
                break
            try:
                await self.receive(pkt)
            except exceptions.UnknownPacketError:
                pass
            except exceptions.SocketIsClosedError:
                self.server.logger.info("Receive error -- socket is closed")
                break
            except Exception:
                # if we get an unexpected exception we log the error and exit
                # the connection properly
                self.server.logger.exception("Unknown receive error")

        try:
            await self.queue.put(None)  # unlock the writer task so it can exit
            await asyncio.wait_for(writer_task, timeout=None)
            await self.close(wait=False, abort=True, reason=self.server.reason.TRANSPORT_CLOSE)
        finally:
            if cancelled:
                writer_task.cancel()
        if cancelled:
            raise asyncio.CancelledError

    def _refuse_frame(self, error: MalformedFrame) -> None:
        log.info("closing Engine.IO connection %s: a frame that is not an Engine.IO packet (%s)", self.sid, error)


# Tasks ending a connection at once (an expired token, a stalled client), until they end.
_closing: set[asyncio.Task[None]] = set()


def install() -> None:
    """Make Engine.IO create this socket for every connection (it names the class in its module)."""
    async_socket.AsyncSocket = FastWebSocket


async def close_every_socket(eio: Any, wait_seconds: float) -> None:
    """Close every Engine.IO connection: a close packet, and pending long-polls answered at once.
    Best effort: a client that vanished never reads its close packet, so this waits `wait_seconds` at most."""
    sockets = list(eio.sockets.values())
    closing = [asyncio.create_task(eio.disconnect(sid)) for sid in list(eio.sockets)]
    if closing:
        _, late = await asyncio.wait(closing, timeout=wait_seconds)
        for task in late:
            task.cancel()
        await asyncio.gather(*closing, return_exceptions=True)
    for socket in sockets:
        # `poll` returns at a None; a socket closed by its client (abort) never put one there.
        socket.queue.put_nowait(None)
    if _closing:  # connections ending at once (expired tokens, stalled clients) finish first
        await asyncio.wait(list(_closing), timeout=wait_seconds)
