"""The benchmark: the service beside a bare python-socketio server, every figure a ratio measured in one run.

    make bench                      # all workloads, writes docs/performance.md and docs/latency-vs-load.png
    .venv/bin/python bench/run.py --workloads b --rounds 3
    .venv/bin/python bench/run.py --workloads b --variant coalesce=service:CHUNK_COALESCE_MS=20

Both servers run one process on the service's uvicorn settings (server/serve.py) and get the same
load from the Node generator (bench/node/load.mjs, the official socket.io-client, WebSocket only):
the service (`python -m server`) with the offline script at OFFLINE_CHUNK_DELAY_MS=0 and SQLite
storage, and bench/bare_server.py, which emits the same events with no logic and no storage.

Workloads: (a) one session, one client; (b) 100 sessions at once; (c) one session with 10 tabs;
(d) sessions streaming 10 chunks/s each, as many as make 25, 50 and 75 % of the bare server's
chunks/s at (b); (e) idle sockets, each joined to a session: RSS per socket at 1,000, 5,000 and
10,000, and the server's CPU over two rounds of pings with 10,000.
A `--variant label=bare|service:KEY=VALUE,...` runs beside them with extra environment, to measure
one setting's effect in the same run (`BENCH_PLAIN_CLIENTS=N` adds a reading plain WebSocket client
to each of the first N sessions; `PYTHONPATH=<checkout>` runs another commit's code).
Configurations alternate within each round; medians count.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from common import (
    NODE,
    REPORT,
    ROOT,
    SERVICE_ENV,
    ServerProcess,
    cpu_seconds,
    ensure_node_modules,
    rss_bytes,
    run_load,
    write_section,
)

PLOT = ROOT / "docs" / "latency-vs-load.png"
PACED_CHUNKS_PER_SECOND = 10  # (d): one chunk every 100 ms per session, an LLM-like pace
LOAD_SHARES = (0.25, 0.5, 0.75)
IDLE_COUNTS = (1000, 5000, 10000)
HEARTBEAT_SECONDS = 55  # two rounds of Engine.IO's 25 s pings, and a margin


@dataclass(frozen=True)
class Kind:
    label: str
    base: str  # "bare" or "service"
    env: dict[str, str] = field(default_factory=dict)


BARE = Kind("bare", "bare")
SERVICE = Kind("service", "service")
# The bare server with the service's interpreter tuning (server/serve.py: GC and GIL switch interval).
TUNED_BARE = Kind("bare-tuned", "bare", {"BARE_TUNED": "1"})


@dataclass
class Stream:
    """One streaming run: what the load generator saw, and the server's CPU over the same window."""

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


@dataclass
class Idle:
    kib_per_connection: dict[int, float]
    connect_seconds: dict[int, float]
    heartbeat_cpu_percent: float  # the server's CPU with IDLE_COUNTS[-1] idle sockets (pings alone)


async def start(kind: Kind, data: str, delay_ms: float) -> ServerProcess:
    if kind.base == "bare":
        env = {"BARE_CHUNK_DELAY_MS": str(delay_ms), "LOG_LEVEL": "warning", **kind.env}
        return await ServerProcess.start([str(ROOT / "bench" / "bare_server.py")], env, data)
    env = {
        **SERVICE_ENV,
        "OFFLINE_CHUNK_DELAY_MS": str(delay_ms),
        "SQLITE_PATH": f"{data}/bench.db",
        "BENCH_CHUNK_TIMESTAMPS": "1",
        **kind.env,
    }
    return await ServerProcess.start(["-m", "server"], env, data)


async def stream(kind: Kind, *, sessions: int, tabs: int, seconds: float, delay_ms: float = 0) -> Stream:
    paced = delay_ms > 0
    with tempfile.TemporaryDirectory() as data:
        server = await start(kind, data, delay_ms)
        cpu: dict[str, float] = {}
        try:
            result = await run_load(
                [
                    *("--urls", server.url, "--sessions", str(sessions), "--tabs", str(tabs)),
                    # Paced runs open hundreds of sockets (about 300 a second): connect before counting.
                    *("--seconds", str(seconds), "--warmup", str(3 + sessions / 250 if paced else 2)),
                    *("--stagger", "1" if paced else "0"),
                    # A variant's BENCH_PLAIN_CLIENTS=N: a plain WebSocket client in each of the first N sessions.
                    *("--plain", kind.env.get("BENCH_PLAIN_CLIENTS", "0")),
                ],
                lambda phase: cpu.__setitem__(phase["phase"], cpu_seconds(server.pid)),
            )
        finally:
            await server.stop()
    server_cpu = cpu["end"] - cpu["measure"]
    latency, first = result["latency_ms"], result["first_chunk_ms"]
    failures = result["failures"] + result["error_count"]
    if failures:
        print(f"  ! {kind.label}: {failures} refused messages or failed sessions: {result['errors']}")
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
    )


async def idle(kind: Kind) -> Idle:
    with tempfile.TemporaryDirectory() as data:
        server = await start(kind, data, 0)
        await asyncio.sleep(1)
        base = rss_bytes(server.pid)
        per: dict[int, float] = {}
        took: dict[int, float] = {}

        cpu: dict[str, float] = {}

        def checkpoint(phase: dict[str, Any]) -> None:
            if phase["phase"] != "checkpoint":
                cpu[phase["phase"]] = cpu_seconds(server.pid)
                return
            n = phase["connections"]
            per[n] = (rss_bytes(server.pid) - base) / n / 1024
            took[n] = phase["connect_seconds"]

        counts = ",".join(map(str, IDLE_COUNTS))
        try:
            await run_load(
                ["--urls", server.url, "--idle", counts, "--hold", "3", "--heartbeat", str(HEARTBEAT_SECONDS)],
                checkpoint,
            )
        finally:
            await server.stop()
    return Idle(per, took, 100 * (cpu["heartbeat_end"] - cpu["heartbeat_start"]) / HEARTBEAT_SECONDS)


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def merge(runs: list[Stream]) -> Stream:
    """The median of each figure over the rounds."""
    merged: dict[str, Any] = {}
    for name in Stream.__dataclass_fields__:
        values = [getattr(r, name) for r in runs]
        merged[name] = sum(values) if name == "failures" else median(values)
    return Stream(**merged)


def say(kind: Kind, what: str, s: Stream) -> None:
    print(
        f"  {what} {kind.label}: {s.chunks_per_second:,.0f} chunks/s, latency p50/p99 "
        f"{fmt(s.latency_p50)}/{fmt(s.latency_p99)} ms, first chunk p50/p99 {fmt(s.first_chunk_p50)}/"
        f"{fmt(s.first_chunk_p99)} ms, {s.cpu_ms_per_1000_chunks:,.0f} ms CPU per 1,000 chunks, "
        f"server {s.server_cpu_percent:.0f} % / generator {s.generator_cpu_percent:.0f} % CPU",
        flush=True,
    )


def fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def ratio(value: float | None, base: float | None) -> str:
    return "–" if value is None or not base else f"{value / base:.2f}×"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="abcde", help="which of a, b, c, d, e to run (default all)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (a), (b), (c); medians count")
    parser.add_argument("--seconds", type=float, default=8, help="measured seconds per streaming run")
    parser.add_argument("--variant", action="append", default=[], help="label=bare|service:KEY=VALUE,...")
    parser.add_argument("--no-tuned-bare", action="store_true", help="skip the bare server with the service's tuning")
    parser.add_argument("--write", action="store_true", help="write docs/performance.md and the plot")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    kinds = [BARE, SERVICE, *([] if args.no_tuned_bare else [TUNED_BARE]), *variants]
    await ensure_node_modules()

    streams: dict[str, dict[str, Stream]] = {}
    shapes = {"a": (1, 1), "b": (100, 1), "c": (1, 10)}
    # (d)'s load is a share of the bare server's capacity at (b), so (b) runs first.
    order = [w for w in "bac" if w in args.workloads or (w == "b" and "d" in args.workloads)]
    for workload in order:
        sessions, tabs = shapes[workload]
        print(f"({workload}) {sessions} session(s) x {tabs} tab(s)", flush=True)
        runs: dict[str, list[Stream]] = {k.label: [] for k in kinds}
        for n in range(args.rounds):
            for kind in kinds if n % 2 == 0 else reversed(kinds):
                run = await stream(kind, sessions=sessions, tabs=tabs, seconds=args.seconds)
                runs[kind.label].append(run)
                say(kind, f"({workload})", run)
        streams[workload] = {label: merge(rs) for label, rs in runs.items()}

    paced: dict[float, dict[str, Stream]] = {}
    if "d" in args.workloads:
        capacity = streams["b"]["bare"].chunks_per_second
        for share in LOAD_SHARES:
            sessions = round(share * capacity / PACED_CHUNKS_PER_SECOND)
            print(f"(d) {share:.0%} of {capacity:,.0f} chunks/s: {sessions} sessions at 10 chunks/s", flush=True)
            paced[share] = {}
            for kind in kinds:
                run = await stream(kind, sessions=sessions, tabs=1, seconds=args.seconds + 2, delay_ms=100)
                paced[share][kind.label] = run
                say(kind, f"(d {share:.0%})", run)

    idles: dict[str, Idle] = {}
    if "e" in args.workloads:
        print(f"(e) idle sockets: {', '.join(map(str, IDLE_COUNTS))}", flush=True)
        for kind in kinds:
            idles[kind.label] = await idle(kind)
            found = idles[kind.label]
            heartbeat = f"heartbeat CPU {found.heartbeat_cpu_percent:.1f} %"
            print(f"  {kind.label}: KiB per socket {found.kib_per_connection}, {heartbeat}", flush=True)

    text = report(args, kinds, streams, paced, idles)
    print(text)
    if args.write:
        write_section("benchmark", text)
        if paced:
            plot(kinds, paced, streams["b"]["bare"].chunks_per_second)


def parse_variant(spec: str) -> Kind:
    label, _, rest = spec.partition("=")
    base, _, pairs = rest.partition(":")
    if base not in ("bare", "service") or not label:
        raise SystemExit(f"--variant {spec!r}: expected label=bare|service:KEY=VALUE,...")
    return Kind(label, base, dict(pair.split("=", 1) for pair in pairs.split(",") if pair))


def report(
    args: argparse.Namespace,
    kinds: list[Kind],
    streams: dict[str, dict[str, Stream]],
    paced: dict[float, dict[str, Stream]],
    idles: dict[str, Idle],
) -> str:
    others = [k for k in kinds if k is not BARE]
    head = "| workload | figure | bare python-socketio | " + " | ".join(f"{k.label} | {k.label} ÷ bare" for k in others)
    rule = "|---|---|---|" + "---|---|" * len(others)
    lines = [
        "## Benchmark: the service beside a bare python-socketio server",
        "",
        f"`bench/run.py --workloads {args.workloads} --rounds {args.rounds} --seconds {args.seconds:g}"
        + ("" if TUNED_BARE in kinds else " --no-tuned-bare")
        + "".join(
            f" --variant {k.label}={k.base}:{','.join(f'{a}={b}' for a, b in k.env.items())}"
            for k in others
            if k not in (SERVICE, TUNED_BARE)
        )
        + "` (`make bench`). Both servers: one process, the service's uvicorn settings; the service with"
        " the offline script at 0 ms per chunk and SQLite storage. Latency: from the provider's yield"
        " (the bare server: its emit) to the client's receipt. First chunk: from the client's `message`"
        " to its first `chunk`. CPU: the server process over the measured window (100 % = one core).",
        "",
        machine(),
        "",
        head + " |",
        rule,
    ]
    figures = [
        ("chunks/s delivered", "chunks_per_second", 0),
        ("turns/s", "turns_per_second", 0),
        ("chunk latency p50 ms", "latency_p50", 1),
        ("chunk latency p99 ms", "latency_p99", 1),
        ("message → first chunk p50 ms", "first_chunk_p50", 1),
        ("message → first chunk p99 ms", "first_chunk_p99", 1),
        ("server CPU ms per 1,000 chunks", "cpu_ms_per_1000_chunks", 0),
        ("server / generator CPU %", None, 0),
    ]
    names = {"a": "(a) 1 session", "b": "(b) 100 sessions", "c": "(c) 1 session × 10 tabs"}
    for workload, by_kind in streams.items():
        for title, attr, digits in figures:
            bare = by_kind["bare"]
            if attr is None:
                cells = [f"{bare.server_cpu_percent:.0f} / {bare.generator_cpu_percent:.0f}"]
                for k in others:
                    s = by_kind[k.label]
                    cells += [f"{s.server_cpu_percent:.0f} / {s.generator_cpu_percent:.0f}", ""]
            else:
                cells = [fmt(getattr(bare, attr), digits)]
                for k in others:
                    value = getattr(by_kind[k.label], attr)
                    cells += [fmt(value, digits), ratio(value, getattr(bare, attr))]
            lines.append(f"| {names[workload]} | {title} | " + " | ".join(cells) + " |")
    for share, by_kind in paced.items():
        bare = by_kind["bare"]
        for title, attr in (
            ("chunks/s delivered", "chunks_per_second"),
            ("chunk latency p50 ms", "latency_p50"),
            ("chunk latency p99 ms", "latency_p99"),
        ):
            cells = [fmt(getattr(bare, attr), 0 if attr == "chunks_per_second" else 1)]
            for k in others:
                value = getattr(by_kind[k.label], attr)
                cells += [fmt(value, 0 if attr == "chunks_per_second" else 1), ratio(value, getattr(bare, attr))]
            lines.append(f"| (d) {share:.0%} load | {title} | " + " | ".join(cells) + " |")
    for n in IDLE_COUNTS if idles else ():
        bare_kib = idles["bare"].kib_per_connection[n]
        cells = [f"{bare_kib:,.0f}"]
        for k in others:
            kib = idles[k.label].kib_per_connection[n]
            cells += [f"{kib:,.0f}", ratio(kib, bare_kib)]
        lines.append(f"| (e) {n:,} idle sockets | RSS KiB per socket | " + " | ".join(cells) + " |")
    if idles:
        bare_cpu = idles["bare"].heartbeat_cpu_percent
        cells = [f"{bare_cpu:.1f}"]
        for k in others:
            value = idles[k.label].heartbeat_cpu_percent
            cells += [f"{value:.1f}", ratio(value, bare_cpu)]
        title = f"| (e) {IDLE_COUNTS[-1]:,} idle sockets | server CPU % over {HEARTBEAT_SECONDS} s (pings only) | "
        lines.append(title + " | ".join(cells) + " |")
    lines += ["", *targets(streams, paced, idles)]
    return "\n".join(lines) + "\n"


def targets(
    streams: dict[str, dict[str, Stream]], paced: dict[float, dict[str, Stream]], idles: dict[str, Idle]
) -> list[str]:
    """Each target against the stock bare server, and against the tuned one: met only if both hold.

    The stock bare server pauses for garbage collection where the service does not (it freezes
    its start-up heap), which flatters latency ratios; the tuned bare server compares like with like.
    """
    bares = [b for b in (BARE.label, TUNED_BARE.label) if b in next(iter(streams.values()), {})]
    rows: list[tuple[str, str, bool]] = []

    def row(what: str, measure: Any, fmt_one: Any, ok: Any, sources: list[str]) -> None:
        values = {b: measure(b) for b in sources}
        if not values or any(v is None for v in values.values()):
            return  # nothing to compare with: no row (an empty one would read as met)
        shown = "; ".join(f"{fmt_one(v)} vs {b}" for b, v in values.items())
        rows.append((what, shown, all(ok(v) for v in values.values())))

    if "b" in streams:
        b = streams["b"]
        row(
            "(b) chunks/s ≥ 0.8 × bare",
            lambda k: b["service"].chunks_per_second / b[k].chunks_per_second,
            lambda v: f"{v:.2f}×",
            lambda v: v >= 0.8,
            bares,
        )
        row(
            "(b) first chunk p99 added by the service ≤ 10 ms",
            lambda k: (
                None
                if b["service"].first_chunk_p99 is None or b[k].first_chunk_p99 is None
                else b["service"].first_chunk_p99 - b[k].first_chunk_p99
            ),
            lambda v: f"{v:+.1f} ms",
            lambda v: v <= 10,
            bares,
        )
    if 0.5 in paced:
        p99 = paced[0.5]["service"].latency_p99
        if p99 is not None:
            rows.append(("(d) 50 % load: chunk latency p99 ≤ 50 ms", f"{p99:.1f} ms", p99 <= 50))
    if 0.75 in paced:
        d = paced[0.75]
        row(
            "(d) 75 % load: chunk latency p99 ≤ 1.5 × bare",
            lambda k: (
                None
                if d["service"].latency_p99 is None or not d[k].latency_p99
                else d["service"].latency_p99 / d[k].latency_p99
            ),
            lambda v: f"{v:.2f}×",
            lambda v: v <= 1.5,
            [k for k in bares if k in d],
        )
    if idles:
        row(
            "(e) RSS per idle socket ≤ 1.3 × bare (the worst of 1,000, 5,000 and 10,000)",
            lambda k: max(idles["service"].kib_per_connection[n] / idles[k].kib_per_connection[n] for n in IDLE_COUNTS),
            lambda v: f"{v:.2f}×",
            lambda v: v <= 1.3,
            [b for b in (BARE.label, TUNED_BARE.label) if b in idles],
        )
    if not rows:
        return []
    return [
        "| target | measured | met |",
        "|---|---|---|",
        *(f"| {what} | {measured} | {'yes' if met else '**no**'} |" for what, measured, met in rows),
    ]


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
        f"Machine: {os.cpu_count()} cores ({cpu}), {platform.platform()}; server and load generator share it."
        f" Python {platform.python_version()} ({versions}); Node {node}, socket.io-client {client_version}."
    )


def plot(kinds: list[Kind], paced: dict[float, dict[str, Stream]], capacity: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2), dpi=120)
    for kind, colour in zip(kinds, ("tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red"), strict=False):
        loads = [100 * share for share in paced]
        for attr, style, name in (("latency_p99", "-o", "p99"), ("latency_p50", "--s", "p50")):
            axis.plot(
                loads,
                [getattr(paced[s][kind.label], attr) for s in paced],
                style,
                color=colour,
                label=f"{kind.label} {name}",
            )
    axis.set_xlabel(f"offered load: sessions × 10 chunks/s, % of the bare server's chunks/s at (b) ({capacity:,.0f})")
    axis.set_ylabel("chunk latency, ms (provider yield → client receipt)")
    axis.set_title("(d) sessions streaming 10 chunks/s each")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(PLOT)
    print(f"wrote {REPORT.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
