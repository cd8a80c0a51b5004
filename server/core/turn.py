"""One turn of a session, from its lock to its `done`, in the order it happens:

1. `start` (in the task of the `message` that asked for it): take the session's lock, start the
   model while the user message is stored (its output held), announce the message, send what was
   held; the turn then goes on as a task of its own.
2. `_generate`: model rounds and tool calls, streamed as `chunk`, `tool_call` and `tool_result`.
3. `_end`: however the rounds ended (finished, cancelled, failed, shutdown), store the answer,
   send exactly one `done`, and free the session's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from server.core.approvals import ApprovalPolicy, TurnApprovals, refused_result
from server.core.chunks import ChunkStream
from server.core.compaction import Compactor
from server.core.context import ContextBudget, ContextWindow, files_to_send
from server.core.errors import (
    ErrorCode,
    ServiceError,
    ToolErrorCode,
    TurnErrorCode,
    session_deleted,
    shared_state_unavailable,
)
from server.core.event_store import HistoryEvent
from server.core.history import HistoryCache
from server.core.limits import Limits
from server.core.log_context import log_scope
from server.core.models import (
    ActiveTurn,
    AttachmentRef,
    ChunkEvent,
    DoneEvent,
    ErrorInfo,
    EventDraft,
    EventType,
    FinishReason,
    JSONValue,
    StoredEvent,
    ToolCallEvent,
    ToolResultEvent,
    Usage,
    UserMessageEvent,
    utc_now,
)
from server.core.ports import (
    NO_SPAN,
    AttachmentStore,
    ConversationItem,
    Emitter,
    FileWithheld,
    Finished,
    Metrics,
    ModelProvider,
    ModelRequest,
    ModelText,
    ProviderError,
    ProviderOutcome,
    SessionDeleted,
    Span,
    StorageUnavailable,
    TextDelta,
    ToolApprovals,
    ToolCallItem,
    ToolCallRequest,
    ToolResultItem,
    TraceParent,
    Tracer,
    TurnLocks,
    UsageReport,
)
from server.core.redelivery import answer_key, tool_call_key, tool_result_key, user_message_key
from server.core.replay import tool_call_content, tool_result_content
from server.core.snapshot import Snapshot
from server.core.tasks import TaskTracker
from server.core.tools import ToolError, ToolRegistry
from server.core.traces import ended, failed_turn, tool_ended, tool_span, turn_span
from server.core.writer import OrderedWriter

log = logging.getLogger(__name__)

# ended_elsewhere: this process was taken for dead, and another one ended the turn as interrupted.
StopReason = Literal["cancelled", "shutdown", "lock_lost", "ended_elsewhere"]
# A turn's files are read a few at a time: a window of many must not take the whole storage pool.
FILE_READS_AT_ONCE = 4
SHUTDOWN = ErrorInfo(code=TurnErrorCode.SHUTDOWN, message="the server is shutting down")
LOCK_LOST = ErrorInfo(
    code=TurnErrorCode.TURN_LOCK_LOST, message="this turn lost its session lock (shared state was unreachable too long)"
)


@dataclass(frozen=True)
class MessageAccepted:
    turn_id: str
    event_id: int | None


class TurnBusy(Exception):
    """Another turn holds the session's lock."""


class RunningTurns:
    """The turns running in this process, by session: what cancel, join and shutdown look up."""

    def __init__(self) -> None:
        self._by_session: dict[str, Turn] = {}
        self.closing = False  # shutdown: no turn starts any more

    def get(self, session_id: str) -> Turn | None:
        return self._by_session.get(session_id)

    def add(self, turn: Turn) -> None:
        self._by_session[turn.session_id] = turn

    def discard(self, turn: Turn) -> None:
        if self._by_session.get(turn.session_id) is turn:
            del self._by_session[turn.session_id]

    def __iter__(self) -> Iterator[Turn]:
        return iter(list(self._by_session.values()))


@dataclass(frozen=True)
class TurnContext:
    """What every turn of the service works with."""

    provider: ModelProvider
    tools: ToolRegistry
    emitter: Emitter
    locks: TurnLocks
    writer: OrderedWriter
    history: HistoryCache
    limits: Limits
    tasks: TaskTracker
    running: RunningTurns
    metrics: Metrics
    budget: ContextBudget
    compaction: Compactor
    approvals: ToolApprovals
    approval_policy: ApprovalPolicy
    files: AttachmentStore
    tracer: Tracer
    # Told of every turn that ended here (with its `done`): what follows a turn (a title).
    finished: Callable[[str, FinishReason], None] = lambda session_id, finish_reason: None


class Turn:
    def __init__(
        self,
        context: TurnContext,
        session_id: str,
        text: str,
        client_message_id: str | None,
        *,
        received_at: float,
        files: tuple[AttachmentRef, ...] = (),
        trace: TraceParent | None = None,
    ) -> None:
        """`received_at`: when its `message` arrived (time.monotonic()); `files`: those it names;
        `trace`: the client's trace the turn continues."""
        self._ctx = context
        self._received_at = received_at
        self._trace = trace
        self._span: Span = NO_SPAN
        self.session_id = session_id
        self.turn_id = str(uuid.uuid4())
        self.client_message_id = client_message_id
        key = user_message_key(self.turn_id, client_message_id)
        self.question = EventDraft(
            session_id=session_id,
            event_type=EventType.USER_MESSAGE,
            content=text,
            event_key=key,
            turn_id=self.turn_id,
            timestamp=utc_now(),
            attachments=files or None,
        )
        # The `message` answer: a retry racing the first attempt waits for it too.
        self.accepted: asyncio.Future[MessageAccepted] = asyncio.get_running_loop().create_future()
        self.parts: list[str] = []  # the chunks sent, in order
        self.stop_reason: StopReason | None = None
        self.finish_reason: FinishReason = "stop"
        self.error: ErrorInfo | None = None
        self.usage: Usage | None = None
        self.ended: asyncio.Task[None] | None = None  # the turn's task, from the announcement on
        self._chunks = ChunkStream(self._send_chunk, context.limits.chunk_coalesce_seconds, context.tasks)
        self._generation: asyncio.Task[None] | None = None
        self._open_failure: Exception | None = None
        self._call_ids: set[str] = set()
        self._files: dict[str, bytes | FileWithheld] = {}  # read once a turn: every round sends them
        self.approvals = TurnApprovals(
            session_id, self.turn_id, context.approval_policy, context.approvals, context.emitter, context.metrics
        )

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def snapshot(self) -> ActiveTurn:
        return ActiveTurn(
            turn_id=self.turn_id,
            text=self.text,
            next_index=len(self.parts),
            pending_approvals=self.approvals.pending(),
        )

    def stop(self, reason: StopReason) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        if self._generation is not None:
            self._generation.cancel()

    # ------------------------------------------------------------------ 1. start

    async def start(self) -> MessageAccepted:
        """Raises TurnBusy, or a ServiceError when it cannot start; once this returns the turn ends
        with `done` whatever happens."""
        with log_scope(self.session_id, self.turn_id):  # and so the turn's tasks
            return await self._start()

    async def _start(self) -> MessageAccepted:
        await self._take_lock()
        ctx = self._ctx
        try:
            await self._keep_files()
        except BaseException:
            await ctx.locks.release_turn(self.session_id, self.turn_id)
            raise
        self._span = turn_span(ctx.tracer, ctx.provider.info, self.session_id, self.turn_id, self._trace)
        with ctx.tracer.current(self._span):  # its tasks, started here, report beneath it
            return await self._begin()

    async def _begin(self) -> MessageAccepted:
        ctx = self._ctx
        # Read, and the model asked, while the message is written: their output waits for it.
        history = ctx.tasks.spawn(
            ctx.history.read(self.session_id, after=ctx.writer.last_write(self.session_id)),
            name=f"history {self.turn_id}",
            awaited=True,
        )
        self._generation = ctx.tasks.spawn(self._generate(history), name=f"generate {self.turn_id}", awaited=True)
        ctx.running.add(self)
        try:
            stored = await ctx.writer.append(self.question)
        except BaseException as exc:
            refusal = await self._abandon(history, exc)
            if isinstance(exc, StorageUnavailable | SessionDeleted):
                raise refusal from None
            raise
        accepted = MessageAccepted(turn_id=self.turn_id, event_id=stored.event_id if stored is not None else None)
        self.accepted.set_result(accepted)
        ctx.metrics.turn_started()
        try:
            await ctx.emitter.publish(self.session_id, self._announcement(accepted))
            await self._open()
        finally:
            # The message is stored, so its turn runs (and ends in `done`) even if that emit failed.
            self.ended = ctx.tasks.spawn(self._end(), name=f"turn {self.turn_id}")
        return accepted

    async def _take_lock(self) -> None:
        locks = self._ctx.locks
        try:
            acquired = await locks.acquire_turn(self.session_id, self.turn_id)
        except Exception as exc:
            # Refused rather than run without the lock: another process might run a turn too.
            raise shared_state_unavailable(exc) from None
        if not acquired:
            raise TurnBusy
        if self._ctx.running.closing:
            await locks.release_turn(self.session_id, self.turn_id)
            raise ServiceError(ErrorCode.UNAVAILABLE, "the server is shutting down; retry on another")

    async def _keep_files(self) -> None:
        """Marked before the message is stored, so that no stored message names a file that expires;
        then read again: one the expiry took since the message was checked is refused now."""
        files = self.question.attachments
        if not files:
            return
        ids = [file.attachment_id for file in files]
        try:
            await self._ctx.files.mark_attachments_used(self.session_id, ids)
            kept = await self._ctx.files.session_attachments(self.session_id, ids)
        except StorageUnavailable:
            raise ServiceError(ErrorCode.UNAVAILABLE, "storage cannot keep the files now; nothing was stored") from None
        if len(kept) != len(ids):
            raise ServiceError(ErrorCode.INVALID_PAYLOAD, "attachments: each must be a file uploaded to this session")

    async def _abandon(self, history: asyncio.Task[Snapshot[HistoryEvent]], cause: BaseException) -> ServiceError:
        """The user message could not be stored: the turn never started, and nothing it held is sent."""
        history.cancel()
        assert self._generation is not None
        self._generation.cancel()
        await asyncio.wait([self._generation])
        self._chunks.close()
        self._ctx.running.discard(self)
        await self._ctx.locks.release_turn(self.session_id, self.turn_id)
        if isinstance(cause, SessionDeleted):
            error = session_deleted()
        else:
            error = ServiceError(ErrorCode.UNAVAILABLE, "storage cannot take the message now; nothing was stored")
        self._span.fail(str(error.code))
        self._span.end()
        self.accepted.set_exception(error)
        self.accepted.exception()  # retrieved: a concurrent retry re-raises it
        return error

    def _announcement(self, accepted: MessageAccepted) -> UserMessageEvent:
        return UserMessageEvent(
            session_id=self.session_id,
            turn_id=self.turn_id,
            event_id=accepted.event_id,
            text=self.question.content,
            client_message_id=self.client_message_id,
            attachments=list(self.question.attachments or ()),
        )

    async def _open(self) -> None:
        """Send the chunks held so far, a turn of the loop sooner than the generation could. One
        that cannot be sent ends the turn in an error, as it would have in the generation."""
        try:
            await self._chunks.open()
        except Exception as exc:
            self._open_failure = exc
            assert self._generation is not None
            self._generation.cancel()

    # ------------------------------------------------------------------ 2. model rounds

    async def _generate(self, history: asyncio.Task[Snapshot[HistoryEvent]]) -> None:
        ctx = self._ctx
        events = await history
        summary, upto = await ctx.compaction.current(self.session_id)
        window = ctx.budget.window(self.session_id, events, self.question, summary=summary, upto=upto)
        conversation = window.current  # this turn's items: the window adds what fits before them
        for round_number in range(ctx.limits.max_tool_rounds + 1):
            round_start = len(self.parts)
            calls = await self._stream_round(window)
            if not calls or self.finish_reason != "stop":
                return
            # Tool events are stored and sent after the user message; the round's text goes out,
            # and counts, before its tool calls.
            await self._chunks.wait_open()
            await self._chunks.flush()
            if round_number == ctx.limits.max_tool_rounds:
                raise ProviderError(
                    TurnErrorCode.TOOL_ROUNDS_EXCEEDED,
                    f"the model asked for tools more than {ctx.limits.max_tool_rounds} times",
                )
            round_text = "".join(self.parts[round_start:])
            if round_text:
                conversation.append(ModelText(round_text))
            conversation.extend(calls)
            conversation.extend(await self._run_tools(calls, text_offset=len(self.text)))

    async def _stream_round(self, window: ContextWindow) -> list[ToolCallItem]:
        """One model request: its text streamed as chunks; the tool calls it asked for."""
        ctx = self._ctx
        stamped = ctx.limits.chunk_timestamps
        calls: list[ToolCallItem] = []
        conversation = window.conversation()
        request = ModelRequest(
            conversation=conversation, tools=ctx.tools.specs, files=await self._file_contents(conversation)
        )
        estimated = window.estimate()
        outcome: ProviderOutcome = "ok"  # a stream stopped by a cancel too
        try:
            async with contextlib.aclosing(self._ctx.provider.stream(request)) as stream:
                async for event in stream:
                    if isinstance(event, TextDelta):
                        if event.text:
                            await self._chunks.add(event.text, time.monotonic() * 1000 if stamped else None)
                            # A turn of the loop for everyone else after each chunk: one network read
                            # can bring many, which would otherwise all go before another session's.
                            await asyncio.sleep(0)
                    elif isinstance(event, ToolCallRequest):
                        calls.append(self._tool_call_item(event))
                    elif isinstance(event, UsageReport):
                        self.usage = event.usage if self.usage is None else self.usage + event.usage
                        self._ctx.budget.observe(self.session_id, estimated, event.usage.input_tokens)
                    elif isinstance(event, Finished):
                        self.finish_reason = event.reason
        except Exception:
            outcome = "error"
            raise
        finally:
            ctx.metrics.provider_request(outcome)
        return calls

    async def _file_contents(self, conversation: Sequence[ConversationItem]) -> dict[str, bytes | FileWithheld]:
        """What the request carries of its files: each one's bytes, read from storage once a turn
        (a tool round sends them again), or why it goes by name only."""
        provider = self._ctx.provider
        if not provider.takes_files:
            return {}
        send, withheld = files_to_send(conversation, provider.max_request_file_bytes)
        unread = [file.attachment_id for file in send if file.attachment_id not in self._files]
        if unread:
            reads = asyncio.Semaphore(FILE_READS_AT_ONCE)

            async def read_one(attachment_id: str) -> bytes | None:
                async with reads:
                    return await self._ctx.files.attachment_data(attachment_id)

            reading = [asyncio.ensure_future(read_one(attachment_id)) for attachment_id in unread]
            try:
                read = await asyncio.gather(*reading)
            except BaseException:  # StorageUnavailable ends the turn `unavailable`: the other reads stop
                for task in reading:
                    task.cancel()
                await asyncio.gather(*reading, return_exceptions=True)
                raise
            for attachment_id, data in zip(unread, read, strict=True):
                self._files[attachment_id] = data if data is not None else FileWithheld("no longer stored")
        return {**withheld, **{file.attachment_id: self._files[file.attachment_id] for file in send}}

    async def _send_chunk(self, text: str, stamp: float | None) -> None:
        index = len(self.parts)
        self.parts.append(text)
        await self._ctx.emitter.publish(
            self.session_id,
            ChunkEvent(session_id=self.session_id, turn_id=self.turn_id, index=index, text=text, ts=stamp),
        )
        self._ctx.metrics.chunk_sent()
        if index == 0:
            self._ctx.metrics.first_chunk(time.monotonic() - self._received_at)

    def _tool_call_item(self, call: ToolCallRequest) -> ToolCallItem:
        # call_id keys the stored tool events, so it must be unique within the turn.
        call_id = call.call_id
        if not call_id or call_id in self._call_ids:
            call_id = f"call-{len(self._call_ids) + 1}"
        self._call_ids.add(call_id)
        return ToolCallItem(
            call_id=call_id,
            name=call.name,
            args=call.args,
            provider_data=call.provider_data,
            invalid_arguments=call.invalid_arguments,
        )

    async def _run_tools(self, calls: list[ToolCallItem], *, text_offset: int) -> list[ToolResultItem]:
        announced: list[ToolCallItem] = []
        pending: list[asyncio.Task[ToolResultItem]] = []
        results: list[ToolResultItem] = []
        try:
            for call in calls:
                announced.append(call)  # stored from here on, whatever stops the round
                await self._announce(call, text_offset)
            pending = [
                self._ctx.tasks.spawn(self._run_tool(call), name=f"tool {call.name} {self.turn_id}") for call in calls
            ]
            for task in pending:
                results.append(await task)
                await self._publish_result(results[-1])
        except BaseException:
            # Whatever stopped the round (a cancel, a failed publish), no tool call outlives it, and
            # every stored tool_call gets its tool_result, so the history stays valid for a model.
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
            # Ended elsewhere: the process that took this one for dead answered them (`interrupted`).
            unanswered = announced[len(results) :] if self.stop_reason != "ended_elsewhere" else []
            await self._answer_stopped(unanswered, dict(zip([c.call_id for c in calls], pending, strict=False)))
            raise
        return results

    async def _answer_stopped(
        self, unanswered: list[ToolCallItem], tasks: dict[str, asyncio.Task[ToolResultItem]]
    ) -> None:
        """The results of a stopped round's calls not answered yet: what a finished one gave (it ran,
        waiting behind an earlier call), else `cancelled`."""
        approvals = await self.approvals.abandon([call.call_id for call in unanswered])
        for call in unanswered:
            task = tasks.get(call.call_id)
            if task is not None and task.done() and not task.cancelled() and task.exception() is None:
                result = task.result()
            else:
                result = ToolResultItem(
                    call_id=call.call_id,
                    name=call.name,
                    error=ErrorInfo(code=ToolErrorCode.CANCELLED, message="the turn was stopped"),
                    approval=approvals[call.call_id],
                )
            with contextlib.suppress(Exception):  # what failed may fail again: the stored result counts
                await self._publish_result(result)

    async def _announce(self, call: ToolCallItem, text_offset: int) -> None:
        expires_at = await self.approvals.open(call)
        await self._stored(
            EventType.TOOL_CALL,
            tool_call_key(self.turn_id, call.call_id),
            tool_call_content(call, text_offset=text_offset, expires_at=expires_at),
        )
        await self._ctx.emitter.publish(
            self.session_id,
            ToolCallEvent(
                session_id=self.session_id, turn_id=self.turn_id, call_id=call.call_id, name=call.name, args=call.args
            ),
        )
        if expires_at is not None:
            await self.approvals.ask(call)

    async def _run_tool(self, call: ToolCallItem) -> ToolResultItem:
        """The call's result, once a person approved it where it needs that; its span around it."""
        tracer = self._ctx.tracer
        span = tool_span(tracer, call, self._ctx.tools.origin_of(call.name))
        try:
            with tracer.current(span):  # its log lines name it
                result = await self._decided_call(call)
        except BaseException:
            span.fail(ToolErrorCode.CANCELLED)
            span.end()
            raise
        tool_ended(tracer, span, result)
        return result

    async def _decided_call(self, call: ToolCallItem) -> ToolResultItem:
        approval = await self.approvals.decision(call)
        if approval is None:
            return await self._call_tool(call)
        if not approval.approved:
            return refused_result(call, approval)
        return dataclasses.replace(await self._call_tool(call), approval=approval)

    async def _call_tool(self, call: ToolCallItem) -> ToolResultItem:
        timeout = self._ctx.tools.timeout_of(call.name) or self._ctx.limits.tool_timeout_seconds
        try:
            if call.invalid_arguments is not None:
                raise ToolError(ToolErrorCode.INVALID_ARGUMENTS, call.invalid_arguments)
            async with asyncio.timeout(timeout):
                result: JSONValue = await self._ctx.tools.call(call.name, call.args)
        except ToolError as exc:
            # The code and the cause's kind, never the message: it may quote the arguments.
            cause = f" ({type(exc.__cause__).__name__})" if exc.__cause__ is not None else ""
            log.warning("tool %s failed: %s%s", call.name, exc.code, cause)
            return ToolResultItem(
                call_id=call.call_id, name=call.name, error=ErrorInfo(code=exc.code, message=exc.message)
            )
        except TimeoutError:
            log.warning("tool %s failed: tool_timeout (no answer in %.0f s)", call.name, timeout)
            return ToolResultItem(
                call_id=call.call_id,
                name=call.name,
                error=ErrorInfo(code=ToolErrorCode.TOOL_TIMEOUT, message="the tool took too long"),
            )
        except Exception:
            log.exception("tool %s failed", call.name)
            return ToolResultItem(
                call_id=call.call_id,
                name=call.name,
                error=ErrorInfo(code=ToolErrorCode.TOOL_FAILED, message="the tool failed"),
            )
        return ToolResultItem(call_id=call.call_id, name=call.name, result=result)

    async def _publish_result(self, result: ToolResultItem) -> None:
        self._ctx.metrics.tool_called(
            result.name if result.name in self._ctx.tools else "unknown", result.error is None
        )
        if result.approval is not None and result.approval.source != "cancel" and not self._ctx.locks.single_process:
            # Its decision again, in case another process's rooms missed it and caught up before this
            # result was stored (the one place they find it): the rooms drop a repeat they had.
            await self._ctx.emitter.publish(self.session_id, self.approvals.told(result.call_id, result.approval))
        await self._stored(
            EventType.TOOL_RESULT, tool_result_key(self.turn_id, result.call_id), tool_result_content(result)
        )
        await self._ctx.emitter.publish(
            self.session_id,
            ToolResultEvent(
                session_id=self.session_id,
                turn_id=self.turn_id,
                call_id=result.call_id,
                name=result.name,
                result=result.result,
                error=result.error,
            ),
        )

    async def _stored(self, event_type: EventType, key: str, content: str) -> None:
        """Store a tool event before it is published (briefly waited for, as the answer is before
        `done`): a room that missed it live then finds it in storage (rooms/hub.py)."""
        write = self._store(event_type, key, content)
        await asyncio.wait([write], timeout=self._ctx.limits.done_store_wait_seconds)

    def _store(
        self, event_type: EventType, key: str, content: str, *, ending: bool = False
    ) -> asyncio.Task[StoredEvent | None]:
        """`ending`: the turn's answer, which also says how the turn ended."""
        return self._ctx.writer.submit(
            EventDraft(
                session_id=self.session_id,
                event_type=event_type,
                content=content,
                event_key=key,
                turn_id=self.turn_id,
                timestamp=utc_now(),
                finish_reason=self.finish_reason if ending else None,
                error=self.error if ending else None,
            )
        )

    # ------------------------------------------------------------------ 3. the end

    async def _end(self) -> None:
        """Wait for the model rounds, then `done`; the session's lock is freed whatever happens."""
        assert self._generation is not None
        try:
            try:
                if not self._chunks.is_open:  # the announcement failed before it opened them
                    await self._open()
                await asyncio.wait([self._generation])
            except asyncio.CancelledError:
                # Only the tracker's last-resort drain cancels a turn: it still ends with `done`.
                self.stop("shutdown")
                await asyncio.wait([self._generation])
                await self._finish()
                raise
            if self.stop_reason == "ended_elsewhere":
                self.finish_reason = "error"  # its answer and `done` are the other process's
                return
            await self._finish()
            self._ctx.finished(self.session_id, self.finish_reason)
        finally:
            self._chunks.close()
            self._ctx.running.discard(self)
            self._ctx.metrics.turn_ended(self.finish_reason)
            ended(self._span, self.finish_reason, self.usage, failed_turn(self.error))
            await self._ctx.locks.release_turn(self.session_id, self.turn_id)

    async def _finish(self) -> None:
        self._settle()
        # Held text goes out before `done`, which repeats it (a timer mid-send finishes first).
        await self._chunks.flush()
        write = self._store(EventType.AI_MESSAGE, answer_key(self.turn_id), self.text, ending=True)
        await asyncio.wait([write], timeout=self._ctx.limits.done_store_wait_seconds)
        stored = write.result() if write.done() and write.exception() is None else None
        if self.usage is not None:
            self._ctx.metrics.tokens_used(self.usage)
        # A client that sends once it has `done` must not find the lock still held: `busy`.
        if not await self._ctx.locks.turn_ending(self.session_id, self.turn_id):
            return  # ended elsewhere, taking this process for dead: its `done` went out there
        await self._ctx.emitter.publish(
            self.session_id,
            DoneEvent(
                session_id=self.session_id,
                turn_id=self.turn_id,
                text=self.text,
                finish_reason=self.finish_reason,
                usage=self.usage,
                event_id=getattr(stored, "event_id", None),
                error=self.error,
            ),
        )

    def _settle(self) -> None:
        """How the model rounds ended, as the turn's finish reason and error."""
        assert self._generation is not None
        exc: BaseException | None = self._open_failure
        if exc is None and self._generation.cancelled():
            if self.stop_reason == "cancelled":
                self.finish_reason, self.error = "cancelled", None
            elif self.stop_reason == "lock_lost":
                self.finish_reason, self.error = "error", LOCK_LOST
            else:
                self.finish_reason, self.error = "error", SHUTDOWN
            return
        if exc is None:
            exc = self._generation.exception()
        if exc is None:
            return
        self.finish_reason = "error"
        if isinstance(exc, ProviderError):
            log.warning("turn failed: %s (%s)", exc.code, exc.cause())
            self.error = ErrorInfo(code=exc.code, message=exc.message)
        elif isinstance(exc, StorageUnavailable):
            log.warning("turn failed: unavailable (%s)", type(exc.__cause__ or exc).__name__)
            self.error = ErrorInfo(code=TurnErrorCode.UNAVAILABLE, message="storage could not give the conversation")
        else:
            log.error("turn %s failed", self.turn_id, exc_info=exc)
            self.error = ErrorInfo(code=TurnErrorCode.PROVIDER_ERROR, message="the model could not answer")
