"""Ordered, idempotent event writes per session, so storage never sits on the chunk path, and
never loses an event: what storage cannot take waits in a local durable queue (the outbox)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from server.core.models import EventDraft, StoredEvent
from server.core.ports import Outbox, Repository, StorageUnavailable
from server.core.tasks import TaskTracker

log = logging.getLogger(__name__)

HistoryEvent = StoredEvent | EventDraft  # stored, or waiting in the outbox
CACHED_SESSIONS = 1000
CACHED_EVENTS = 100_000
DRAIN_BATCH = 100
MAX_DRAIN_BACKOFF_SECONDS = 10.0


@dataclass
class _Copy:
    events: list[StoredEvent]
    read_upto: int  # the last event_id read from storage; later rows are read at the next turn


class EventLog:
    """Each session's writes run one after another, in the order they were submitted.

    A caller that needs the row (a user message's ack) awaits the returned task; the turn runner
    submits tool events and moves on. With an outbox, a write storage cannot take within its retry
    budget goes to the outbox instead (the task then gives None), and so does every later write of
    that session until the queue has drained, so each session's events reach storage in order.
    While storage is out, writes go to the outbox at once, and a turn reads its history from what
    this process last read and wrote of the session.
    """

    def __init__(
        self, repo: Repository, tasks: TaskTracker, outbox: Outbox | None = None, *, sole_writer: bool = False
    ) -> None:
        self._repo = repo
        # Only this process writes the sessions' events: a session read once is known from then on.
        self._sole_writer = sole_writer
        self._tasks = tasks
        self._outbox = outbox
        # Each session's last write not finished yet: later writes and reads wait for it.
        self._tails: dict[str, asyncio.Future[Any]] = {}
        self._outage = False
        # Each session's events as this process last read and wrote them (least recently used first).
        self._cache: OrderedDict[str, _Copy] = OrderedDict()
        self._cached_events = 0
        self._wake = asyncio.Event()
        self._closing = False
        self._drainer: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ state

    @property
    def outage(self) -> bool:
        """Storage failed past its retry budget and has not taken the queue back yet."""
        return self._outage

    @property
    def queued(self) -> int:
        return self._outbox.depth if self._outbox is not None else 0

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

    # ------------------------------------------------------------------ writes

    def submit(self, draft: EventDraft) -> asyncio.Task[StoredEvent | None]:
        session_id = draft.session_id
        previous = self._tails.get(session_id)
        task = self._tasks.spawn(
            self._write_after(previous, draft), name=f"store {draft.event_type.value} {session_id}"
        )
        self._tails[session_id] = task

        def forget(done: asyncio.Task[StoredEvent | None]) -> None:
            if self._tails.get(session_id) is done:
                del self._tails[session_id]

        task.add_done_callback(forget)
        return task

    async def append(self, draft: EventDraft) -> StoredEvent | None:
        """`submit`, but written by the calling task: a caller that waits for the row anyway (a
        user message's ack) saves the two event-loop turns of starting a task and hearing it end."""
        session_id = draft.session_id
        previous = self._tails.get(session_id)
        marker: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._tails[session_id] = marker
        try:
            return await self._write_after(previous, draft)
        finally:
            marker.set_result(None)
            if self._tails.get(session_id) is marker:
                del self._tails[session_id]

    async def _write_after(self, previous: asyncio.Future[Any] | None, draft: EventDraft) -> StoredEvent | None:
        if previous is not None:
            # Order only: the previous write's failure is reported by its own task.
            await asyncio.wait([previous])
        if self._outbox is None:
            return self._remember(await self._repo.append_event(draft))
        if self._outage or self._outbox.holds(draft.session_id):
            await self._enqueue(draft)
            return None
        try:
            return self._remember(await self._repo.append_event(draft))
        except StorageUnavailable as exc:
            self._enter_outage(exc)
            await self._enqueue(draft)
            return None

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
        self._wake.set()

    async def flush(self, session_id: str) -> None:
        """Wait until every write submitted so far for the session has finished (stored or queued)."""
        tail = self._tails.get(session_id)
        if tail is not None:
            await asyncio.wait([tail])

    async def require_stored(self, session_id: str) -> None:
        """Raise StorageUnavailable while events of the session still wait in the outbox."""
        await self.flush(session_id)
        if self._outbox is not None and self._outbox.holds(session_id):
            raise StorageUnavailable(f"events of session {session_id} still wait in the local queue")

    async def wait_stored(self, session_id: str, within_seconds: float) -> None:
        """Give the outbox up to `within_seconds` to write the session's waiting events."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_seconds
        while True:
            try:
                await self.require_stored(session_id)
                return
            except StorageUnavailable:
                if loop.time() >= deadline:
                    raise
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ reads

    def history(self, session_id: str) -> Coroutine[Any, Any, list[HistoryEvent]]:
        """The session's events for a model: from storage, or while it is out, from this process's copy.

        The read waits for the writes submitted before this call, not for later ones: a turn reads
        its history while its user message is being written.
        """
        return self._read_history(session_id, self._tails.get(session_id))

    async def _read_history(self, session_id: str, earlier: asyncio.Future[Any] | None) -> list[HistoryEvent]:
        if earlier is not None:
            await asyncio.wait([earlier])
        if not self._outage:
            try:
                stored = await self._read_stored(session_id)
            except StorageUnavailable:
                stored = self._cached(session_id)
        else:
            stored = self._cached(session_id)
        waiting: Sequence[EventDraft] = await self._outbox.waiting(session_id) if self._outbox is not None else []
        return [*stored, *waiting]

    async def _read_stored(self, session_id: str) -> list[StoredEvent]:
        """The stored history, reading only the events after those this process has read before.

        event_ids increase in the order events are stored within a session (the contract that
        `join.after_event_id` rests on too), so the rows after the last one read are all that is
        new, whichever process wrote them. A turn then reads a few rows, not the whole session.
        """
        copy = self._cache.get(session_id)
        if copy is None:
            stored = await self._repo.list_events(session_id)
            self.note_history(session_id, stored)
            return stored
        if self._sole_writer:
            # Every write of the session went through this log (and the ones before this read
            # have finished): the copy is the stored history, without a trip to storage.
            self._cache.move_to_end(session_id)
            return list(copy.events)
        read_upto = copy.read_upto
        new = await self._repo.list_events(session_id, read_upto)
        current = self._cache.get(session_id) or copy
        if current is copy and copy.read_upto == read_upto:
            # The usual case, kept linear in what is new: this process's own writes past the last
            # read are in `new` too, so they make way for the rows as stored.
            before = len(copy.events)
            while copy.events and copy.events[-1].event_id > read_upto:
                copy.events.pop()
            copy.events.extend(new)
            copy.read_upto = new[-1].event_id if new else read_upto
            self._cached_events += len(copy.events) - before
            self._cache.move_to_end(session_id)
            self._evict()
            return list(copy.events)
        # Another read of the session finished meanwhile: merge by event_id.
        known = {e.event_id: e for e in current.events if e.event_id <= max(current.read_upto, copy.read_upto)}
        known.update((e.event_id, e) for e in new)
        read_upto = max(current.read_upto, new[-1].event_id if new else copy.read_upto)
        events = sorted(known.values(), key=lambda e: e.event_id)
        self._put(session_id, _Copy(events, read_upto))
        return list(events)

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

    def note_history(self, session_id: str, stored: list[StoredEvent]) -> None:
        """A whole history just read (a join, or a turn's first read here)."""
        copy = self._cache.get(session_id)
        last = stored[-1].event_id if stored else 0
        # Writes that finished while the read ran stay in the copy.
        later = [e for e in copy.events if e.event_id > last] if copy is not None else []
        self._put(session_id, _Copy([*stored, *later], last))

    def _cached(self, session_id: str) -> list[StoredEvent]:
        copy = self._cache.get(session_id)
        if copy is None:
            raise StorageUnavailable(f"storage is unreachable and session {session_id} was not read here before")
        return list(copy.events)

    def _put(self, session_id: str, copy: _Copy) -> None:
        previous = self._cache.pop(session_id, None)
        self._cached_events += len(copy.events) - (len(previous.events) if previous is not None else 0)
        self._cache[session_id] = copy
        self._evict()

    def _evict(self) -> None:
        while self._cache and (len(self._cache) > CACHED_SESSIONS or self._cached_events > CACHED_EVENTS):
            _, evicted = self._cache.popitem(last=False)
            self._cached_events -= len(evicted.events)

    def _remember(self, stored: StoredEvent) -> StoredEvent:
        """A write of this process: in the copy at once, for reads during an outage."""
        copy = self._cache.get(stored.session_id)
        if copy is not None and (not copy.events or copy.events[-1].event_id < stored.event_id):
            copy.events.append(stored)
            self._cached_events += 1
        return stored

    # ------------------------------------------------------------------ the drainer

    async def _drain_forever(self) -> None:
        assert self._outbox is not None
        backoff = 0.2
        while True:
            if self._outbox.depth == 0:
                if self._outage:
                    log.warning("storage is back: the local queue is written")
                self._outage = False
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._drain_batch()
                backoff = 0.2
            except StorageUnavailable as exc:
                self._outage = True
                if self._closing:
                    log.error(
                        "stopping with %d events in the local queue (%s): written at the next start",
                        self._outbox.depth,
                        exc,
                    )
                    return
                log.warning("storage still unreachable, %d events queued locally: %s", self._outbox.depth, exc)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), backoff)
                backoff = min(backoff * 2, MAX_DRAIN_BACKOFF_SECONDS)

    async def _drain_batch(self) -> None:
        assert self._outbox is not None
        for position, draft in await self._outbox.oldest(DRAIN_BATCH):
            try:
                stored = await self._repo.append_event(draft)
            except StorageUnavailable:
                raise
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
            self._remember(stored)
