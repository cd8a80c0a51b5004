"""The tools a model may call, by name: the registry the core asks. Each tool is an adapter (server/tools/);
the registry checks every call's arguments against the tool's JSON Schema before the tool runs."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from jsonschema.protocols import Validator

from server.core.errors import ToolErrorCode
from server.core.models import JSONValue
from server.core.ports import ToolSpec

log = logging.getLogger(__name__)


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
    # The schema the arguments must match, None: the spec's `parameters`. The spec is what the model
    # is shown, which holds only the keywords every provider accepts; this is the tool's whole schema.
    input_schema: Mapping[str, Any] | None = None
    origin: str | None = None  # the MCP server it comes from (None: built in)
    validator: Validator | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        schema = self.spec.parameters if self.input_schema is None else self.input_schema
        object.__setattr__(self, "validator", _validator(self.spec.name, json.dumps(schema, sort_keys=True)))


# An MCP server's tools are built again whenever any server's list changes: each schema is compiled,
# and a bad one logged, once.
@functools.lru_cache(maxsize=1024)
def _validator(name: str, schema_json: str) -> Validator | None:
    """The validator of the schema's own draft (2020-12 when it names none); None when the schema
    itself is invalid: that tool's arguments go unchecked rather than the tool going unusable."""
    schema = json.loads(schema_json)
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
    except jsonschema.SchemaError:
        log.warning("tool %s has an invalid input schema; its arguments go unchecked", name)
        return None
    validator: Validator = cls(schema)
    return validator


def check_arguments(tool: Tool, args: dict[str, JSONValue]) -> None:
    """Raise `invalid_arguments`, naming the first mismatch, when the arguments do not match the schema."""
    if tool.validator is None:
        return
    error = jsonschema.exceptions.best_match(tool.validator.iter_errors(args))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "the arguments"
        raise ToolError(
            ToolErrorCode.INVALID_ARGUMENTS, f"invalid arguments for {tool.spec.name} ({where}): {error.message}"
        )


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

    def origin_of(self, name: str) -> str | None:
        tool = self._tools.get(name)
        return tool.origin if tool is not None else None

    def timeout_of(self, name: str) -> float | None:
        tool = self._tools.get(name)
        return tool.timeout_seconds if tool is not None else None

    async def call(self, name: str, args: dict[str, JSONValue]) -> JSONValue:
        tool = self._tools.get(name)
        if tool is None:
            raise ToolError(ToolErrorCode.UNKNOWN_TOOL, f"no tool named {name!r}")
        check_arguments(tool, args)
        return await tool.run(args)
