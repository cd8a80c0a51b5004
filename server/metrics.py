"""The metrics port over prometheus-client (docs/protocol.md, Metrics), and the scrape.

One process keeps its metrics in memory, in the registry of its `PrometheusMetrics`. Several
worker processes (`WORKERS` > 1) use prometheus-client's multiprocess mode: the supervisor points
PROMETHEUS_MULTIPROC_DIR at an empty directory before the workers start, each worker writes its
values to files there, a scrape of any worker sums them all, and a worker that dies has its live
gauges dropped (`process_exited`). Counters keep what dead workers counted, as counters must.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import get_args

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

from server.core.errors import ErrorCode
from server.core.models import FinishReason, Usage
from server.core.ports import ApprovalOutcome, ProviderOutcome, Transport

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own variable
FIRST_CHUNK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STORAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The Repository operations (server/storage/measured.py names them so).
STORAGE_OPERATIONS = (
    "ensure_session",
    "get_session",
    "append_event",
    "find_event",
    "list_events",
    "page_events",
    "list_sessions",
    "rename_session",
    "set_generated_title",
    "delete_session",
    "write_summary",
    "write_context_summary",
    "mark_emptied",
    "due_summaries",
    "open_turns",
    "turn_events",
    "add_attachment",
    "get_attachment",
    "attachment_data",
    "session_attachments",
    "mark_attachments_used",
    "delete_unused_attachments",
    "ping",
)
UNKNOWN_TOOL = "unknown"
# The `_created` series (when each child was made) mean nothing on a dashboard here, and
# multiprocess mode has none: one exposition either way.
disable_created_metrics()  # type: ignore[no-untyped-call]


class PrometheusMetrics:
    """Every family of the contract, exported with its known label values at 0 from the start."""

    def __init__(self, provider: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._connections = Gauge(
            "realtime_connections", "Connected clients now", ["transport"], registry=r, multiprocess_mode="livesum"
        )
        self._turns = Counter("realtime_turns", "Turns ended", ["finish_reason"], registry=r)
        self._running = Gauge("realtime_turns_running", "Turns running now", registry=r, multiprocess_mode="livesum")
        self._chunks = Counter(
            "realtime_chunks", "Chunk events emitted (once per chunk, not per recipient)", registry=r
        )
        self._first_chunk = Histogram(
            "realtime_first_chunk_seconds",
            "From receiving a turn's message to emitting its first chunk",
            buckets=FIRST_CHUNK_BUCKETS,
            registry=r,
        )
        self._tools = Counter("realtime_tool_calls", "Tool calls made", ["tool", "outcome"], registry=r)
        self._refusals = Counter(
            "realtime_refusals", "Requests answered with an error code, and connections refused", ["code"], registry=r
        )
        self._provider_requests = Counter(
            "realtime_provider_requests",
            "Model requests (turn rounds, summaries, titles and compactions)",
            ["provider", "outcome"],
            registry=r,
        )
        self._tokens = Counter("realtime_tokens", "Tokens reported in done.usage", ["direction"], registry=r)
        self._storage = Histogram(
            "realtime_storage_seconds",
            "Storage operations, retries included",
            ["operation"],
            buckets=STORAGE_BUCKETS,
            registry=r,
        )
        self._queued = Gauge(
            "realtime_queued_events",
            "Events waiting in the local durable queue",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._summaries = Counter("realtime_summaries", "Summaries written or failed", ["outcome"], registry=r)
        self._titles = Counter("realtime_titles", "Titles generated", ["outcome"], registry=r)
        self._compactions = Counter(
            "realtime_compactions", "Compactions of a long conversation", ["outcome"], registry=r
        )
        self._approvals = Counter("realtime_tool_approvals", "Approval decisions", ["outcome"], registry=r)
        self._export_known_labels(provider)

    def _export_known_labels(self, provider: str) -> None:
        self._provider = {
            outcome: self._provider_requests.labels(provider, outcome) for outcome in get_args(ProviderOutcome)
        }
        for transport in get_args(Transport):
            self._connections.labels(transport)
        for reason in get_args(FinishReason):
            self._turns.labels(reason)
        for code in ErrorCode:
            self._refusals.labels(code.value)
        for direction in ("input", "output"):
            self._tokens.labels(direction)
        for operation in STORAGE_OPERATIONS:
            self._storage.labels(operation)
        for outcome in ("ok", "error"):
            self._summaries.labels(outcome)
            self._titles.labels(outcome)
            self._compactions.labels(outcome)
        for approval in get_args(ApprovalOutcome):
            self._approvals.labels(approval)
        self.declare_tools([])

    def declare_tools(self, names: Iterable[str]) -> None:
        """Export the tools' counters at 0 (and `unknown`'s)."""
        for name in [*names, UNKNOWN_TOOL]:
            for outcome in ("ok", "error"):
                self._tools.labels(name, outcome)

    # ------------------------------------------------------------------ the port

    def chunk_sent(self) -> None:
        self._chunks.inc()

    def first_chunk(self, seconds: float) -> None:
        self._first_chunk.observe(seconds)

    def turn_started(self) -> None:
        self._running.inc()

    def turn_ended(self, finish_reason: FinishReason) -> None:
        self._running.dec()
        self._turns.labels(finish_reason).inc()

    def turn_interrupted(self) -> None:
        self._turns.labels("error").inc()

    def tool_called(self, tool: str, ok: bool) -> None:
        self._tools.labels(tool, "ok" if ok else "error").inc()

    def provider_request(self, outcome: ProviderOutcome) -> None:
        self._provider[outcome].inc()

    def tokens_used(self, usage: Usage) -> None:
        self._tokens.labels("input").inc(usage.input_tokens)
        self._tokens.labels("output").inc(usage.output_tokens)

    def summary_made(self, ok: bool) -> None:
        self._summaries.labels("ok" if ok else "error").inc()

    def title_made(self, ok: bool) -> None:
        self._titles.labels("ok" if ok else "error").inc()

    def compaction_made(self, ok: bool) -> None:
        self._compactions.labels("ok" if ok else "error").inc()

    def tool_approval(self, outcome: ApprovalOutcome) -> None:
        self._approvals.labels(outcome).inc()

    def storage_operation(self, operation: str, seconds: float) -> None:
        self._storage.labels(operation).observe(seconds)

    def events_queued(self, count: int) -> None:
        self._queued.set(count)

    def connection_opened(self, transport: Transport) -> None:
        self._connections.labels(transport).inc()

    def connection_closed(self, transport: Transport) -> None:
        self._connections.labels(transport).dec()

    def refused(self, code: str) -> None:
        self._refusals.labels(code).inc()

    # ------------------------------------------------------------------ the scrape

    async def exposition(self) -> bytes:
        """The text format: this process's metrics, or in multiprocess mode every worker's summed."""
        directory = os.environ.get(MULTIPROCESS_DIR)
        if not directory:
            return generate_latest(self.registry)
        return await asyncio.to_thread(_collect_directory, directory)  # reads every worker's files


def _collect_directory(directory: str) -> bytes:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


# ---------------------------------------------------------------- the supervisor's side


@contextmanager
def multiprocess_directory() -> Iterator[Path]:
    """While the workers run: PROMETHEUS_MULTIPROC_DIR, emptied first so that no earlier run's
    values count; a temporary directory (removed afterwards) unless the operator set one."""
    configured = os.environ.get(MULTIPROCESS_DIR)
    directory = Path(configured) if configured else Path(tempfile.mkdtemp(prefix="realtime-metrics-"))
    directory.mkdir(parents=True, exist_ok=True)
    for entry in directory.glob("*.db"):
        entry.unlink()
    os.environ[MULTIPROCESS_DIR] = str(directory)
    try:
        yield directory
    finally:
        if not configured:
            shutil.rmtree(directory, ignore_errors=True)


def process_exited(pid: int | None) -> None:
    """A worker is gone: its live gauges (connections, running turns, queued events) stop counting."""
    directory = os.environ.get(MULTIPROCESS_DIR)
    if pid is not None and directory:
        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
