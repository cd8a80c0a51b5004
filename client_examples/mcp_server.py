"""A tiny MCP server, written with the official SDK, for trying MCP_SERVERS_FILE.

.venv/bin/python client_examples/mcp_server.py              # stdio (how mcp.example.json starts it)
.venv/bin/python client_examples/mcp_server.py --http 8931  # Streamable HTTP at http://127.0.0.1:8931/mcp
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from mcp.server.mcpserver import MCPServer
from pydantic import BaseModel

server = MCPServer("example")


class Sum(BaseModel):
    sum: float


class Counted(BaseModel):
    words: int
    characters: int


@server.tool(description="Adds two numbers.")
def add(a: float, b: float) -> Sum:
    return Sum(sum=a + b)


@server.tool(description="Counts the words and characters of a text.")
def count_words(text: str) -> Counted:
    return Counted(words=len(text.split()), characters=len(text))


@server.tool(description="The current date and time in UTC, ISO 8601.", structured_output=False)
def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--http", type=int, metavar="PORT", help="serve Streamable HTTP on 127.0.0.1:PORT")
    port = parser.parse_args().http
    if port is None:
        server.run("stdio")
    else:
        server.run("streamable-http", host="127.0.0.1", port=port)


if __name__ == "__main__":
    main()
