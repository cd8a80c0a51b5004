"""What the benchmark scripts share: starting a server process, the Node load generator, /proc readings,
and the pace the bench servers stream at."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx

ROOT = Path(__file__).resolve().parent.parent
NODE = ROOT / "bench" / "node"
REPORT = ROOT / "docs" / "performance.md"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")

# The service as the benchmark drives it: the offline script, storage on, no limit in the way.
SERVICE_ENV = {
    "LLM_PROVIDER": "offline",
    "OFFLINE_CHUNK_DELAY_MS": "0",
    "STORAGE_BACKEND": "sqlite",
    "MESSAGE_RATE_LIMIT": "1000000",
    "MAX_CONNECTIONS_PER_ADDRESS": "100000",
    "LOG_LEVEL": "warning",
}


# A turn of a stored conversation (bench/gemini_request_cost.py, and the sessions bench/capacity.py
# --history-turns stores): about 155 tokens at 4 characters a token.
QUESTION = "Tell me about streaming answers over a socket, with an example or two"
ANSWER = " ".join(["streamed"] * 60)

T = TypeVar("T")


def history_turn(n: int) -> tuple[str, str]:
    """The question and the answer of a stored conversation's turn `n`."""
    return f"{QUESTION} (number {n})", ANSWER


def compaction_summary(words: int = 400) -> str:
    """A summary as long as the compaction prompt allows (400 words) of such a conversation."""
    sentence = "The user asked how answers stream over a socket and was given examples of chunked replies."
    return " ".join((sentence.split() * words)[:words])


def chunks_of(pieces: Sequence[str], size: int) -> list[str]:
    """`size` pieces (words) a chunk, as a model streaming bursts of words sends them."""
    return ["".join(pieces[i : i + size]) for i in range(0, len(pieces), size)]


async def paced(items: Sequence[T], seconds: float) -> AsyncIterator[T]:
    """Each item `seconds` after the last one was due (as the offline script paces its words): a
    model's stream does not slow down when the server is busy, so a late item shortens the next pause."""
    loop = asyncio.get_running_loop()
    due = loop.time()
    for item in items:
        due += seconds
        await asyncio.sleep(max(0.0, due - loop.time()))
        yield item


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES


class ServerProcess:
    """A server in its own process on a free port: `python -m server`, or a script such as the bare server."""

    def __init__(self, process: asyncio.subprocess.Process, url: str) -> None:
        self.process = process
        self.url = url

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    @classmethod
    async def start(cls, args: Sequence[str], env: Mapping[str, str], cwd: str, root: Path = ROOT) -> ServerProcess:
        """`root` is the checkout whose code runs (`python -m server` imports it): this one, or a baseline's."""
        port = free_port()
        full_env = {**os.environ, "PYTHONPATH": str(root), "PORT": str(port), **env}
        process = await asyncio.create_subprocess_exec(sys.executable, *args, env=full_env, cwd=cwd)
        server = cls(process, f"http://127.0.0.1:{port}")
        async with httpx.AsyncClient() as http:
            for _ in range(400):
                if process.returncode is not None:
                    break
                try:
                    # The bare server has no routes of its own: any HTTP answer means it listens.
                    await http.get(f"{server.url}/readyz")
                    return server
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
        await server.stop()
        raise RuntimeError(f"{' '.join(args)} did not start")

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


@contextlib.asynccontextmanager
async def checkout_of(revision: str) -> AsyncIterator[tuple[Path, str]]:
    """A temporary `git worktree` of `revision` (detached) and its short commit id, removed on exit."""
    commit = (await git("rev-parse", "--short", f"{revision}^{{commit}}")).strip()
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as parent:
        tree = Path(parent) / "tree"
        await git("worktree", "add", "--detach", "--quiet", str(tree), commit)
        try:
            yield tree, commit
        finally:
            await git("worktree", "remove", "--force", str(tree))


async def git(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "git", "-C", str(ROOT), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    if process.returncode:
        raise SystemExit(f"git {' '.join(args)} failed: {err.decode().strip()}")
    return out.decode()


async def ensure_node_modules() -> None:
    if not (NODE / "node_modules").exists():
        npm = await asyncio.create_subprocess_exec("npm", "ci", "--silent", cwd=NODE)
        if await npm.wait():
            raise SystemExit("npm ci failed in bench/node")


async def run_load(args: Sequence[str], on_phase: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Runs bench/node/load.mjs; hands each phase line to `on_phase` as it comes, returns the result."""
    load = await asyncio.create_subprocess_exec("node", "load.mjs", *args, cwd=NODE, stdout=asyncio.subprocess.PIPE)
    assert load.stdout is not None
    result: dict[str, Any] = {}
    async for line in load.stdout:
        message = json.loads(line)
        if "phase" in message:
            if on_phase is not None:
                on_phase(message)
        else:
            result = message
    if await load.wait():
        raise RuntimeError(f"the load generator failed ({load.returncode})")
    return result


def write_section(name: str, body: str) -> None:
    """Replaces the part of docs/performance.md between this section's markers (or appends it)."""
    begin, end = f"<!-- begin {name}: generated, do not edit -->", f"<!-- end {name} -->"
    text = REPORT.read_text() if REPORT.exists() else "# Performance\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        text = head + block + rest.partition(end)[2]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    REPORT.write_text(text)
