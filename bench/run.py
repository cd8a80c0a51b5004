"""The benchmark: the service beside a bare python-socketio server, every figure a ratio measured in one run.

    make bench                      # all workloads, writes docs/performance.md and docs/capacity-vs-load.png
    .venv/bin/python bench/run.py --workloads b --rounds 10
    .venv/bin/python bench/run.py --workloads b --variant coalesce=service:CHUNK_COALESCE_MS=20

Both servers run one process on the service's uvicorn settings (server/serve.py) and get the same
load from the Node generator (bench/node/load.mjs, the official socket.io-client, WebSocket only):
the service (`python -m server`) with the offline script and SQLite storage, and
bench/bare_server.py, which emits the same events with no logic and no storage.

Flat out, at 0 ms per chunk: (a) one session, one client; (b) 100 sessions at once; (c) one session
with 10 tabs. Every server is up at once and they take turns: in each round each server gets the
load alone for a one-second slice (the round's first server rotates), so they share the machine's
same minutes; each round is reported, and each median with the range of the rounds.
(e) idle sockets, each joined to a session: RSS per socket at 1,000, 5,000 and 10,000, and the
server's CPU over two rounds of pings with 10,000.
(f) capacity at a model's pace (bench/capacity.py): the most sessions one process carries while
each streams at LLM speed, for the service, the bare server and, on Redis, 1 and 2 processes.
A `--variant label=bare|service:KEY=VALUE,...` runs beside them with extra environment, to measure
one setting's effect in the same run (`BENCH_PLAIN_CLIENTS=N` adds a reading plain WebSocket client
to each of the first N sessions; `PYTHONPATH=<checkout>` runs another commit's code).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import capacity
from common import ensure_node_modules, rss_bytes, run_load, write_section
from servers import BARE, SERVICE, TUNED_BARE, Kind, Stream, fmt, machine, measured, redis_reachable, running, say

IDLE_COUNTS = (1000, 5000, 10000)
HEARTBEAT_SECONDS = 55  # two rounds of Engine.IO's 25 s pings, and a margin
SHAPES = {"a": (1, 1), "b": (100, 1), "c": (1, 10)}
NAMES = {"a": "(a) 1 session", "b": "(b) 100 sessions", "c": "(c) 1 session × 10 tabs"}

Rounds = dict[str, list[Stream]]  # each server's slices, one per round, in round order


@dataclass
class Idle:
    kib_per_connection: dict[int, float]
    connect_seconds: dict[int, float]
    heartbeat_cpu_percent: float  # the server's CPU with IDLE_COUNTS[-1] idle sockets (pings alone)


async def alternate(kinds: list[Kind], *, sessions: int, tabs: int, rounds: int, slice_seconds: float) -> Rounds:
    """Every server up at once, taking turns: in each round each one gets the load alone for a slice."""
    slices: Rounds = {k.label: [] for k in kinds}

    def on_slice(line: dict[str, Any]) -> None:
        if line["phase"] == "slice":
            kind = kinds[line["server"]]
            slices[kind.label].append(measured(line, line["server_cpu_seconds"], line["failures"]))
            say(kind.label, f"round {line['round'] + 1}", slices[kind.label][-1])

    async with contextlib.AsyncExitStack() as stack:
        servers = [(await stack.enter_async_context(running(kind)))[0] for kind in kinds]
        await run_load(
            [
                *("--urls", ",".join(s.url for s in servers), "--pids", ",".join(str(s.pid) for s in servers)),
                *("--sessions", str(sessions), "--tabs", str(tabs)),
                *("--slice", str(slice_seconds), "--rounds", str(rounds)),
            ],
            on_slice,
        )
    for label, found in slices.items():
        if failed := sum(s.failures for s in found):
            print(f"  ! {label}: {failed} refused messages")
    return slices


async def idle(kind: Kind) -> Idle:
    async with running(kind) as (server,):
        await asyncio.sleep(1)
        base = rss_bytes(server.pid)
        per: dict[int, float] = {}
        took: dict[int, float] = {}
        cpu: dict[str, float] = {}

        def checkpoint(phase: dict[str, Any]) -> None:
            if phase["phase"] != "checkpoint":
                cpu[phase["phase"]] = server.cpu_seconds()
                return
            n = phase["connections"]
            per[n] = (rss_bytes(server.pid) - base) / n / 1024
            took[n] = phase["connect_seconds"]

        counts = ",".join(map(str, IDLE_COUNTS))
        await run_load(
            ["--urls", server.url, "--idle", counts, "--hold", "3", "--heartbeat", str(HEARTBEAT_SECONDS)],
            checkpoint,
        )
    return Idle(per, took, 100 * (cpu["heartbeat_end"] - cpu["heartbeat_start"]) / HEARTBEAT_SECONDS)


@dataclass(frozen=True)
class Spread:
    """A figure over the rounds: its median and the lowest and highest round."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: list[float | None]) -> Spread | None:
        present = [v for v in values if v is not None]
        return cls(statistics.median(present), min(present), max(present)) if present else None

    def show(self, digits: int, unit: str = "") -> str:
        middle = f"{self.median:,.{digits}f}{unit}"
        return middle if self.low == self.high else f"{middle} ({self.low:,.{digits}f}–{self.high:,.{digits}f})"


def figure(slices: list[Stream], attr: str) -> Spread | None:
    return Spread.of([getattr(s, attr) for s in slices])


def paired(
    slices: list[Stream], base: list[Stream], attr: str, how: Callable[[float, float], float | None]
) -> Spread | None:
    """`how(value, base value)` round by round: each round's two slices are seconds apart."""
    values: list[float | None] = []
    for mine, theirs in zip(slices, base, strict=True):
        a, b = getattr(mine, attr), getattr(theirs, attr)
        values.append(None if a is None or b is None else how(a, b))
    return Spread.of(values)


def per(a: float, b: float) -> float | None:
    return a / b if b else None


def minus(a: float, b: float) -> float | None:
    return a - b


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="abcef", help="which of a, b, c, e, f to run (default all)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of (a), (b), (c): one slice per server each")
    parser.add_argument("--slice", type=float, default=1, help="counted seconds per server per round")
    parser.add_argument("--capacity-seconds", type=float, default=10, help="measured seconds per (f) run")
    parser.add_argument("--variant", action="append", default=[], help="label=bare|service:KEY=VALUE,...")
    parser.add_argument("--no-tuned-bare", action="store_true", help="skip the bare server with the service's tuning")
    parser.add_argument("--no-redis", action="store_true", help="(f) without the Redis configurations")
    parser.add_argument("--write", action="store_true", help="write docs/performance.md and the plot")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    kinds = [BARE, SERVICE, *([] if args.no_tuned_bare else [TUNED_BARE]), *variants]
    await ensure_node_modules()

    flat: dict[str, Rounds] = {}
    for workload in (w for w in "bac" if w in args.workloads):
        sessions, tabs = SHAPES[workload]
        print(f"({workload}) {sessions} session(s) x {tabs} tab(s), {args.rounds} rounds", flush=True)
        flat[workload] = await alternate(
            kinds, sessions=sessions, tabs=tabs, rounds=args.rounds, slice_seconds=args.slice
        )

    idles: dict[str, Idle] = {}
    if "e" in args.workloads:
        print(f"(e) idle sockets: {', '.join(map(str, IDLE_COUNTS))}", flush=True)
        for kind in kinds:
            idles[kind.label] = await idle(kind)
            found = idles[kind.label]
            heartbeat = f"heartbeat CPU {found.heartbeat_cpu_percent:.1f} %"
            print(f"  {kind.label}: KiB per socket {found.kib_per_connection}, {heartbeat}", flush=True)

    if flat or idles:  # written before (f), the longest part, runs
        text = report(args, kinds, flat, idles)
        print(text)
        if args.write:
            write_section("benchmark", text)

    if "f" in args.workloads:
        print("(f) capacity at a model's pace", flush=True)
        configurations = capacity.kinds(redis=not args.no_redis and await redis_reachable())
        found_capacity = await capacity.measure(configurations, args.capacity_seconds)
        text = capacity.report(found_capacity, args.capacity_seconds, configurations)
        print(text)
        if args.write:
            write_section("capacity", text)
            capacity.plot(found_capacity)


def parse_variant(spec: str) -> Kind:
    label, _, rest = spec.partition("=")
    base, _, pairs = rest.partition(":")
    if base not in ("bare", "service") or not label:
        raise SystemExit(f"--variant {spec!r}: expected label=bare|service:KEY=VALUE,...")
    return Kind(label, base, dict(pair.split("=", 1) for pair in pairs.split(",") if pair))


FIGURES = (
    ("chunks/s delivered", "chunks_per_second", 0),
    ("turns/s", "turns_per_second", 0),
    ("chunk latency p50 ms", "latency_p50", 1),
    ("chunk latency p99 ms", "latency_p99", 1),
    ("message → first chunk p50 ms", "first_chunk_p50", 1),
    ("message → first chunk p99 ms", "first_chunk_p99", 1),
    ("server CPU ms per 1,000 chunks", "cpu_ms_per_1000_chunks", 0),
    ("server CPU %", "server_cpu_percent", 0),
    ("generator CPU %", "generator_cpu_percent", 0),
)


def report(args: argparse.Namespace, kinds: list[Kind], flat: dict[str, Rounds], idles: dict[str, Idle]) -> str:
    others = [k for k in kinds if k is not BARE]
    head = "| workload | figure | bare python-socketio | " + " | ".join(f"{k.label} | {k.label} ÷ bare" for k in others)
    rule = "|---|---|---|" + "---|---|" * len(others)
    command = (
        f"`bench/run.py --workloads {args.workloads} --rounds {args.rounds} --slice {args.slice:g}"
        + ("" if TUNED_BARE in kinds else " --no-tuned-bare")
        + "".join(
            f" --variant {k.label}={k.base}:{','.join(f'{a}={b}' for a, b in k.env.items())}"
            for k in others
            if k not in (SERVICE, TUNED_BARE)
        )
        + "`"
    )
    lines = [
        "## Flat out: the service beside a bare python-socketio server",
        "",
        f"{command} (`make bench`). Each server: one process, the service's uvicorn settings; the"
        " service with the offline script at 0 ms per chunk and SQLite storage. All of them run at"
        f" once and take turns: in each of {args.rounds} rounds each gets the load alone for"
        f" {args.slice:g} s (after 0.5 s to start its sessions, and followed by its turns in flight"
        " finishing), the round's first server rotating. Each cell: the median of the rounds and, in"
        " brackets, the lowest and highest round; a ratio is the median of the rounds' ratios (each"
        " round's slices are seconds apart). Latency: from the provider's yield (the bare server: its"
        " emit) to the client's receipt. First chunk: from the client's `message` to its first"
        " `chunk`. CPU: the server process over the counted seconds (100 % = one core).",
        "",
        machine(),
        "",
        head + " |",
        rule,
    ]
    for workload, by_kind in flat.items():
        bare = by_kind[BARE.label]
        for title, attr, digits in FIGURES:
            base = figure(bare, attr)
            cells = [base.show(digits) if base else "–"]
            for k in others:
                mine = figure(by_kind[k.label], attr)
                share = paired(by_kind[k.label], bare, attr, per)
                cells += [mine.show(digits) if mine else "–", share.show(2, "×") if share else "–"]
            lines.append(f"| {NAMES[workload]} | {title} | " + " | ".join(cells) + " |")
    for n in IDLE_COUNTS if idles else ():
        bare_kib = idles[BARE.label].kib_per_connection[n]
        cells = [f"{bare_kib:,.0f}"]
        for k in others:
            kib = idles[k.label].kib_per_connection[n]
            cells += [f"{kib:,.0f}", f"{kib / bare_kib:.2f}×"]
        lines.append(f"| (e) {n:,} idle sockets | RSS KiB per socket | " + " | ".join(cells) + " |")
    if idles:
        bare_cpu = idles[BARE.label].heartbeat_cpu_percent
        cells = [f"{bare_cpu:.1f}"]
        for k in others:
            value = idles[k.label].heartbeat_cpu_percent
            cells += [f"{value:.1f}", f"{value / bare_cpu:.2f}×" if bare_cpu else "–"]
        title = f"| (e) {IDLE_COUNTS[-1]:,} idle sockets | server CPU % over {HEARTBEAT_SECONDS} s (pings only) | "
        lines.append(title + " | ".join(cells) + " |")
    lines += ["", *targets(flat, idles), *every_round(kinds, flat)]
    return "\n".join(lines) + "\n"


def every_round(kinds: list[Kind], flat: dict[str, Rounds]) -> list[str]:
    if not flat:
        return []
    lines = [
        "",
        "Every round, in order:",
        "",
        "| workload | server | chunks/s | first chunk p99 ms |",
        "|---|---|---|---|",
    ]
    for workload, by_kind in flat.items():
        for kind in kinds:
            slices = by_kind[kind.label]
            rates = " · ".join(f"{s.chunks_per_second:,.0f}" for s in slices)
            firsts = " · ".join(fmt(s.first_chunk_p99) for s in slices)
            lines.append(f"| {NAMES[workload]} | {kind.label} | {rates} | {firsts} |")
    return lines


def targets(flat: dict[str, Rounds], idles: dict[str, Idle]) -> list[str]:
    """Each target against the stock bare server, and against the tuned one: met only if both hold.

    The stock bare server pauses for garbage collection where the service does not (it freezes
    its start-up heap), which flatters latency ratios; the tuned bare server compares like with like.
    """
    rows: list[tuple[str, str, bool]] = []

    def row(what: str, found: dict[str, Spread | None], digits: int, unit: str, ok: Callable[[float], bool]) -> None:
        present = {b: s for b, s in found.items() if s is not None}
        if not present:
            return  # nothing to compare with: no row (an empty one would read as met)
        shown = "; ".join(f"{s.show(digits, unit)} vs {b}" for b, s in present.items())
        rows.append((what, shown, all(ok(s.median) for s in present.values())))

    for workload, added in (("a", 3.0), ("b", 10.0)):
        if workload not in flat:
            continue
        by_kind = flat[workload]
        bares = [b for b in (BARE.label, TUNED_BARE.label) if b in by_kind]
        service = by_kind[SERVICE.label]
        row(
            f"({workload}) chunks/s ≥ 0.8 × bare",
            {b: paired(service, by_kind[b], "chunks_per_second", per) for b in bares},
            2,
            "×",
            lambda v: v >= 0.8,
        )
        row(
            f"({workload}) first chunk p99 added by the service ≤ {added:.0f} ms",
            {b: paired(service, by_kind[b], "first_chunk_p99", minus) for b in bares},
            1,
            " ms",
            lambda v, added=added: v <= added,
        )
    if idles:
        worst = {
            b: Spread.of(
                [max(idles[SERVICE.label].kib_per_connection[n] / idles[b].kib_per_connection[n] for n in IDLE_COUNTS)]
            )
            for b in (BARE.label, TUNED_BARE.label)
            if b in idles
        }
        row(
            "(e) RSS per idle socket ≤ 1.3 × bare (the worst of 1,000, 5,000 and 10,000)",
            worst,
            2,
            "×",
            lambda v: v <= 1.3,
        )
    if not rows:
        return []
    return [
        "| target | measured: median (lowest–highest round) | met |",
        "|---|---|---|",
        *(f"| {what} | {measured} | {'yes' if met else '**no**'} |" for what, measured, met in rows),
    ]


if __name__ == "__main__":
    asyncio.run(main())
