"""Capacity at a model's pace, workload (f): how many sessions one process carries while every one
streams at LLM speed, with chunk latency p99 ≤ 50 ms and ≥ 97 % of the offered chunks delivered.

    .venv/bin/python bench/capacity.py                  # every configuration and both paces
    .venv/bin/python bench/capacity.py --no-redis       # the service and the bare server only
    .venv/bin/python bench/run.py --workloads f --write # as `make bench` runs it

Two paces, one tab per session, the next message once the answer is done:
- words: the offline script at WORD_PACE_MS a chunk of one word (the bare server: the same);
- bursts: Gemini-like, BURST_WORDS words every BURST_PACE_MS, streamed by bench/model_stub.py
  over Gemini's REST API and read by the service through the real google-genai SDK (the bare
  server sends the same chunks at the same pace, with no model behind it).
For each configuration and pace the session count doubles from START until a run misses a bound,
then is bisected to within 10 %; every run is reported. The configurations alternate at each step.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from common import REPORT, ROOT, ServerProcess, ensure_node_modules, write_section
from servers import BARE, REDIS_1, REDIS_2, SERVICE, Kind, Stream, fmt, machine, redis_reachable, stream

PLOT = ROOT / "docs" / "capacity-vs-load.png"
P99_BOUND_MS = 50.0
DELIVERED_BOUND = 0.97
START = 100
CALIBRATION = 20
MAX_SESSIONS = 6400  # (all processes) the search stops there: no configuration here comes near it


@dataclass(frozen=True)
class Pace:
    name: str
    delay_ms: float
    words_per_chunk: int

    def describe(self) -> str:
        if self.words_per_chunk == 1:
            return f"a word every {self.delay_ms:g} ms ({1000 / self.delay_ms:.1f} chunks/s while answering)"
        return f"{self.words_per_chunk} words every {self.delay_ms:g} ms, through the google-genai SDK"


WORDS = Pace("words", 80, 1)
BURSTS = Pace("bursts", 250, 6)


@dataclass(frozen=True)
class Probe:
    sessions: int
    run: Stream
    # Chunks/s one session gets from this configuration unloaded (CALIBRATION sessions): the pace
    # with its gaps between answers, which differ between servers (a message's round trip).
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


Found = dict[str, dict[str, list[Probe]]]  # pace name -> configuration label -> its probes in order


def kinds(*, redis: bool = True) -> list[Kind]:
    return [SERVICE, BARE, *([REDIS_1, REDIS_2] if redis else [])]


@contextlib.asynccontextmanager
async def model_for(pace: Pace) -> AsyncIterator[dict[str, str]]:
    """The environment that makes a service stream at this pace (and the bare server send the same chunks)."""
    if pace.words_per_chunk == 1:
        yield {}
        return
    env = {"STUB_BURST_WORDS": str(pace.words_per_chunk), "STUB_BURST_MS": str(pace.delay_ms)}
    stub = await ServerProcess.start([str(ROOT / "bench" / "model_stub.py")], env, str(ROOT))
    try:
        yield {
            "LLM_PROVIDER": "gemini",
            "GEMINI_API_KEY": "bench",
            "GEMINI_BASE_URL": stub.url,
            "BARE_WORDS_PER_CHUNK": str(pace.words_per_chunk),
        }
    finally:
        await stub.stop()


async def run_at(kind: Kind, pace: Pace, sessions: int, seconds: float, model: dict[str, str]) -> Stream:
    return await stream(kind, sessions=sessions, tabs=1, seconds=seconds, delay_ms=pace.delay_ms, env=model)


async def measure(configurations: list[Kind], seconds: float, paces: tuple[Pace, ...] = (WORDS, BURSTS)) -> Found:
    found: Found = {}
    for pace in paces:
        print(f"  pace: {pace.describe()}", flush=True)
        async with model_for(pace) as model:
            found[pace.name] = await search(configurations, pace, seconds, model)
    return found


async def search(
    configurations: list[Kind], pace: Pace, seconds: float, model: dict[str, str]
) -> dict[str, list[Probe]]:
    """Every probe of each configuration; the largest held count of each is its capacity."""
    probes: dict[str, list[Probe]] = {k.label: [] for k in configurations}
    bounds: dict[str, tuple[int, int | None]] = {k.label: (0, None) for k in configurations}  # held, missed

    def next_count(label: str) -> int | None:
        held, missed = bounds[label]
        if missed is None:
            count = max(START, 2 * held)
            return count if count <= MAX_SESSIONS else None
        if missed - held <= max(25, held // 10):
            return None
        return (held + missed) // 2

    per_session: dict[str, float] = {}
    for kind in configurations:
        unloaded = await run_at(kind, pace, CALIBRATION, seconds, model)
        per_session[kind.label] = unloaded.chunks_per_second / CALIBRATION
        print(f"  {kind.label}: {per_session[kind.label]:.2f} chunks/s per session unloaded", flush=True)
    order = list(configurations)
    while todo := [(k, n) for k in order if (n := next_count(k.label)) is not None]:
        for kind, count in todo:
            probe = Probe(count, await run_at(kind, pace, count, seconds, model), per_session[kind.label])
            probes[kind.label].append(probe)
            held, missed = bounds[kind.label]
            bounds[kind.label] = (count, missed) if probe.held else (held, count)
            print(
                f"  {kind.label} {count} sessions: {probe.delivered:.1%} of {probe.offered:,.0f} chunks/s delivered, "
                f"p99 {fmt(probe.run.latency_p99)} ms, server {probe.run.server_cpu_percent:.0f} % CPU"
                f" -> {'held' if probe.held else 'missed'}",
                flush=True,
            )
        order.reverse()  # alternate which configuration runs first
    return probes


def largest_held(probes: list[Probe]) -> Probe | None:
    held = [p for p in probes if p.held]
    return max(held, key=lambda p: p.sessions) if held else None


def report(found: Found, seconds: float, configurations: list[Kind]) -> str:
    paces = {p.name: p for p in (WORDS, BURSTS)}
    processes = {k.label: k.processes for k in configurations}
    lines = [
        "## Capacity at a model's pace: sessions per process",
        "",
        "`bench/run.py --workloads f` (`make bench`; `bench/capacity.py`). Every session streams at a"
        " model's pace, one tab each, the next message once the answer is done. A count of sessions"
        f" is held when chunk latency p99 ≤ {P99_BOUND_MS:.0f} ms and ≥ {DELIVERED_BOUND:.0%} of the offered"
        f" chunks arrive, over {seconds:g} s; offered is the count times what one session gets from the"
        f" same configuration with {CALIBRATION} sessions (its pace with the gaps between answers). The"
        " count doubles from 100 until a run misses, then is bisected to within 10 %. The service runs"
        " SQLite storage; with Redis, each process its own SQLite file and the sessions spread round"
        " robin over the processes, as a load balancer would.",
        "",
        machine(),
        "",
        "| pace | configuration | sessions held | per process | offered chunks/s there"
        " | chunk latency p50 / p99 ms | server CPU % |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by_kind in found.items():
        for label, probes in by_kind.items():
            best = largest_held(probes)
            if best is None:
                lines.append(f"| {paces[name].describe()} | {label} | fewer than {START:,} | | | | |")
                continue
            lines.append(
                f"| {paces[name].describe()} | {label} | **{best.sessions:,}** | "
                f"{best.sessions // processes[label]:,} | "
                f"{best.offered:,.0f} | {fmt(best.run.latency_p50)} / {fmt(best.run.latency_p99)} | "
                f"{best.run.server_cpu_percent:.0f} |"
            )
    ratios = []
    for name, by_kind in found.items():
        service, bare = (largest_held(by_kind.get(k.label, [])) for k in (SERVICE, BARE))
        if service and bare:
            ratios.append(f"{service.sessions / bare.sessions:.2f}× at {name}")
    if ratios:
        lines += ["", f"Sessions per process, the service ÷ the bare server: {', '.join(ratios)}."]
    lines += [
        "",
        f"![chunk latency p99 against sessions]({PLOT.relative_to(REPORT.parent)})",
        "",
        "The plot shows latency; a count can also miss on the delivered rate (the table below says which).",
        "",
        "Every run, in order:",
        "",
        "| pace | configuration | sessions | delivered | chunk latency p50 / p99 ms | server CPU % | held |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by_kind in found.items():
        for label, probes in by_kind.items():
            for p in probes:
                lines.append(
                    f"| {name} | {label} | {p.sessions:,} | {p.delivered:.1%} | {fmt(p.run.latency_p50)} / "
                    f"{fmt(p.run.latency_p99)} | {p.run.server_cpu_percent:.0f} | {'yes' if p.held else 'no'} |"
                )
    return "\n".join(lines) + "\n"


def plot(found: Found) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(found), figsize=(6 * len(found), 4.2), dpi=110, squeeze=False)
    colours = ("tab:blue", "tab:gray", "tab:orange", "tab:green", "tab:red")
    for axis, (name, by_kind) in zip(axes[0], found.items(), strict=True):
        for (label, probes), colour in zip(by_kind.items(), colours, strict=False):
            ordered = sorted(probes, key=lambda p: p.sessions)
            axis.plot(
                [p.sessions for p in ordered],
                [p.run.latency_p99 for p in ordered],
                "-o",
                color=colour,
                label=label,
            )
        axis.axhline(P99_BOUND_MS, color="black", linestyle=":", linewidth=1, label=f"bound {P99_BOUND_MS:.0f} ms")
        pace = WORDS if name == WORDS.name else BURSTS
        axis.set_title(f"(f) {pace.describe()}", fontsize=9)
        axis.set_xlabel("sessions streaming at once (all processes)")
        axis.set_ylabel("chunk latency p99, ms")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(PLOT)
    print(f"wrote {PLOT.relative_to(ROOT)}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10, help="measured seconds per run")
    parser.add_argument("--no-redis", action="store_true", help="without the Redis configurations")
    parser.add_argument("--pace", choices=("words", "bursts"), action="append", help="one pace only (default both)")
    parser.add_argument("--write", action="store_true", help="write its section of docs/performance.md and the plot")
    args = parser.parse_args()
    await ensure_node_modules()
    paces = tuple(p for p in (WORDS, BURSTS) if not args.pace or p.name in args.pace)
    configurations = kinds(redis=not args.no_redis and await redis_reachable())
    found = await measure(configurations, args.seconds, paces)
    text = report(found, args.seconds, configurations)
    print(text)
    if args.write:
        write_section("capacity", text)
        plot(found)


if __name__ == "__main__":
    asyncio.run(main())
