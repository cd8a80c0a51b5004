"""The shape of server/, checked from its source: no import cycle (type-only imports included),
the core imports only the standard library, a few pure libraries and itself, and no function is
longer than 60 lines but the one copied from python-engineio."""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.harness import ROOT

SERVER = ROOT / "server"
COPIED = {("server.upstream.engineio", "_websocket_handler")}  # python-engineio's loop, kept whole
# Libraries the core may use: pure Python, no I/O of their own. A transport, a vendor's SDK or a
# database driver comes in through a port (server/core/ports.py) instead.
CORE_LIBRARIES = {"pydantic", "jsonschema", "tenacity"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(path): ast.parse(path.read_text("utf-8")) for path in SERVER.rglob("*.py")}


def imported(tree: ast.Module) -> Iterator[str]:
    """Every module an import names, wherever it stands (under TYPE_CHECKING or in a function too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_no_module_of_the_server_imports_itself_back() -> None:
    trees = modules()
    graph = {name: {m for m in imported(tree) if m in trees and m != name} for name, tree in trees.items()}
    cycles: list[list[str]] = []

    def visit(name: str, path: list[str], done: set[str]) -> None:
        if name in path:
            cycles.append([*path[path.index(name) :], name])
            return
        if name in done:
            return
        for dependency in sorted(graph[name]):
            visit(dependency, [*path, name], done)
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        visit(name, [], done)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_the_core_imports_the_standard_library_its_libraries_and_itself_only() -> None:
    allowed = set(sys.stdlib_module_names) | CORE_LIBRARIES | {"server"}
    foreign = {
        (name, module)
        for name, tree in modules().items()
        if name.startswith("server.core")
        for module in imported(tree)
        if module.split(".")[0] not in allowed
        or (module.startswith("server.") and not module.startswith("server.core"))
    }
    assert not foreign, sorted(foreign)


def test_no_function_is_longer_than_60_lines() -> None:
    long = [
        (name, node.name, node.end_lineno - node.lineno + 1)
        for name, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > 60
        and (name, node.name) not in COPIED
    ]
    assert not long, long
