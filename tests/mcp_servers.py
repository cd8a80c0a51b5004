"""Real MCP servers for the tests, written with the official SDK (`MCPServer`):
`python -m tests.mcp_servers stdio`, or `python -m tests.mcp_servers http PORT TOKEN` (Streamable HTTP
at /mcp, answering 401 to a request without `Authorization: Bearer TOKEN`)."""

from __future__ import annotations

import os
import sys
from typing import Annotated, Literal

import anyio
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.exceptions import MCPError
from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

server = MCPServer("test-tools")
# What the server saw, for the tests to ask through the `seen` tool.
seen: dict[str, list[str]] = {"calls": [], "cancelled": []}


class Sum(BaseModel):
    sum: int


@server.tool(description="Adds two integers.")
def add(a: int, b: int) -> Sum:
    seen["calls"].append("add")
    return Sum(sum=a + b)


@server.tool(description="Says the text back.", structured_output=False)
def echo(text: str) -> str:
    seen["calls"].append("echo")
    return text


@server.tool(description="Fails as a tool does: an error result.")
def refuse(reason: str) -> str:
    raise ToolError(f"refused: {reason}")


@server.tool(description="Fails with a protocol error.")
def explode() -> str:
    raise MCPError(code=-32000, message="exploded on purpose")


@server.tool(description="Crashes: an exception the tool did not expect.")
def crash() -> str:
    raise RuntimeError("a bug in the tool")


@server.tool(description="Sleeps, unless it is cancelled first.")
async def slow(seconds: float, label: str = "slow") -> str:
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        seen["cancelled"].append(label)
        raise
    return f"slept {seconds} s"


@server.tool(description="What the server saw: calls and cancellations.")
def seen_so_far() -> dict[str, list[str]]:
    return seen


@server.tool(description="The server's process id and the names in its environment.")
def whoami() -> dict[str, object]:
    return {"pid": os.getpid(), "env": sorted(os.environ), "greeting": os.environ.get("GREETING")}


@server.tool(description="The MCP session this call came in (Streamable HTTP: its Mcp-Session-Id).")
def session(ctx: Context) -> dict[str, object]:
    request = ctx.request_context.request
    headers = getattr(request, "headers", {})
    return {"pid": os.getpid(), "session": headers.get("mcp-session-id")}


@server.tool(description="A long text.", structured_output=False)
def big(n: int) -> str:
    return "x" * n


@server.tool(description="Searches, with a schema full of keywords Gemini does not take.")
def search(
    query: Annotated[str, Field(pattern="^[a-z ]+$", min_length=1, max_length=50, description="lower-case words")],
    limit: Annotated[int, Field(ge=1, le=10)] = 5,
    mode: Literal["fast"] = "fast",
) -> str:
    return f"{mode} search for {query!r}, {limit} results"


@server.tool(description="Adds a tool and says so (notifications/tools/list_changed).")
async def grow(ctx: Context) -> str:
    def extra() -> str:
        return "I am new"

    server.add_tool(extra, name="extra", description="A tool added while the server runs.", structured_output=False)
    await ctx.session.send_tool_list_changed()
    return "added extra"


# The stdio wire, duplicated before the SDK serves: while it does, fd 1 points at stderr, so that a
# tool's prints cannot corrupt the protocol; `spew` and `flood` mean to.
wire: int | None = None


def _write_wire(data: bytes) -> None:
    assert wire is not None, "over stdio only"
    view = memoryview(data)
    while view:
        view = view[os.write(wire, view) :]


@server.tool(
    description="Prints lines that are not JSON-RPC on stdout, and complaints on stderr.", structured_output=False
)
def spew(lines: int) -> str:
    _write_wire(b"".join(b"garbage %d {not json\n" % i for i in range(lines)))
    sys.stderr.write("".join(f"complaint {i}: something is off\n" for i in range(lines)))
    sys.stderr.flush()
    return f"spewed {lines} lines"


@server.tool(
    description="Prints one line of `mib` MiB on stdout (no JSON-RPC message is that long).", structured_output=False
)
def flood(mib: int) -> str:
    _write_wire(b"x" * (mib * 1024 * 1024) + b"\n")
    return "flooded"


class _Bearer:
    """401 without the expected token."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app, self.token = app, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            if request.headers.get("authorization") != f"Bearer {self.token}":
                await JSONResponse({"error": "unauthorized"}, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def main() -> None:
    transport = sys.argv[1]
    if transport == "stdio":
        global wire
        wire = os.dup(1)
        server.run("stdio")
        return
    port, token = int(sys.argv[2]), sys.argv[3]
    app = _Bearer(server.streamable_http_app(), token)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
