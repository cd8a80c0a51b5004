"""Ordered, idempotent event writes per session, so storage never sits on the chunk path."""

from __future__ import annotations

import asyncio

from server.core.models import EventDraft, StoredEvent
from server.core.ports import Repository
from server.core.tasks import TaskTracker


class EventLog:
    """Each session's writes run one after another, in the order they were submitted.

    A caller that needs the row (a user message's ack) awaits the returned task; the turn
    runner submits tool events and moves on.
    """

    def __init__(self, repo: Repository, tasks: TaskTracker) -> None:
        self._repo = repo
        self._tasks = tasks
        self._tails: dict[str, asyncio.Task[StoredEvent]] = {}

    def submit(self, draft: EventDraft) -> asyncio.Task[StoredEvent]:
        session_id = draft.session_id
        previous = self._tails.get(session_id)
        task = self._tasks.spawn(
            self._write_after(previous, draft), name=f"store {draft.event_type.value} {session_id}"
        )
        self._tails[session_id] = task

        def forget(done: asyncio.Task[StoredEvent]) -> None:
            if self._tails.get(session_id) is done:
                del self._tails[session_id]

        task.add_done_callback(forget)
        return task

    async def _write_after(self, previous: asyncio.Task[StoredEvent] | None, draft: EventDraft) -> StoredEvent:
        if previous is not None:
            # Order only: the previous write's failure is reported by its own task.
            await asyncio.wait([previous])
        return await self._repo.append_event(draft)

    async def flush(self, session_id: str) -> None:
        """Wait until every write submitted so far for the session has finished."""
        tail = self._tails.get(session_id)
        if tail is not None:
            await asyncio.wait([tail])
