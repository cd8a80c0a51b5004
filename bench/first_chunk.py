"""Time from `message` to the first `chunk`, through the real service, on this machine.

    .venv/bin/python bench/first_chunk.py [--turns 200] [--sessions 1]

Starts `python -m server` (offline provider, OFFLINE_CHUNK_DELAY_MS=0, SQLite in a temporary
directory) and drives it with python-socketio clients, `--sessions` of them at once, each
running `--turns` turns one after another. Reports percentiles in milliseconds. The offline
provider adds no model time, so this is the service's own latency: storing the user message
durably, reading the history, and the Socket.IO round trip. BENCH_SERIES=1 also prints every
sample in order (latency grows with a session's history: each turn reads all of it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import socketio

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def one_session(url: str, turns: int, samples: list[float]) -> None:
    client = socketio.AsyncClient()
    first_chunk: dict[str, float] = {}
    finished: dict[str, asyncio.Event] = {}

    async def on_chunk(data: dict[str, object]) -> None:
        if data["index"] == 0:
            first_chunk[str(data["turn_id"])] = time.perf_counter()

    async def on_done(data: dict[str, object]) -> None:
        finished.setdefault(str(data["turn_id"]), asyncio.Event()).set()

    client.on("chunk", on_chunk)
    client.on("done", on_done)
    await client.connect(url, transports=["websocket"])
    sid = (await client.call("join", {}))["session"]["session_id"]
    for n in range(turns):
        sent = time.perf_counter()
        ack = await client.call("message", {"session_id": sid, "text": f"turn {n} of the benchmark"})
        turn_id = ack["turn_id"]
        await finished.setdefault(turn_id, asyncio.Event()).wait()
        samples.append((first_chunk[turn_id] - sent) * 1000)
    await client.disconnect()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--sessions", type=int, default=1)
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        env = {
            **os.environ,
            "PORT": str(port),
            "SQLITE_PATH": f"{data}/bench.db",
            "OFFLINE_CHUNK_DELAY_MS": "0",
            "LLM_PROVIDER": "offline",
            "STORAGE_BACKEND": "sqlite",
            "MESSAGE_RATE_LIMIT": "1000000",
            "LOG_LEVEL": "warning",
            "PYTHONPATH": str(ROOT),
        }
        server = await asyncio.create_subprocess_exec(sys.executable, "-m", "server", env=env, cwd=data)
        url = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient() as http:
                for _ in range(200):
                    try:
                        if (await http.get(f"{url}/healthz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await asyncio.sleep(0.05)
            samples: list[float] = []
            await asyncio.gather(*(one_session(url, args.turns, samples) for _ in range(args.sessions)))
        finally:
            server.terminate()
            await server.wait()
    if os.environ.get("BENCH_SERIES"):
        print(" ".join(f"{s:.1f}" for s in samples))
    samples.sort()
    q = statistics.quantiles(samples, n=100)
    print(f"sessions={args.sessions} turns={len(samples)}")
    print(
        f"message -> first chunk: p50 {q[49]:.2f} ms, p90 {q[89]:.2f} ms, p99 {q[98]:.2f} ms, max {samples[-1]:.2f} ms"
    )


if __name__ == "__main__":
    asyncio.run(main())
