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
import os
import platform
import statistics
from dataclasses import dataclass

from common import ensure_node_modules, run_load, write_section
from servers import REDIS_1, REDIS_2, running


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


async def measure(processes: int, sessions: int, seconds: float) -> Run:
    async with running(REDIS_1 if processes == 1 else REDIS_2) as servers:
        cpu: dict[str, float] = {}
        result = await run_load(
            ["--urls", ",".join(s.url for s in servers), "--sessions", str(sessions), "--seconds", str(seconds)],
            lambda phase: cpu.__setitem__(phase["phase"], sum(s.cpu_seconds() for s in servers)),
        )
    return Run(
        processes=processes,
        chunks_per_second=result["chunks_per_second"],
        server_cpu_seconds=cpu["end"] - cpu["measure"],
        chunks=result["chunks"],
        generator_cpu_seconds=result["generator_cpu_seconds"],
    )


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
    await ensure_node_modules()
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
        write_section("cluster", table)


if __name__ == "__main__":
    asyncio.run(main())
