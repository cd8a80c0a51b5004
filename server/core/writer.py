"""Each session's event writes run one after another, in the order they were submitted, so a
turn never waits for storage on the chunk path and a session's events are stored in order."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from server.core.event_store import EventStore
from server.core.models import EventDraft, StoredEvent
from server.core.ports import SessionDeleted, StorageUnavailable
from server.core.tasks import TaskTracker

log = logging.getLogger(__name__)


class OrderedWriter:
    """A caller that needs the row (a user message's ack) awaits `append`; a turn `submit`s its
    tool events and moves on."""

    def __init__(self, store: EventStore, tasks: TaskTracker) -> None:
        self._store = store
        self._tasks = tasks
        # Each session's last write not finished yet: later writes, and reads, wait for it.
        self._tails: dict[str, asyncio.Future[Any]] = {}

    def submit(self, draft: EventDraft) -> asyncio.Task[StoredEvent | None]:
        session_id = draft.session_id
        task = self._tasks.spawn(
            self._submitted(self._tails.get(session_id), draft), name=f"store {draft.event_type.value} {session_id}"
        )
        self._tails[session_id] = task

        def forget(done: asyncio.Task[StoredEvent | None]) -> None:
            if self._tails.get(session_id) is done:
                del self._tails[session_id]

        task.add_done_callback(forget)
        return task

    async def append(self, draft: EventDraft) -> StoredEvent | None:
        """`submit`, but written by the calling task: a caller that waits for the row anyway saves
        the two event-loop turns of starting a task and hearing it end."""
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

    async def _submitted(self, previous: asyncio.Future[Any] | None, draft: EventDraft) -> StoredEvent | None:
        try:
            return await self._write_after(previous, draft)
        except SessionDeleted:  # storage takes nothing more of it: the write is dropped, as deletion means
            log.info("session %s was deleted: its %s is not stored", draft.session_id, draft.event_type.value)
            return None

    async def _write_after(self, previous: asyncio.Future[Any] | None, draft: EventDraft) -> StoredEvent | None:
        if previous is not None:
            # Order only: the previous write's failure is reported by its own task.
            await asyncio.wait([previous])
        return await self._store.write(draft)

    def last_write(self, session_id: str) -> asyncio.Future[Any] | None:
        """The session's last write submitted so far, while it runs: a turn reads its history after
        it, while its own user message (submitted later) is being written."""
        return self._tails.get(session_id)

    async def flush(self, session_id: str) -> None:
        """Wait until every write submitted so far for the session has finished (stored or queued)."""
        last = self._tails.get(session_id)
        if last is not None:
            await asyncio.wait([last])

    async def require_stored(self, session_id: str) -> None:
        """Raise StorageUnavailable while events of the session still wait in the outbox."""
        await self.flush(session_id)
        if self._store.holds(session_id):
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
