"""A TCP proxy a test can cut and restore: storage going away and coming back, for real.

Two kinds of outage: `cut()` drops every connection and hangs up on new ones (a process that
died, a refused port); `blackhole()` keeps every connection open and accepts new ones but
forwards nothing either way (a network path that went dark). On `restore()` what a blackhole
held is delivered, in order and then any end of stream, as TCP retransmission would.
"""

from __future__ import annotations

import asyncio


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.cut_off = False
        self.port = 0

    async def start(self, port: int = 0) -> TcpProxy:
        """Listen on `port` (any free one by default)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def cut(self) -> None:
        """Drop every open connection and hang up on new ones, as a dead database does."""
        self.cut_off = True
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()
        self._flowing.set()  # what a blackhole held goes nowhere: its connections are gone

    def blackhole(self) -> None:
        """Forward nothing from now on, either way, on open and new connections, until `restore()`."""
        self._flowing.clear()

    def restore(self) -> None:
        self.cut_off = False
        self._flowing.set()

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._handlers:  # each ends once its connections are gone: none is left to the loop's end
            await asyncio.wait(self._handlers, timeout=5)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
            handler.add_done_callback(self._handlers.discard)
        if self.cut_off:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._links.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for end in (writer, up_writer):
                self._links.discard(end)
                end.close()  # both ways ended (or were reset): what is still buffered goes out first

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Read on whatever happens, so that a blackhole holds every byte the sender sent.
        held: asyncio.Queue[bytes | None] = asyncio.Queue()
        forwarding = asyncio.create_task(self._forward(held, writer))
        end: bytes | None = b""  # the end of the stream, delivered after what came before it
        try:
            while data := await reader.read(65536):
                held.put_nowait(data)
        except (ConnectionError, OSError):
            end = None  # a reset: passed on as one
        finally:
            held.put_nowait(end)
            await forwarding

    async def _forward(self, held: asyncio.Queue[bytes | None], writer: asyncio.StreamWriter) -> None:
        try:
            while data := await held.get():
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
            await self._flowing.wait()
            if data is None:
                writer.transport.abort()
            elif writer.can_write_eof():
                writer.write_eof()  # half-closed: the answer to what was sent may still come back
        except (ConnectionError, OSError):
            writer.transport.abort()
