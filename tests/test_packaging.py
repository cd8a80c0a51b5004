"""What the service imports is what it declares, and `make run` installs only what running needs."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

from tests.harness import ROOT


def _declared(requirements: Path) -> set[str]:
    names = set()
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(_normal(re.split(r"[\[=<>!~; ]", line, maxsplit=1)[0]))
    return names


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_modules(folder: Path) -> set[str]:
    modules = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"server", "__future__"}


def test_every_package_the_server_imports_is_declared_in_requirements() -> None:
    declared = _declared(ROOT / "requirements.txt")
    providers = packages_distributions()
    undeclared = {
        module: providers.get(module, ["(not installed)"])
        for module in _imported_modules(ROOT / "server")
        if not declared & {_normal(d) for d in providers.get(module, [])}
    }
    assert not undeclared, f"imported by server/ but not in requirements.txt: {undeclared}"


def test_make_run_installs_the_runtime_requirements_only(tmp_path: Path) -> None:
    # -B: every target as if out of date; -n: print the commands without running them.
    venv = tmp_path / "venv"
    out = subprocess.run(
        ["make", "-B", "-n", "run", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    installs = [line for line in out.splitlines() if "pip install" in line]
    assert installs and all("-r requirements.txt" in line for line in installs), out
    assert "requirements-dev.txt" not in out

    out = subprocess.run(
        ["make", "-B", "-n", "test", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "-r requirements-dev.txt" in out
