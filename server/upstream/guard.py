"""Each patch in server/upstream/ holds against the library installed, or the service does not start.

A patch module names the distribution it patches (`DISTRIBUTION`), the version it was written for
(`PINNED`, as in constraints.txt) and the sha256 of the source of each upstream piece it copies or
relies on (`PATCHED`). An install that skipped constraints.txt would otherwise run a copy written
for another version, silently. `check` runs when server/upstream is first imported (its
`__init__`), so before any patch module runs, on every start: `python -m server`, `uvicorn
server.main:app`, each worker. It costs a few file reads and a hash of a dozen functions.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
from importlib import metadata
from pathlib import Path
from types import ModuleType

# The patch modules, by name: each is read for its pin before it is imported (see `pin`).
PATCH_MODULES = ("server.upstream.engineio", "server.upstream.socketio", "server.upstream.uvicorn")
INSTALL = "pip install -r requirements.txt -c constraints.txt"


class StaleUpstream(Exception):
    """A library installed is not the one a patch was written for; the message is one line."""


def source_file(module_name: str) -> Path:
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(module_name)
    return Path(spec.origin)


def pin(module_name: str) -> tuple[str, str]:
    """The module's `DISTRIBUTION` and `PINNED`, read from its source without running it: against
    another version its import may fail (a private method renamed) before the version is compared."""
    constants: dict[str, object] = {}
    for node in ast.parse(source_file(module_name).read_text("utf-8")).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            constants.update((target.id, node.value.value) for target in node.targets if isinstance(target, ast.Name))
    distribution, pinned = constants.get("DISTRIBUTION"), constants.get("PINNED")
    if not (isinstance(distribution, str) and isinstance(pinned, str)):
        raise TypeError(f"{module_name} must set DISTRIBUTION and PINNED to string literals")
    return distribution, pinned


def source_digest(piece: object) -> str:
    """The sha256 of a function's (or a module's) source as installed; "" when it cannot be read."""
    try:
        return hashlib.sha256(inspect.getsource(piece).encode()).hexdigest()  # type: ignore[arg-type]
    except (OSError, TypeError):  # no source shipped (bytecode only): it cannot be checked
        return ""


def changed_pieces(patch: ModuleType) -> list[str]:
    """The names of the upstream pieces in `patch.PATCHED` whose installed source is not the one recorded."""
    pieces: dict[object, str] = patch.PATCHED
    return [
        getattr(piece, "__qualname__", getattr(piece, "__name__", repr(piece)))
        for piece, digest in pieces.items()
        if source_digest(piece) != digest
    ]


def problem(module_name: str) -> str | None:
    """Why the patch `module_name` does not hold against what is installed (one sentence), or None."""
    distribution, pinned = pin(module_name)
    where = source_file(module_name).relative_to(Path(__file__).parents[2]).as_posix()
    try:
        installed = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return f"{distribution} is not installed ({where} patches {pinned}): install with constraints.txt ({INSTALL})"
    if installed != pinned:
        return (
            f"{distribution} {installed} is installed, but {where} patches {distribution} {pinned}: "
            f"install with constraints.txt ({INSTALL})"
        )
    changed = changed_pieces(importlib.import_module(module_name))
    if changed:
        reinstall = f"pip install --force-reinstall {distribution}=={pinned}"
        return (
            f"{distribution} {installed} is installed, but its {', '.join(changed)} is not the code {where} "
            f"patches (the installed copy was changed): reinstall it ({reinstall})"
        )
    return None


def check(module_names: tuple[str, ...] = PATCH_MODULES) -> None:
    """StaleUpstream, in one line naming every patch that does not hold; else nothing."""
    problems = [found for name in module_names if (found := problem(name)) is not None]
    if problems:
        raise StaleUpstream("cannot start: " + "; ".join(problems))


def refuse_stale_upstream() -> None:
    """`check`, as the start's one line and a non-zero exit, without a traceback."""
    try:
        check()
    except StaleUpstream as exc:
        raise SystemExit(str(exc)) from None
