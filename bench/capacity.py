"""Capacity at a model's pace, workload (f): how many sessions one process carries while every one
streams at LLM speed, with chunk latency p99 ≤ 50 ms and ≥ 97 % of the offered chunks delivered.

    .venv/bin/python bench/capacity.py                  # every configuration and both paces
    .venv/bin/python bench/capacity.py --no-redis       # the service and the bare server only
    .venv/bin/python bench/capacity.py --baseline main --only service,redis1,redis2
                                                        # each configuration before and after, in one run
    .venv/bin/python bench/run.py --workloads f --write # as `make bench` runs it
    .venv/bin/python bench/capacity.py --baseline main --only service --pace bursts --history-turns 200 \
        --start 10 --calibration 5 --seconds 6 --max-sessions 400  # sessions with long histories (issue 30)

Two paces, one tab per session, the next message once the answer is done:
- words: the offline script at WORD_PACE_MS a chunk of one word (the bare server: the same);
- bursts: Gemini-like, BURST_WORDS words every BURST_PACE_MS, streamed by bench/model_stub.py
  over Gemini's REST API and read by the service through the real google-genai SDK (the bare
  server sends the same chunks at the same pace, with no model behind it).
For each configuration and pace the session count doubles from START until a run misses a bound,
then is bisected to within 10 %; every run is reported. The configurations alternate at each step.
With --baseline REV, every configuration also runs from a temporary `git worktree` of REV (labelled
" (before)"), beside its current twin in that alternation, and the report gives both and their ratios.
REV needs what the bench drives (BENCH_CHUNK_TIMESTAMPS, bench/bare_server.py): any commit since (f) was added.
With --history-turns N, every session is stored before the load with N answered turns (the original
design's SQL, in each server's SQLite, so any tree reads them), the load joins those sessions, and
counting starts once every session has finished two turns (bench/servers.py HISTORY_WARM_TURNS);
the report is its own section of docs/performance.md (without a plot), beside the capacity section.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from common import REPORT, ROOT, ServerProcess, checkout_of, ensure_node_modules, history_turn, write_section
from servers import (
    BARE,
    BEFORE,
    HISTORY_WARM_LIMIT_SECONDS,
    HISTORY_WARM_TURNS,
    REDIS_1,
    REDIS_2,
    SERVICE,
    Kind,
    Stream,
    before,
    fmt,
    machine,
    redis_reachable,
    stream,
)

PLOT = ROOT / "docs" / "capacity-vs-load.png"
P99_BOUND_MS = 50.0
DELIVERED_BOUND = 0.97
START = 100
CALIBRATION = 20
MAX_SESSIONS = 6400  # (all processes) the search stops there: no configuration here comes near it
MAKE_BENCH = "bench/run.py --workloads f"  # how `make bench` runs this workload
# The names --only takes, in the order the configurations run.
CHOICES = {"service": SERVICE, "bare": BARE, "redis1": REDIS_1, "redis2": REDIS_2}
# The ratios of sessions held that the report gives: (numerator, denominator).
RATIOS = ((SERVICE, BARE), (REDIS_1, SERVICE), (REDIS_2, SERVICE))


@dataclass(frozen=True)
class Limits:
    """Where the search of a count starts and the count (all processes) it does not go past."""

    start: int = START
    most: int = MAX_SESSIONS


@dataclass(frozen=True)
class Sessions:
    """What every session is: how many turns it has stored before the load, and how many sessions
    the unloaded pace is calibrated with."""

    history_turns: int = 0
    calibration: int = CALIBRATION

    @property
    def section(self) -> str:
        return "capacity-long-history" if self.history_turns else "capacity"

    @property
    def plotted(self) -> bool:
        """The plot is of the capacity section; the table of every run gives the same figures."""
        return not self.history_turns


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


def kinds(*, redis: bool = True, only: Sequence[str] = (), baseline: Path | None = None) -> list[Kind]:
    """The configurations to measure; with a baseline checkout, each one followed by its twin running
    that checkout, so the search's alternation keeps the two seconds apart."""
    chosen = [k for name, k in CHOICES.items() if (not only or name in only) and (redis or not k.redis)]
    return [twin for k in chosen for twin in (k, *([before(k, baseline)] if baseline else []))]


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


async def run_at(
    kind: Kind, pace: Pace, sessions: int, seconds: float, model: dict[str, str], history_turns: int
) -> Stream:
    return await stream(
        kind,
        sessions=sessions,
        tabs=1,
        seconds=seconds,
        delay_ms=pace.delay_ms,
        env=model,
        history_turns=history_turns,
    )


async def measure(
    configurations: list[Kind],
    seconds: float,
    paces: tuple[Pace, ...] = (WORDS, BURSTS),
    limits: Limits = Limits(),
    each: Sessions = Sessions(),
) -> Found:
    found: Found = {}
    for pace in paces:
        print(f"  pace: {pace.describe()}", flush=True)
        async with model_for(pace) as model:
            found[pace.name] = await search(configurations, pace, seconds, model, limits, each)
    return found


async def search(
    configurations: list[Kind], pace: Pace, seconds: float, model: dict[str, str], limits: Limits, each: Sessions
) -> dict[str, list[Probe]]:
    """Every probe of each configuration; the largest held count of each is its capacity."""
    probes: dict[str, list[Probe]] = {k.label: [] for k in configurations}
    bounds: dict[str, tuple[int, int | None]] = {k.label: (0, None) for k in configurations}  # held, missed

    def next_count(label: str) -> int | None:
        held, missed = bounds[label]
        if missed is None:
            count = max(limits.start, 2 * held)
            return count if count <= limits.most else None
        if missed - held <= max(25, held // 10):
            return None
        return (held + missed) // 2

    per_session: dict[str, float] = {}
    for kind in configurations:
        unloaded = await run_at(kind, pace, each.calibration, seconds, model, each.history_turns)
        per_session[kind.label] = unloaded.chunks_per_second / each.calibration
        print(f"  {kind.label}: {per_session[kind.label]:.2f} chunks/s per session unloaded", flush=True)
    order = list(configurations)
    while todo := [(k, n) for k in order if (n := next_count(k.label)) is not None]:
        for kind, count in todo:
            run = await run_at(kind, pace, count, seconds, model, each.history_turns)
            probe = Probe(count, run, per_session[kind.label])
            probes[kind.label].append(probe)
            held, missed = bounds[kind.label]
            bounds[kind.label] = (count, missed) if probe.held else (held, count)
            print(
                f"  {kind.label} {count} sessions: {probe.delivered:.1%} of {probe.offered:,.0f} chunks/s delivered, "
                f"p99 {fmt(probe.run.latency_p99)} ms, server {probe.run.server_cpu_percent:.0f} % CPU"
                f" (counted after {probe.run.warm_seconds:.1f} s) -> {'held' if probe.held else 'missed'}",
                flush=True,
            )
        order.reverse()  # alternate which configuration runs first
    return probes


def largest_held(probes: list[Probe]) -> Probe | None:
    held = [p for p in probes if p.held]
    return max(held, key=lambda p: p.sessions) if held else None


def report(
    found: Found,
    seconds: float,
    configurations: list[Kind],
    limits: Limits = Limits(),
    baseline: str | None = None,
    command: str = MAKE_BENCH,
    each: Sessions = Sessions(),
) -> str:
    """The section of docs/performance.md; `baseline` names the revision the " (before)" rows ran."""
    how = f"`{command}`" + (" (`make bench`; `bench/capacity.py`)" if command == MAKE_BENCH else "")
    lines = [
        # The long-history section sits among the notes of issue 30, a level down.
        f"### Capacity at a model's pace: sessions per process, each session {each.history_turns:,} turns long"
        if each.history_turns
        else "## Capacity at a model's pace: sessions per process",
        "",
        f"{how}. Every session streams at a"
        " model's pace, one tab each, the next message once the answer is done. A count of sessions"
        f" is held when chunk latency p99 ≤ {P99_BOUND_MS:.0f} ms and ≥ {DELIVERED_BOUND:.0%} of the offered"
        f" chunks arrive, over {seconds:g} s; offered is the count times what one session gets from the"
        f" same configuration with {each.calibration} sessions (its pace with the gaps between answers). The"
        f" count doubles from {limits.start:,} (up to {limits.most:,} in all) until a run misses, then is"
        " bisected to within 10 %. The service runs SQLite storage; with Redis, each process its own"
        " SQLite file and the sessions spread round robin over the processes, as a load balancer would.",
        "",
        *([history_note(each.history_turns), ""] if each.history_turns else []),
        machine(),
        "",
    ]
    if baseline:
        lines += [
            f"Rows marked{BEFORE} run {baseline} from a temporary `git worktree`, each configuration"
            " beside its current twin in the same alternation: after and before share the run's minutes.",
            "",
        ]
    lines += held_table(found, configurations, limits)
    lines += ["", *ratios(found, baseline)]
    lines += ["", *(plot_lines() if each.plotted else []), *every_run(found, warm=bool(each.history_turns))]
    return "\n".join(lines) + "\n"


def plot_lines() -> list[str]:
    return [
        f"![chunk latency p99 against sessions]({PLOT.relative_to(REPORT.parent)})",
        "",
        "The plot shows latency; a count can also miss on the delivered rate (the table below says which).",
        "",
    ]


def history_note(turns: int) -> str:
    question, answer = history_turn(0)
    return (
        f"Every session is stored before the load with {turns:,} answered turns ({len(question)} and"
        f" {len(answer)} characters each way), inserted with plain SQL into the server's"
        " SQLite, so that both trees read the same rows; the load joins those sessions. Counting starts"
        f" once every session has finished {HISTORY_WARM_TURNS} turns (at most"
        f" {HISTORY_WARM_LIMIT_SECONDS} s): a session's first turn sends whatever its tree sends of the"
        " stored history, and the compaction that may follow runs in the background; the time that took"
        " is in the last column of the table of every run."
    )


def held_table(found: Found, configurations: list[Kind], limits: Limits) -> list[str]:
    paces = {p.name: p for p in (WORDS, BURSTS)}
    processes = {k.label: k.processes for k in configurations}
    lines = [
        "| pace | configuration | sessions held | per process | offered chunks/s there"
        " | chunk latency p50 / p99 ms | server CPU % |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by_kind in found.items():
        for label, probes in by_kind.items():
            best = largest_held(probes)
            if best is None:
                lines.append(f"| {paces[name].describe()} | {label} | fewer than {limits.start:,} | | | | |")
                continue
            lines.append(
                f"| {paces[name].describe()} | {label} | **{best.sessions:,}** | "
                f"{best.sessions // processes[label]:,} | "
                f"{best.offered:,.0f} | {fmt(best.run.latency_p50)} / {fmt(best.run.latency_p99)} | "
                f"{best.run.server_cpu_percent:.0f} |"
            )
    return lines


def held_ratio(by_kind: dict[str, list[Probe]], numerator: str, denominator: str) -> float | None:
    """Sessions held (all processes) by one configuration over another's, if both held a count."""
    top, bottom = (largest_held(by_kind.get(label, [])) for label in (numerator, denominator))
    return top.sessions / bottom.sessions if top and bottom else None


def times(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:.2f}×"


def ratios(found: Found, baseline: str | None) -> list[str]:
    """The ratios of sessions held, for the current tree and, with a baseline, for the baseline's."""
    trees = [BEFORE, ""] if baseline else [""]
    head = f"| pace | sessions held | before: {baseline} | after |" if baseline else "| pace | sessions held | ratio |"
    lines = [head, "|---|---|---|---|" if baseline else "|---|---|---|"]
    for name, by_kind in found.items():
        for top, bottom in RATIOS:
            if top.label not in by_kind or bottom.label not in by_kind:
                continue
            cells = [times(held_ratio(by_kind, top.label + tree, bottom.label + tree)) for tree in trees]
            lines.append(f"| {name} | {top.label} ÷ {bottom.label} | " + " | ".join(cells) + " |")
        for label in (k for k in by_kind if baseline and not k.endswith(BEFORE)):
            lines.append(
                f"| {name} | {label}: after ÷ before | | {times(held_ratio(by_kind, label, label + BEFORE))} |"
            )
    return lines if len(lines) > 2 else []


def every_run(found: Found, *, warm: bool = False) -> list[str]:
    """`warm`: with the seconds from the first connection until counting started."""
    lines = [
        "Every run, in order:",
        "",
        "| pace | configuration | sessions | delivered | chunk latency p50 / p99 ms | server CPU % | held |"
        + (" counted after |" if warm else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if warm else ""),
    ]
    for name, by_kind in found.items():
        for label, probes in by_kind.items():
            for p in probes:
                lines.append(
                    f"| {name} | {label} | {p.sessions:,} | {p.delivered:.1%} | {fmt(p.run.latency_p50)} / "
                    f"{fmt(p.run.latency_p99)} | {p.run.server_cpu_percent:.0f} | {'yes' if p.held else 'no'} |"
                    + (f" {p.run.warm_seconds:.1f} s |" if warm else "")
                )
    return lines


def plot(found: Found) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(found), figsize=(6 * len(found), 4.2), dpi=110, squeeze=False)
    palette = ("tab:blue", "tab:gray", "tab:orange", "tab:green", "tab:red")
    # One colour per configuration; its baseline twin in the same colour, dashed.
    colours = {k.label: c for k, c in zip(CHOICES.values(), palette, strict=False)}
    for axis, (name, by_kind) in zip(axes[0], found.items(), strict=True):
        for label, probes in by_kind.items():
            ordered = sorted(probes, key=lambda p: p.sessions)
            axis.plot(
                [p.sessions for p in ordered],
                [p.run.latency_p99 for p in ordered],
                "--o" if label.endswith(BEFORE) else "-o",
                color=colours.get(label.removesuffix(BEFORE), "tab:purple"),
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


def configurations_named(names: str) -> list[str]:
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    if unknown := [n for n in chosen if n not in CHOICES]:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(CHOICES)}")
    return chosen


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10, help="measured seconds per run")
    parser.add_argument("--no-redis", action="store_true", help="without the Redis configurations")
    parser.add_argument("--only", type=configurations_named, default=[], help=f"some of {','.join(CHOICES)}")
    parser.add_argument("--pace", choices=("words", "bursts"), action="append", help="one pace only (default both)")
    parser.add_argument("--baseline", metavar="REV", help="also run every configuration from this git revision")
    parser.add_argument("--start", type=int, default=START, help="the first count of sessions tried")
    parser.add_argument("--max-sessions", type=int, default=MAX_SESSIONS, help="the search goes no higher")
    parser.add_argument("--history-turns", type=int, default=0, help="turns stored in every session before the load")
    parser.add_argument("--calibration", type=int, default=CALIBRATION, help="sessions of the unloaded run")
    parser.add_argument("--write", action="store_true", help="write its section of docs/performance.md and the plot")
    return parser.parse_args()


async def run(args: argparse.Namespace, tree: Path | None, baseline: str | None) -> None:
    paces = tuple(p for p in (WORDS, BURSTS) if not args.pace or p.name in args.pace)
    wants_redis = not args.no_redis and (not args.only or any(CHOICES[name].redis for name in args.only))
    configurations = kinds(redis=wants_redis and await redis_reachable(), only=args.only, baseline=tree)
    if not configurations:
        raise SystemExit("no configuration to measure")
    limits = Limits(args.start, args.max_sessions)
    each = Sessions(args.history_turns, args.calibration)
    found = await measure(configurations, args.seconds, paces, limits, each)
    command = shlex.join(["bench/capacity.py", *(a for a in sys.argv[1:] if a != "--write")])
    text = report(found, args.seconds, configurations, limits, baseline, command, each)
    print(text)
    if args.write:
        write_section(each.section, text)
        if each.plotted:
            plot(found)


async def main() -> None:
    args = arguments()
    await ensure_node_modules()
    if not args.baseline:
        await run(args, None, None)
        return
    async with checkout_of(args.baseline) as (tree, commit):
        print(f"  before: {args.baseline} ({commit}) in {tree}", flush=True)
        await run(args, tree, f"`{args.baseline}` ({commit})")


if __name__ == "__main__":
    asyncio.run(main())
