"""The summary job: after the last client leaves and a grace period passes, summarise once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from tenacity import AsyncRetrying, RetryCallState, wait_exponential

from server.core.context import SUMMARY_INTRO, newest_that_fit, tokens_of
from server.core.models import Session, utc_now
from server.core.ports import (
    ConversationItem,
    Coordination,
    Metrics,
    ModelProvider,
    ProviderError,
    Repository,
    StorageUnavailable,
    UserText,
    failure_reason,
)
from server.core.tasks import TaskTracker
from server.core.writer import OrderedWriter

log = logging.getLogger(__name__)
EMPTY_SESSION_SUMMARY = "No messages were exchanged in this session."
MAX_RETRY_SECONDS = 3600.0
RESCAN_SECONDS = 300.0
RESCAN_BATCH = 100
SUMMARY_EVENTS = 1000  # the newest events a summary reads (what fits of them goes to the model)


class _Rejoined(Exception):
    """The session was joined again while its summary waited to retry: the next emptying summarises it."""


@dataclass
class _Pending:
    task: asyncio.Task[None]
    # A rejoin cancels the job only while it waits; once it summarises it finishes.
    waiting: bool = True


class SummaryScheduler:
    def __init__(
        self,
        *,
        repo: Repository,
        provider: ModelProvider,
        coordination: Coordination,
        writer: OrderedWriter,
        tasks: TaskTracker,
        delay_seconds: float,
        retry_seconds: float,
        wait_turn_end: Callable[[str], Awaitable[None]],
        metrics: Metrics,
        context_tokens: int = 32_000,
    ) -> None:
        self._metrics = metrics
        self._context_tokens = context_tokens
        self._repo = repo
        self._provider = provider
        self._coordination = coordination
        self._writer = writer
        self._tasks = tasks
        self._delay = delay_seconds
        self._retry_seconds = retry_seconds
        self._wait_turn_end = wait_turn_end
        self._pending: dict[str, _Pending] = {}
        self._hurry = asyncio.Event()

    def session_emptied(self, session_id: str, emptied_at: datetime) -> None:
        self.session_joined(session_id)
        self._schedule(session_id, emptied_at, self._delay, mark=True)

    def _schedule(self, session_id: str, emptied_at: datetime, delay: float, *, mark: bool) -> None:
        task = self._tasks.spawn(
            self._summarise_later(session_id, emptied_at, delay, mark=mark), name=f"summary {session_id}"
        )
        self._pending[session_id] = _Pending(task)

    def start(self) -> None:
        """Pick up the summaries still due in storage: failed earlier, or left by a stopped process."""
        self._tasks.spawn(self._rescan_forever(), name="due summaries")

    async def _rescan_forever(self) -> None:
        while not self._hurry.is_set():
            try:
                # A recent mark belongs to a job still in its grace period somewhere: leave it be.
                settled = utc_now() - timedelta(seconds=self._delay + 1)
                for session_id, emptied_at in await self._repo.due_summaries(RESCAN_BATCH):
                    if session_id not in self._pending and emptied_at <= settled:
                        self._schedule(session_id, emptied_at, 0.0, mark=False)
            except StorageUnavailable as exc:
                log.warning("cannot list the summaries still due: %s", exc)
            except Exception:
                # Whatever went wrong, the next rescan may succeed: stopping would leave them undone.
                log.exception("listing the summaries still due failed; trying again in %.0f s", RESCAN_SECONDS)
            await self._pause(RESCAN_SECONDS)

    def session_joined(self, session_id: str) -> None:
        pending = self._pending.get(session_id)
        if pending is not None and pending.waiting:
            pending.task.cancel()
            del self._pending[session_id]

    def session_deleted(self, session_id: str) -> None:
        """Drop its summary, waiting or under way: nothing of a deleted session is written."""
        pending = self._pending.pop(session_id, None)
        if pending is not None:
            pending.task.cancel()

    def hurry(self) -> None:
        """Shutdown: skip the grace period of every waiting job."""
        self._hurry.set()

    async def _summarise_later(self, session_id: str, emptied_at: datetime, delay: float, *, mark: bool) -> None:
        try:
            if mark:
                try:
                    await self._repo.mark_emptied(session_id, emptied_at)
                except StorageUnavailable as exc:
                    log.warning(
                        "cannot note session %s as ended (%s); its summary writes that, made from memory",
                        session_id,
                        exc,
                    )
            await self._pause(delay)
            await self._wait_turn_end(session_id)
            if await self._coordination.member_count(session_id) > 0:
                return
            self._set_waiting(session_id, False)
            if not await self._coordination.claim_summary(session_id, emptied_at):
                return
            await self._summarise_until_done(session_id, emptied_at)
        finally:
            current = self._pending.get(session_id)
            if current is not None and current.task is asyncio.current_task():
                del self._pending[session_id]

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._hurry.wait(), seconds)

    def _set_waiting(self, session_id: str, waiting: bool) -> None:
        pending = self._pending.get(session_id)
        if pending is not None and pending.task is asyncio.current_task():
            pending.waiting = waiting

    async def _summarise_until_done(self, session_id: str, emptied_at: datetime) -> None:
        """Summarise, and after a failure try again later (backing off), never dropping it silently."""
        retrying = AsyncRetrying(
            wait=wait_exponential(multiplier=self._retry_seconds, max=MAX_RETRY_SECONDS),
            stop=lambda _: self._hurry.is_set(),
            before_sleep=lambda retry: self._log_failure(session_id, retry),
            sleep=lambda seconds: self._wait_to_retry(session_id, seconds),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._summarise_counted(session_id, emptied_at)
        except _Rejoined:
            return
        except Exception as exc:
            if not self._hurry.is_set():
                raise
            log.warning(
                "summary of session %s failed (%s) while the server stops; "
                "it stays due in storage and is made after the next start",
                session_id,
                failure_reason(exc),
            )

    async def _summarise_counted(self, session_id: str, emptied_at: datetime) -> None:
        try:
            await self._summarise(session_id, emptied_at)
        except Exception:
            self._metrics.summary_made(ok=False)
            raise

    def _log_failure(self, session_id: str, retry: RetryCallState) -> None:
        exc = retry.outcome.exception() if retry.outcome is not None else None
        log.warning(
            "summary of session %s failed (attempt %d, %s); trying again in %.1f s",
            session_id,
            retry.attempt_number,
            failure_reason(exc),
            retry.next_action.sleep if retry.next_action is not None else 0.0,
            exc_info=exc if not isinstance(exc, ProviderError | StorageUnavailable) else None,
        )

    async def _wait_to_retry(self, session_id: str, seconds: float) -> None:
        # While it waits to retry, a rejoin cancels it: the next emptying summarises anyway.
        self._set_waiting(session_id, True)
        await self._pause(seconds)
        self._set_waiting(session_id, False)
        if await self._coordination.member_count(session_id) > 0:
            raise _Rejoined

    async def _summarise(self, session_id: str, emptied_at: datetime) -> None:
        await self._writer.require_stored(session_id)  # else: retried once the queue is written
        session = await self._repo.get_session(session_id)
        if session is None or session.deleted:
            return
        conversation = await self._conversation(session)
        # Nothing to summarise is not worth a model call.
        summary = await self._model_summary(conversation) if conversation else EMPTY_SESSION_SUMMARY
        if await self._coordination.member_count(session_id) > 0:
            log.info("session %s was rejoined while being summarised; its next emptying summarises it", session_id)
            return
        duration = max(0, round((emptied_at - session.start_time).total_seconds()))
        await self._repo.write_summary(session_id, summary, emptied_at, duration)
        self._metrics.summary_made(ok=True)
        log.info("summarised session %s (%d items, %d s)", session_id, len(conversation), duration)

    async def _conversation(self, session: Session) -> list[ConversationItem]:
        """What the summary is made of, within the context budget however long the session: its
        compaction summary, then the newest whole turns after it that fit."""
        upto = session.context_upto or 0
        page = await self._repo.page_events(session.session_id, limit=SUMMARY_EVENTS)
        earlier: list[ConversationItem] = (
            [UserText(SUMMARY_INTRO + session.context_summary)] if session.context_summary else []
        )
        room = self._context_tokens - tokens_of(earlier)
        turns, _, _ = newest_that_fit(page.events, upto, room)
        return [*earlier, *(item for turn in turns for item in turn)]

    async def _model_summary(self, conversation: list[ConversationItem]) -> str:
        try:
            summary = await self._provider.summarise(conversation)
        except Exception:
            self._metrics.provider_request("error")
            raise
        self._metrics.provider_request("ok")
        return summary
