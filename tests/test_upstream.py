"""Each patch of an upstream library (server/upstream/) is checked against the version it was
written for: a new version fails here until its patched pieces are read and the pins updated."""

from __future__ import annotations

import hashlib
import inspect
from importlib import metadata
from types import ModuleType

import pytest

from server.upstream import engineio, socketio, uvicorn
from tests.harness import ROOT


@pytest.mark.parametrize("patch", [engineio, socketio, uvicorn], ids=lambda patch: patch.DISTRIBUTION)
def test_each_patch_matches_the_installed_upstream(patch: ModuleType) -> None:
    installed = metadata.version(patch.DISTRIBUTION)
    assert installed == patch.PINNED, (
        f"{patch.DISTRIBUTION} {installed} is installed, {patch.__name__} patches {patch.PINNED}: "
        "read what changed in the pieces it patches, then update PINNED and PATCHED"
    )
    changed = [
        getattr(piece, "__qualname__", getattr(piece, "__name__", repr(piece)))
        for piece, digest in patch.PATCHED.items()
        if hashlib.sha256(inspect.getsource(piece).encode()).hexdigest() != digest  # type: ignore[arg-type]
    ]
    assert not changed, f"{patch.DISTRIBUTION}'s {changed} changed: carry the change into {patch.__name__}"


def test_the_pins_are_the_constraints() -> None:
    """PINNED is what `make` installs, so the guard above runs against the version that ships."""
    pins = dict(
        line.split("==", 1) for line in (ROOT / "constraints.txt").read_text("utf-8").splitlines() if "==" in line
    )
    for patch in (engineio, socketio, uvicorn):
        assert pins[patch.DISTRIBUTION] == patch.PINNED, patch.__name__
