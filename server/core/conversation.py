"""The conversation core: sessions, turns, presence. It knows nothing of Socket.IO or any vendor."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

from server.core.errors import ErrorCode, ServiceError
from server.core.event_log import EventLog, HistoryEvent
from server.core.models import (
    ActiveTurn,
    EventDraft,
    EventType,
    PresenceEvent,
    Session,
    StoredEvent,
    UserMessageEvent,
    utc_now,
)
from server.core.ports import (
    Coordination,
    Emitter,
    MessageQuota,
    ModelProvider,
    Outbox,
    Repository,
    StorageUnavailable,
)
from server.core.rate_limit import LocalQuota, RateLimiter
from server.core.summaries import SummaryScheduler
from server.core.tasks import TaskTracker
from server.core.turns import TurnRunner
from server.tools.registry import ToolRegistry

log = logging.getLogger(__name__)

StopReason = Literal["cancelled", "shutdown", "lock_lost"]


@dataclass(frozen=True)
class Limits:
    max_message_chars: int = 8000
    messages_per_minute: int = 30
    max_tool_rounds: int = 5
    max_sessions_per_member: int = 20
    tool_timeout_seconds: float = 30.0
    # How long `done` waits for storage to confirm the AI message before sending event_id null.
    done_store_wait_seconds: float = 2.0
    # Text deltas arriving within this window go out as one chunk (0: every delta is a chunk).
    chunk_coalesce_seconds: float = 0.0
    chunk_timestamps: bool = False


@dataclass(frozen=True)
class MessageAccepted:
    turn_id: str
    event_id: int | None


@dataclass(frozen=True)
class JoinResult:
    session: Session
    history: list[StoredEvent]
    active_turn: ActiveTurn | None


@dataclass(eq=False)
class RunningTurn:
    """A turn running in this process."""

    session_id: str
    turn_id: str
    client_message_id: str | None
    accepted: asyncio.Future[MessageAccepted]
    parts: list[str] = field(default_factory=list)
    stop_reason: StopReason | None = None
    generation: asyncio.Task[object] | None = None
    runner: asyncio.Task[None] | None = None
    # The user message, and the session's history read while it was being written.
    question: EventDraft | None = None
    history: asyncio.Task[list[HistoryEvent]] | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def stop(self, reason: StopReason) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.generation is not None:
            self.generation.cancel()


def _user_message_key(client_message_id: str) -> str:
    """The idempotency key of a user message that carries a client_message_id."""
    return f"user:cmid:{client_message_id}"


def _shared_state_unavailable(exc: Exception) -> ServiceError:
    log.warning("shared state unreachable: %r", exc)
    return ServiceError(ErrorCode.UNAVAILABLE, "the server's shared state is unreachable; retrying is safe")


def parse_session_id(value: str) -> str:
    """The canonical form of a session UUID, or `invalid_session_id`."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, TypeError, AttributeError):
        raise ServiceError(ErrorCode.INVALID_SESSION_ID, "session_id must be a UUID") from None


class ConversationService:
    def __init__(
        self,
        *,
        repo: Repository,
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
    ) -> None:
        self._repo = repo
        self._emitter = emitter
        self._coordination = coordination
        self._tasks = tasks
        self._limits = limits
        self._log = EventLog(repo, tasks, outbox, sole_writer=coordination.single_process)
        self._log.start()
        self._rate = RateLimiter(limits.messages_per_minute)
        self._user_quota = user_quota or LocalQuota(limits.messages_per_minute)
        self._joined: defaultdict[str, set[str]] = defaultdict(set)
        # Sessions a member's joins are still working on: they count against its cap already.
        self._joining: defaultdict[str, set[str]] = defaultdict(set)
        self._running: dict[str, RunningTurn] = {}
        self._closing = False
        self._runner = TurnRunner(
            provider=provider,
            tools=tools,
            emitter=emitter,
            coordination=coordination,
            event_log=self._log,
            limits=limits,
            tasks=tasks,
        )
        self.summaries = SummaryScheduler(
            repo=repo,
            provider=provider,
            coordination=coordination,
            event_log=self._log,
            tasks=tasks,
            delay_seconds=summary_delay_seconds,
            retry_seconds=summary_retry_seconds,
            wait_turn_end=self.wait_turn_end,
        )
        coordination.on_cancel(self._cancel_local)
        coordination.on_turn_lost(self._turn_lost)
        self.summaries.start()

    # ------------------------------------------------------------------ client requests

    async def join(
        self,
        member: str,
        session_id: str | None,
        user_id: str | None,
        after_event_id: int | None,
        *,
        owner: str | None = None,
    ) -> JoinResult:
        """`owner`: the authenticated user, who may only join sessions they created (or new ones)."""
        sid = parse_session_id(session_id) if session_id is not None else str(uuid.uuid4())
        if owner is not None:
            user_id = owner
        if not self._reserve_join(member, sid):
            await self._refuse_over_session_cap(sid, owner)
        try:
            return await self._join(member, sid, user_id, after_event_id, owner)
        finally:
            self._joining[member].discard(sid)
            if not self._joining[member]:
                del self._joining[member]
            if not self._joined.get(member, True):
                del self._joined[member]

    def _reserve_join(self, member: str, sid: str) -> bool:
        """Count the session against the member's cap now, before any await: joins sent at once are
        counted as if sent one after another. False when the cap is reached."""
        joined, joining = self._joined[member], self._joining[member]
        if sid in joined or sid in joining:
            return True
        if len(joined) + len(joining) >= self._limits.max_sessions_per_member:
            return False
        joining.add(sid)
        return True

    async def _join(
        self, member: str, sid: str, user_id: str | None, after_event_id: int | None, owner: str | None
    ) -> JoinResult:
        try:
            if self._log.outage:
                raise StorageUnavailable("storage is out; events wait in the local queue")
            session = await self._repo.ensure_session(sid, user_id, utc_now())
            if owner is not None and session.user_id != owner:
                raise ServiceError(ErrorCode.FORBIDDEN, "this session belongs to another user")
            # A history with gaps would mislead the tab: the session's queued events go first.
            await self._log.wait_stored(sid, within_seconds=self._limits.done_store_wait_seconds)
            history = await self._repo.list_events(sid, after_event_id)
            if after_event_id is None:
                self._log.note_history(sid, history)
        except StorageUnavailable:
            raise ServiceError(ErrorCode.UNAVAILABLE, "storage is unreachable; retrying is safe") from None

        newly = sid not in self._joined[member]
        if newly:
            self._joined[member].add(sid)
            await self._emitter.add_member(member, sid)
        try:
            clients = await self._coordination.add_member(sid, member)
            # Taken right after entering the room: every chunk is in this text or reaches the
            # socket live, and `next_index` tells the client which live chunks to drop.
            running = self._running.get(sid)
            if running is not None:
                active: ActiveTurn | None = ActiveTurn(
                    turn_id=running.turn_id, text=running.text, next_index=len(running.parts)
                )
            else:
                active = await self._coordination.turn_snapshot(sid)
        except Exception as exc:
            if newly:  # the join did not happen: undo it
                self._joined[member].discard(sid)
                await self._emitter.remove_member(member, sid)
            raise _shared_state_unavailable(exc) from None
        self.summaries.session_joined(sid)
        if clients is not None:
            await self._emitter.publish(sid, PresenceEvent(session_id=sid, clients=clients))
        return JoinResult(session=session, history=history, active_turn=active)

    async def _refuse_over_session_cap(self, sid: str, owner: str | None) -> None:
        # `forbidden` comes before `rate_limited`, and a refusal creates nothing: look, never create.
        if owner is not None:
            try:
                existing = await self._repo.get_session(sid)
            except StorageUnavailable:
                raise ServiceError(ErrorCode.UNAVAILABLE, "storage is unreachable; retrying is safe") from None
            if existing is not None and existing.user_id != owner:
                raise ServiceError(ErrorCode.FORBIDDEN, "this session belongs to another user")
        raise ServiceError(
            ErrorCode.RATE_LIMITED,
            f"this connection is in {self._limits.max_sessions_per_member} sessions already; leave one first",
        )

    async def send_message(
        self, member: str, session_id: str, text: str, client_message_id: str | None, *, user: str | None = None
    ) -> MessageAccepted:
        """`user`: the authenticated user, whose messages over all their connections are limited too."""
        sid = self._joined_session(member, session_id)
        if not text.strip():
            raise ServiceError(ErrorCode.EMPTY_MESSAGE, "text is empty")
        if len(text) > self._limits.max_message_chars:
            raise ServiceError(
                ErrorCode.MESSAGE_TOO_LONG, f"text is longer than {self._limits.max_message_chars} characters"
            )
        if client_message_id is not None:
            earlier = await self._earlier_answer(sid, client_message_id)
            if earlier is not None:
                return earlier
        await self._take_quota(member, user)
        try:
            accepted, started = await self._start_turn(sid, text, client_message_id)
        except BaseException:
            await self._give_back_quota(member, user)
            raise
        if not started:  # a retry answered like the first attempt: it does not count
            await self._give_back_quota(member, user)
        return accepted

    async def _take_quota(self, member: str, user: str | None) -> None:
        """Count the message against the socket's and the user's limits, or refuse it."""
        if not self._rate.try_take(member):
            raise ServiceError(ErrorCode.RATE_LIMITED, "too many messages; wait a little")
        if user is None:
            return
        try:
            allowed = await self._user_quota.take(user)
        except Exception as exc:
            self._rate.give_back(member)
            raise _shared_state_unavailable(exc) from None
        if not allowed:
            self._rate.give_back(member)
            raise ServiceError(ErrorCode.RATE_LIMITED, "too many messages from this user; wait a little")

    async def _give_back_quota(self, member: str, user: str | None) -> None:
        self._rate.give_back(member)
        if user is not None:
            try:
                await self._user_quota.give_back(user)
            except Exception as exc:
                log.warning("cannot give back a refused message's place in the user's limit: %r", exc)

    async def _start_turn(self, sid: str, text: str, client_message_id: str | None) -> tuple[MessageAccepted, bool]:
        """Take the session's turn lock and store the user message; the turn then runs on its own.
        The answer, and False when it is an earlier attempt's (a retry with the same client_message_id)."""
        turn_id = str(uuid.uuid4())
        try:
            acquired = await self._coordination.acquire_turn(sid, turn_id)
        except Exception as exc:
            # Refused rather than run without the lock: another process might run a turn too.
            raise _shared_state_unavailable(exc) from None
        if not acquired:
            # A retry can race the first attempt to the lock: it gets the first one's answer.
            retried = self._running_with(sid, client_message_id)
            if retried is not None:
                return await asyncio.shield(retried.accepted), False
            raise ServiceError(ErrorCode.BUSY, "a turn is already running in this session")
        if self._closing:
            await self._coordination.release_turn(sid, turn_id)
            raise ServiceError(ErrorCode.UNAVAILABLE, "the server is shutting down; retry on another")

        turn = RunningTurn(sid, turn_id, client_message_id, asyncio.get_running_loop().create_future())
        self._running[sid] = turn
        draft = EventDraft(
            session_id=sid,
            event_type=EventType.USER_MESSAGE,
            content=text,
            event_key=(
                _user_message_key(client_message_id) if client_message_id is not None else f"user:turn:{turn_id}"
            ),
            turn_id=turn_id,
            timestamp=utc_now(),
        )
        turn.question = draft
        # Read, and the model asked, while the message is written: their output waits for it.
        turn.history = self._tasks.spawn(self._log.history(sid), name=f"history {turn_id}")
        generation = self._runner.start(turn)
        try:
            stored = await self._log.append(draft)
        except BaseException as exc:
            # Whatever went wrong, the turn never started: free the session for the next message.
            turn.history.cancel()
            await self._runner.abandon(generation)
            del self._running[sid]
            await self._coordination.release_turn(sid, turn_id)
            error = ServiceError(ErrorCode.UNAVAILABLE, "storage cannot take the message now; nothing was stored")
            turn.accepted.set_exception(error)
            turn.accepted.exception()  # retrieved here; a concurrent retry re-raises it
            if isinstance(exc, StorageUnavailable):
                raise error from None
            raise

        event_id = stored.event_id if stored is not None else None  # None: waiting in the local queue
        accepted = MessageAccepted(turn_id=turn_id, event_id=event_id)
        turn.accepted.set_result(accepted)
        try:
            await self._emitter.publish(
                sid,
                UserMessageEvent(
                    session_id=sid,
                    turn_id=turn_id,
                    event_id=event_id,
                    text=text,
                    client_message_id=client_message_id,
                ),
            )
            await self._runner.release(turn, generation)
        finally:
            # The message is stored, so its turn runs (and ends in `done`) even if that emit failed.
            turn.runner = self._tasks.spawn(
                self._run(turn, self._runner.finish(turn, generation)), name=f"turn {turn_id}"
            )
        return accepted, True

    async def cancel(self, member: str, session_id: str) -> str:
        sid = self._joined_session(member, session_id)
        running = self._running.get(sid)
        try:
            turn_id = await self._coordination.running_turn(sid)
            if turn_id is None or (running is not None and running.turn_id == turn_id and running.stop_reason):
                raise ServiceError(ErrorCode.NO_ACTIVE_TURN, "no turn is running in this session")
            if running is not None and running.turn_id == turn_id:
                running.stop("cancelled")  # here: at once, without a round trip
            else:
                await self._coordination.request_cancel(sid, turn_id)
        except ServiceError:
            raise
        except Exception as exc:
            raise _shared_state_unavailable(exc) from None
        return turn_id

    async def leave(self, member: str, session_id: str) -> None:
        sid = parse_session_id(session_id)
        joined = self._joined.get(member)
        if joined is None or sid not in joined:
            return
        joined.discard(sid)
        if not joined:
            del self._joined[member]
        await self._emitter.remove_member(member, sid)
        try:
            clients = await self._coordination.remove_member(sid, member)
        except Exception as exc:
            # The socket is out of the room; the shared count catches up when it can (see coordination).
            log.warning("cannot count %s out of session %s: %r", member, sid, exc)
            return
        if clients is None:
            return
        await self._emitter.publish(sid, PresenceEvent(session_id=sid, clients=clients))
        if clients == 0:
            self.summaries.session_emptied(sid, utc_now())

    async def disconnect(self, member: str) -> None:
        for sid in list(self._joined.get(member, ())):
            await self.leave(member, sid)
        self._joined.pop(member, None)  # also the empty entry of a socket whose joins were all refused
        self._rate.forget(member)

    async def disconnect_all(self) -> None:
        """Shutdown: count out every member still known, so emptied sessions get summarised."""
        for member in list(self._joined):
            await self.disconnect(member)

    # ------------------------------------------------------------------ turns

    def _joined_session(self, member: str, session_id: str) -> str:
        sid = parse_session_id(session_id)
        if sid not in self._joined.get(member, ()):
            raise ServiceError(ErrorCode.NOT_JOINED, "join the session first")
        return sid

    def _running_with(self, sid: str, client_message_id: str | None) -> RunningTurn | None:
        """The session's running turn, when it was started by this client_message_id."""
        running = self._running.get(sid)
        if client_message_id is None or running is None or running.client_message_id != client_message_id:
            return None
        return running

    async def _earlier_answer(self, sid: str, client_message_id: str) -> MessageAccepted | None:
        """The answer to the first `message` with this client_message_id, if there was one."""
        retried = self._running_with(sid, client_message_id)
        if retried is not None:
            return await asyncio.shield(retried.accepted)
        try:
            earlier = await self._log.find(sid, _user_message_key(client_message_id))
        except StorageUnavailable:
            raise ServiceError(ErrorCode.UNAVAILABLE, "storage is unreachable; retrying is safe") from None
        if earlier is None or earlier.turn_id is None:
            return None
        return MessageAccepted(turn_id=earlier.turn_id, event_id=getattr(earlier, "event_id", None))

    async def _run(self, turn: RunningTurn, supervise: Coroutine[Any, Any, None]) -> None:
        try:
            await supervise
        finally:
            if self._running.get(turn.session_id) is turn:
                del self._running[turn.session_id]
            await self._coordination.release_turn(turn.session_id, turn.turn_id)

    async def _cancel_local(self, session_id: str, turn_id: str) -> None:
        turn = self._running.get(session_id)
        if turn is not None and turn.turn_id == turn_id:
            turn.stop("cancelled")

    async def _turn_lost(self, session_id: str, turn_id: str) -> None:
        """The turn's session lock expired and may be another's now: two turns must not run at once."""
        turn = self._running.get(session_id)
        if turn is not None and turn.turn_id == turn_id:
            log.error("turn %s of session %s lost its session lock: it is stopped", turn_id, session_id)
            turn.stop("lock_lost")

    async def wait_turn_end(self, session_id: str) -> None:
        """Return once no turn runs in the session (here or, with shared coordination, anywhere)."""
        while True:
            turn = self._running.get(session_id)
            if turn is not None and turn.runner is not None:
                await asyncio.wait([turn.runner])
                continue
            if await self._coordination.running_turn(session_id) is None:
                return
            await asyncio.sleep(0.2)

    # ------------------------------------------------------------------ lifecycle

    @property
    def storage_outage(self) -> bool:
        return self._log.outage

    @property
    def queued_events(self) -> int:
        return self._log.queued

    async def close_storage(self) -> None:
        """Shutdown: write what the local queue holds if storage takes it; the rest stays on disk."""
        await self._log.close()

    async def shutdown(self, grace_seconds: float) -> None:
        """End every running turn with `done` (shutdown) and start the pending summaries."""
        self._closing = True
        runners = []
        for turn in list(self._running.values()):
            turn.stop("shutdown")
            if turn.runner is not None:
                runners.append(turn.runner)
        if runners:
            await asyncio.wait(runners, timeout=grace_seconds)
        self.summaries.hurry()
