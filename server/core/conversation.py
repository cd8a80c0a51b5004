"""The conversation core: sessions, turns, presence. It knows nothing of Socket.IO or any vendor."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from server.core.approvals import ApprovalPolicy
from server.core.compaction import Compactor
from server.core.context import ContextBudget
from server.core.errors import (
    ErrorCode,
    ServiceError,
    session_deleted,
    shared_state_unavailable,
    storage_unavailable,
)
from server.core.event_store import EventStore
from server.core.history import HistoryCache
from server.core.limits import Limits
from server.core.models import ActiveTurn, AttachmentRef, FinishReason, PresenceEvent, Session, StoredEvent, utc_now
from server.core.ports import (
    Approval,
    Coordination,
    Emitter,
    EventPage,
    MessageQuota,
    Metrics,
    ModelProvider,
    NoMetrics,
    NoTracer,
    Outbox,
    Storage,
    StorageRefused,
    StorageUnavailable,
    TraceParent,
    Tracer,
)
from server.core.rate_limit import LocalQuota, RateLimiter
from server.core.recent import Recent
from server.core.recovery import TurnEnder
from server.core.redelivery import Missed, as_live, user_message_key
from server.core.summaries import SummaryScheduler
from server.core.tasks import TaskTracker
from server.core.titles import TitleWriter
from server.core.tools import ToolRegistry
from server.core.turn import MessageAccepted, RunningTurns, Turn, TurnBusy, TurnContext
from server.core.writer import OrderedWriter

log = logging.getLogger(__name__)

OPEN_TURNS_PAGE = 1000


DELETED_REMEMBERED = 10_000  # deleted sessions this process answers `session_deleted` for without a read
DELETE_TURN_WAIT_SECONDS = 10.0  # how long a deletion waits for the session's cancelled turn to end


@dataclass(frozen=True)
class JoinResult:
    session: Session
    history: list[StoredEvent]
    history_more: bool
    active_turn: ActiveTurn | None


def parse_session_id(value: str) -> str:
    """The canonical form of a session UUID, or `invalid_session_id`."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, TypeError, AttributeError):
        raise ServiceError(ErrorCode.INVALID_SESSION_ID, "session_id must be a UUID") from None


class ConversationService:
    """What clients ask of sessions (join, message, cancel, leave), whichever transport they use.

    A client is named by its `connection`: the transport's id of its connection, unique in the
    process (a Socket.IO sid, or `ws:<hex>` for a plain WebSocket)."""

    def __init__(
        self,
        *,
        repo: Storage,
        provider: ModelProvider,
        tools: ToolRegistry,
        emitter: Emitter,
        coordination: Coordination,
        tasks: TaskTracker,
        limits: Limits,
        summary_delay_seconds: float,
        summary_retry_seconds: float = 30.0,
        outbox: Outbox | None = None,
        user_quota: MessageQuota | None = None,
        metrics: Metrics | None = None,
        title_generation: bool = True,
        approval: ApprovalPolicy | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        metrics = metrics or NoMetrics()
        self._tracer = tracer or NoTracer()
        self._repo = repo
        self._emitter = emitter
        self._coordination = coordination
        self._limits = limits
        self._store = EventStore(repo, tasks, outbox)
        self._writer = OrderedWriter(self._store, tasks)
        self._history = HistoryCache(repo, self._store, sole_writer=coordination.single_process)
        self._store.on_stored(self._history.remember)
        self._rate = RateLimiter(limits.messages_per_minute)
        self._user_quota = user_quota or LocalQuota(limits.messages_per_minute)
        self._joined: defaultdict[str, set[str]] = defaultdict(set)  # connection -> the sessions it joined
        # Sessions a connection's joins are still working on: they count against its cap already.
        self._joining: defaultdict[str, set[str]] = defaultdict(set)
        self._turns = RunningTurns()
        self._deleted: Recent[str, None] = Recent(DELETED_REMEMBERED)  # sessions known deleted, newest last
        self._tasks = tasks
        self._budget = ContextBudget(limits.context_max_tokens)
        self.compaction = Compactor(
            repo, provider, coordination, tasks, metrics, self._budget, sole_writer=coordination.single_process
        )
        self._turn_context = self._context_of_turns(provider, tools, metrics, approval or ApprovalPolicy())
        self._ender = TurnEnder(repo=repo, writer=self._writer, emitter=emitter, metrics=metrics)
        # Set once the turns a crash left open are ended: no turn starts before.
        self._recovered = asyncio.Event()
        self._sweep: asyncio.Task[None] | None = None
        # What follows sessions and turns in the background.
        self.summaries = SummaryScheduler(
            repo=repo,
            provider=provider,
            coordination=coordination,
            writer=self._writer,
            tasks=tasks,
            delay_seconds=summary_delay_seconds,
            retry_seconds=summary_retry_seconds,
            wait_turn_end=self.wait_turn_end,
            metrics=metrics,
            context_tokens=limits.context_max_tokens,
        )
        self.titles = TitleWriter(repo, provider, coordination, emitter, tasks, metrics, enabled=title_generation)

    def _context_of_turns(
        self, provider: ModelProvider, tools: ToolRegistry, metrics: Metrics, approval: ApprovalPolicy
    ) -> TurnContext:
        return TurnContext(
            provider=provider,
            tools=tools,
            emitter=self._emitter,
            locks=self._coordination,
            writer=self._writer,
            history=self._history,
            limits=self._limits,
            tasks=self._tasks,
            running=self._turns,
            metrics=metrics,
            budget=self._budget,
            compaction=self.compaction,
            approvals=self._coordination,
            approval_policy=approval,
            files=self._repo,
            tracer=self._tracer,
            finished=self._turn_finished,
        )

    def start(self) -> None:
        """Start the background work: storage's queue, the summaries, the sweep of cut-off turns."""
        self._coordination.on_cancel(self._cancel_here)
        self._coordination.on_decision(self._decision_here)
        self._coordination.on_running_text(self._running_text)
        self._coordination.on_turn_lost(self._turn_lost)
        self._coordination.on_turn_orphaned(self._end_orphaned)
        self._store.start()
        self.summaries.start()
        # A loop, cancelled at shutdown: storage may be away for long.
        self._sweep = self._tasks.spawn_loop(self._end_cut_off_turns(), "end cut-off turns")

    # ------------------------------------------------------------------ join

    async def join(
        self,
        connection: str,
        session_id: str | None,
        user_id: str | None,
        after_event_id: int | None,
        history_limit: int | None = None,
        *,
        owner: str | None = None,
    ) -> JoinResult:
        """`owner`: the authenticated user, who may only join sessions they created (or new ones).
        `history_limit`: the most events the history holds (JOIN_HISTORY_LIMIT when None)."""
        session_id = parse_session_id(session_id) if session_id is not None else str(uuid.uuid4())
        if owner is not None:
            user_id = owner
        if not self._reserve_join(connection, session_id):
            await self._refuse_over_session_cap(session_id, owner)
        limit = history_limit or self._limits.join_history_limit
        try:
            session, page, end = await self._open_session(session_id, user_id, after_event_id, limit, owner)
            active = await self._enter(
                connection, session_id, history_end=end or after_event_id, stored_end=end, title=session.title
            )
            await self._refuse_if_deleted_meanwhile(connection, session_id)
            if owner is None and user_id is not None:
                # Authentication off: the user the client says it is (with it on, the token's user
                # is followed from the connect on), whoever owns this session.
                await self._emitter.follow_user(connection, user_id)
        finally:
            self._joining[connection].discard(session_id)
            if not self._joining[connection]:
                del self._joining[connection]
            if not self._joined.get(connection, True):
                del self._joined[connection]
        return JoinResult(session=session, history=page.events, history_more=page.more, active_turn=active)

    def _reserve_join(self, connection: str, session_id: str) -> bool:
        """Count the session against the connection's cap now, before any await: joins sent at once are
        counted as if sent one after another. False when the cap is reached."""
        joined, joining = self._joined[connection], self._joining[connection]
        if session_id in joined or session_id in joining:
            return True
        if len(joined) + len(joining) >= self._limits.max_sessions_per_member:
            return False
        joining.add(session_id)
        return True

    async def _open_session(
        self, session_id: str, user_id: str | None, after_event_id: int | None, limit: int, owner: str | None
    ) -> tuple[Session, EventPage, int | None]:
        """The session, its history page, and the last event id storage has of it (None: unknown)."""
        try:
            if self._store.outage:
                raise StorageUnavailable("storage is out; events wait in the local queue")
            session = await self._repo.ensure_session(session_id, user_id, utc_now())
            if owner is not None and session.user_id != owner:
                raise ServiceError(ErrorCode.FORBIDDEN, "this session belongs to another user")
            if session.deleted:
                self._remember_deleted(session_id)
                raise session_deleted()
            self.compaction.seen(session)
            # A history with gaps would mislead the tab: the session's queued events go first.
            await self._writer.wait_stored(session_id, within_seconds=self._limits.done_store_wait_seconds)
            page = await self._repo.page_events(session_id, after=after_event_id, limit=limit)
            end = page.events[-1].event_id if page.events else None
            if after_event_id is not None and page.more:
                # The client pages the rest itself: its room starts at the session's end, not the page's.
                latest = await self._repo.page_events(session_id, limit=1)
                end = latest.events[-1].event_id if latest.events else end
        except StorageUnavailable:
            raise storage_unavailable() from None
        if after_event_id is None and not page.more:
            self._history.note(session_id, page.events)  # the whole session: a turn need not read it again
        return session, page, end

    async def _enter(
        self,
        connection: str,
        session_id: str,
        *,
        history_end: int | None,
        stored_end: int | None,
        title: str | None,
    ) -> ActiveTurn | None:
        """Put the connection in the session's room; the session's running turn, if any."""
        newly = session_id not in self._joined[connection]
        try:
            if newly:
                self._joined[connection].add(session_id)
                await self._emitter.add_member(
                    connection, session_id, history_end=history_end, stored_end=stored_end, title=title
                )
            clients = await self._coordination.add_member(session_id, connection)
            # Taken right after entering the room: every chunk is in this text or reaches the
            # socket live, and `next_index` tells the client which live chunks to drop.
            turn = self._turns.get(session_id)
            active = turn.snapshot() if turn is not None else await self._coordination.turn_snapshot(session_id)
        except Exception as exc:
            if newly:  # the join did not happen: undo it
                self._joined[connection].discard(session_id)
                await self._emitter.remove_member(connection, session_id)
            raise shared_state_unavailable(exc) from None
        self.summaries.session_joined(session_id)
        if clients is not None:
            await self._emitter.publish(session_id, PresenceEvent(session_id=session_id, clients=clients))
        return active

    async def _refuse_if_deleted_meanwhile(self, connection: str, session_id: str) -> None:
        """A deletion that ran while the join read the session emptied the room before this client
        was in it: the join is undone and refused rather than left in a room nobody announces to.
        With other processes, storage is asked again (the deletion may have run on one of them)."""
        deleted = session_id in self._deleted
        if not deleted and not self._coordination.single_process:
            try:
                session = await self._repo.get_session(session_id)
                deleted = session is not None and session.deleted
            except StorageUnavailable:
                deleted = False  # the join stands; a deletion is caught up on once storage answers
        if not deleted:
            return
        self._remember_deleted(session_id)
        await self._leave_deleted(connection, session_id)
        await self._emitter.remove_member(connection, session_id)
        raise session_deleted()

    async def _leave_deleted(self, connection: str, session_id: str) -> None:
        """Take the connection out of a deleted session (no presence is sent: nobody is in it)."""
        sessions = self._joined.get(connection)
        if sessions is None or session_id not in sessions:
            return
        sessions.discard(session_id)
        if not sessions:
            del self._joined[connection]
        try:
            await self._coordination.remove_member(session_id, connection)
        except Exception as exc:  # presence of a deleted session is read by nobody
            log.debug("cannot count %s out of deleted session %s: %r", connection, session_id, exc)

    async def _refuse_over_session_cap(self, session_id: str, owner: str | None) -> None:
        # `forbidden` comes before `rate_limited`, and a refusal creates nothing: look, never create.
        if owner is not None:
            try:
                existing = await self._repo.get_session(session_id)
            except StorageUnavailable:
                raise storage_unavailable() from None
            if existing is not None and existing.user_id != owner:
                raise ServiceError(ErrorCode.FORBIDDEN, "this session belongs to another user")
        if session_id in self._deleted:
            raise session_deleted()
        raise ServiceError(
            ErrorCode.RATE_LIMITED,
            f"this connection is in {self._limits.max_sessions_per_member} sessions already; leave one first",
        )

    # ------------------------------------------------------------------ message

    async def send_message(
        self,
        connection: str,
        session_id: str,
        text: str,
        client_message_id: str | None,
        *,
        user: str | None = None,
        attachments: Sequence[str] = (),
        trace: TraceParent | None = None,
    ) -> MessageAccepted:
        """`user`: the authenticated user, whose messages over all their connections are limited too.
        `attachments`: ids of files uploaded to the session, sent to the model with the text."""
        received_at = time.monotonic()
        if len(attachments) > self._limits.attachments_per_message:
            raise ServiceError(
                ErrorCode.INVALID_PAYLOAD, f"attachments: at most {self._limits.attachments_per_message} files"
            )
        session_id = self._joined_session(connection, session_id)
        retried = self._running_with(session_id, client_message_id)
        if retried is not None:  # answered like the first attempt, whatever storage does meanwhile
            return await asyncio.shield(retried.accepted)
        files = await self._files_of(session_id, attachments)
        self._check_message(text, files)
        if client_message_id is not None:
            earlier = await self._earlier_answer(session_id, client_message_id)
            if earlier is not None:
                return earlier
        await self._wait_recovered()
        await self._take_quota(connection, user)
        try:
            accepted, started = await self._start_turn(session_id, text, client_message_id, received_at, files, trace)
        except BaseException:
            await self._give_back_quota(connection, user)
            raise
        if not started:  # a retry answered like the first attempt: it does not count
            await self._give_back_quota(connection, user)
        return accepted

    def _check_message(self, text: str, files: tuple[AttachmentRef, ...]) -> None:
        if not text.strip():
            raise ServiceError(ErrorCode.EMPTY_MESSAGE, "text is empty")
        if len(text) > self._limits.max_message_chars:
            raise ServiceError(
                ErrorCode.MESSAGE_TOO_LONG, f"text is longer than {self._limits.max_message_chars} characters"
            )
        if self._budget.too_long(text, files):
            raise ServiceError(
                ErrorCode.MESSAGE_TOO_LONG,
                f"the text and files are longer than the model's context ({self._budget.max_tokens} tokens)",
            )
        most = self._turn_context.provider.max_request_file_bytes
        if most is not None and sum(file.size for file in files) > most:
            raise ServiceError(
                ErrorCode.MESSAGE_TOO_LONG, f"the files are larger than one model request may carry ({most} bytes)"
            )

    async def _earlier_answer(self, session_id: str, client_message_id: str) -> MessageAccepted | None:
        """The answer to the first `message` with this client_message_id, if there was one."""
        retried = self._running_with(session_id, client_message_id)
        if retried is not None:
            return await asyncio.shield(retried.accepted)
        try:
            earlier = await self._store.find(session_id, user_message_key("", client_message_id))
        except StorageUnavailable:
            raise storage_unavailable() from None
        if earlier is None or earlier.turn_id is None:
            return None
        return MessageAccepted(turn_id=earlier.turn_id, event_id=getattr(earlier, "event_id", None))

    async def _take_quota(self, connection: str, user: str | None) -> None:
        """Count the message against the socket's and the user's limits, or refuse it."""
        if not self._rate.try_take(connection):
            raise ServiceError(ErrorCode.RATE_LIMITED, "too many messages; wait a little")
        if user is None:
            return
        try:
            allowed = await self._user_quota.take(user)
        except Exception as exc:
            self._rate.give_back(connection)
            raise shared_state_unavailable(exc) from None
        if not allowed:
            self._rate.give_back(connection)
            raise ServiceError(ErrorCode.RATE_LIMITED, "too many messages from this user; wait a little")

    async def _give_back_quota(self, connection: str, user: str | None) -> None:
        self._rate.give_back(connection)
        if user is not None:
            try:
                await self._user_quota.give_back(user)
            except Exception as exc:
                log.warning("cannot give back a refused message's place in the user's limit: %r", exc)

    async def _files_of(self, session_id: str, attachment_ids: Sequence[str]) -> tuple[AttachmentRef, ...]:
        """The files a message names, each an upload of its session (else `invalid_payload`)."""
        if not attachment_ids:
            return ()
        try:
            found = await self._repo.session_attachments(session_id, attachment_ids)
        except StorageUnavailable:
            raise ServiceError(ErrorCode.UNAVAILABLE, "storage cannot give the files now; retrying is safe") from None
        if len(found) != len(attachment_ids):
            raise ServiceError(ErrorCode.INVALID_PAYLOAD, "attachments: each must be a file uploaded to this session")
        return tuple(
            AttachmentRef(attachment_id=f.attachment_id, name=f.name, mime_type=f.mime_type, size=f.size) for f in found
        )

    async def _start_turn(
        self,
        session_id: str,
        text: str,
        client_message_id: str | None,
        received_at: float,
        files: tuple[AttachmentRef, ...] = (),
        trace: TraceParent | None = None,
    ) -> tuple[MessageAccepted, bool]:
        """The answer, and False when it is an earlier attempt's (a retry with the same client_message_id)."""
        turn = Turn(
            self._turn_context, session_id, text, client_message_id, received_at=received_at, files=files, trace=trace
        )
        try:
            return await turn.start(), True
        except TurnBusy:
            # A retry can race the first attempt to the lock: it gets the first one's answer.
            retried = self._running_with(session_id, client_message_id)
            if retried is not None:
                return await asyncio.shield(retried.accepted), False
            raise ServiceError(ErrorCode.BUSY, "a turn is already running in this session") from None

    def _running_with(self, session_id: str, client_message_id: str | None) -> Turn | None:
        """The session's running turn, when it was started by this client_message_id."""
        turn = self._turns.get(session_id)
        if client_message_id is None or turn is None or turn.client_message_id != client_message_id:
            return None
        return turn

    # ------------------------------------------------------------------ cancel, leave

    async def cancel(self, connection: str, session_id: str) -> str:
        session_id = self._joined_session(connection, session_id)
        here = self._turns.get(session_id)
        try:
            turn_id = await self._coordination.running_turn(session_id)
            if turn_id is None or (here is not None and here.turn_id == turn_id and here.stop_reason):
                raise ServiceError(ErrorCode.NO_ACTIVE_TURN, "no turn is running in this session")
            if here is not None and here.turn_id == turn_id:
                here.stop("cancelled")  # here: at once, without a round trip
            else:
                await self._coordination.request_cancel(session_id, turn_id)
        except ServiceError:
            raise
        except Exception as exc:
            raise shared_state_unavailable(exc) from None
        return turn_id

    async def approve_tool(
        self, connection: str, session_id: str, call_id: str, approved: bool, reason: str | None
    ) -> None:
        """Decide a call waiting for approval, for the whole cluster: the first decision wins."""
        session_id = self._joined_session(connection, session_id)
        here = self._turns.get(session_id)
        if here is not None and here.stop_reason is not None:  # its calls are being answered `cancelled`
            raise ServiceError(ErrorCode.NO_PENDING_APPROVAL, "no call with this call_id waits for approval")
        decision = Approval(approved=approved, reason=(reason or "").strip() or None)
        try:
            won = await self._coordination.decide(session_id, call_id, decision)
        except Exception as exc:
            raise shared_state_unavailable(exc) from None
        if not won:
            raise ServiceError(ErrorCode.NO_PENDING_APPROVAL, "no call with this call_id waits for approval")

    async def leave(self, connection: str, session_id: str) -> None:
        session_id = parse_session_id(session_id)
        joined = self._joined.get(connection)
        if joined is None or session_id not in joined:
            return
        joined.discard(session_id)
        if not joined:
            del self._joined[connection]
        await self._emitter.remove_member(connection, session_id)
        try:
            clients = await self._coordination.remove_member(session_id, connection)
        except Exception as exc:
            # The socket is out of the room; the shared count catches up when it can (see coordination).
            log.warning("cannot count %s out of session %s: %r", connection, session_id, exc)
            return
        if clients is None:
            return
        await self._emitter.publish(session_id, PresenceEvent(session_id=session_id, clients=clients))
        if clients == 0:
            self.summaries.session_emptied(session_id, utc_now())

    async def disconnect(self, connection: str) -> None:
        for session_id in list(self._joined.get(connection, ())):
            await self.leave(connection, session_id)
        self._joined.pop(connection, None)  # also the empty entry of a socket whose joins were all refused
        self._rate.forget(connection)

    async def disconnect_all(self) -> None:
        """Shutdown: count out every connection still known, so emptied sessions get summarised."""
        for connection in list(self._joined):
            await self.disconnect(connection)

    def _joined_session(self, connection: str, session_id: str) -> str:
        session_id = parse_session_id(session_id)
        if session_id not in self._joined.get(connection, ()):
            if session_id in self._deleted:
                raise session_deleted()
            raise ServiceError(ErrorCode.NOT_JOINED, "join the session first")
        return session_id

    # ------------------------------------------------------------------ deletion

    async def end_deleted(self, session_id: str) -> None:
        """The session was just deleted in storage: its running turn, here or on another process,
        is cancelled, and this returns once it has ended (its `done` sent), or after a while."""
        here = self._turns.get(session_id)
        if here is not None:
            here.stop("cancelled")  # at once, whatever the shared state can answer
        try:
            async with asyncio.timeout(DELETE_TURN_WAIT_SECONDS):
                turn_id = await self._coordination.running_turn(session_id)
                if turn_id is not None and (here is None or here.turn_id != turn_id):
                    await self._coordination.request_cancel(session_id, turn_id)
                await self.wait_turn_end(session_id)
        except Exception as exc:  # the deletion stands; storage refuses what that turn still writes
            log.warning("deleted session %s: its turn did not end in time (%r)", session_id, exc)
            if here is not None and here.ended is not None:  # its `done` goes before `session_deleted`
                await asyncio.wait([here.ended], timeout=DELETE_TURN_WAIT_SECONDS)

    async def require_shared_state(self) -> None:
        """`unavailable` when the shared state cannot be reached (a request that needs it changes nothing)."""
        try:
            await self._coordination.ping()
        except Exception as exc:
            raise shared_state_unavailable(exc) from None

    async def session_deleted(self, session_id: str) -> None:
        """On every process that hears it: forget the session (its rooms are emptied by the hub),
        and drop what waits to be written of it."""
        self._remember_deleted(session_id)
        for connection in [c for c, sessions in self._joined.items() if session_id in sessions]:
            await self._leave_deleted(connection, session_id)
        self.summaries.session_deleted(session_id)
        self.titles.session_deleted(session_id)
        self.compaction.session_deleted(session_id)
        self._history.forget(session_id)
        await self._store.discard(session_id)

    def _remember_deleted(self, session_id: str) -> None:
        self._deleted.remember(session_id, None)

    def _turn_finished(self, session_id: str, finish_reason: FinishReason) -> None:
        self.titles.turn_finished(session_id, finish_reason)
        self.compaction.turn_finished(session_id)

    # ------------------------------------------------------------------ what a room missed

    async def missed_events(self, session_id: str, after_event_id: int) -> list[Missed]:
        """The session's stored events after `after_event_id`, as the live events they were."""
        try:
            rows = await self._repo.list_events(session_id, after_event_id)
        except StorageUnavailable:
            raise storage_unavailable() from None
        return [missed for row in rows for missed in as_live(row)]

    async def session_state(self, session_id: str) -> Session | None:
        try:
            return await self._repo.get_session(session_id)
        except StorageUnavailable:
            raise storage_unavailable() from None

    async def presence(self, session_id: str) -> PresenceEvent:
        """The session's presence now. This process's members are counted in again first: shared
        state that was away may have counted them out (their process's heartbeat lapsed)."""
        for connection, sessions in list(self._joined.items()):
            if session_id in sessions:
                await self._coordination.add_member(session_id, connection)
        return PresenceEvent(session_id=session_id, clients=await self._coordination.member_count(session_id))

    # ------------------------------------------------------------------ turns of other processes

    def _running_text(self, session_id: str) -> ActiveTurn | None:
        turn = self._turns.get(session_id)
        return turn.snapshot() if turn is not None else None

    async def _decision_here(self, session_id: str, turn_id: str, call_id: str, approval: Approval) -> None:
        turn = self._turns.get(session_id)
        if turn is not None:
            turn.approvals.decided(turn_id, call_id, approval)

    async def _cancel_here(self, session_id: str, turn_id: str) -> None:
        turn = self._turns.get(session_id)
        if turn is not None and turn.turn_id == turn_id:
            turn.stop("cancelled")

    async def _turn_lost(self, session_id: str, turn_id: str, ended_elsewhere: bool) -> None:
        """The turn's session lock expired and may be another's now: two turns must not run at once."""
        turn = self._turns.get(session_id)
        if turn is not None and turn.turn_id == turn_id:
            if ended_elsewhere:
                log.warning(
                    "turn %s of session %s was ended by another process, which took this one for dead",
                    turn_id,
                    session_id,
                )
                turn.stop("ended_elsewhere")
                return
            log.error("turn %s of session %s lost its session lock: it is stopped", turn_id, session_id)
            turn.stop("lock_lost")

    async def _end_orphaned(self, session_id: str, turn_id: str, text: str) -> None:
        await self._ender.end_interrupted(session_id, turn_id, text)

    async def _end_cut_off_turns(self) -> None:
        """A turn storage still has open when this process starts alone was cut off when the service
        last stopped, so it is ended as interrupted, once the events an earlier run queued locally
        are written. (With other processes alive, the coordination hands over the turns of those
        that die; this also covers a shared state that lost what it knew.)"""
        try:
            alone = await self._coordination.alone()
        except Exception as exc:
            log.warning("cannot tell whether other processes serve (%s): no sweep of cut-off turns", exc)
            alone = False
        if not alone:
            self._recovered.set()
            return
        backoff = 0.5
        after: str | None = None
        logged = False
        while True:
            try:
                await self._store.drained()
                cut_off = await self._repo.open_turns(after, OPEN_TURNS_PAGE)
                for session_id, turn_id in cut_off:
                    await self._end_cut_off(session_id, turn_id)
                    after = session_id
                if len(cut_off) < OPEN_TURNS_PAGE:
                    break
            except StorageUnavailable as exc:
                if not logged:  # storage's own lines say when it is back
                    log.warning("cannot end the turns cut off by the last stop yet (%s); retried", type(exc).__name__)
                    logged = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            except StorageRefused as exc:  # the schema lacks what it needs: the operator's to fix
                log.warning("cannot end the turns cut off by the last stop: %s", exc)
                break
            except Exception:
                log.exception("ending the turns cut off by the last stop failed")  # a bug: serve anyway
                break
        self._recovered.set()

    async def _end_cut_off(self, session_id: str, turn_id: str) -> None:
        # Under the session's lock: a turn that holds it is running (another process started
        # meanwhile), or being ended already.
        if not await self._coordination.acquire_turn(session_id, turn_id):
            return
        try:
            if await self._coordination.turn_ending(session_id, turn_id):  # its `done` is sent once
                await self._ender.end_interrupted(session_id, turn_id, "")
        finally:
            await self._coordination.release_turn(session_id, turn_id)

    async def _wait_recovered(self) -> None:
        if self._recovered.is_set():
            return
        try:
            await asyncio.wait_for(self._recovered.wait(), self._limits.done_store_wait_seconds)
        except TimeoutError:
            raise ServiceError(
                ErrorCode.UNAVAILABLE, "the server is still ending turns cut off by its last stop; retry"
            ) from None

    async def wait_turn_end(self, session_id: str) -> None:
        """Return once no turn runs in the session (here or, with shared coordination, anywhere)."""
        while True:
            turn = self._turns.get(session_id)
            if turn is not None and turn.ended is not None:
                await asyncio.wait([turn.ended])
                continue
            if await self._coordination.running_turn(session_id) is None:
                return
            await asyncio.sleep(0.2)

    # ------------------------------------------------------------------ lifecycle

    @property
    def storage_outage(self) -> bool:
        return self._store.outage

    @property
    def queued_events(self) -> int:
        return self._store.queued

    async def close_storage(self) -> None:
        """Shutdown: write what the local queue holds if storage takes it; the rest stays on disk."""
        await self._store.close()

    async def shutdown(self, grace_seconds: float) -> None:
        """End every running turn with `done` (shutdown) and start the pending summaries."""
        self._turns.closing = True
        self.compaction.closing = True
        if self._sweep is not None:
            self._sweep.cancel()
        ending = []
        for turn in self._turns:
            turn.stop("shutdown")
            if turn.ended is not None:
                ending.append(turn.ended)
        if ending:
            await asyncio.wait(ending, timeout=grace_seconds)
        self.summaries.hurry()
