"""The tools a model may call, by name: the registry the core asks. Each tool is an adapter (server/tools/)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from server.core.errors import ToolErrorCode
from server.core.models import JSONValue
from server.core.ports import ToolSpec


class ToolError(Exception):
    """A tool failed in a way the model and the client should hear about."""

    def __init__(self, code: ToolErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Tool:
    spec: ToolSpec
    run: Callable[[dict[str, JSONValue]], Awaitable[JSONValue]]
    timeout_seconds: float | None = None  # None: the turn's default


class ToolRegistry:
    """The built-in tools, plus groups that change while the service runs (an MCP server's tools)."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._builtin = {tool.spec.name: tool for tool in tools}
        self._tools = dict(self._builtin)
        self._groups: dict[str, dict[str, Tool]] = {}

    @property
    def specs(self) -> list[ToolSpec]:
        return [tool.spec for tool in self._tools.values()]

    @property
    def builtin_names(self) -> set[str]:
        return set(self._builtin)

    def replace_group(self, group: str, tools: Iterable[Tool]) -> None:
        """Offer `tools` instead of what `group` offered before; a built-in name is never replaced."""
        self._groups[group] = {tool.spec.name: tool for tool in tools if tool.spec.name not in self._builtin}
        merged = dict(self._builtin)
        for members in self._groups.values():
            merged.update(members)
        self._tools = merged

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def timeout_of(self, name: str) -> float | None:
        tool = self._tools.get(name)
        return tool.timeout_seconds if tool is not None else None

    async def call(self, name: str, args: dict[str, JSONValue]) -> JSONValue:
        tool = self._tools.get(name)
        if tool is None:
            raise ToolError(ToolErrorCode.UNKNOWN_TOOL, f"no tool named {name!r}")
        return await tool.run(args)
