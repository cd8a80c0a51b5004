"""Tools from MCP servers (docs/protocol.md, Tools from MCP servers), through the official `mcp` SDK as a
client (stdio through a transport of our own, server/tools/mcp_stdio.py): one session per configured
server per process, opened at start and reopened with backoff when it drops; each server's tools in
the registry as `<server>__<tool>`."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import httpx2
import mcp_types as mcp
from mcp.client import Client, Transport
from mcp.client._transport import TransportStreams  # the SDK's own name for a transport's two streams
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from pydantic import BaseModel
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from server.core.errors import ToolErrorCode
from server.core.models import JSONValue
from server.core.ports import ToolSpec
from server.core.tasks import cancel_and_wait
from server.core.tools import Tool, ToolError, ToolRegistry
from server.tools.mcp_config import HttpServer, ServerConfig, StdioServer
from server.tools.mcp_schema import model_schema, unique_names
from server.tools.mcp_stdio import stdio_transport

log = logging.getLogger(__name__)

GROUP = "mcp"
CLIENT_INFO = mcp.Implementation(name="realtime-ai-backend", version="0.1.0")
# A session that ends sooner than this after opening counts as a failed start: the backoff grows.
STABLE_SECONDS = 5.0
START_WAIT_SECONDS = 10.0
ERROR_MESSAGE_CHARS = 2000


class McpServerState(BaseModel):
    """One server as /readyz shows it."""

    transport: Literal["stdio", "http"]
    state: Literal["connecting", "connected", "reconnecting"]
    tools: list[str]
    last_error: str | None
    required: bool


class SessionEnded(Exception):
    """The server's session ended (a stdio server exited, a connection dropped)."""


@dataclass(frozen=True)
class CallLimits:
    tool_timeout_seconds: float
    result_max_chars: int


@dataclass
class McpConnection:
    """One server: its session (owned by `run`, one task) and the tools it lists now."""

    name: str
    config: ServerConfig
    on_change: Callable[[], None]
    state: Literal["connecting", "connected", "reconnecting"] = "connecting"
    last_error: str | None = None
    listed: dict[str, mcp.Tool] = field(default_factory=dict)
    attempted: asyncio.Event = field(default_factory=asyncio.Event)  # the first start tried
    closing: bool = False
    _client: Client | None = None
    _ended: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def transport(self) -> Literal["stdio", "http"]:
        return "stdio" if isinstance(self.config, StdioServer) else "http"

    async def run(self) -> None:
        """Keep a session open until closed: each start that fails waits longer (0.5 s to 30 s)."""
        while not self.closing:
            retrying = AsyncRetrying(
                wait=wait_exponential_jitter(initial=0.5, max=30),
                retry=retry_if_exception_type(Exception),
                # anyio's task groups inside the SDK can turn a cancel into the failure they were
                # handling: the flag, not the cancel alone, is what ends the loop.
                stop=lambda _: self.closing,
                before_sleep=self._failed,
                reraise=True,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        await self._serve_once()
            except Exception:
                if not self.closing:
                    raise

    def _failed(self, retry: RetryCallState) -> None:
        error = retry.outcome.exception() if retry.outcome is not None else None
        self._lost(describe(error) if error is not None else "unknown error")
        wait = retry.next_action.sleep if retry.next_action is not None else 0.0
        log.warning("MCP server %s: %s; reconnecting in %.1f s", self.name, self.last_error, wait)

    def _lost(self, error: str) -> None:
        self.state = "reconnecting"
        self.last_error = error
        self._client = None
        self.listed = {}
        self.attempted.set()
        self.on_change()

    async def _serve_once(self) -> None:
        self._ended.clear()
        self._changed.clear()
        if isinstance(self.config, StdioServer):
            # `env` would report a missing command only on its stderr, as a closed connection.
            await asyncio.to_thread(_check_command, self.config)
        opened = asyncio.get_running_loop().time()
        try:
            async with Client(
                _reporting_end(self._transport(), self._ended),
                mode="legacy",
                client_info=CLIENT_INFO,
                message_handler=self._on_message,
                cache=None,
            ) as client:
                self._client = client
                await self._list_tools(client)
                self.state, self.last_error = "connected", None
                self.attempted.set()
                log.info("MCP server %s connected (%s): %s", self.name, self.transport, _tool_list(self.listed))
                await self._follow(client)
        finally:
            self._client = None
        if asyncio.get_running_loop().time() - opened < STABLE_SECONDS:
            raise SessionEnded("the session ended right after it opened")
        self._lost("the session ended")
        log.warning("MCP server %s: the session ended; reconnecting", self.name)

    async def _follow(self, client: Client) -> None:
        """Until the session ends: list the tools again whenever the server says they changed."""
        while not self._ended.is_set():
            ended = asyncio.ensure_future(self._ended.wait())
            changed = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait({ended, changed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended.cancel()
                changed.cancel()
            if self._changed.is_set() and not self._ended.is_set():
                self._changed.clear()
                await self._list_tools(client)
                log.info("MCP server %s changed its tools: %s", self.name, _tool_list(self.listed))

    def _transport(self) -> Transport:
        config = self.config
        if isinstance(config, HttpServer):
            http = httpx2.AsyncClient(headers=config.headers, timeout=httpx2.Timeout(30, read=300))
            return _owning(http, streamable_http_client(config.url, http_client=http))
        # `env -i`: the child's environment is exactly the file's (plus PATH), never the service's.
        assignments = [f"{key}={value}" for key, value in config.env.items()]
        path = f"PATH={os.environ.get('PATH', os.defpath)}"
        parameters = StdioServerParameters(
            command="env", args=["-i", path, *assignments, config.command, *config.args], cwd=config.cwd
        )
        # Its stderr and stray output are logged by a logger of its own: rate-limited apart from others'.
        return stdio_transport(parameters, logging.getLogger(f"{__name__}.{self.name}"))

    async def _on_message(self, message: Any) -> None:
        if isinstance(message, mcp.ToolListChangedNotification):
            self._changed.set()

    async def _list_tools(self, client: Client) -> None:
        listed: dict[str, mcp.Tool] = {}
        cursor: str | None = None
        while True:
            page = await client.list_tools(cursor=cursor)
            for tool in page.tools:
                listed[tool.name] = tool
            cursor = page.next_cursor
            if cursor is None:
                break
        self.listed = listed
        self.on_change()

    async def call(self, tool: str, args: dict[str, JSONValue], limits: CallLimits) -> JSONValue:
        client, listed = self._client, self.listed.get(tool)
        if client is None or listed is None or self.state != "connected":
            raise ToolError(ToolErrorCode.TOOL_ERROR, f"the MCP server {self.name!r} is not connected")
        try:
            result = await client.call_tool(tool, dict(args))
        except MCPError as exc:
            # Not a sign of a dropped session by itself: CONNECTION_CLOSED's code (-32000) is also the
            # generic server error; a drop shows as the read side ending (`_reporting_end`).
            raise ToolError(ToolErrorCode.TOOL_ERROR, _capped(exc.message, ERROR_MESSAGE_CHARS)) from exc
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._ended.set()
            raise ToolError(ToolErrorCode.TOOL_ERROR, f"the MCP server {self.name!r} dropped the call") from exc
        return tool_result(result, limits.result_max_chars)


class McpTools:
    """Every configured server's connection; their tools in the registry's `mcp` group."""

    def __init__(self, servers: dict[str, ServerConfig], registry: ToolRegistry, limits: CallLimits) -> None:
        self._registry = registry
        self._limits = limits
        self._connections = {name: McpConnection(name, config, self._publish) for name, config in servers.items()}
        self._tasks: list[asyncio.Task[None]] = []
        self._offer: list[tuple[str, Tool]] = []  # what the model is offered now, by server
        self._unnamed: set[tuple[str, str]] = set()  # tools left out for a taken name (logged once)
        self.on_tools_changed: Callable[[list[str]], None] = lambda names: None

    async def start(self) -> None:
        """Open every session; wait (a bounded time) until each has connected or failed once."""
        for name, connection in self._connections.items():
            self._tasks.append(asyncio.create_task(connection.run(), name=f"mcp server {name}"))
        waits = [c.attempted.wait() for c in self._connections.values()]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*waits), START_WAIT_SECONDS)

    async def aclose(self) -> None:
        """Close every session: stdio servers are stopped (stdin closed, then killed if need be)."""
        for connection in self._connections.values():
            connection.closing = True
        # Each stdio server gets the SDK's bounded stop (about 6 s at worst) before a new cancel.
        await cancel_and_wait(self._tasks, patience_seconds=10)
        self._tasks.clear()

    def states(self) -> dict[str, McpServerState]:
        return {
            name: McpServerState(
                transport=c.transport,
                state=c.state,
                tools=sorted(tool.spec.name for server, tool in self._offer if server == name),
                last_error=c.last_error,
                required=c.config.required,
            )
            for name, c in self._connections.items()
        }

    def problems(self) -> list[str]:
        """Required servers that are not connected (an optional one never fails readiness)."""
        return [
            f"mcp: {name} is {c.state}" + (f" ({c.last_error})" if c.last_error else "")
            for name, c in self._connections.items()
            if c.config.required and c.state != "connected"
        ]

    def _publish(self) -> None:
        listed = {(name, tool) for name, c in self._connections.items() for tool in c.listed}
        names = unique_names(listed, taken=self._registry.builtin_names)
        for server, tool in sorted(listed - set(names) - self._unnamed):
            log.warning("MCP server %s: tool %s is not offered: its name would be another tool's", server, tool)
        self._unnamed = listed - set(names)
        self._offer = self._offered(names)
        self._registry.replace_group(GROUP, [tool for _, tool in self._offer])
        self.on_tools_changed([tool.spec.name for _, tool in self._offer])

    def _offered(self, names: dict[tuple[str, str], str]) -> list[tuple[str, Tool]]:
        """Each listed tool as the model is offered it, with its server's name."""
        tools = []
        for (server, tool_name), exposed in names.items():
            connection = self._connections[server]
            listed = connection.listed[tool_name]
            spec = ToolSpec(
                name=exposed,
                description=listed.description or listed.title or f"{tool_name} (MCP server {server})",
                parameters=model_schema(listed.input_schema),
            )
            runner = _runner(connection, tool_name, self._limits)
            # The model sees the schema's Gemini subset; the arguments are checked against all of it.
            tools.append(
                (server, Tool(spec, runner, self._limits.tool_timeout_seconds, listed.input_schema, origin=server))
            )
        return tools


def _runner(
    connection: McpConnection, tool: str, limits: CallLimits
) -> Callable[[dict[str, JSONValue]], Awaitable[JSONValue]]:
    async def run(args: dict[str, JSONValue]) -> JSONValue:
        return await connection.call(tool, args, limits)

    return run


def tool_result(result: mcp.CallToolResult, max_chars: int) -> JSONValue:
    """The contract's result: `structuredContent` when present, else the text items joined; an
    error result is a ToolError. Whatever is longer than `max_chars` (as JSON) becomes a cut text."""
    text = "\n".join(_text_of(block) for block in result.content)
    if result.is_error:
        raise ToolError(ToolErrorCode.TOOL_ERROR, _capped(text or "the tool reported an error", ERROR_MESSAGE_CHARS))
    value: JSONValue = result.structured_content if result.structured_content is not None else text
    serialized = json.dumps(value, ensure_ascii=False)
    if len(serialized) <= max_chars:
        return value
    return _capped(value if isinstance(value, str) else serialized, max_chars)


def _text_of(block: Any) -> str:
    if isinstance(block, mcp.TextContent):
        return block.text
    if isinstance(block, mcp.ImageContent | mcp.AudioContent):
        return f"[{block.type}: {block.mime_type}, not shown]"
    if isinstance(block, mcp.ResourceLink):
        return f"[resource: {block.uri}]"
    if isinstance(block, mcp.EmbeddedResource):
        resource = block.resource
        return resource.text if isinstance(resource, mcp.TextResourceContents) else f"[resource: {resource.uri}]"
    return f"[{getattr(block, 'type', 'content')}]"


def _capped(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"… [cut: the tool returned {len(text):,} characters; the first {limit:,} are kept]"


def describe(error: BaseException) -> str:
    """A failure in a line: the innermost cause of an exception group, never a header or an env value."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    if isinstance(error, SessionEnded):
        return str(error)
    if isinstance(error, FileNotFoundError | PermissionError):
        return f"cannot start the command ({error.strerror})"
    if isinstance(error, httpx2.ConnectError | httpx2.ConnectTimeout):
        return "cannot connect"
    if isinstance(error, httpx2.HTTPStatusError):
        return f"answered HTTP {error.response.status_code}"
    if isinstance(error, MCPError):
        return _capped(f"MCP error {error.code}: {error.message}", 300)
    text = str(error)
    return _capped(f"{type(error).__name__}: {text}" if text else type(error).__name__, 300)


def _check_command(config: StdioServer) -> None:
    command = config.command
    if os.sep in command:
        found = os.access(Path(config.cwd or ".") / command, os.X_OK)
    else:
        # `env` looks the command up in the child's PATH: the file's, else the service's.
        path = config.env.get("PATH", os.environ.get("PATH", os.defpath))
        found = shutil.which(command, path=path) is not None
    if not found:
        raise FileNotFoundError(errno.ENOENT, "not found, or not executable")


def _tool_list(listed: dict[str, mcp.Tool]) -> str:
    return f"{len(listed)} tools ({', '.join(sorted(listed))})" if listed else "no tools"


@contextlib.asynccontextmanager
async def _reporting_end(transport: Transport, ended: asyncio.Event) -> AsyncIterator[TransportStreams]:
    """The transport, with `ended` set when its read side ends (a stdio server that exits)."""
    async with transport as (read, write):
        send, receive = anyio.create_memory_object_stream[SessionMessage | Exception](0)

        async def forward() -> None:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                async with send:
                    async for item in read:
                        await send.send(item)
            ended.set()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(forward)
            try:
                yield receive, write
            finally:
                tasks.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def _owning(http: httpx2.AsyncClient, transport: Transport) -> AsyncIterator[TransportStreams]:
    async with http, transport as streams:
        yield streams
