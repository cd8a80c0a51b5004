"""Where an event is written: storage, or while storage is out, the local durable queue (the
outbox), which a drainer writes back, oldest first, once storage answers again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from server.core.models import EventDraft, StoredEvent
from server.core.ports import Outbox, Repository, SessionDeleted, StorageUnavailable
from server.core.tasks import TaskTracker

log = logging.getLogger(__name__)

HistoryEvent = StoredEvent | EventDraft  # stored, or waiting in the outbox
DRAIN_BATCH = 100
FIRST_DRAIN_BACKOFF_SECONDS = 0.2
MAX_DRAIN_BACKOFF_SECONDS = 10.0


class EventStore:
    """Writes one event at a time; the order of a session's writes is the caller's (OrderedWriter).

    Without an outbox a write that fails raises. With one, a write storage cannot take within its
    retry budget goes to the outbox instead (and gives None), and so does every later write of that
    session until its queued events are written, so each session's events reach storage in order.
    """

    def __init__(self, repo: Repository, tasks: TaskTracker, outbox: Outbox | None = None) -> None:
        self._repo = repo
        self._tasks = tasks
        self._outbox = outbox
        self._outage = False
        self._stored: list[Callable[[StoredEvent], None]] = []
        self._wake = asyncio.Event()
        self._empty = asyncio.Event()  # set by the drainer while the outbox holds nothing
        self._closing = False
        self._drainer: asyncio.Task[None] | None = None

    @property
    def outage(self) -> bool:
        """Storage failed past its retry budget and has not taken the queue back yet."""
        return self._outage

    @property
    def queued(self) -> int:
        return self._outbox.depth if self._outbox is not None else 0

    def holds(self, session_id: str) -> bool:
        """Whether events of the session wait in the outbox (no I/O)."""
        return self._outbox is not None and self._outbox.holds(session_id)

    async def drained(self) -> None:
        """Return once the outbox holds nothing (what an earlier run queued is written)."""
        if self._outbox is not None:
            await self._empty.wait()

    def on_stored(self, handler: Callable[[StoredEvent], None]) -> None:
        """Call `handler` with every event this store writes to storage (the history cache's copy)."""
        self._stored.append(handler)

    def start(self) -> None:
        """Resume the outbox (events left by an earlier run are written first)."""
        if self._outbox is not None and self._drainer is None:
            if self._outbox.depth:
                log.warning("%d events wait in the local queue from an earlier run; writing them", self._outbox.depth)
            self._drainer = self._tasks.spawn(self._drain_forever(), name="outbox drainer")

    async def close(self) -> None:
        """Shutdown: one last pass over the queue; what storage will not take stays on disk."""
        self._closing = True
        self._wake.set()
        if self._drainer is not None:
            await asyncio.wait([self._drainer])

    # ------------------------------------------------------------------ writes and reads

    async def write(self, draft: EventDraft) -> StoredEvent | None:
        """The stored row, or None when the event waits in the outbox."""
        if self._outbox is None:
            return self._noted(await self._repo.append_event(draft))
        if self._outage or self._outbox.holds(draft.session_id):
            await self._enqueue(draft)
            return None
        try:
            return self._noted(await self._repo.append_event(draft))
        except StorageUnavailable as exc:
            self._enter_outage(exc)
            await self._enqueue(draft)
            return None

    async def discard(self, session_id: str) -> None:
        """The session was deleted: what waits of it in the outbox is never written."""
        if self._outbox is not None and self._outbox.holds(session_id):
            dropped = await self._outbox.discard(session_id)
            log.info("session %s was deleted: %d of its events waiting in the local queue dropped", session_id, dropped)

    async def waiting(self, session_id: str) -> list[EventDraft]:
        """The session's events in the outbox, oldest first."""
        return await self._outbox.waiting(session_id) if self._outbox is not None else []

    async def find(self, session_id: str, event_key: str) -> HistoryEvent | None:
        """The event with this key, stored or waiting; during an outage only the outbox is asked."""
        if self._outbox is not None:
            waiting = await self._outbox.find(session_id, event_key)
            if waiting is not None:
                return waiting
        if self._outage:
            return None
        try:
            return await self._repo.find_event(session_id, event_key)
        except StorageUnavailable as exc:
            if self._outbox is None:
                raise
            # Taken as "not seen": the write that follows goes to the queue at once. (A retry of a
            # message stored just before the outage is then stored once, but answered twice.)
            self._enter_outage(exc)
            return None

    def _noted(self, stored: StoredEvent) -> StoredEvent:
        for handler in self._stored:
            handler(stored)
        return stored

    def _enter_outage(self, cause: Exception) -> None:
        if not self._outage:
            log.error("storage is unreachable (%s): events wait in the local queue until it is back", cause)
        self._outage = True

    async def _enqueue(self, draft: EventDraft) -> None:
        assert self._outbox is not None
        try:
            await self._outbox.put(draft)
        except Exception as exc:
            # Even the local disk failed: the caller hears that nothing was stored.
            log.exception("the local queue cannot take event %s of session %s", draft.event_key, draft.session_id)
            raise StorageUnavailable(f"storage is out and the local queue failed: {exc!r}") from exc
        self._empty.clear()
        self._wake.set()

    # ------------------------------------------------------------------ the drainer

    async def _drain_forever(self) -> None:
        assert self._outbox is not None
        while True:
            if self._outbox.depth == 0:
                self._empty.set()
                if self._outage:
                    log.warning("storage is back: the local queue is written")
                self._outage = False
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._drain_batch_retrying()
            except StorageUnavailable as exc:  # storage still out as the service stops
                self._outage = True
                log.error(
                    "stopping with %d events in the local queue (%s): written at the next start",
                    self._outbox.depth,
                    exc,
                )
                return

    async def _drain_batch_retrying(self) -> None:
        """One batch, tried again while storage is out (backing off) until it is written or we stop."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(StorageUnavailable),
            wait=wait_exponential(multiplier=FIRST_DRAIN_BACKOFF_SECONDS, max=MAX_DRAIN_BACKOFF_SECONDS),
            stop=lambda _: self._closing,
            before_sleep=self._still_out,
            sleep=self._nap,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await self._drain_batch()

    def _still_out(self, retry: RetryCallState) -> None:
        assert self._outbox is not None
        self._outage = True
        error = retry.outcome.exception() if retry.outcome is not None else None
        log.warning("storage still unreachable, %d events queued locally: %s", self._outbox.depth, error)

    async def _nap(self, seconds: float) -> None:
        """The pause between two tries, cut short by a new event (or by close)."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _drain_batch(self) -> None:
        assert self._outbox is not None
        for position, draft in await self._outbox.oldest(DRAIN_BATCH):
            try:
                stored = await self._repo.append_event(draft)
            except StorageUnavailable:
                raise
            except SessionDeleted:  # deleted meanwhile: nothing of it is written any more
                await self._outbox.remove(position, draft.session_id)
                continue
            except Exception as exc:
                # Not a passing failure (e.g. the session row is gone): keep it aside, on disk, loudly.
                log.error(
                    "storage refuses queued event %s of session %s for good; set aside in the local queue",
                    draft.event_key,
                    draft.session_id,
                    exc_info=exc,
                )
                await self._outbox.set_aside(position, draft.session_id, repr(exc))
                continue
            await self._outbox.remove(position, draft.session_id)
            self._noted(stored)
