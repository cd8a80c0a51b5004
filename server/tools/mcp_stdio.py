"""The stdio transport to an MCP server: the SDK's `stdio_client` (mcp 2.3.0, pinned) with its
process handling and shutdown kept, and two parts of its own:
- stdout is split into lines in linear time, and a line over MAX_LINE_BYTES ends the session with
  LineTooLong (the server is then restarted): the SDK's reader joins a growing line again on every
  read, quadratic in its length, with no bound;
- stderr is read line by line into the log, as WARNING records of the server's own logger (capped,
  rate-limited), instead of landing unformatted among the service's JSON lines.
A line on stdout that is not JSON-RPC is dropped with a WARNING (rate-limited), not a traceback."""

from __future__ import annotations

import contextlib
import logging
import subprocess
from collections.abc import AsyncGenerator, AsyncIterator

import anyio
import anyio.lowlevel
import mcp_types as types
from anyio.abc import ByteReceiveStream, Process
from mcp.client._transport import TransportStreams
from mcp.client.stdio import StdioServerParameters, get_default_environment

# Private to the SDK, and its reason to be trusted: the spec's shutdown sequence (close stdin, wait,
# then kill the process group), every wait bounded. The pin in requirements.txt keeps it there.
from mcp.client.stdio import _drain_stdout as drain_stdout
from mcp.client.stdio import _stop_server_process as stop_server_process
from mcp.shared.message import SessionMessage

from server.logs import REPEAT_BURST

# Far above any message a tool sends back (results are cut to MCP_RESULT_MAX_CHARS anyway).
MAX_LINE_BYTES = 16 * 1024 * 1024
STDERR_LINE_BYTES = 2000
STDERR_BURST = 20  # stderr lines logged per rate-limit period: a traceback shows its start
_WRITER_FLUSH_SECONDS = 0.5  # as the SDK's
_STDERR_FLUSH_SECONDS = 0.5


class LineTooLong(Exception):
    """The server wrote a line on stdout longer than any message may be."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"a line on stdout over {limit:,} bytes")


@contextlib.asynccontextmanager
async def stdio_transport(
    server: StdioServerParameters, log: logging.Logger, max_line_bytes: int = MAX_LINE_BYTES
) -> AsyncIterator[TransportStreams]:
    """Start the server and yield the two streams the SDK's session takes; stop it on exit. Raises
    LineTooLong on exit when that is what ended the session."""
    process = await anyio.open_process(
        [server.command, *server.args],
        env=get_default_environment() | (server.env or {}),
        stderr=subprocess.PIPE,
        cwd=server.cwd,
        start_new_session=True,
    )
    # As in the SDK: no await between the spawn and the task group, or a cancel would leak the process.
    pipes = _Pipes(process, log, max_line_bytes)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(pipes.read_stdout)
        tasks.start_soon(pipes.write_stdin)
        tasks.start_soon(pipes.log_stderr)
        try:
            yield pipes.read_stream, pipes.write_stream
        finally:
            # Shielded, every wait in it bounded: a cancelled caller must not leak the server.
            with anyio.CancelScope(shield=True):
                await pipes.shutdown()
            tasks.cancel_scope.cancel()
    if pipes.failure is not None:
        raise pipes.failure


class _Pipes:
    """The server's three pipes and the session's two streams, bridged by one task per pipe."""

    def __init__(self, process: Process, log: logging.Logger, max_line_bytes: int) -> None:
        self.process, self.log, self.max_line_bytes = process, log, max_line_bytes
        self.read_writer, self.read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
        self.write_stream, self.write_reader = anyio.create_memory_object_stream[SessionMessage](0)
        self.writer_done, self.stderr_done = anyio.Event(), anyio.Event()
        self.failure: LineTooLong | None = None

    async def read_stdout(self) -> None:
        assert self.process.stdout is not None
        try:
            lines = _lines(self.process.stdout, self.max_line_bytes)
            async with self.read_writer, contextlib.aclosing(lines):
                async for line in lines:
                    message = _message(line, self.log)
                    if message is not None:
                        await self.read_writer.send(message)
        except LineTooLong as exc:
            self.failure = exc
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, ConnectionError):
            pass  # the session went away, or our shutdown closed the pipe under the read
        finally:
            await drain_stdout(self.process)  # a server blocked writing could not see its stdin close

    async def write_stdin(self) -> None:
        assert self.process.stdin is not None
        try:
            async with self.write_reader:
                async for session_message in self.write_reader:
                    json = session_message.message.model_dump_json(by_alias=True, exclude_unset=True)
                    await self.process.stdin.send((json + "\n").encode())
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
            await self.read_writer.aclose()  # the session sees the end instead of a request hanging
        finally:
            self.writer_done.set()

    async def log_stderr(self) -> None:
        stderr = self.process.stderr
        assert stderr is not None
        try:
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
                lines = _lines(stderr, STDERR_LINE_BYTES, cut=True)
                async with contextlib.aclosing(lines):
                    async for line in lines:
                        text = line.decode(errors="replace").rstrip()
                        if text:
                            self.log.warning("stderr: %s", text, extra={REPEAT_BURST: STDERR_BURST})
        finally:
            self.stderr_done.set()
            with contextlib.suppress(OSError):
                await stderr.aclose()

    async def shutdown(self) -> None:
        """The SDK's order: stop traffic, let the writer flush, stop the server, close the streams."""
        self.read_stream.close()
        self.write_stream.close()
        with anyio.move_on_after(_WRITER_FLUSH_SECONDS):
            await self.writer_done.wait()
        await stop_server_process(self.process)
        with anyio.move_on_after(_STDERR_FLUSH_SECONDS):  # the last words of a server that died
            await self.stderr_done.wait()
        for stream in (self.read_stream, self.write_stream, self.read_writer, self.write_reader):
            await stream.aclose()
        await anyio.lowlevel.checkpoint()


def _message(line: bytes, log: logging.Logger) -> SessionMessage | None:
    """The line's JSON-RPC message; None for a blank line or one that is not a message (logged
    with its length only: a server's stray print can hold anything)."""
    if not line.strip():
        return None
    try:
        return SessionMessage(types.jsonrpc_message_adapter.validate_json(line, by_name=False))
    except ValueError as exc:
        log.warning("a line on stdout is not JSON-RPC (%s, %d bytes); dropped", type(exc).__name__, len(line))
        return None


async def _lines(stream: ByteReceiveStream, limit: int, *, cut: bool = False) -> AsyncGenerator[bytes, None]:
    """The stream's lines, without their newline, in time linear in their length: each byte is
    searched once and copied at most twice. A line over `limit` bytes raises LineTooLong, or with
    `cut` is cut to its first `limit` bytes (the rest is not kept)."""
    pending = bytearray()
    async for chunk in stream:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            pending += chunk[start:end]
            start = end + 1
            if len(pending) > limit and not cut:
                raise LineTooLong(limit)
            yield bytes(pending if len(pending) <= limit else pending[:limit])
            pending.clear()
        pending += chunk[start:]
        if len(pending) > limit:
            if not cut:
                raise LineTooLong(limit)
            del pending[limit:]
    if pending:
        yield bytes(pending)
