"""The interfaces the conversation core depends on. Vendors and transports implement them."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

from server.core.errors import TurnErrorCode
from server.core.models import (
    ActiveTurn,
    AttachmentRef,
    ErrorInfo,
    EventDraft,
    FinishReason,
    JSONValue,
    Session,
    SessionEvent,
    StoredEvent,
    TurnEvent,
    Usage,
)

# ---------------------------------------------------------------- model provider


@dataclass(frozen=True)
class UserText:
    text: str
    files: tuple[AttachmentRef, ...] = ()  # the message's attachments (their bytes are read apart)


@dataclass(frozen=True)
class ModelText:
    text: str


@dataclass(frozen=True)
class ToolCallItem:
    call_id: str
    name: str
    args: dict[str, JSONValue]
    # Whatever the provider needs to replay the call verbatim (e.g. Gemini's thought signature).
    provider_data: dict[str, JSONValue] | None = None
    # Why the model's arguments could not be read (not JSON, not an object): the call is answered
    # `invalid_arguments` without running, and `args` is {}.
    invalid_arguments: str | None = None


# Who decided a call that waited: a person, or the wait's own end (its deadline, the turn's end, or
# the shared state away so that nobody could be asked).
ApprovalSource = Literal["person", "timeout", "cancel", "unasked"]


@dataclass(frozen=True)
class Approval:
    """A decision on a tool call that waited for one."""

    approved: bool
    reason: str | None = None
    source: ApprovalSource = "person"


@dataclass(frozen=True)
class ToolResultItem:
    call_id: str
    name: str
    result: JSONValue = None
    error: ErrorInfo | None = None
    approval: Approval | None = None  # the call waited for this decision (stored with the result)


ConversationItem = UserText | ModelText | ToolCallItem | ToolResultItem


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, JSONValue]


@dataclass(frozen=True)
class FileWithheld:
    """A file the model gets only by name, and why."""

    reason: str


@dataclass(frozen=True)
class ModelRequest:
    conversation: Sequence[ConversationItem]
    tools: Sequence[ToolSpec] = field(default_factory=tuple)
    # What the conversation's user messages name, by attachment_id: a file's bytes, or why the model
    # gets only its name (no longer stored, past the request's size limit).
    files: Mapping[str, bytes | FileWithheld] = field(default_factory=dict)


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ToolCallRequest:
    call_id: str
    name: str
    args: dict[str, JSONValue]
    provider_data: dict[str, JSONValue] | None = None
    invalid_arguments: str | None = None  # as in ToolCallItem


@dataclass(frozen=True)
class UsageReport:
    usage: Usage


@dataclass(frozen=True)
class Finished:
    reason: Literal["stop", "max_tokens", "safety"]


ModelEvent = TextDelta | ToolCallRequest | UsageReport | Finished


class ProviderError(Exception):
    """The model could not answer; `code` goes to the client in `done.error`, `detail` (what the
    vendor said, which can name its internals) only to the log."""

    def __init__(self, code: TurnErrorCode, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail

    def cause(self) -> str:
        """For a log line: the class of what caused it, and the vendor's detail."""
        name = type(self.__cause__ or self).__name__
        return f"{name}: {self.detail}" if self.detail else name


def failure_reason(exc: BaseException | None) -> str:
    """For a log line: a provider's code and cause, or the class of anything else (not its text,
    which may hold what a client wrote)."""
    return f"{exc.code}: {exc.cause()}" if isinstance(exc, ProviderError) else type(exc).__name__


@dataclass(frozen=True)
class ModelInfo:
    """What a trace says of the model a provider asks (OpenTelemetry's GenAI conventions)."""

    provider: str  # gen_ai.provider.name: gcp.gemini, openai, offline
    operation: str  # gen_ai.operation.name: generate_content, chat
    model: str
    server_address: str | None = None
    server_port: int | None = None


class ModelProvider(Protocol):
    name: str
    info: ModelInfo
    # The most file bytes one request may carry (None: no limit known); a message whose own files
    # pass it is refused, and older files past it are named instead of sent.
    max_request_file_bytes: int | None
    # Whether requests carry the files' bytes (False: only their names, and nothing is read).
    takes_files: bool

    def stream(self, request: ModelRequest) -> AsyncGenerator[ModelEvent, None]:
        """One model request: text deltas, tool calls, usage, then one `Finished`."""
        ...

    async def summarise(self, conversation: Sequence[ConversationItem]) -> str: ...

    async def title(self, conversation: Sequence[ConversationItem]) -> str:
        """A short title for the conversation (one request; the caller trims it to one line)."""
        ...

    async def compact(self, summary: str | None, conversation: Sequence[ConversationItem]) -> str:
        """`summary` (of what came before, None at first) extended with `conversation`: one request."""
        ...

    def not_ready_reason(self) -> str | None:
        """Why the provider cannot serve (no network call), or None when it is configured."""
        ...

    async def aclose(self) -> None: ...


# ---------------------------------------------------------------- storage


class StorageUnavailable(Exception):
    """Storage could not take or give the data within the retry budget."""


class StorageRefused(Exception):
    """Storage answers but will not take the service's writes (e.g. a key without the rights):
    waiting does not help, the configuration must change. The message says what to change."""


class SessionDeleted(Exception):
    """The session was deleted: storage takes nothing more of it (a write of it is dropped)."""


@dataclass(frozen=True)
class SessionCursor:
    """Where a page of a user's sessions ends: the last one's `updated_at` and `session_id`."""

    updated_at: datetime
    session_id: str


@dataclass(frozen=True)
class EventPage:
    events: list[StoredEvent]  # in stored order
    more: bool  # events exist beyond the page, in the direction asked


class Repository(Protocol):
    """Sessions and events. Every write is idempotent, so retrying one is always safe.

    A deleted session keeps its row (id, user, `deleted_at`) so that its id is never used again;
    every other read and write treats it as gone: `append_event` raises SessionDeleted, summaries
    and titles of it are not written, and it is never listed."""

    async def ensure_session(self, session_id: str, user_id: str | None, start_time: datetime) -> Session: ...

    async def get_session(self, session_id: str) -> Session | None: ...

    async def append_event(self, draft: EventDraft) -> StoredEvent:
        """Store the event once; a second call with the same (session, event_key) returns the first row.
        SessionDeleted when the session is deleted (storage itself refuses it, whoever writes)."""
        ...

    async def find_event(self, session_id: str, event_key: str) -> StoredEvent | None: ...

    async def list_events(self, session_id: str, after_event_id: int | None = None) -> list[StoredEvent]: ...

    async def page_events(
        self, session_id: str, *, after: int | None = None, before: int | None = None, limit: int
    ) -> EventPage:
        """One indexed query: with `after`, the first `limit` events after it; with `before`, the last
        `limit` before it; with neither, the last `limit`. `more`: events exist past the page (later
        ones for `after`, earlier ones otherwise)."""
        ...

    async def list_sessions(self, user_id: str, limit: int, after: SessionCursor | None = None) -> list[Session]:
        """Up to `limit` of the user's sessions that are not deleted, most recently updated first
        (`updated_at` descending, then `session_id` descending), those after `after` in that order."""
        ...

    async def rename_session(self, session_id: str, title: str) -> Session | None:
        """Set the title and `updated_at` (now); None when the session is unknown or deleted."""
        ...

    async def set_generated_title(self, session_id: str, title: str) -> Session | None:
        """Store the title only when the session has none and is not deleted (`updated_at` stays);
        the session when stored, else None."""
        ...

    async def delete_session(self, session_id: str) -> bool:
        """Delete the session at once, atomically: its events (and files) removed, its title, summary
        and times cleared, `deleted_at` set; from then on storage refuses events of it. False when
        it is unknown or already deleted."""
        ...

    async def write_summary(self, session_id: str, summary: str, end_time: datetime, duration_seconds: int) -> None:
        """Write the summary of the emptying at `end_time`; a summary due for it or earlier is done."""
        ...

    async def write_context_summary(self, session_id: str, summary: str, upto: int, previous_upto: int | None) -> bool:
        """Store the compaction summary covering events up to `upto`, only when the session is not
        deleted and its stored `context_upto` is `previous_upto` (None: none stored yet), so that no
        process overwrites a newer summary with an older one. `updated_at` stays. True when stored."""
        ...

    async def mark_emptied(self, session_id: str, emptied_at: datetime) -> None:
        """The last client left at `emptied_at`: write `end_time` and `duration_seconds` now, and
        remember, durably, that the session needs its summary (which follows, retried on its own)."""
        ...

    async def due_summaries(self, limit: int) -> list[tuple[str, datetime]]:
        """Sessions still waiting for a summary, with when they emptied, oldest first."""
        ...

    async def open_turns(self, after: str | None, limit: int) -> list[tuple[str, str]]:
        """(session_id, turn_id) of turns whose user message is stored and whose answer is not
        (running somewhere, or cut off by a crash), by session_id, from after `after`."""
        ...

    async def turn_events(self, session_id: str, turn_id: str) -> list[StoredEvent]:
        """The turn's stored events, in order."""
        ...

    async def ping(self) -> None:
        """Raise when storage does not answer; StorageRefused when it would refuse the service's writes."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class AttachmentInfo:
    """A file uploaded to a session (its bytes are read apart: `AttachmentStore.attachment_data`)."""

    attachment_id: str  # a UUID made by the service
    session_id: str
    name: str  # the client's file name, as given (trimmed, at most 255 characters)
    mime_type: str  # decided from the content
    size: int
    sha256: str  # hex
    created_at: datetime
    used: bool = False  # a stored message names it (then it never expires)


class AttachmentStore(Protocol):
    """Files uploaded to sessions. Writes are idempotent (same attachment_id: a no-op).

    An id that is not a UUID names no file: reads give nothing, and nothing is written."""

    async def add_attachment(self, info: AttachmentInfo, data: bytes) -> None:
        """Store the file's bytes and row; SessionDeleted when the session is deleted (or unknown)."""
        ...

    async def get_attachment(self, attachment_id: str) -> AttachmentInfo | None: ...

    async def attachment_data(self, attachment_id: str) -> bytes | None: ...

    async def session_attachments(self, session_id: str, attachment_ids: Sequence[str]) -> list[AttachmentInfo]:
        """Those of the ids that are uploads of this session, in the order asked (others left out)."""
        ...

    async def mark_attachments_used(self, session_id: str, attachment_ids: Sequence[str]) -> None:
        """The session's uploads among the ids are named by a stored message: they never expire."""
        ...

    async def delete_unused_attachments(self, created_before: datetime, limit: int) -> int:
        """Delete uploads no message names, made before `created_before` (at most `limit`); how many."""
        ...


class Storage(Repository, AttachmentStore, Protocol):
    """What every storage backend is: sessions, their events, and their files."""


class Outbox(Protocol):
    """A local durable queue for events storage could not take: kept on disk until written.

    Events leave it oldest first; an event is removed only once storage has it, so a crash in
    between writes it again, which the idempotent `append_event` turns into a no-op.
    """

    @property
    def depth(self) -> int:
        """Events waiting (kept in memory: no I/O)."""
        ...

    def holds(self, session_id: str) -> bool:
        """Whether events of the session wait here (kept in memory: no I/O)."""
        ...

    async def put(self, draft: EventDraft) -> None:
        """Store the event durably (on disk) before returning."""
        ...

    async def oldest(self, limit: int) -> list[tuple[int, EventDraft]]:
        """Up to `limit` waiting events with their queue position, oldest first."""
        ...

    async def remove(self, position: int, session_id: str) -> None: ...

    async def set_aside(self, position: int, session_id: str, reason: str) -> None:
        """Move an event storage refuses for good out of the way, keeping it on disk."""
        ...

    async def waiting(self, session_id: str) -> list[EventDraft]:
        """The session's waiting events, oldest first."""
        ...

    async def find(self, session_id: str, event_key: str) -> EventDraft | None: ...

    async def discard(self, session_id: str) -> int:
        """Drop the session's waiting events (it was deleted); how many there were."""
        ...

    async def aclose(self) -> None: ...


# ---------------------------------------------------------------- transport


class Emitter(Protocol):
    """Delivers events to every client of a session, on every process (rooms/hub.py)."""

    async def publish(self, session_id: str, event: TurnEvent) -> None: ...

    async def add_member(
        self,
        connection: str,
        session_id: str,
        *,
        history_end: int | None = None,
        stored_end: int | None = None,
        title: str | None = None,
    ) -> None:
        """Put the connection in the session's room. `history_end`: the last stored event its join
        gave it (as the client asked); `stored_end`: the last stored event the join read; `title`:
        the session's title as the join read it."""
        ...

    async def remove_member(self, connection: str, session_id: str) -> None: ...

    async def follow_user(self, connection: str, user_id: str) -> None:
        """The connection hears the session events of every session of this user, joined or not."""
        ...

    async def announce(self, session_id: str, user_id: str | None, event: SessionEvent) -> None:
        """A session event to the session's room and to every connection following its user, on
        every process, once each. After `session_deleted` the room is empty everywhere."""
        ...


# ---------------------------------------------------------------- coordination

CancelHandler = Callable[[str, str], Awaitable[None]]
# (session_id, turn_id, ended_elsewhere): see `Coordination.on_turn_lost`.
LostHandler = Callable[[str, str, bool], Awaitable[None]]
# (session_id, turn_id, text streamed so far): see `Coordination.on_turn_orphaned`.
OrphanHandler = Callable[[str, str, str], Awaitable[None]]
# session_id -> the turn running here in it, as a tab joining elsewhere needs it (None: none here).
RunningTextHandler = Callable[[str], ActiveTurn | None]


class MessageQuota(Protocol):
    """How many messages one user may send per minute, over every process serving them.

    `take` decides and counts in one step (an atomic operation where the count is shared), so
    messages sent at once are counted as if sent one after another. A message refused after its
    take (busy, storage down) is given back: refused messages do not count.
    """

    async def take(self, key: str) -> bool:
        """Count one message for `key`; False, counting nothing, when its limit is reached."""
        ...

    async def give_back(self, key: str) -> None: ...

    async def aclose(self) -> None: ...


class TurnLocks(Protocol):
    """One turn at a time per session, over every process; the turns of processes that died."""

    # True when this process is the only one serving sessions: then nothing but this process
    # writes a session's events, and what it has read and written of a session is all of it.
    single_process: bool

    async def acquire_turn(self, session_id: str, turn_id: str) -> bool:
        """Take the session's one-turn lock; False when another turn holds it."""
        ...

    async def turn_ending(self, session_id: str, turn_id: str) -> bool:
        """The turn is about to publish its `done`: from now on a turn asked for in the session waits
        (briefly) for this one's release instead of being refused `busy` by a lock about to go.
        False when another process has ended the turn (it took this one for dead): it sent the
        turn's `done`, so this one must not."""
        ...

    async def release_turn(self, session_id: str, turn_id: str) -> None: ...

    async def running_turn(self, session_id: str) -> str | None: ...

    async def alone(self) -> bool:
        """Whether no other live process serves sessions now (always, for one process)."""
        ...

    def on_turn_lost(self, handler: LostHandler) -> None:
        """Call `handler(session_id, turn_id, ended_elsewhere)` when a turn held here lost its lock
        (it expired, so another process may hold it now): the turn must stop. `ended_elsewhere`:
        this process was taken for dead and another one ended the turn (stored its answer, sent its
        `done`), so it stops without a `done` of its own."""
        ...

    def on_turn_orphaned(self, handler: OrphanHandler) -> None:
        """Call `handler(session_id, turn_id, text)` for each turn whose process died, in exactly
        one live process, while the session's lock is held for it; the lock is freed once the
        handler returns (an exception leaves the turn to be handed over again a little later)."""
        ...


class TurnRequests(Protocol):
    """What a client on any process asks of the process running a turn."""

    async def request_cancel(self, session_id: str, turn_id: str) -> None:
        """Ask whichever process runs the turn to cancel it (it calls the `on_cancel` handler)."""
        ...

    def on_cancel(self, handler: CancelHandler) -> None: ...

    async def turn_snapshot(self, session_id: str) -> ActiveTurn | None:
        """The text so far of the session's turn when it runs in another process, else None. The
        caller's member is in the room already: that process's chunks from now on reach it."""
        ...

    def on_running_text(self, handler: RunningTextHandler) -> None:
        """How this process answers `turn_snapshot` asked elsewhere of one of its turns."""
        ...


class Presence(Protocol):
    """How many clients are in a session, over every process."""

    async def add_member(self, session_id: str, connection: str) -> int | None:
        """Count the connection in; the new count, or None when it was already in."""
        ...

    async def remove_member(self, session_id: str, connection: str) -> int | None:
        """Count the connection out; the new count, or None when it was not in."""
        ...

    async def member_count(self, session_id: str) -> int: ...


class JobClaims(Protocol):
    """At most one process at a time does a session's background job of one kind (a title)."""

    async def claim_job(self, job: str, session_id: str, seconds: float) -> bool:
        """True for one caller until `release_job`, or until `seconds` pass (should it stop first)."""
        ...

    async def release_job(self, job: str, session_id: str) -> None: ...


# (session_id, turn_id, call_id, approval): see `ToolApprovals.on_decision`.
DecisionHandler = Callable[[str, str, str, Approval], Awaitable[None]]


class ToolApprovals(Protocol):
    """Tool calls waiting for a decision, over every process: each is decided exactly once, by
    whoever claims it first (a person on any process, or the turn's own timeout or cancel)."""

    async def open_approval(self, session_id: str, turn_id: str, call_id: str, seconds: float) -> None:
        """The call, of the turn running here, waits for a decision from now on (for `seconds` at
        most); the record of an earlier call with the same id is replaced."""
        ...

    async def decide(self, session_id: str, call_id: str, approval: Approval) -> bool:
        """Claim the call's one decision, atomically: False when it is not waiting (unknown, decided
        already, or its turn no longer runs). The winner's decision reaches the process running the
        turn, whose `on_decision` handler is called with it."""
        ...

    async def decision(self, session_id: str, turn_id: str, call_id: str) -> Approval | None:
        """The decision claimed for the turn's call, if any (what a lost message would have carried)."""
        ...

    def on_decision(self, handler: DecisionHandler) -> None: ...


class SummaryClaims(Protocol):
    async def claim_summary(self, session_id: str, emptied_at: datetime) -> bool:
        """True for exactly one caller per emptying of a session."""
        ...


class Coordination(TurnLocks, TurnRequests, Presence, SummaryClaims, JobClaims, ToolApprovals, Protocol):
    """State shared by every process serving a session: in one process, or across many on Redis.
    Each part of the core takes the concern it uses (a turn: `TurnLocks`; summaries: `SummaryClaims`)."""

    async def ping(self) -> None:
        """Raise when the shared state cannot be reached."""
        ...

    async def aclose(self) -> None: ...


# ---------------------------------------------------------------- metrics

Transport = Literal["socketio", "websocket"]
ProviderOutcome = Literal["ok", "retried", "error"]
ApprovalOutcome = Literal["approved", "denied", "timeout"]


class Metrics(Protocol):
    """What the service counts (docs/protocol.md, Metrics). `chunk_sent` and `first_chunk` are on the
    chunk path: an implementation must not block or do I/O."""

    def chunk_sent(self) -> None:
        """One `chunk` emitted (once, whatever the number of recipients)."""
        ...

    def first_chunk(self, seconds: float) -> None:
        """A turn emitted its first chunk this long after its `message` arrived."""
        ...

    def turn_started(self) -> None: ...

    def turn_ended(self, finish_reason: FinishReason) -> None: ...

    def turn_interrupted(self) -> None:
        """A turn whose process died was ended here (it ran elsewhere: not in turns running)."""
        ...

    def tool_called(self, tool: str, ok: bool) -> None:
        """`tool`: a registered tool's name, or `unknown` (never what a model made up)."""
        ...

    def provider_request(self, outcome: ProviderOutcome) -> None: ...

    def tokens_used(self, usage: Usage) -> None: ...

    def summary_made(self, ok: bool) -> None: ...

    def title_made(self, ok: bool) -> None: ...

    def compaction_made(self, ok: bool) -> None: ...

    def tool_approval(self, outcome: ApprovalOutcome) -> None:
        """A call that waited was decided: approved, denied, or timed out (a cancel is not counted)."""
        ...

    def storage_operation(self, operation: str, seconds: float) -> None: ...

    def events_queued(self, count: int) -> None:
        """The local durable queue holds `count` events now."""
        ...

    def connection_opened(self, transport: Transport) -> None: ...

    def connection_closed(self, transport: Transport) -> None: ...

    def refused(self, code: str) -> None:
        """A request answered with an error code, or a connection refused."""
        ...


class NoMetrics:
    """Counts nothing: for a core built without metrics (unit tests)."""

    def chunk_sent(self) -> None:
        pass

    def first_chunk(self, seconds: float) -> None:
        pass

    def turn_started(self) -> None:
        pass

    def turn_ended(self, finish_reason: FinishReason) -> None:
        pass

    def turn_interrupted(self) -> None:
        pass

    def tool_called(self, tool: str, ok: bool) -> None:
        pass

    def provider_request(self, outcome: ProviderOutcome) -> None:
        pass

    def tokens_used(self, usage: Usage) -> None:
        pass

    def summary_made(self, ok: bool) -> None:
        pass

    def title_made(self, ok: bool) -> None:
        pass

    def compaction_made(self, ok: bool) -> None:
        pass

    def tool_approval(self, outcome: ApprovalOutcome) -> None:
        pass

    def storage_operation(self, operation: str, seconds: float) -> None:
        pass

    def events_queued(self, count: int) -> None:
        pass

    def connection_opened(self, transport: Transport) -> None:
        pass

    def connection_closed(self, transport: Transport) -> None:
        pass

    def refused(self, code: str) -> None:
        pass


# ---------------------------------------------------------------- traces

SpanValue = str | bool | int | float | Sequence[str]


@dataclass(frozen=True)
class TraceParent:
    """A client's W3C trace context (`traceparent`, `tracestate` headers): the trace a turn continues."""

    traceparent: str | None = None
    tracestate: str | None = None


class Span(Protocol):
    def set(self, attributes: Mapping[str, SpanValue | None]) -> None:
        """Attributes to add (a None value is left out)."""
        ...

    def fail(self, error_type: str) -> None:
        """The operation failed: `error.type`, and the span's status ERROR."""
        ...

    def end(self) -> None: ...


class Tracer(Protocol):
    """Where the core reports what it does as spans (docs/protocol.md, Traces)."""

    # Whether message text, tool arguments and results may go on spans.
    capture_content: bool

    def start(
        self,
        name: str,
        attributes: Mapping[str, SpanValue | None],
        *,
        client: bool = False,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> Span:
        """A span, a child of the current one, or of `traceparent` (a W3C header a client sent: an
        invalid one starts a new trace). It is not made current: see `current`."""
        ...

    def current(self, span: Span) -> AbstractContextManager[object]:
        """Within the block, `span` is the parent of what starts (and of the tasks spawned there)."""
        ...

    def within_span(self) -> bool:
        """Whether a span is current (work done outside any, such as a sweep, makes no spans)."""
        ...


class _NoSpan:
    def set(self, attributes: Mapping[str, SpanValue | None]) -> None:
        pass

    def fail(self, error_type: str) -> None:
        pass

    def end(self) -> None:
        pass


NO_SPAN = _NoSpan()
_NOT_CURRENT = nullcontext()


class NoTracer:
    """Traces nothing, at the cost of a call: tracing off."""

    capture_content = False

    def start(
        self,
        name: str,
        attributes: Mapping[str, SpanValue | None],
        *,
        client: bool = False,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> Span:
        return NO_SPAN

    def current(self, span: Span) -> AbstractContextManager[object]:
        return _NOT_CURRENT

    def within_span(self) -> bool:
        return False
