"""Storage as the metrics and traces see it: every Repository operation timed (retries included)
and, within a traced turn or job, a span; and the depth of the local durable queue after every change."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Sequence
from datetime import datetime
from typing import TypeVar

from server.core.models import EventDraft, Session, StoredEvent
from server.core.ports import (
    NO_SPAN,
    AttachmentInfo,
    EventPage,
    Metrics,
    NoTracer,
    Outbox,
    SessionCursor,
    Storage,
    Tracer,
)

T = TypeVar("T")


class MeasuredRepository:
    """A Repository (and AttachmentStore) that reports how long each operation took, by its name."""

    def __init__(self, repo: Storage, metrics: Metrics, tracer: Tracer | None = None, system: str = "sqlite") -> None:
        """`system`: the backend as a trace names it (`db.system.name`)."""
        self._repo = repo
        self._metrics = metrics
        self._tracer = tracer or NoTracer()
        self._system = system

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        span = (
            self._tracer.start(
                f"storage {operation}", {"db.system.name": self._system, "db.operation.name": operation}, client=True
            )
            if self._tracer.within_span()
            else NO_SPAN
        )
        try:
            return await call
        except Exception as exc:
            span.fail(type(exc).__name__)
            raise
        finally:
            self._metrics.storage_operation(operation, time.perf_counter() - started)
            span.end()

    async def ensure_session(self, session_id: str, user_id: str | None, start_time: datetime) -> Session:
        return await self._timed("ensure_session", self._repo.ensure_session(session_id, user_id, start_time))

    async def get_session(self, session_id: str) -> Session | None:
        return await self._timed("get_session", self._repo.get_session(session_id))

    async def append_event(self, draft: EventDraft) -> StoredEvent:
        return await self._timed("append_event", self._repo.append_event(draft))

    async def find_event(self, session_id: str, event_key: str) -> StoredEvent | None:
        return await self._timed("find_event", self._repo.find_event(session_id, event_key))

    async def list_events(self, session_id: str, after_event_id: int | None = None) -> list[StoredEvent]:
        return await self._timed("list_events", self._repo.list_events(session_id, after_event_id))

    async def page_events(
        self, session_id: str, *, after: int | None = None, before: int | None = None, limit: int
    ) -> EventPage:
        return await self._timed(
            "page_events", self._repo.page_events(session_id, after=after, before=before, limit=limit)
        )

    async def list_sessions(self, user_id: str, limit: int, after: SessionCursor | None = None) -> list[Session]:
        return await self._timed("list_sessions", self._repo.list_sessions(user_id, limit, after))

    async def rename_session(self, session_id: str, title: str) -> Session | None:
        return await self._timed("rename_session", self._repo.rename_session(session_id, title))

    async def set_generated_title(self, session_id: str, title: str) -> Session | None:
        return await self._timed("set_generated_title", self._repo.set_generated_title(session_id, title))

    async def delete_session(self, session_id: str) -> bool:
        return await self._timed("delete_session", self._repo.delete_session(session_id))

    async def write_summary(self, session_id: str, summary: str, end_time: datetime, duration_seconds: int) -> None:
        await self._timed("write_summary", self._repo.write_summary(session_id, summary, end_time, duration_seconds))

    async def write_context_summary(self, session_id: str, summary: str, upto: int, previous_upto: int | None) -> bool:
        return await self._timed(
            "write_context_summary", self._repo.write_context_summary(session_id, summary, upto, previous_upto)
        )

    async def mark_emptied(self, session_id: str, emptied_at: datetime) -> None:
        await self._timed("mark_emptied", self._repo.mark_emptied(session_id, emptied_at))

    async def due_summaries(self, limit: int) -> list[tuple[str, datetime]]:
        return await self._timed("due_summaries", self._repo.due_summaries(limit))

    async def open_turns(self, after: str | None, limit: int) -> list[tuple[str, str]]:
        return await self._timed("open_turns", self._repo.open_turns(after, limit))

    async def turn_events(self, session_id: str, turn_id: str) -> list[StoredEvent]:
        return await self._timed("turn_events", self._repo.turn_events(session_id, turn_id))

    async def add_attachment(self, info: AttachmentInfo, data: bytes) -> None:
        await self._timed("add_attachment", self._repo.add_attachment(info, data))

    async def get_attachment(self, attachment_id: str) -> AttachmentInfo | None:
        return await self._timed("get_attachment", self._repo.get_attachment(attachment_id))

    async def attachment_data(self, attachment_id: str) -> bytes | None:
        return await self._timed("attachment_data", self._repo.attachment_data(attachment_id))

    async def session_attachments(self, session_id: str, attachment_ids: Sequence[str]) -> list[AttachmentInfo]:
        return await self._timed("session_attachments", self._repo.session_attachments(session_id, attachment_ids))

    async def mark_attachments_used(self, session_id: str, attachment_ids: Sequence[str]) -> None:
        await self._timed("mark_attachments_used", self._repo.mark_attachments_used(session_id, attachment_ids))

    async def delete_unused_attachments(self, created_before: datetime, limit: int) -> int:
        return await self._timed(
            "delete_unused_attachments", self._repo.delete_unused_attachments(created_before, limit)
        )

    async def ping(self) -> None:
        await self._timed("ping", self._repo.ping())

    async def aclose(self) -> None:
        await self._repo.aclose()


class MeasuredOutbox:
    """An Outbox that reports its depth whenever it changes."""

    def __init__(self, outbox: Outbox, metrics: Metrics) -> None:
        self._outbox = outbox
        self._metrics = metrics
        metrics.events_queued(outbox.depth)  # what an earlier run left

    @property
    def depth(self) -> int:
        return self._outbox.depth

    def holds(self, session_id: str) -> bool:
        return self._outbox.holds(session_id)

    async def put(self, draft: EventDraft) -> None:
        try:
            await self._outbox.put(draft)
        finally:
            self._metrics.events_queued(self._outbox.depth)

    async def oldest(self, limit: int) -> list[tuple[int, EventDraft]]:
        return await self._outbox.oldest(limit)

    async def remove(self, position: int, session_id: str) -> None:
        try:
            await self._outbox.remove(position, session_id)
        finally:
            self._metrics.events_queued(self._outbox.depth)

    async def set_aside(self, position: int, session_id: str, reason: str) -> None:
        try:
            await self._outbox.set_aside(position, session_id, reason)
        finally:
            self._metrics.events_queued(self._outbox.depth)

    async def waiting(self, session_id: str) -> list[EventDraft]:
        return await self._outbox.waiting(session_id)

    async def find(self, session_id: str, event_key: str) -> EventDraft | None:
        return await self._outbox.find(session_id, event_key)

    async def discard(self, session_id: str) -> int:
        try:
            return await self._outbox.discard(session_id)
        finally:
            self._metrics.events_queued(self._outbox.depth)

    async def aclose(self) -> None:
        await self._outbox.aclose()
