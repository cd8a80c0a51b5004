"""Each session's history as this process last read and wrote it: the one cache of a session's
history, bounded by events. What a model is sent of it is core/context.py's."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from server.core.event_store import EventStore, HistoryEvent
from server.core.models import StoredEvent
from server.core.ports import Repository, StorageUnavailable
from server.core.snapshot import Snapshot

CACHED_SESSIONS = 1000
CACHED_EVENTS = 100_000


@dataclass
class _Copy:
    events: list[StoredEvent]
    read_upto: int  # the last event_id read from storage; later rows are read at the next turn


class HistoryCache:
    """Reads from storage only the events after those read before; while storage is out, a turn
    reads its history from this copy (and the outbox). Least recently used sessions go first."""

    def __init__(
        self,
        repo: Repository,
        store: EventStore,
        *,
        sole_writer: bool = False,
        max_sessions: int = CACHED_SESSIONS,
        max_events: int = CACHED_EVENTS,
    ) -> None:
        self._repo = repo
        self._store = store
        # Only this process writes the sessions' events: a session read once is known from then on.
        self._sole_writer = sole_writer
        self._max_sessions = max_sessions
        self._max_events = max_events
        self._copies: OrderedDict[str, _Copy] = OrderedDict()
        self._events = 0

    def __len__(self) -> int:
        return len(self._copies)

    @property
    def events(self) -> int:
        return self._events

    async def read(self, session_id: str, after: asyncio.Future[Any] | None = None) -> Snapshot[HistoryEvent]:
        """The session's history: what storage holds (as far as this process knows), then the writes
        waiting in the outbox. `after`: a write to wait for first."""
        if after is not None:
            await asyncio.wait([after])
        if self._store.outage:
            stored = self._cached(session_id)
        else:
            try:
                stored = await self._read_stored(session_id)
            except StorageUnavailable:
                stored = self._cached(session_id)
        return Snapshot(stored, await self._store.waiting(session_id))

    def note(self, session_id: str, stored: list[StoredEvent]) -> None:
        """A whole history just read (a join, or a turn's first read here)."""
        copy = self._copies.get(session_id)
        last = stored[-1].event_id if stored else 0
        # Writes that finished while the read ran stay in the copy.
        later = [e for e in copy.events if e.event_id > last] if copy is not None else []
        self._put(session_id, _Copy([*stored, *later], last))

    def forget(self, session_id: str) -> None:
        copy = self._copies.pop(session_id, None)
        if copy is not None:
            self._events -= len(copy.events)

    def remember(self, stored: StoredEvent) -> None:
        """A write of this process: in the copy at once, for reads during an outage."""
        copy = self._copies.get(stored.session_id)
        if copy is not None and (not copy.events or copy.events[-1].event_id < stored.event_id):
            copy.events.append(stored)
            self._events += 1
            self._evict()

    async def _read_stored(self, session_id: str) -> list[StoredEvent]:
        """event_ids increase in the order events are stored within a session (the contract that
        `join.after_event_id` rests on too), so the rows after the last one read are all that is
        new, whichever process wrote them. A turn then reads a few rows, not the whole session."""
        copy = self._copies.get(session_id)
        if copy is None:
            stored = await self._repo.list_events(session_id)
            self.note(session_id, stored)
            return stored
        if self._sole_writer:
            # Every write of the session went through this process (and the ones before this read
            # have finished): the copy is the stored history, without a trip to storage.
            self._copies.move_to_end(session_id)
            return copy.events  # not copied: in this mode it only grows at its end (a Snapshot holds)
        read_upto = copy.read_upto
        new = await self._repo.list_events(session_id, read_upto)
        current = self._copies.get(session_id)
        if current is copy and copy.read_upto == read_upto:
            self._extend(session_id, copy, new)
            return list(copy.events)
        # Another read of the session finished meanwhile (or the copy was evicted): merge by event_id.
        base = current or copy
        known = {e.event_id: e for e in base.events if e.event_id <= max(base.read_upto, copy.read_upto)}
        known.update((e.event_id, e) for e in new)
        read_upto = max(base.read_upto, new[-1].event_id if new else copy.read_upto)
        events = sorted(known.values(), key=lambda e: e.event_id)
        self._put(session_id, _Copy(events, read_upto))
        return list(events)

    def _extend(self, session_id: str, copy: _Copy, new: list[StoredEvent]) -> None:
        """The usual case, kept linear in what is new: this process's own writes past the last read
        are in `new` too, so they make way for the rows as stored."""
        before = len(copy.events)
        while copy.events and copy.events[-1].event_id > copy.read_upto:
            copy.events.pop()
        copy.events.extend(new)
        copy.read_upto = new[-1].event_id if new else copy.read_upto
        self._events += len(copy.events) - before
        self._copies.move_to_end(session_id)
        self._evict()

    def _cached(self, session_id: str) -> list[StoredEvent]:
        copy = self._copies.get(session_id)
        if copy is None:
            raise StorageUnavailable(f"storage is unreachable and session {session_id} was not read here before")
        return list(copy.events)

    def _put(self, session_id: str, copy: _Copy) -> None:
        previous = self._copies.pop(session_id, None)
        self._events += len(copy.events) - (len(previous.events) if previous is not None else 0)
        self._copies[session_id] = copy
        self._evict()

    def _evict(self) -> None:
        while self._copies and (len(self._copies) > self._max_sessions or self._events > self._max_events):
            _, evicted = self._copies.popitem(last=False)
            self._events -= len(evicted.events)
