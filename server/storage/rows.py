"""What the three repositories share: the tables' columns, rows to records, and the idempotent
"insert, or give the row stored before" that every write is."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from server.core.models import Session, StoredEvent
from server.core.ports import AttachmentInfo, EventPage, SessionDeleted

T = TypeVar("T")

EVENT_COLUMNS = (
    "event_id",
    "session_id",
    "event_type",
    "content",
    "timestamp",
    "turn_id",
    "event_key",
    "finish_reason",
    "error",
    "attachments",
)
INSERTED_EVENT_COLUMNS = EVENT_COLUMNS[1:]  # event_id is storage's to give
SESSION_COLUMNS = (
    "session_id",
    "user_id",
    "start_time",
    "end_time",
    "summary",
    "duration_seconds",
    "title",
    "updated_at",
    "deleted_at",
    "context_summary",
    "context_upto",
)
ATTACHMENT_COLUMNS = ("attachment_id", "session_id", "name", "mime_type", "size", "sha256", "created_at", "used")
# What deleting a session sets besides `deleted_at`: it keeps only its id, user and start.
CLEARED_WHEN_DELETED = (
    "title",
    "summary",
    "end_time",
    "duration_seconds",
    "summary_due_at",
    "open_turn_id",
    "context_summary",
    "context_upto",
)


def columns(names: tuple[str, ...], separator: str = ", ") -> str:
    return separator.join(names)


def storable(text: str) -> str:
    # PostgreSQL text cannot hold NUL; a model answer that contains one must still be stored.
    return text.replace("\x00", "\ufffd")


def to_event(row: Any) -> StoredEvent:
    # A row of any of the drivers (sqlite3.Row, asyncpg.Record, PostgREST JSON); asyncpg gives UUIDs.
    return StoredEvent.model_validate({**row, "session_id": str(row["session_id"])})


def to_session(row: Any) -> Session:
    return Session.model_validate({**row, "session_id": str(row["session_id"])})


async def insert_or_existing(
    insert: Callable[[], Awaitable[T | None]], existing: Callable[[], Awaitable[T | None]]
) -> T:
    """`insert` gives None when the key was stored before (a retry after a lost answer, or another
    process's write): that row is the answer."""
    row = await insert()
    if row is None:
        row = await existing()
    assert row is not None, "a row that conflicts on insert must exist"
    return row


async def stored_event(
    insert: Callable[[], Awaitable[StoredEvent | None]],
    existing: Callable[[], Awaitable[StoredEvent | None]],
    session: Callable[[], Awaitable[Session | None]],
) -> StoredEvent:
    """`insert_or_existing` for an event, which storage skips when its session is deleted (a
    trigger): then neither gives a row, and the session says why."""
    row = await insert()
    if row is None:
        row = await existing()
    if row is None and (found := await session()) is not None and found.deleted:
        raise SessionDeleted(found.session_id)
    assert row is not None, "a row that conflicts on insert must exist"
    return row


def event_page(rows: list[StoredEvent], limit: int, *, ascending: bool) -> EventPage:
    """A page from `limit + 1` rows read in the direction asked: the extra one only says `more`."""
    events = rows[:limit]
    return EventPage(events=events if ascending else events[::-1], more=len(rows) > limit)


def to_attachment(row: Any) -> AttachmentInfo:
    created = row["created_at"]
    return AttachmentInfo(
        attachment_id=str(row["attachment_id"]),
        session_id=str(row["session_id"]),
        name=row["name"],
        mime_type=row["mime_type"],
        size=int(row["size"]),
        sha256=row["sha256"],
        created_at=created if isinstance(created, datetime) else datetime.fromisoformat(created),
        used=bool(row["used"]),
    )


def attachment_key(attachment_id: str) -> str | None:
    """The id as stored (a UUID's canonical text), or None when it is not a UUID: then it names no
    file, and a database whose column is a uuid is not asked (it would refuse the text)."""
    try:
        return str(uuid.UUID(attachment_id))
    except (ValueError, TypeError, AttributeError):
        return None


def attachment_keys(attachment_ids: Sequence[str]) -> list[str]:
    """The ids as stored, once each, in the order given; those that are not UUIDs left out."""
    keys = (attachment_key(attachment_id) for attachment_id in attachment_ids)
    return list(dict.fromkeys(key for key in keys if key is not None))


def in_asked_order(found: Sequence[AttachmentInfo], attachment_ids: Sequence[str]) -> list[AttachmentInfo]:
    """`found` (in any order) in the order of the ids asked, each once."""
    by_key = {info.attachment_id: info for info in found}
    return [by_key[key] for key in attachment_keys(attachment_ids) if key in by_key]
