"""Compaction: once a session's history that no summary covers passes half the context budget
beyond the newest quarter (which always stays verbatim), its older turns are summarised,
extending the summary stored with the session, in the background, by one process at a time. So
a compaction takes at least half a budget of new history, and a turn then sends the summary (at
most a quarter of the budget), then the newest turns verbatim."""

from __future__ import annotations

import asyncio
import logging

from server.core.context import ContextBudget, newest_turns, tokens_of
from server.core.errors import TurnErrorCode
from server.core.event_store import HistoryEvent
from server.core.models import EventType, Session, StoredEvent
from server.core.ports import (
    JobClaims,
    Metrics,
    ModelProvider,
    ProviderError,
    Repository,
    StorageUnavailable,
    failure_reason,
)
from server.core.recent import Recent
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
        self._known: Recent[str, tuple[str | None, int]] = Recent(KNOWN_SESSIONS)  # session -> (summary, upto)
        self._pending: dict[str, asyncio.Task[None]] = {}
        self.closing = False

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
        self._known.remember(session_id, state)
        return state

    def seen(self, session: Session) -> None:
        """The session as a join just read it: a turn that follows need not read it again. (A
        summary this process stored while that read ran is newer: it stays.)"""
        known = self._known.get(session.session_id)
        if known is None or (session.context_upto or 0) >= known[1]:
            self._known.remember(session.session_id, (session.context_summary, session.context_upto or 0))

    def turn_finished(self, session_id: str) -> None:
        if self.closing:
            return  # shutting down: what is due is made after the next turn
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
        sizes = [tokens_of(conversation_from_events(turn)) for turn in turns]
        budget = self._budget.max_tokens
        if sum(sizes) <= budget // 2 + budget // 4 and not page.more:
            return
        chosen = _oldest_to_summarise(turns, sizes, verbatim=budget // 4, request=budget - budget // 4)
        if not chosen:
            return
        try:
            if not await self._claims.claim_job("compaction", session_id, CLAIM_SECONDS):
                return  # another process compacts it now
        except Exception as exc:  # the shared state is away: compaction waits for it
            log.warning("cannot claim session %s's compaction now (%s)", session_id, type(exc).__name__)
            return
        try:
            await self._compact(session_id, summary, upto, chosen)
        finally:
            await self._release(session_id)

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
            reason = failure_reason(exc)
            log.warning("compaction of session %s failed (%s); turns send what fits meanwhile", session_id, reason)
            return
        self._metrics.provider_request("ok")
        # At most a quarter of the budget (its newest part: what a digest appends, a summary ends with).
        extended = extended[-self._budget.max_tokens :]
        try:
            stored = await self._repo.write_context_summary(session_id, extended, last.event_id, upto or None)
        except StorageUnavailable as exc:
            self._metrics.compaction_made(ok=False)
            log.warning("cannot store session %s's compaction (%s); made again later", session_id, exc)
            return
        self._metrics.compaction_made(ok=stored)
        if stored:
            self._known.remember(session_id, (extended, last.event_id))
            log.info("compacted session %s up to event %d (%d turns)", session_id, last.event_id, len(turns))
        else:
            self._known.pop(session_id, None)  # another process wrote one meanwhile: read it next time

    async def _release(self, session_id: str) -> None:
        try:
            await self._claims.release_job("compaction", session_id)
        except Exception as exc:  # it expires by itself
            log.debug("cannot release the compaction claim of %s: %r", session_id, exc)

    def _forget_task(self, session_id: str, task: asyncio.Task[None]) -> None:
        if self._pending.get(session_id) is task:
            del self._pending[session_id]


def _complete_turns(events: list[StoredEvent], upto: int) -> list[list[HistoryEvent]]:
    """The page's turns, oldest first, but the newest when it has no answer yet (still running). An
    older one without its answer (cut off long ago) is as complete as it will ever be."""
    turns = list(newest_turns(events, upto))
    turns.reverse()
    if turns and not any(event.event_type is EventType.AI_MESSAGE for event in turns[-1]):
        turns.pop()
    return turns


def _oldest_to_summarise(
    turns: list[list[HistoryEvent]], sizes: list[int], *, verbatim: int, request: int
) -> list[list[HistoryEvent]]:
    """The oldest turns, leaving the newest ones worth `verbatim` tokens (at least the newest turn)
    unsummarised, and no more than one request of `request` tokens can carry (at least one turn)."""
    kept, total = len(turns), 0
    while kept > 1 and total + sizes[kept - 1] <= verbatim:
        kept -= 1
        total += sizes[kept]
    kept = min(kept, len(turns) - 1)  # the newest turn always stays verbatim
    chosen: list[list[HistoryEvent]] = []
    carried = 0
    for turn, size in zip(turns[:kept], sizes[:kept], strict=True):
        if chosen and carried + size > request:
            break
        chosen.append(turn)
        carried += size
    return chosen
