"""Runs one turn: model rounds, tool calls, chunk events, and exactly one `done`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.core.event_log import EventLog
from server.core.history import ConversationCache, tool_call_content, tool_result_content
from server.core.models import (
    JSON,
    ChunkEvent,
    DoneEvent,
    ErrorInfo,
    EventDraft,
    EventType,
    FinishReason,
    ToolCallEvent,
    ToolResultEvent,
    Usage,
    utc_now,
)
from server.core.ports import (
    Coordination,
    Emitter,
    Finished,
    ModelProvider,
    ModelRequest,
    ModelText,
    ProviderError,
    StorageUnavailable,
    TextDelta,
    ToolCallItem,
    ToolCallRequest,
    ToolResultItem,
    UsageReport,
)
from server.core.tasks import TaskTracker
from server.tools.registry import ToolError, ToolRegistry

if TYPE_CHECKING:
    from server.core.conversation import Limits, RunningTurn

log = logging.getLogger(__name__)


SHUTDOWN = ErrorInfo(code="shutdown", message="the server is shutting down")
LOCK_LOST = ErrorInfo(
    code="turn_lock_lost", message="this turn lost its session lock (shared state was unreachable too long)"
)


class ChunkCoalescer:
    """Sends a turn's text deltas as chunks; with a window, the deltas arriving within it as one.

    A window starts with the first delta held and ends on a timer, so held text never waits for
    the next delta. Chunks leave one at a time under a lock, so a timer's flush and the turn's own
    (before a tool call, at the end) keep their order.
    """

    def __init__(
        self, send: Callable[[str, float | None], Awaitable[None]], window_seconds: float, tasks: TaskTracker
    ) -> None:
        self._send = send
        self._window = window_seconds
        self._tasks = tasks
        self._held: list[str] = []
        self._stamp: float | None = None
        self._timer: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def add(self, text: str, stamp: float | None) -> None:
        if self._window <= 0:
            await self._send(text, stamp)
            return
        self._held.append(text)
        if self._stamp is None:
            self._stamp = stamp
        if self._timer is None:
            self._timer = self._tasks.spawn(self._flush_later(), name="chunk window")

    async def _flush_later(self) -> None:
        await asyncio.sleep(self._window)
        self._timer = None
        await self.flush()

    def close(self) -> None:
        """Let go of `send`, which refers to the turn that refers to this coalescer: without the
        cycle a finished turn is freed at once, not by the cyclic garbage collector, whose young
        collections took 10-75 ms under load (docs/performance.md)."""
        self._send = _nowhere

    async def flush(self) -> None:
        async with self._lock:
            if self._timer is not None:  # a flush before the window's end ends the window
                self._timer.cancel()
                self._timer = None
            if not self._held:
                return
            text, stamp = "".join(self._held), self._stamp
            self._held, self._stamp = [], None
            await self._send(text, stamp)


async def _nowhere(text: str, stamp: float | None) -> None:
    """Where a closed coalescer sends: nowhere (a turn has ended by then)."""


@dataclass
class Generation:
    """A turn's model rounds, started while its user message is still being written.

    What they stream is held until `TurnRunner.release` (the message is stored and announced), so
    the model's time to its first token overlaps the write. Kept apart from the task, so what the
    rounds produced survives a cancel.
    """

    task: asyncio.Task[None] = field(init=False)
    chunks: ChunkCoalescer = field(init=False)
    held: deque[tuple[str, float | None]] = field(default_factory=deque)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    release_failure: Exception | None = None
    finish_reason: FinishReason = "stop"
    error: ErrorInfo | None = None
    usage: Usage | None = None
    call_ids: set[str] = field(default_factory=set)


class TurnRunner:
    def __init__(
        self,
        *,
        provider: ModelProvider,
        tools: ToolRegistry,
        emitter: Emitter,
        coordination: Coordination,
        event_log: EventLog,
        limits: Limits,
        tasks: TaskTracker,
    ) -> None:
        self._coordination = coordination
        self._tasks = tasks
        self._provider = provider
        self._tools = tools
        self._emitter = emitter
        self._log = event_log
        self._limits = limits
        self._conversations = ConversationCache()

    def start(self, turn: RunningTurn) -> Generation:
        """Start the turn's model rounds now, their output held until `release`."""
        generation = Generation()
        generation.chunks = ChunkCoalescer(
            lambda text, stamp: self._chunk(turn, generation, text, stamp),
            self._limits.chunk_coalesce_seconds,
            self._tasks,
        )
        generation.task = self._tasks.spawn(self._generate(turn, generation), name=f"generate {turn.turn_id}")
        turn.generation = generation.task
        if turn.stop_reason is not None:
            generation.task.cancel()
        return generation

    async def release(self, turn: RunningTurn, generation: Generation) -> None:
        """The user message is stored and announced: send the chunks held so far, then stream.

        The caller (the `message` handler) sends them in the same step as `user_message`, a turn
        of the loop sooner than the generation task could. A chunk that cannot be sent ends the
        turn in an error, as it would have in the generation task.
        """
        try:
            while generation.held:
                text, stamp = generation.held.popleft()
                await self._send_chunk(turn, text, stamp)
        except Exception as exc:
            generation.release_failure = exc
            generation.task.cancel()
        finally:
            # Set only once `held` is empty, with no await since: chunks keep their order.
            generation.released.set()

    async def abandon(self, generation: Generation) -> None:
        """The user message could not be stored: the turn never started, and nothing it held is sent."""
        generation.task.cancel()
        await asyncio.wait([generation.task])
        generation.chunks.close()

    async def finish(self, turn: RunningTurn, generation: Generation) -> None:
        """Wait for the model rounds, then end the turn with its `done` (run this as the turn's task)."""
        try:
            await self._wait_and_finish(turn, generation)
        finally:
            generation.chunks.close()

    async def _wait_and_finish(self, turn: RunningTurn, generation: Generation) -> None:
        try:
            if not generation.released.is_set():  # the handler failed before releasing
                await self.release(turn, generation)
            await asyncio.wait([generation.task])
        except asyncio.CancelledError:
            # Only the tracker's last-resort drain cancels a runner: still end the turn.
            turn.stop("shutdown")
            generation.released.set()
            await asyncio.wait([generation.task])
            await self._finish(turn, generation)
            raise
        await self._finish(turn, generation)

    @staticmethod
    def _settle(turn: RunningTurn, generation: Generation) -> None:
        """Turn how the model rounds ended into the turn's finish reason and error."""
        task = generation.task
        exc: BaseException | None = generation.release_failure
        if exc is None:
            if task.cancelled():
                if turn.stop_reason == "cancelled":
                    generation.finish_reason, generation.error = "cancelled", None
                elif turn.stop_reason == "lock_lost":
                    generation.finish_reason, generation.error = "error", LOCK_LOST
                else:
                    generation.finish_reason, generation.error = "error", SHUTDOWN
                return
            exc = task.exception()
        if exc is None:
            return
        generation.finish_reason = "error"
        if isinstance(exc, ProviderError):
            generation.error = ErrorInfo(code=exc.code, message=exc.message)
        elif isinstance(exc, StorageUnavailable):
            generation.error = ErrorInfo(code="unavailable", message="storage could not give the conversation")
        else:
            log.error("turn %s failed", turn.turn_id, exc_info=exc)
            generation.error = ErrorInfo(code="provider_error", message="the model could not answer")

    async def _finish(self, turn: RunningTurn, generation: Generation) -> None:
        self._settle(turn, generation)
        # Held text goes out before `done`, which repeats it (a timer mid-flush finishes first).
        await generation.chunks.flush()
        text = turn.text
        write = self._log.submit(
            EventDraft(
                session_id=turn.session_id,
                event_type=EventType.AI_MESSAGE,
                content=text,
                event_key=f"ai:{turn.turn_id}",
                turn_id=turn.turn_id,
                timestamp=utc_now(),
                finish_reason=generation.finish_reason,
                error=generation.error,
            )
        )
        await asyncio.wait([write], timeout=self._limits.done_store_wait_seconds)
        stored = write.result() if write.done() and write.exception() is None else None
        event_id = stored.event_id if stored is not None else None
        await self._emitter.publish(
            turn.session_id,
            DoneEvent(
                session_id=turn.session_id,
                turn_id=turn.turn_id,
                text=text,
                finish_reason=generation.finish_reason,
                usage=generation.usage,
                event_id=event_id,
                error=generation.error,
            ),
        )

    async def _generate(self, turn: RunningTurn, generation: Generation) -> None:
        events = await (turn.history or self._log.history(turn.session_id))
        conversation = self._conversations.conversation(turn.session_id, events, turn.question)
        tools = self._tools.specs
        chunks = generation.chunks
        for _round in range(self._limits.max_tool_rounds + 1):
            round_start = len(turn.parts)
            calls: list[ToolCallItem] = []
            request = ModelRequest(conversation=conversation, tools=tools)
            async with contextlib.aclosing(self._provider.stream(request)) as stream:
                async for event in stream:
                    if isinstance(event, TextDelta):
                        if event.text:
                            stamp = time.monotonic() * 1000 if self._limits.chunk_timestamps else None
                            await chunks.add(event.text, stamp)
                            # A turn of the loop for everyone else after each chunk: a stream with
                            # several chunks ready (one network read can bring many) would send
                            # them all before another session's chunk or a new message's next step.
                            # At saturation each turn of the loop then carries a chunk of half the
                            # streams, and a first chunk waits a few such turns (docs/performance.md).
                            await asyncio.sleep(0)
                    elif isinstance(event, ToolCallRequest):
                        calls.append(self._tool_call_item(generation, event))
                    elif isinstance(event, UsageReport):
                        generation.usage = event.usage if generation.usage is None else generation.usage + event.usage
                    elif isinstance(event, Finished):
                        generation.finish_reason = event.reason
            if not calls or generation.finish_reason != "stop":
                return
            # Tool events are stored and sent after the user message; the round's text goes out,
            # and counts, before its tool calls.
            await generation.released.wait()
            await chunks.flush()
            if _round == self._limits.max_tool_rounds:
                raise ProviderError(
                    "tool_rounds_exceeded", f"the model asked for tools more than {self._limits.max_tool_rounds} times"
                )
            round_text = "".join(turn.parts[round_start:])
            if round_text:
                conversation.append(ModelText(round_text))
            conversation.extend(calls)
            conversation.extend(await self._run_tools(turn, calls, text_offset=len(turn.text)))

    async def _chunk(self, turn: RunningTurn, generation: Generation, text: str, stamp: float | None) -> None:
        if not generation.released.is_set():
            generation.held.append((text, stamp))
            return
        await self._send_chunk(turn, text, stamp)

    async def _send_chunk(self, turn: RunningTurn, text: str, stamp: float | None) -> None:
        index = len(turn.parts)
        turn.parts.append(text)
        self._coordination.record_chunk(turn.session_id, turn.turn_id, index, text)
        await self._emitter.publish(
            turn.session_id,
            ChunkEvent(session_id=turn.session_id, turn_id=turn.turn_id, index=index, text=text, ts=stamp),
            local=self._coordination.chunks_stay_local(turn.session_id),
        )

    @staticmethod
    def _tool_call_item(generation: Generation, call: ToolCallRequest) -> ToolCallItem:
        # call_id keys the stored tool events, so it must be unique within the turn.
        call_id = call.call_id
        if not call_id or call_id in generation.call_ids:
            call_id = f"call-{len(generation.call_ids) + 1}"
        generation.call_ids.add(call_id)
        return ToolCallItem(call_id=call_id, name=call.name, args=call.args, provider_data=call.provider_data)

    async def _run_tools(
        self, turn: RunningTurn, calls: list[ToolCallItem], *, text_offset: int
    ) -> list[ToolResultItem]:
        for call in calls:
            content = tool_call_content(call, text_offset=text_offset)
            self._store(turn, EventType.TOOL_CALL, f"tool_call:{turn.turn_id}:{call.call_id}", content)
            await self._emitter.publish(
                turn.session_id,
                ToolCallEvent(
                    session_id=turn.session_id,
                    turn_id=turn.turn_id,
                    call_id=call.call_id,
                    name=call.name,
                    args=call.args,
                ),
            )
        pending = [self._tasks.spawn(self._run_tool(call), name=f"tool {call.name} {turn.turn_id}") for call in calls]
        results: list[ToolResultItem] = []
        try:
            for task in pending:
                results.append(await task)
                await self._publish_result(turn, results[-1])
        except BaseException:
            # Whatever stopped the round (a cancel, a failed publish), no tool call outlives it, and
            # every stored tool_call gets its tool_result, so the history stays valid for a model.
            for task in pending:
                task.cancel()
            await asyncio.wait(pending)
            for call in calls[len(results) :]:
                cancelled = ToolResultItem(
                    call_id=call.call_id, name=call.name, error={"code": "cancelled", "message": "the turn was stopped"}
                )
                with contextlib.suppress(Exception):  # what failed may fail again: the stored result counts
                    await self._publish_result(turn, cancelled)
            raise
        return results

    async def _run_tool(self, call: ToolCallItem) -> ToolResultItem:
        try:
            async with asyncio.timeout(self._limits.tool_timeout_seconds):
                result: JSON = await self._tools.call(call.name, call.args)
        except ToolError as exc:
            # The code and the cause's kind, never the message: it may quote the arguments.
            cause = f" ({type(exc.__cause__).__name__})" if exc.__cause__ is not None else ""
            log.warning("tool %s failed: %s%s", call.name, exc.code, cause)
            return ToolResultItem(
                call_id=call.call_id, name=call.name, error={"code": exc.code, "message": exc.message}
            )
        except TimeoutError:
            log.warning(
                "tool %s failed: tool_timeout (no answer in %.0f s)", call.name, self._limits.tool_timeout_seconds
            )
            return ToolResultItem(
                call_id=call.call_id,
                name=call.name,
                error={"code": "tool_timeout", "message": "the tool took too long"},
            )
        except Exception:
            log.exception("tool %s failed", call.name)
            return ToolResultItem(
                call_id=call.call_id, name=call.name, error={"code": "tool_failed", "message": "the tool failed"}
            )
        return ToolResultItem(call_id=call.call_id, name=call.name, result=result)

    async def _publish_result(self, turn: RunningTurn, result: ToolResultItem) -> None:
        self._store(
            turn, EventType.TOOL_RESULT, f"tool_result:{turn.turn_id}:{result.call_id}", tool_result_content(result)
        )
        await self._emitter.publish(
            turn.session_id,
            ToolResultEvent(
                session_id=turn.session_id,
                turn_id=turn.turn_id,
                call_id=result.call_id,
                name=result.name,
                result=result.result,
                error=ErrorInfo(**result.error) if result.error is not None else None,
            ),
        )

    def _store(self, turn: RunningTurn, event_type: EventType, key: str, content: str) -> None:
        self._log.submit(
            EventDraft(
                session_id=turn.session_id,
                event_type=event_type,
                content=content,
                event_key=key,
                turn_id=turn.turn_id,
                timestamp=utc_now(),
            )
        )
