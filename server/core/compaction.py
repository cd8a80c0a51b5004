"""Compaction: once a session's history that no summary covers passes half the context budget, its
oldest turns are summarised (extending the summary stored with the session), in the background,
by one process at a time. A turn then sends that summary and the turns after it."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from server.core.context import ContextBudget, newest_turns, tokens_of
from server.core.errors import TurnErrorCode
from server.core.event_store import HistoryEvent
from server.core.models import EventType, Session, StoredEvent
from server.core.ports import JobClaims, Metrics, ModelProvider, ProviderError, Repository, StorageUnavailable
from server.core.replay import conversation_from_events
from server.core.tasks import TaskTracker

log = logging.getLogger(__name__)

COMPACTION_EVENTS = 2000  # the most events one compaction reads (a long backlog takes several)
CLAIM_SECONDS = 300.0
KNOWN_SESSIONS = 10_000


class Compactor:
    def __init__(
        self,
        repo: Repository,
        provider: ModelProvider,
        claims: JobClaims,
        tasks: TaskTracker,
        metrics: Metrics,
        budget: ContextBudget,
        *,
        sole_writer: bool,
    ) -> None:
        self._repo = repo
        self._provider = provider
        self._claims = claims
        self._tasks = tasks
        self._metrics = metrics
        self._budget = budget
        # Only this process compacts (and writes) its sessions: what it knows of one is current.
        self._sole_writer = sole_writer
        self._known: OrderedDict[str, tuple[str | None, int]] = OrderedDict()  # session -> (summary, upto)
        self._pending: dict[str, asyncio.Task[None]] = {}

    async def current(self, session_id: str) -> tuple[str | None, int]:
        """The session's summary and the last event it covers (0: none), as a turn starts."""
        known = self._known.get(session_id)
        if known is not None and self._sole_writer:
            return known
        try:
            session = await self._repo.get_session(session_id)
        except StorageUnavailable:
            return known or (None, 0)  # the turn runs on what fits; compaction waits for storage
        state = (session.context_summary, session.context_upto or 0) if session is not None else (None, 0)
        self._remember(session_id, state)
        return state

    def seen(self, session: Session) -> None:
        """The session as a join just read it: a turn that follows need not read it again."""
        self._remember(session.session_id, (session.context_summary, session.context_upto or 0))

    def turn_finished(self, session_id: str) -> None:
        if session_id not in self._pending:
            task = self._tasks.spawn(self._compact_if_due(session_id), name=f"compaction {session_id}")
            self._pending[session_id] = task
            task.add_done_callback(lambda done: self._forget_task(session_id, done))

    def session_deleted(self, session_id: str) -> None:
        task = self._pending.pop(session_id, None)
        if task is not None:
            task.cancel()
        self._known.pop(session_id, None)

    async def _compact_if_due(self, session_id: str) -> None:
        try:
            summary, upto = await self.current(session_id)
            page = await self._repo.page_events(session_id, after=upto, limit=COMPACTION_EVENTS)
        except StorageUnavailable as exc:
            log.warning("cannot check session %s for compaction now (%s)", session_id, type(exc).__name__)
            return
        turns = _complete_turns(page.events, upto)
        uncovered = sum(tokens_of(conversation_from_events(turn)) for turn in turns)
        if not turns or (uncovered <= self._budget.max_tokens // 2 and not page.more):
            return
        if not await self._claims.claim_job("compaction", session_id, CLAIM_SECONDS):
            return  # another process compacts it now
        try:
            await self._compact(session_id, summary, upto, self._oldest_within_budget(turns))
        finally:
            await asyncio.shield(self._release(session_id))

    def _oldest_within_budget(self, turns: list[list[HistoryEvent]]) -> list[list[HistoryEvent]]:
        """The oldest uncovered turns whose text fits one request (at least one turn)."""
        chosen: list[list[HistoryEvent]] = []
        total = 0
        for turn in turns:
            tokens = tokens_of(conversation_from_events(turn))
            if chosen and total + tokens > self._budget.max_tokens:
                break
            chosen.append(turn)
            total += tokens
        return chosen

    async def _compact(self, session_id: str, summary: str | None, upto: int, turns: list[list[HistoryEvent]]) -> None:
        conversation = conversation_from_events(event for turn in turns for event in turn)
        last = turns[-1][-1]
        assert isinstance(last, StoredEvent)
        try:
            extended = (await self._provider.compact(summary, conversation)).strip()
            if not extended:
                raise ProviderError(TurnErrorCode.PROVIDER_ERROR, "the model gave an empty summary")
        except Exception as exc:
            self._metrics.provider_request("error")
            self._metrics.compaction_made(ok=False)
            reason = f"{exc.code}: {exc.cause()}" if isinstance(exc, ProviderError) else type(exc).__name__
            log.warning("compaction of session %s failed (%s); turns send what fits meanwhile", session_id, reason)
            return
        self._metrics.provider_request("ok")
        # At most a quarter of the budget: the summary must leave room for the turns it precedes.
        extended = extended[: self._budget.max_tokens]
        try:
            stored = await self._repo.write_context_summary(session_id, extended, last.event_id, upto or None)
        except StorageUnavailable as exc:
            self._metrics.compaction_made(ok=False)
            log.warning("cannot store session %s's compaction (%s); made again later", session_id, exc)
            return
        self._metrics.compaction_made(ok=stored)
        if stored:
            self._remember(session_id, (extended, last.event_id))
            log.info("compacted session %s up to event %d (%d turns)", session_id, last.event_id, len(turns))
        else:
            self._known.pop(session_id, None)  # another process wrote one meanwhile: read it next time

    async def _release(self, session_id: str) -> None:
        try:
            await self._claims.release_job("compaction", session_id)
        except Exception as exc:  # it expires by itself
            log.debug("cannot release the compaction claim of %s: %r", session_id, exc)

    def _remember(self, session_id: str, state: tuple[str | None, int]) -> None:
        self._known[session_id] = state
        self._known.move_to_end(session_id)
        while len(self._known) > KNOWN_SESSIONS:
            self._known.popitem(last=False)

    def _forget_task(self, session_id: str, task: asyncio.Task[None]) -> None:
        if self._pending.get(session_id) is task:
            del self._pending[session_id]


def _complete_turns(events: list[StoredEvent], upto: int) -> list[list[HistoryEvent]]:
    """The page's turns that have their answer, oldest first (a turn still running is not summarised)."""
    turns = list(newest_turns(events, upto))
    turns.reverse()
    complete = []
    for turn in turns:
        if not any(event.event_type is EventType.AI_MESSAGE for event in turn):
            break
        complete.append(turn)
    return complete
