"""Each patch of an upstream library (server/upstream/) is checked against the version it was
written for, by the check the service runs at start (server/upstream/guard.py): here against what
is installed, and through real starts against another version and a changed copy."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

from server.upstream import guard
from tests.harness import REDIS_URL, ROOT, free_port, run_python, service_env


@pytest.mark.parametrize("name", guard.PATCH_MODULES)
def test_each_patch_matches_the_installed_upstream(name: str) -> None:
    assert guard.problem(name) is None, (
        "upgrading it? read what changed in the pieces it patches, carry that into the patch, then update "
        "PINNED and PATCHED"
    )


@pytest.mark.parametrize("name", guard.PATCH_MODULES)
def test_the_pin_read_from_the_source_is_the_one_the_module_runs_with(name: str) -> None:
    patch = importlib.import_module(name)
    assert guard.pin(name) == (patch.DISTRIBUTION, patch.PINNED)
    assert patch.PATCHED, "a patch records the upstream pieces it relies on"


def test_the_pins_are_the_constraints() -> None:
    """PINNED is what `make` installs, so the guard passes on the versions that ship."""
    pins = dict(
        line.split("==", 1) for line in (ROOT / "constraints.txt").read_text("utf-8").splitlines() if "==" in line
    )
    for name in guard.PATCH_MODULES:
        distribution, pinned = guard.pin(name)
        assert pins[distribution] == pinned, name


def another_release(site: Path, distribution: str, version: str) -> Path:
    """A directory that importlib.metadata reads as `distribution` installed at `version`: its
    `*.dist-info` comes first on PYTHONPATH, before site-packages, while the code imported stays
    the installed one. So only the version differs, as after an install without constraints.txt."""
    info = site / f"{distribution.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n", "utf-8")
    return site


def start_env(tmp_path: Path, site: Path, **extra: str) -> dict[str, str]:
    return service_env(tmp_path, free_port(), PYTHONPATH=f"{site}{os.pathsep}{ROOT}", **extra)


STARTS = {
    "python -m server": (["-m", "server"], {}),
    "python -m server, WORKERS=2": (["-m", "server"], {"WORKERS": "2", "REDIS_URL": REDIS_URL}),
    "uvicorn server.main:app": (["-m", "uvicorn", "server.main:app", "--port", "0"], {}),
}


@pytest.mark.parametrize("start", STARTS)
async def test_another_version_of_a_patched_library_stops_the_start_in_one_line(tmp_path: Path, start: str) -> None:
    argv, extra = STARTS[start]
    distribution, pinned = guard.pin("server.upstream.socketio")
    site = another_release(tmp_path / "site", distribution, "5.99.0")
    returncode, out, err = await run_python(argv, tmp_path, start_env(tmp_path, site, **extra), timeout=30)
    assert returncode not in (0, None)
    assert out == ""
    (line,) = err.strip().splitlines()  # one line, the whole of what it says
    assert line.startswith("cannot start: "), line
    assert f"{distribution} 5.99.0 is installed" in line and f"patches {distribution} {pinned}" in line, line
    assert "-c constraints.txt" in line, line
    assert not (tmp_path / "data").exists()  # it stopped before it opened anything


# Run by the interpreter at start (from PYTHONPATH): python-socketio as if its installed copy had
# been edited, before the service imports it.
CHANGED_COPY = """
import socketio


class AsyncServer(socketio.AsyncServer):
    async def _handle_eio_connect(self, eio_sid, environ):
        self.environ[eio_sid] = environ


socketio.AsyncServer._handle_eio_connect = AsyncServer._handle_eio_connect
"""


async def test_a_changed_copy_of_a_patched_piece_stops_the_start_in_one_line(tmp_path: Path) -> None:
    _, pinned = guard.pin("server.upstream.socketio")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(CHANGED_COPY, "utf-8")
    returncode, out, err = await run_python(["-m", "server"], tmp_path, start_env(tmp_path, site), timeout=30)
    assert returncode not in (0, None)
    (line,) = err.strip().splitlines()
    assert "its AsyncServer._handle_eio_connect is not the code server/upstream/socketio.py patches" in line, line
    assert line.endswith(f"reinstall it (pip install --force-reinstall python-socketio=={pinned})"), line
    assert "Traceback" not in out + err
    assert not (tmp_path / "data").exists()
