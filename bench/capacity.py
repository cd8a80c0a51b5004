"""Capacity at a model's pace, workload (f): how many sessions one process carries while every one
streams at LLM speed, with chunk latency p99 ≤ 50 ms and ≥ 97 % of the offered chunks delivered.

    .venv/bin/python bench/capacity.py                 # the service and the bare server, one process each
    .venv/bin/python bench/capacity.py --write         # also writes its section of docs/performance.md

A first version (issue 20, part 2), not yet run by `make bench`: the bare server misses the
delivered bound at 100 sessions while using about 15 % of a core (20 s windows too), which says more
about its pacing than its capacity, so its figure is not published yet; nor are 2 processes on Redis.

Each session streams the offline script at PACE_MS a chunk (the bare server: the same pace), one tab
each, the next message once the answer is done. The count doubles from START until a run misses a
bound, then is bisected to within 10 %; every run is reported. The servers alternate at each count.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass

from common import ensure_node_modules, write_section
from run import BARE, SERVICE, Kind, Stream, fmt, machine, stream

PACE_MS = 80  # 12.5 chunks/s per session: a model streaming a word at a time
P99_BOUND_MS = 50.0
DELIVERED_BOUND = 0.97
START = 100
CALIBRATION = 20
MAX_SESSIONS = 6400


@dataclass(frozen=True)
class Probe:
    sessions: int
    run: Stream
    # Chunks/s one session gets from this server unloaded (CALIBRATION sessions): the pace with its
    # gaps between answers, which differ between the servers (answer length, a message's round trip).
    per_session: float

    @property
    def offered(self) -> float:
        return self.sessions * self.per_session

    @property
    def delivered(self) -> float:
        return self.run.chunks_per_second / self.offered

    @property
    def held(self) -> bool:
        p99 = self.run.latency_p99
        return p99 is not None and p99 <= P99_BOUND_MS and self.delivered >= DELIVERED_BOUND and not self.run.failures


async def probe(kind: Kind, sessions: int, seconds: float, per_session: float) -> Probe:
    run = await stream(kind, sessions=sessions, tabs=1, seconds=seconds, delay_ms=PACE_MS)
    found = Probe(sessions, run, per_session)
    print(
        f"  {kind.label} {sessions} sessions: {found.delivered:.1%} of {found.offered:,.0f} chunks/s delivered, "
        f"p99 {fmt(found.run.latency_p99)} ms, server {found.run.server_cpu_percent:.0f} % CPU"
        f" -> {'held' if found.held else 'missed'}",
        flush=True,
    )
    return found


async def capacity(kinds: list[Kind], seconds: float) -> dict[str, list[Probe]]:
    """Every probe of each server; the largest held count of each is its capacity."""
    probes: dict[str, list[Probe]] = {k.label: [] for k in kinds}
    bounds = {k.label: [0, None] for k in kinds}  # largest held, smallest missed

    def next_count(label: str) -> int | None:
        held, missed = bounds[label]
        if missed is None:
            count = max(START, 2 * held)
            return count if count <= MAX_SESSIONS else None
        if missed - held <= max(25, held // 10):
            return None
        return (held + missed) // 2

    pace: dict[str, float] = {}
    for kind in kinds:
        unloaded = await stream(kind, sessions=CALIBRATION, tabs=1, seconds=seconds, delay_ms=PACE_MS)
        pace[kind.label] = unloaded.chunks_per_second / CALIBRATION
        print(f"  {kind.label}: {pace[kind.label]:.2f} chunks/s per session unloaded", flush=True)
    order = list(kinds)
    while True:
        todo = [(k, n) for k in order if (n := next_count(k.label)) is not None]
        if not todo:
            return probes
        for kind, count in todo:
            found = await probe(kind, count, seconds, pace[kind.label])
            probes[kind.label].append(found)
            bounds[kind.label][0 if found.held else 1] = count
        order.reverse()  # alternate which server runs first


def largest_held(probes: list[Probe]) -> int:
    return max((p.sessions for p in probes if p.held), default=0)


def offered_at(probes: list[Probe], sessions: int) -> str:
    found = [p for p in probes if p.sessions == sessions]
    return f"{found[0].offered:,.0f}" if found else "–"


def report(probes: dict[str, list[Probe]], seconds: float) -> str:
    bare = largest_held(probes[BARE.label])
    service = largest_held(probes[SERVICE.label])
    lines = [
        "## Capacity at a model's pace: sessions per process",
        "",
        f"`bench/capacity.py` (`make bench`): every session streams at {PACE_MS} ms a chunk "
        f"({1000 / PACE_MS:.1f} chunks/s while it answers), one tab each, the next message once the answer "
        f"is done; a count is held when chunk latency p99 ≤ {P99_BOUND_MS:.0f} ms and ≥ {DELIVERED_BOUND:.0%} "
        f"of the offered chunks arrive, over {seconds:.0f} s. Offered: the count times what one session "
        f"gets from the same server with {CALIBRATION} sessions (its pace with the gaps between answers).",
        "",
        machine(),
        "",
        "| server | sessions per process held | offered chunks/s there |",
        "|---|---|---|",
        f"| service (one process) | **{service:,}** | {offered_at(probes[SERVICE.label], service)} |",
        f"| bare python-socketio | {bare:,} | {offered_at(probes[BARE.label], bare)} |",
        f"| service ÷ bare | {service / bare:.2f}× | |" if bare else "| service ÷ bare | – | |",
        "",
        "Every run, in order:",
        "",
        "| server | sessions | delivered | chunk latency p50 / p99 ms | server CPU % | held |",
        "|---|---|---|---|---|---|",
    ]
    for label, runs in probes.items():
        for p in runs:
            lines.append(
                f"| {label} | {p.sessions:,} | {p.delivered:.1%} | {fmt(p.run.latency_p50)} / "
                f"{fmt(p.run.latency_p99)} | {p.run.server_cpu_percent:.0f} | {'yes' if p.held else 'no'} |"
            )
    return "\n".join(lines) + "\n"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10, help="measured seconds per run")
    parser.add_argument("--write", action="store_true", help="write its section of docs/performance.md")
    args = parser.parse_args()
    await ensure_node_modules()
    probes = await capacity([SERVICE, BARE], args.seconds)
    text = report(probes, args.seconds)
    print(text)
    if args.write:
        write_section("capacity", text)


if __name__ == "__main__":
    asyncio.run(main())
