"""Chunks delivered per second by 1 and by 2 server processes sharing Redis, under the same load.

    .venv/bin/python bench/cluster_throughput.py [--sessions 100] [--seconds 10] [--rounds 2] [--write]

Each configuration runs `python -m server` with REDIS_URL set (the offline provider at
OFFLINE_CHUNK_DELAY_MS=0, so the model adds no time; SQLite storage, one file per process), and
the Node load generator (bench/node/load.mjs, the official socket.io-client, WebSocket only)
spreads `--sessions` sessions over the processes, as a load balancer would, each sending messages
back to back. Configurations alternate for `--rounds` rounds and the median counts; the result is
the ratio of the two, measured in one run. `--write` puts the table into docs/performance.md.
Needs Redis (REDIS_URL, default redis://127.0.0.1:6379/0) and Node (it runs `npm ci` in bench/node).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
NODE = ROOT / "bench" / "node"
REPORT = ROOT / "docs" / "performance.md"
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    processes: int
    chunks_per_second: float
    server_cpu_seconds: float
    chunks: int
    generator_cpu_seconds: float

    @property
    def cpu_ms_per_1000_chunks(self) -> float:
        return 1000 * self.server_cpu_seconds / max(self.chunks, 1) * 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


async def start_server(data: str, channel: str, n: int) -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PORT": str(port),
        "REDIS_URL": REDIS_URL,
        "REDIS_CHANNEL": channel,
        "LLM_PROVIDER": "offline",
        "OFFLINE_CHUNK_DELAY_MS": "0",
        "STORAGE_BACKEND": "sqlite",
        "SQLITE_PATH": f"{data}/process-{n}.db",
        "MESSAGE_RATE_LIMIT": "1000000",
        "LOG_LEVEL": "warning",
    }
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "server", env=env, cwd=data)
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient() as http:
        for _ in range(200):
            try:
                if (await http.get(f"{url}/readyz")).status_code == 200:
                    return process, url
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError("the server did not start")


async def measure(processes: int, sessions: int, seconds: float) -> Run:
    channel = f"bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as data:
        servers = [await start_server(data, channel, n) for n in range(processes)]
        try:
            before = sum(cpu_seconds(p.pid) for p, _ in servers)
            load = await asyncio.create_subprocess_exec(
                "node",
                "load.mjs",
                "--urls",
                ",".join(url for _, url in servers),
                "--sessions",
                str(sessions),
                "--seconds",
                str(seconds),
                cwd=NODE,
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await load.communicate()
            after = sum(cpu_seconds(p.pid) for p, _ in servers)
        finally:
            for process, _ in servers:
                process.terminate()
            await asyncio.gather(*(p.wait() for p, _ in servers))
        await clean(channel)
    result = json.loads(out)
    # Server CPU over the whole run (warm-up included) is scaled to the measured window's share.
    total = result["seconds"] + 2
    return Run(
        processes=processes,
        chunks_per_second=result["chunks_per_second"],
        server_cpu_seconds=(after - before) * result["seconds"] / total,
        chunks=result["chunks"],
        generator_cpu_seconds=result["generator_cpu_seconds"],
    )


async def clean(channel: str) -> None:
    client = aioredis.Redis.from_url(REDIS_URL)
    keys = [key async for key in client.scan_iter(f"{channel}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def report(runs: dict[int, list[Run]], sessions: int, seconds: float) -> str:
    median = {n: statistics.median(r.chunks_per_second for r in rs) for n, rs in runs.items()}
    lines = [
        "## Scaling across processes (Redis)",
        "",
        f"`bench/cluster_throughput.py --sessions {sessions} --seconds {seconds:g} --rounds {len(runs[1])}`:"
        " the offline provider at 0 ms per chunk, REDIS_URL set in both configurations, sessions spread"
        " round robin over the processes by the Node load generator (WebSocket only), configurations"
        f" alternating. Machine: {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}.",
        "",
        "| processes | chunks/s (median) | runs | server CPU ms per 1,000 chunks | ratio to 1 process |",
        "|---|---|---|---|---|",
    ]
    for n, rs in runs.items():
        cpu = statistics.median(r.cpu_ms_per_1000_chunks for r in rs)
        each = ", ".join(f"{r.chunks_per_second:,.0f}" for r in rs)
        lines.append(f"| {n} | {median[n]:,.0f} | {each} | {cpu:,.0f} | {median[n] / median[1]:.2f}× |")
    return "\n".join(lines) + "\n"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="write the table into docs/performance.md")
    args = parser.parse_args()
    if not (NODE / "node_modules").exists():
        npm = await asyncio.create_subprocess_exec("npm", "ci", "--silent", cwd=NODE)
        if await npm.wait():
            raise SystemExit("npm ci failed in bench/node")
    runs: dict[int, list[Run]] = {1: [], 2: []}
    for _ in range(args.rounds):
        for processes in (1, 2):
            run = await measure(processes, args.sessions, args.seconds)
            runs[processes].append(run)
            print(
                f"{processes} process(es): {run.chunks_per_second:,.0f} chunks/s, "
                f"{run.cpu_ms_per_1000_chunks:,.0f} ms server CPU per 1,000 chunks, "
                f"load generator CPU {run.generator_cpu_seconds:.1f} s",
                flush=True,
            )
    table = report(runs, args.sessions, args.seconds)
    print(table)
    if args.write:
        text = REPORT.read_text() if REPORT.exists() else "# Performance\n\n"
        marker = "## Scaling across processes (Redis)"
        if marker in text:
            head, _, rest = text.partition(marker)
            tail = rest.split("\n## ", 1)
            text = head + table + ("\n## " + tail[1] if len(tail) > 1 else "")
        else:
            text = text.rstrip("\n") + "\n\n" + table
        REPORT.write_text(text)


if __name__ == "__main__":
    asyncio.run(main())
