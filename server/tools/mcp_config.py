"""MCP_SERVERS_FILE: the operator's list of MCP servers, in the common client format
`{"mcpServers": {"<name>": {...}}}` (docs/protocol.md, Tools from MCP servers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

# What `env -i NAME=VALUE` can set and a shell would accept.
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class StdioServer(BaseModel):
    """A server the service starts as its child and talks to over stdin/stdout."""

    model_config = ConfigDict(extra="ignore")
    command: Annotated[str, Field(min_length=1)]
    args: list[str] = Field(default_factory=list)
    # The child's whole environment, with PATH added: nothing of the service's own (its keys) leaks.
    env: dict[Annotated[str, Field(pattern=ENV_NAME)], str] = Field(default_factory=dict)
    cwd: Path | None = None
    # Added: a required server that is not connected makes /readyz answer 503.
    required: bool = False

    @field_validator("command")
    @classmethod
    def _plain_command(cls, value: str) -> str:
        if "=" in value or value.startswith("-"):
            raise ValueError("command must be a program name or path (no '=', not starting with '-')")
        return value


class HttpServer(BaseModel):
    """A server reached over Streamable HTTP."""

    model_config = ConfigDict(extra="ignore")
    url: Annotated[str, Field(pattern=r"^https?://")]
    headers: dict[str, str] = Field(default_factory=dict)
    required: bool = False


ServerConfig = StdioServer | HttpServer


class ServersFile(BaseModel):
    model_config = ConfigDict(extra="ignore")
    mcp_servers: dict[Annotated[str, Field(min_length=1)], ServerConfig] = Field(alias="mcpServers")


_FILE = TypeAdapter(ServersFile)


def load_servers(path: Path) -> dict[str, ServerConfig]:
    """The servers the file names, or ValueError saying what is wrong with it (without its secrets)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"is not JSON ({exc})") from None
    try:
        return _FILE.validate_python(raw).mcp_servers
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        shape = '{"mcpServers": {name: {command, args?, env?} | {url, headers?}}}'
        raise ValueError(f"is not {shape}: {problems}") from None
