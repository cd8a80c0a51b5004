"""The servers the benchmarks compare, and one streaming run against them (bench/run.py, bench/capacity.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import platform
import sqlite3
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import redis.asyncio as aioredis
from common import NODE, ROOT, SERVICE_ENV, ServerProcess, history_turn, run_load

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
# With stored histories, counting starts once every session has finished this many turns: its first
# sends whatever the tree sends of the stored history, and a compaction may follow in the background.
HISTORY_WARM_TURNS = 2
HISTORY_WARM_LIMIT_SECONDS = 90


@dataclass(frozen=True)
class Kind:
    label: str
    base: str  # "bare" or "service"
    env: dict[str, str] = field(default_factory=dict)
    processes: int = 1  # more than one: service processes sharing Redis, sessions spread round robin
    redis: bool = False
    root: Path = ROOT  # the checkout its code runs from (a baseline's: `capacity.py --baseline`)


BARE = Kind("bare", "bare")
SERVICE = Kind("service", "service")
# The bare server with the service's interpreter tuning (server/serve.py: GC and GIL switch interval).
TUNED_BARE = Kind("bare-tuned", "bare", {"BARE_TUNED": "1"})
REDIS_1 = Kind("service, Redis, 1 process", "service", redis=True)
REDIS_2 = Kind("service, Redis, 2 processes", "service", processes=2, redis=True)
BEFORE = " (before)"


def before(kind: Kind, tree: Path) -> Kind:
    """The same configuration running a baseline checkout's code."""
    return dataclasses.replace(kind, label=kind.label + BEFORE, root=tree)


@dataclass
class Stream:
    """One measured window: what the load generator saw, and the servers' CPU over the same window."""

    chunks_per_second: float
    turns_per_second: float
    latency_p50: float | None
    latency_p99: float | None
    first_chunk_p50: float | None
    first_chunk_p99: float | None
    cpu_ms_per_1000_chunks: float
    server_cpu_percent: float
    generator_cpu_percent: float
    failures: int
    warm_seconds: float = 0.0  # from the first connection until counting started


@dataclass(frozen=True)
class StoredHistory:
    """Sessions stored before the load, `turns` answered turns each; session n is served by
    process n % processes (the load generator's round robin) and stored in that one's SQLite."""

    session_ids: list[str]
    turns: int

    @classmethod
    def of(cls, sessions: int, turns: int) -> StoredHistory:
        return cls([str(uuid.uuid4()) for _ in range(sessions)], turns)

    def fill(self, db: Path, process: int, processes: int) -> None:
        """Inserts this process's sessions with plain SQL (any tree's schema takes it)."""
        mine = self.session_ids[process::processes]
        rows = [
            (session_id, kind, text)
            for session_id in mine
            for n in range(self.turns)
            for kind, text in zip(("user_message", "ai_message"), history_turn(n), strict=True)
        ]
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as connection, connection:
            connection.executemany(
                "insert into sessions (session_id, user_id) values (?, ?)", ((s, "bench") for s in mine)
            )
            connection.executemany("insert into events (session_id, event_type, content) values (?, ?, ?)", rows)


def measured(result: dict[str, Any], server_cpu: float, failures: int) -> Stream:
    """A Stream from the load generator's figures for one window and the servers' CPU seconds over it."""
    latency, first = result["latency_ms"], result["first_chunk_ms"]
    return Stream(
        chunks_per_second=result["chunks_per_second"],
        turns_per_second=result["turns"] / result["seconds"],
        latency_p50=latency["p50"],
        latency_p99=latency["p99"],
        first_chunk_p50=first["p50"],
        first_chunk_p99=first["p99"],
        cpu_ms_per_1000_chunks=1e6 * server_cpu / max(result["chunks"], 1),
        server_cpu_percent=100 * server_cpu / result["seconds"],
        generator_cpu_percent=100 * result["generator_cpu_seconds"] / result["seconds"],
        failures=failures,
        warm_seconds=result.get("warm_seconds", 0.0),
    )


@contextlib.asynccontextmanager
async def running(
    kind: Kind, delay_ms: float = 0, env: dict[str, str] | None = None, history: StoredHistory | None = None
) -> AsyncIterator[list[ServerProcess]]:
    """The kind's server processes, each with its own data directory, stopped (and Redis cleaned) on
    exit; with `history`, the service's sessions are stored in them once they have started."""
    channel = f"bench-{uuid.uuid4().hex[:8]}"
    extra = {**kind.env, **(env or {})}
    if kind.redis:
        extra |= {"REDIS_URL": REDIS_URL, "REDIS_CHANNEL": channel}
    with contextlib.ExitStack() as dirs:
        servers: list[ServerProcess] = []
        try:
            for n in range(kind.processes):
                data = dirs.enter_context(tempfile.TemporaryDirectory())
                servers.append(await start(kind, data, delay_ms, extra))
                if history is not None and kind.base == "service":
                    await asyncio.to_thread(history.fill, Path(data) / "bench.db", n, kind.processes)
            yield servers
        finally:
            await asyncio.gather(*(s.stop() for s in servers))
            if kind.redis:
                await clean_redis(channel)


async def start(kind: Kind, data: str, delay_ms: float, extra: dict[str, str]) -> ServerProcess:
    if kind.base == "bare":
        env = {"BARE_CHUNK_DELAY_MS": str(delay_ms), "LOG_LEVEL": "warning", **extra}
        return await ServerProcess.start([str(kind.root / "bench" / "bare_server.py")], env, data, kind.root)
    env = {
        **SERVICE_ENV,
        "OFFLINE_CHUNK_DELAY_MS": str(delay_ms),
        "SQLITE_PATH": f"{data}/bench.db",
        "BENCH_CHUNK_TIMESTAMPS": "1",
        **extra,
    }
    return await ServerProcess.start(["-m", "server"], env, data, kind.root)


async def redis_reachable() -> bool:
    client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        await client.ping()
        return True
    except (aioredis.RedisError, OSError):
        print(f"  (no Redis at {REDIS_URL}: the Redis configurations are left out)", flush=True)
        return False
    finally:
        await client.aclose()


async def clean_redis(channel: str) -> None:
    client = aioredis.Redis.from_url(REDIS_URL)
    keys = [key async for key in client.scan_iter(f"{channel}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def stream(
    kind: Kind,
    *,
    sessions: int,
    tabs: int,
    seconds: float,
    delay_ms: float = 0,
    env: dict[str, str] | None = None,
    history_turns: int = 0,
) -> Stream:
    """One window of `seconds` on fresh servers: sessions spread over the kind's processes round
    robin; with `history_turns`, each session stored beforehand with that many answered turns."""
    paced = delay_ms > 0 or bool(env)
    history = StoredHistory.of(sessions, history_turns) if history_turns else None
    with tempfile.NamedTemporaryFile("w", prefix="bench-sessions-", suffix=".txt") as ids:
        async with running(kind, delay_ms, env, history) as servers:
            cpu: dict[str, float] = {}
            load = [
                *("--urls", ",".join(s.url for s in servers), "--sessions", str(sessions), "--tabs", str(tabs)),
                # Paced runs open hundreds of sockets (about 300 a second): connect before counting.
                *("--seconds", str(seconds), "--warmup", str(3 + sessions / 250 if paced else 2)),
                *("--stagger", "1" if paced else "0"),
                # A variant's BENCH_PLAIN_CLIENTS=N: a plain WebSocket client in each of the first N sessions.
                *("--plain", kind.env.get("BENCH_PLAIN_CLIENTS", "0")),
                *(history_arguments(history, ids) if history is not None else ()),
            ]
            result = await run_load(
                load, lambda phase: cpu.__setitem__(phase["phase"], sum(s.cpu_seconds() for s in servers))
            )
    failures = result["failures"] + result["error_count"]
    if failures:
        print(f"  ! {kind.label}: {failures} refused messages or failed sessions: {result['errors']}")
    return measured(result, cpu["end"] - cpu["measure"], failures)


def history_arguments(history: StoredHistory, ids: IO[str]) -> Sequence[str]:
    """The load generator's arguments that make session n join the n-th stored session."""
    ids.write("\n".join(history.session_ids) + "\n")
    ids.flush()
    warm = ("--warm-turns", str(HISTORY_WARM_TURNS), "--warm-limit", str(HISTORY_WARM_LIMIT_SECONDS))
    return ("--session-ids", ids.name, *warm)


def fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def say(label: str, what: str, s: Stream) -> None:
    print(
        f"  {what} {label}: {s.chunks_per_second:,.0f} chunks/s, latency p50/p99 "
        f"{fmt(s.latency_p50)}/{fmt(s.latency_p99)} ms, first chunk p50/p99 {fmt(s.first_chunk_p50)}/"
        f"{fmt(s.first_chunk_p99)} ms, {s.cpu_ms_per_1000_chunks:,.0f} ms CPU per 1,000 chunks, "
        f"server {s.server_cpu_percent:.0f} % / generator {s.generator_cpu_percent:.0f} % CPU",
        flush=True,
    )


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    client = (NODE / "node_modules" / "socket.io-client" / "package.json").read_text()
    client_version = client.split('"version": "', 1)[1].split('"', 1)[0]
    versions = ", ".join(
        f"{name} {metadata.version(name)}"
        for name in ("python-socketio", "python-engineio", "uvicorn", "uvloop", "websockets", "orjson")
    )
    return (
        f"Machine: {os.cpu_count()} cores ({cpu}), {platform.platform()}; servers and load generator share it."
        f" Python {platform.python_version()} ({versions}); Node {node}, socket.io-client {client_version}."
    )
