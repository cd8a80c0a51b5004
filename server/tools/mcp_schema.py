"""What an MCP tool looks like to the model: a function name every provider accepts, unique, and an
input schema in the subset of JSON Schema that Gemini's `parametersJsonSchema` accepts (which
OpenAI-compatible endpoints take too)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Any

# What every provider takes: OpenAI letters, digits, `_` and `-` (at most 64); Gemini also wants a
# letter or an underscore first. (Gemini would take `.` and `:` too; OpenAI refuses them.)
MAX_NAME = 64
VALID_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_INVALID_CHARACTER = re.compile(r"[^A-Za-z0-9_-]")
_HASH_LENGTH = 8

# The keywords Gemini documents for parametersJsonSchema; every other one is dropped for the model
# (the call is still validated against the tool's own, whole schema).
KEPT = frozenset(
    {
        "$id", "$defs", "$ref", "$anchor", "type", "format", "title", "description", "enum", "items",
        "prefixItems", "minItems", "maxItems", "minimum", "maximum", "anyOf", "properties",
        "additionalProperties", "required", "propertyOrdering", "nullable",
    }
)  # fmt: skip
_SCHEMA_MAPS = ("properties", "$defs")
_SCHEMA_LISTS = ("anyOf", "prefixItems")


def exposed_name(server: str, tool: str) -> str:
    """`<server>__<tool>`, or, when that is not a valid name, a valid one ending in a hash of it:
    deterministic, and distinct for distinct servers and tools."""
    name = f"{server}__{tool}"
    if VALID_NAME.match(name):
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:_HASH_LENGTH]
    clean = _INVALID_CHARACTER.sub("_", name)
    if not re.match(r"[A-Za-z_]", clean):
        clean = "_" + clean
    return f"{clean[: MAX_NAME - _HASH_LENGTH - 1]}_{digest}"


def unique_names(pairs: Iterable[tuple[str, str]], taken: Iterable[str] = ()) -> dict[tuple[str, str], str]:
    """Each (server, tool) its exposed name; a pair whose name is already taken (a built-in tool, or
    a sanitised twin) is left out: it cannot be offered under a name that means another tool."""
    used = set(taken)
    names: dict[tuple[str, str], str] = {}
    for pair in sorted(set(pairs)):
        name = exposed_name(*pair)
        if name not in used:
            used.add(name)
            names[pair] = name
    return names


def model_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The tool's input schema as Gemini accepts it: unsupported keywords dropped, `oneOf` read as
    `anyOf` (as Gemini does), `const` as a one-value `enum`, and always an object at the top."""
    translated = _translate(schema)
    if not isinstance(translated, dict):
        translated = {}
    translated["type"] = "object"
    translated.setdefault("properties", {})
    return translated


def _translate(node: Any) -> Any:
    if not isinstance(node, dict):
        return node if isinstance(node, bool) else {}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "oneOf":
            key = "anyOf"
        elif key == "const":
            key, value = "enum", [value]
        if key not in KEPT or (key == "anyOf" and "anyOf" in out):
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _translate(sub) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [_translate(sub) for sub in value]
        elif key in ("items", "additionalProperties"):
            out[key] = _translate(value)
        elif key == "enum" and isinstance(value, list):
            # Gemini takes enums of strings and numbers.
            kept = [v for v in value if isinstance(v, str | int | float) and not isinstance(v, bool)]
            if kept:
                out[key] = kept
        else:
            out[key] = value
    return out
