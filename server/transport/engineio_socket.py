"""Engine.IO's WebSocket loop, with fewer turns of the event loop per packet each way.

python-engineio 4.15.1 waits for each received frame and each packet to send through
`asyncio.wait_for` on a task of its own, so on Python 3.11 a packet reaches the handler, and a
queued packet reaches the socket, three turns of the loop after it is ready. Under load a turn is
every streaming turn's chunk (about 10 ms at 100 sessions here), and the time to a turn's first
chunk is a count of such turns. This socket:

- reads frames directly under `asyncio.timeout` (one turn instead of three);
- wakes the writer one turn after a packet is queued, and after each batch it sends lets
  `WRITER_REST_TURNS` turns pass before it looks at the queue again. An idle socket's first packet
  (a `user_message`, the answer's first chunk) goes out at once; a streaming one takes the
  chunks of those turns in one wake-up, where it would otherwise suspend, arm a timeout and be
  woken for every chunk: without the rest the server spent a third more CPU per chunk. (Each
  packet is still its own frame and, with uvloop, its own write to the socket.)

Two more departures, for hostile clients: a frame that is not an Engine.IO packet (plain text,
an unknown packet type) closes its connection with a WebSocket close frame and one log line,
where python-engineio raised out of the loop (a traceback per frame, no close frame); and a
cancellation of the loop is passed on once the socket is cleaned up, not swallowed.

Everything else is python-engineio's `_websocket_handler`, as it is in the version pinned in
constraints.txt; `tests/test_engineio_socket.py` fails when that version's method changes, so
an upgrade is read before it lands. Measured in docs/performance.md.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from engineio import async_socket, exceptions, packet

log = logging.getLogger(__name__)

# Turns of the event loop a streaming socket's writer lets pass between batches.
WRITER_REST_TURNS = 2


class MalformedFrame(ValueError):
    """A WebSocket frame that is not an Engine.IO packet."""


def decode_frame(frame: str | bytes) -> packet.Packet:
    """The Engine.IO packet in a frame, or MalformedFrame (plain text, an unknown packet type)."""
    try:
        pkt = packet.Packet(encoded_packet=frame)
    except (ValueError, TypeError, IndexError) as exc:
        raise MalformedFrame(type(exc).__name__) from None
    if not 0 <= pkt.packet_type < len(packet.packet_names):
        raise MalformedFrame(f"unknown packet type {pkt.packet_type}")
    return pkt


class FastWebSocket(async_socket.AsyncSocket):  # type: ignore[misc]
    connected: bool
    upgraded: bool
    upgrading: bool
    sid: str

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
                except Exception:  # as python-engineio: a failed send ends the writer
                    break
                for _ in range(WRITER_REST_TURNS):
                    await asyncio.sleep(0)
            await ws.close()

        writer_task = asyncio.ensure_future(writer())

        self.server.logger.info("%s: Upgrade to websocket successful", self.sid)

        cancelled = False
        while True:
            p = None
            try:
                async with asyncio.timeout(self.server.ping_interval + self.server.ping_timeout):
                    p = await websocket_wait()
            except asyncio.CancelledError:
                cancelled = True  # cleaned up below, then passed on
                break
            except Exception:  # as python-engineio: a timeout or a failed read ends the loop
                break
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


def install() -> None:
    """Make Engine.IO create this socket for every connection (it names the class in its module)."""
    async_socket.AsyncSocket = FastWebSocket
