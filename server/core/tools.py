"""The tools a model may call, by name: the registry the core asks. Each tool is an adapter (server/tools/)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from server.core.models import JSON
from server.core.ports import ToolSpec


class ToolError(Exception):
    """A tool failed in a way the model and the client should hear about."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Tool:
    spec: ToolSpec
    run: Callable[[dict[str, JSON]], Awaitable[JSON]]


class ToolRegistry:
    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools = {tool.spec.name: tool for tool in tools}

    @property
    def specs(self) -> list[ToolSpec]:
        return [tool.spec for tool in self._tools.values()]

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    async def call(self, name: str, args: dict[str, JSON]) -> JSON:
        tool = self._tools.get(name)
        if tool is None:
            raise ToolError("unknown_tool", f"no tool named {name!r}")
        return await tool.run(args)
