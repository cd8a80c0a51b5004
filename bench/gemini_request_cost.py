"""The CPU a turn's model request costs the service in google-genai, by conversation length, before
and after the context budget (issue 30): one process, the real SDK, the model stub answering at
once, so nothing but the client's own work is counted.

    .venv/bin/python bench/gemini_request_cost.py [--turns 1 20 50 200 1000] [--context-tokens 32000 4000]
                                                  [--repeat 20] [--rounds 3] [--write]

A request is one `GeminiProvider.stream` read to its end (building the request, sending it, parsing
each streamed event). The stub's own CPU is in its own process and not counted.
- before: the whole conversation, as the service sent it until issue 30;
- after, per budget: the session's stored events (N turns, rows as the service stores them) made
  into the request by `ContextBudget(budget).window(...)`, timed with the request, in the steady
  state compaction keeps: a summary of 400 words covering the oldest turns, and the turns no
  summary covers the most that fit three quarters of the budget (the top of compaction's saw
  tooth: past that it summarises all but the newest quarter, so this is the most a turn sends).
The cases take turns within each round (the first rotating); each cell is the median of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from common import QUESTION, ROOT, ServerProcess, compaction_summary, history_turn, write_section

sys.path.insert(0, str(ROOT))

from server.core.context import ContextBudget, newest_turns, tokens_of
from server.core.models import EventDraft, EventType, StoredEvent
from server.core.ports import ModelRequest
from server.core.redelivery import answer_key, user_message_key
from server.core.replay import conversation_from_events
from server.providers.gemini import GeminiConfig, GeminiProvider

SESSION = "00000000-0000-4000-8000-000000000030"
SECTION = "request-cost"
TARGET = 1.5  # the issue's: the CPU of a request at 1,000 turns within 1.5x that at 20


def uncovered_at_most(budget: int) -> int:
    """server/core/compaction.py summarises once the uncovered turns pass half the budget beyond
    the newest quarter."""
    return budget // 2 + budget // 4


def stored_events(turns: int) -> list[StoredEvent]:
    """`turns - 1` answered turns, then this turn's question, as the service's rows of one session."""
    at = datetime(2026, 1, 1, tzinfo=UTC)
    events: list[StoredEvent] = []

    def add(kind: EventType, content: str, turn_id: str, key: str, finish: str | None = None) -> None:
        events.append(
            StoredEvent.model_validate(
                {
                    "event_id": len(events) + 1,
                    "session_id": SESSION,
                    "event_type": kind,
                    "content": content,
                    "timestamp": at,
                    "turn_id": turn_id,
                    "event_key": key,
                    "finish_reason": finish,
                }
            )
        )

    for n in range(turns):
        turn_id = f"00000000-0000-4000-8000-{n:012d}"
        question, answer = history_turn(n) if n < turns - 1 else (QUESTION, "")
        add(EventType.USER_MESSAGE, question, turn_id, user_message_key(turn_id, None))
        if n < turns - 1:
            add(EventType.AI_MESSAGE, answer, turn_id, answer_key(turn_id), "stop")
    return events


def question_of(events: list[StoredEvent]) -> EventDraft:
    last = events[-1]
    assert last.event_key is not None
    return EventDraft(
        session_id=SESSION, event_type=last.event_type, content=last.content, event_key=last.event_key,
        turn_id=last.turn_id, timestamp=last.timestamp,
    )  # fmt: skip


def steady_state(events: list[StoredEvent], budget: int) -> tuple[str | None, int]:
    """The summary and the last event it covers once compaction has kept up, at its most: the
    newest answered turns that fit `uncovered_at_most` stay uncovered, everything before them is
    summarised."""
    uncovered = 0
    oldest_kept: int | None = None
    for turn in newest_turns(events, 0, until=len(events) - 1):
        uncovered += tokens_of(conversation_from_events(turn))
        if uncovered > uncovered_at_most(budget):
            assert oldest_kept is not None, "one turn alone passes the uncovered part's bound"
            return compaction_summary(), oldest_kept - 1
        oldest_kept = turn[0].event_id
    return None, 0


@dataclass
class Case:
    """One column of the table: how a request of a conversation is made, and what it sends."""

    label: str
    build: Callable[[], ModelRequest]
    ms: list[float] = field(default_factory=list)
    contents: int = 0
    tokens: int = 0


def cases(turns: int, budgets: list[int]) -> list[Case]:
    events = stored_events(turns)
    whole = conversation_from_events(events)
    made = [Case("before", lambda: ModelRequest(conversation=whole, tools=[]))]
    question = question_of(events)
    for budget in budgets:
        summary, upto = steady_state(events, budget)
        context = ContextBudget(budget)

        def build(context: ContextBudget = context, summary: str | None = summary, upto: int = upto) -> ModelRequest:
            window = context.window(SESSION, events, question, summary=summary, upto=upto)
            return ModelRequest(conversation=window.conversation(), tools=[])

        made.append(Case(f"after, {budget:,}", build))
    for case in made:
        sent = case.build().conversation
        case.contents, case.tokens = len(sent), tokens_of(sent)
    return made


async def cpu_per_request(provider: GeminiProvider, build: Callable[[], ModelRequest], repeat: int) -> float:
    start = time.process_time()
    for _ in range(repeat):
        async for _ in provider.stream(build()):
            pass
    return (time.process_time() - start) / repeat * 1000


async def measure(provider: GeminiProvider, turns: int, budgets: list[int], repeat: int, rounds: int) -> list[Case]:
    made = cases(turns, budgets)
    for case in made:  # warm: connection, validators
        async for _ in provider.stream(case.build()):
            pass
    for r in range(rounds):
        for case in made[r % len(made) :] + made[: r % len(made)]:
            case.ms.append(await cpu_per_request(provider, case.build, repeat))
    return made


def report(found: dict[int, list[Case]], args: argparse.Namespace, command: str) -> str:
    labels = [case.label for case in next(iter(found.values()))]
    lines = [
        f"`{command}`: CPU of one request, median of {args.rounds} rounds of {args.repeat} requests per"
        " cell, the cases alternating; what each sends as contents and estimated tokens (4 characters a token).",
        "",
        "| turns | " + " | ".join(f"{label}: CPU | {label}: sent" for label in labels) + " |",
        "|---|" + "---|---|" * len(labels),
    ]
    for turns, made in found.items():
        cells = [f"{statistics.median(c.ms):.2f} ms | {c.contents:,} ({c.tokens:,} tokens)" for c in made]
        lines.append(f"| {turns:,} | " + " | ".join(cells) + " |")
    if 20 in found and 1000 in found:
        lines += ["", f"CPU at 1,000 turns ÷ at 20 turns (the target: within {TARGET:g}×):", ""]
        for i, label in enumerate(labels):
            ratio = statistics.median(found[1000][i].ms) / statistics.median(found[20][i].ms)
            lines.append(f"- {label}: {ratio:.2f}× ({'within' if ratio <= TARGET else 'over'} {TARGET:g}×)")
    return "\n".join(lines) + "\n"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, nargs="+", default=[1, 20, 50, 200, 1000])
    parser.add_argument("--context-tokens", type=int, nargs="+", default=[32000, 4000], help="the budgets of after")
    parser.add_argument("--repeat", type=int, default=20, help="requests per case in each round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true", help=f"write its section ({SECTION}) of docs/performance.md")
    args = parser.parse_args()
    stub = await ServerProcess.start([str(ROOT / "bench" / "model_stub.py")], {"STUB_BURST_MS": "0"}, str(ROOT))
    provider = GeminiProvider(GeminiConfig(api_key="bench", model="bench", base_url=stub.url))
    try:
        found = {}
        for turns in args.turns:
            found[turns] = await measure(provider, turns, args.context_tokens, args.repeat, args.rounds)
            print(f"  {turns} turns: " + ", ".join(f"{c.label} {statistics.median(c.ms):.2f} ms" for c in found[turns]))
    finally:
        await provider.aclose()
        await stub.stop()
    command = " ".join(["bench/gemini_request_cost.py", *(a for a in sys.argv[1:] if a != "--write")])
    text = report(found, args, command)
    print(text)
    if args.write:
        write_section(SECTION, text)


if __name__ == "__main__":
    asyncio.run(main())
