"""What opening a long session costs: joins and history reads of a session of 50,000 events.

    .venv/bin/python bench/long_session.py --baseline 427010f [--write]

Each server (this tree, and with --baseline a temporary `git worktree` of that revision) runs as
`python -m server` on SQLite; the session's rows are inserted with plain SQL. The
servers take turns (`--rounds` times each, alternating) and each is measured for:
- one `join`: its time and the size of its answer;
- ten `join`s at once (ten Socket.IO clients): the time until the last answer, the server's peak
  RSS meanwhile, and the slowest answer another client got to small requests during them;
- ten `GET /api/sessions/{id}/events` at once: the peak RSS, and the RSS a second later.
The Socket.IO clients speak Engine.IO over a raw WebSocket with no frame limit, so the size of an
answer is what the server sent, whatever a real client would have refused.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import websockets
from common import ROOT, SERVICE_ENV, ServerProcess, checkout_of, rss_bytes, write_section

EVENTS = 50_000
CONTENT = "x" * 190  # with its number, about 9.9 MB of text in all
CONCURRENT = 10
MIB = 1024 * 1024


@dataclass
class Reading:
    rest_mib: list[float] = field(default_factory=list)
    one_join_seconds: list[float] = field(default_factory=list)
    answer_bytes: int = 0
    ten_joins_seconds: list[float] = field(default_factory=list)
    ten_joins_peak_mib: list[float] = field(default_factory=list)
    other_client_wait_seconds: list[float] = field(default_factory=list)
    ten_reads_peak_mib: list[float] = field(default_factory=list)
    ten_reads_after_mib: list[float] = field(default_factory=list)


class SocketIO:
    """One Socket.IO client on a raw WebSocket (Engine.IO v4, Socket.IO v5): requests with acks."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self._next = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def connected(cls, url: str) -> AsyncIterator[SocketIO]:
        ws_url = url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"
        async with websockets.connect(ws_url, max_size=None) as ws:
            await ws.recv()  # the Engine.IO open packet
            await ws.send("40")
            await ws.recv()  # the namespace's CONNECT
            yield cls(ws)

    async def call(self, event: str, payload: Any) -> tuple[Any, int]:
        """The ack's data and the size of the frame that carried it."""
        ack_id = self._next
        self._next += 1
        await self._ws.send(f"42{ack_id}" + json.dumps([event, payload]))
        prefix = f"43{ack_id}"
        while True:
            frame = await self._ws.recv()
            if frame == "2":
                await self._ws.send("3")  # Engine.IO ping
            elif isinstance(frame, str) and frame.startswith(prefix):
                return json.loads(frame[len(prefix) :])[0], len(frame.encode())


def fill(path: Path, session_id: str) -> None:
    with sqlite3.connect(path, timeout=30) as db:
        db.execute("insert into sessions (session_id, user_id) values (?, ?)", (session_id, "bench"))
        db.executemany(
            "insert into events (session_id, event_type, content) values (?, ?, ?)",
            ((session_id, ("user_message", "ai_message")[n % 2], f"{n} {CONTENT}") for n in range(EVENTS)),
        )


class PeakRss:
    """Samples a process's RSS every 10 ms while the block runs."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self.peak = 0

    @contextlib.asynccontextmanager
    async def sampling(self) -> AsyncIterator[PeakRss]:
        async def sample() -> None:
            while True:
                self.peak = max(self.peak, rss_bytes(self._pid))
                await asyncio.sleep(0.01)

        task = asyncio.create_task(sample())
        try:
            yield self
        finally:
            task.cancel()
            self.peak = max(self.peak, rss_bytes(self._pid))


async def other_client_waits(url: str, stop: asyncio.Event) -> float:
    """The slowest answer to a small request (a `leave`) a client gets while the others join."""
    slowest = 0.0
    async with SocketIO.connected(url) as client:
        while not stop.is_set():
            started = time.perf_counter()
            await client.call("leave", {"session_id": str(uuid.uuid4())})
            slowest = max(slowest, time.perf_counter() - started)
            await asyncio.sleep(0.01)
    return slowest


async def measure_once(root: Path, reading: Reading) -> None:
    with tempfile.TemporaryDirectory(prefix="long-session-") as data:
        db = Path(data) / "realtime.db"
        env = {**SERVICE_ENV, "SQLITE_PATH": str(db), "SUMMARY_DELAY_SECONDS": "3600"}
        server = await ServerProcess.start(["-m", "server"], env, data, root)
        try:
            session_id = str(uuid.uuid4())
            await asyncio.to_thread(fill, db, session_id)
            await measure_server(server, session_id, reading)
        finally:
            await server.stop()


async def measure_server(server: ServerProcess, session_id: str, reading: Reading) -> None:
    reading.rest_mib.append(rss_bytes(server.pid) / MIB)
    async with SocketIO.connected(server.url) as client:
        started = time.perf_counter()
        answer, size = await client.call("join", {"session_id": session_id})
        reading.one_join_seconds.append(time.perf_counter() - started)
        assert answer["ok"], answer
        reading.answer_bytes = size

    stop = asyncio.Event()
    other = asyncio.create_task(other_client_waits(server.url, stop))
    await asyncio.sleep(0.2)

    async def join() -> None:
        async with SocketIO.connected(server.url) as joiner:
            answer, _ = await joiner.call("join", {"session_id": session_id})
            assert answer["ok"], answer

    async with PeakRss(server.pid).sampling() as rss:
        started = time.perf_counter()
        await asyncio.gather(*(join() for _ in range(CONCURRENT)))
        reading.ten_joins_seconds.append(time.perf_counter() - started)
    stop.set()
    reading.other_client_wait_seconds.append(await other)
    reading.ten_joins_peak_mib.append(rss.peak / MIB)

    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http, PeakRss(server.pid).sampling() as rss:
        answers = await asyncio.gather(*(http.get(f"/api/sessions/{session_id}/events") for _ in range(CONCURRENT)))
        assert all(a.status_code == 200 for a in answers)
    reading.ten_reads_peak_mib.append(rss.peak / MIB)
    await asyncio.sleep(1)
    reading.ten_reads_after_mib.append(rss_bytes(server.pid) / MIB)


def report(readings: dict[str, Reading], rounds: int, command: str) -> str:
    labels = list(readings)
    lines = [
        "### Opening a session of 50,000 events",
        "",
        f"`{command}`: {EVENTS:,} events (about 9.9 MB of text) inserted with plain SQL "
        f"into a server's SQLite; medians of {rounds} runs per tree, the trees alternating.",
        "",
        "| | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]

    def row(name: str, values: list[str]) -> None:
        lines.append(f"| {name} | " + " | ".join(values) + " |")

    row("RSS before any join", [f"{statistics.median(r.rest_mib):.0f} MiB" for r in readings.values()])
    row("one `join`: time", [f"{statistics.median(r.one_join_seconds):.2f} s" for r in readings.values()])
    row("one `join`: answer", [f"{r.answer_bytes / MIB:.2f} MiB" for r in readings.values()])
    row("ten `join`s at once: time", [f"{statistics.median(r.ten_joins_seconds):.2f} s" for r in readings.values()])
    row("ten `join`s: peak RSS", [f"{statistics.median(r.ten_joins_peak_mib):.0f} MiB" for r in readings.values()])
    row(
        "another client's slowest ack meanwhile",
        [f"{statistics.median(r.other_client_wait_seconds):.2f} s" for r in readings.values()],
    )
    row(
        "ten `GET .../events`: peak RSS",
        [f"{statistics.median(r.ten_reads_peak_mib):.0f} MiB" for r in readings.values()],
    )
    row("RSS a second later", [f"{statistics.median(r.ten_reads_after_mib):.0f} MiB" for r in readings.values()])
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", metavar="REV", help="also measure this git revision, alternating")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="write its section of docs/performance.md")
    args = parser.parse_args()
    async with contextlib.AsyncExitStack() as stack:
        trees: dict[str, Path] = {}
        if args.baseline:
            tree, commit = await stack.enter_async_context(checkout_of(args.baseline))
            trees[f"before ({commit})"] = tree
        trees["after"] = ROOT
        readings = {label: Reading() for label in trees}
        for _ in range(args.rounds):
            for label, tree in trees.items():
                print(f"  measuring {label}", flush=True)
                await measure_once(tree, readings[label])
    command = " ".join(["bench/long_session.py", *(a for a in sys.argv[1:] if a != "--write")])
    text = report(readings, args.rounds, command)
    print(text)
    if args.write:
        write_section("long-session", text)


if __name__ == "__main__":
    asyncio.run(main())
