"""The embedded default: SQLite through aiosqlite, in WAL mode."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import sqlite3
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import aiosqlite

from server.core.models import EventDraft, Session, StoredEvent, attachments_json, error_json
from server.core.ports import AttachmentInfo, EventPage, SessionCursor, SessionDeleted
from server.storage.retry import with_retries
from server.storage.rows import (
    ATTACHMENT_COLUMNS,
    CLEARED_WHEN_DELETED,
    EVENT_COLUMNS,
    INSERTED_EVENT_COLUMNS,
    SESSION_COLUMNS,
    attachment_key,
    attachment_keys,
    columns,
    event_page,
    in_asked_order,
    insert_or_existing,
    stored_event,
    to_attachment,
    to_event,
    to_session,
)

log = logging.getLogger(__name__)

# One definition of the tables (read at import, before any event loop runs).
SCHEMA = (Path(__file__).with_name("sqlite_schema.sql")).read_text("utf-8")
SCHEMA_VERSION = 6
# The one text format of `updated_at` and `deleted_at` (see sqlite_schema.sql): what SQLite's
# strftime writes, and what every moment compared with them is turned into (`_stamp_ms`).
_NOW = "strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')"

# A session changed last when its last event was stored, else when it started (older files).
_UPDATED_AT_FROM_EVENTS = """
UPDATE sessions SET updated_at = coalesce(
    (SELECT strftime('%Y-%m-%dT%H:%M:%f+00:00', e.timestamp) FROM events e
     WHERE e.session_id = sessions.session_id ORDER BY e.event_id DESC LIMIT 1),
    strftime('%Y-%m-%dT%H:%M:%f+00:00', start_time),
    updated_at
);
"""

# A file made before versioning (user_version 0) has the tables without the defaults and the
# outcome columns: SQLite cannot add a default to a column, so they are rebuilt, rows kept.
_REBUILD_UNVERSIONED = f"""
BEGIN;
ALTER TABLE events RENAME TO events_unversioned;
ALTER TABLE sessions RENAME TO sessions_unversioned;
DROP INDEX IF EXISTS events_session_order;
{SCHEMA}
INSERT INTO sessions (session_id, user_id, start_time, end_time, summary, duration_seconds, summary_due_at)
    SELECT session_id, user_id, start_time, end_time, summary, duration_seconds, summary_due_at
    FROM sessions_unversioned;
INSERT INTO events (event_id, session_id, timestamp, event_type, content, turn_id, event_key)
    SELECT event_id, session_id, timestamp, event_type, content, turn_id, event_key FROM events_unversioned;
DROP TABLE events_unversioned;
DROP TABLE sessions_unversioned;
{_UPDATED_AT_FROM_EVENTS}
PRAGMA user_version = {SCHEMA_VERSION};
COMMIT;
"""

# Version 1 -> 2: the open-turn marker; turns left open before it are each session's last
# unanswered user message. (Its triggers and index come with SCHEMA, in the step to 3.)
_ADD_OPEN_TURNS = """
BEGIN;
ALTER TABLE sessions ADD COLUMN open_turn_id TEXT;
UPDATE sessions SET open_turn_id = (
    SELECT u.turn_id FROM events u
    WHERE u.session_id = sessions.session_id AND u.event_type = 'user_message' AND u.turn_id IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM events a WHERE a.session_id = u.session_id AND a.event_key = 'ai:' || u.turn_id)
    ORDER BY u.event_id DESC LIMIT 1
);
PRAGMA user_version = 2;
COMMIT;
"""

# Version 2 -> 3: title, updated_at and deleted_at. SQLite cannot add a column whose default is
# an expression (updated_at's is now), so the sessions table is rebuilt (with 4's columns too, so
# straight to SCHEMA_VERSION); events stay as they are.
# Run with legacy_alter_table on and foreign keys off, so that the rename leaves events' reference
# and the triggers naming `sessions`, which is the new table once the old one is dropped.
_REBUILD_SESSIONS = f"""
BEGIN;
ALTER TABLE sessions RENAME TO sessions_v2;
DROP INDEX IF EXISTS sessions_open_turn;
{SCHEMA}
INSERT INTO sessions (
    session_id, user_id, start_time, end_time, summary, duration_seconds, summary_due_at, open_turn_id
) SELECT session_id, user_id, start_time, end_time, summary, duration_seconds, summary_due_at, open_turn_id
    FROM sessions_v2;
DROP TABLE sessions_v2;
{_UPDATED_AT_FROM_EVENTS}
PRAGMA user_version = {SCHEMA_VERSION};
COMMIT;
"""

# Version 3 -> 4: the compaction summary. Nullable columns without a default: added in place.
_ADD_CONTEXT_SUMMARY = """
BEGIN;
ALTER TABLE sessions ADD COLUMN context_summary TEXT;
ALTER TABLE sessions ADD COLUMN context_upto INTEGER;
PRAGMA user_version = 4;
COMMIT;
"""

# Version 4 -> 5: files uploaded to sessions. Everything in SCHEMA is "if not exists": only the
# attachments table, its indexes and its triggers are new.
_ADD_ATTACHMENTS = f"""
BEGIN;
{SCHEMA}
PRAGMA user_version = 5;
COMMIT;
"""
# Version 5 -> 6: a user message's files. Every older path that kept its events table (some set
# the version straight to the newest) needs it too: see `_add_message_attachments`.
_MESSAGE_ATTACHMENTS = f"""
BEGIN;
ALTER TABLE events ADD COLUMN attachments TEXT;
PRAGMA user_version = {SCHEMA_VERSION};
COMMIT;
"""

_EVENT_COLUMNS = columns(EVENT_COLUMNS)
_SESSION_COLUMNS = columns(SESSION_COLUMNS)
_ATTACHMENT_COLUMNS = columns(ATTACHMENT_COLUMNS)
_INSERT_ATTACHMENT = (
    f"INSERT INTO attachments ({_ATTACHMENT_COLUMNS}, data) VALUES ({', '.join('?' * (len(ATTACHMENT_COLUMNS) + 1))})"
    " ON CONFLICT (attachment_id) DO NOTHING"
)
_INSERT_EVENT = (
    f"INSERT INTO events ({columns(INSERTED_EVENT_COLUMNS)}) VALUES ({', '.join('?' * len(INSERTED_EVENT_COLUMNS))})"
    " ON CONFLICT (session_id, event_key) DO NOTHING"
)


async def schema_version(db: aiosqlite.Connection) -> int:
    (version,) = next(iter(await db.execute_fetchall("PRAGMA user_version")))
    return int(version)


@contextlib.asynccontextmanager
async def exclusive(lock_path: Path) -> AsyncIterator[None]:
    """Held by one process at a time (an flock, which the OS frees if the process dies)."""
    handle = await asyncio.to_thread(open, lock_path, "a+b")
    try:
        await asyncio.to_thread(fcntl.flock, handle, fcntl.LOCK_EX)
        yield
    finally:
        handle.close()


async def migrate(db: aiosqlite.Connection) -> None:
    """Bring the file to SCHEMA_VERSION: create the tables, or bring those of an older file up."""
    version = await schema_version(db)
    if version >= SCHEMA_VERSION:
        return
    tables = {row[0] for row in await db.execute_fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "events" not in tables:
        await db.executescript(f"BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        return
    if version == 0:
        await _rebuild_unversioned(db)  # events rebuilt from SCHEMA: every column
        return
    if version == 1:
        await db.executescript(_ADD_OPEN_TURNS)
    if version < 3:  # the rebuilt sessions table has every later column too; events do not
        await _with_pragmas(db, _REBUILD_SESSIONS, foreign_keys="OFF", legacy_alter_table="ON")
    if version == 3:
        await db.executescript(_ADD_CONTEXT_SUMMARY)
    if version < 5:
        await db.executescript(_ADD_ATTACHMENTS)
    await _add_message_attachments(db)


async def _add_message_attachments(db: aiosqlite.Connection) -> None:
    events = {row[1] for row in await db.execute_fetchall("PRAGMA table_info(events)")}
    if "attachments" in events:
        await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        await db.commit()
    else:
        await db.executescript(_MESSAGE_ATTACHMENTS)


async def _rebuild_unversioned(db: aiosqlite.Connection) -> None:
    columns = {row[1] for row in await db.execute_fetchall("PRAGMA table_info(sessions)")}
    if "summary_due_at" not in columns:  # made before that column existed
        await db.execute("ALTER TABLE sessions ADD COLUMN summary_due_at TEXT")
    # The rebuild drops tables rows refer to.
    await _with_pragmas(db, _REBUILD_UNVERSIONED, foreign_keys="OFF")


async def _with_pragmas(db: aiosqlite.Connection, script: str, **pragmas: str) -> None:
    """Run `script` with connection settings changed (they cannot change inside a transaction)."""
    before = {name: next(iter(await db.execute_fetchall(f"PRAGMA {name}")))[0] for name in pragmas}
    for name, value in pragmas.items():
        await db.execute(f"PRAGMA {name}={value}")
    try:
        await db.executescript(script)
    except BaseException:
        if db.in_transaction:  # a script stops at its failing statement, inside its BEGIN
            await db.rollback()
        raise
    finally:
        for name, value in before.items():
            await db.execute(f"PRAGMA {name}={value}")


async def _prepare(db: aiosqlite.Connection, path: Path, retry_seconds: float) -> None:
    db.row_factory = sqlite3.Row
    # SQLite waits this long on a lock inside one attempt; tenacity retries around it.
    await db.execute(f"PRAGMA busy_timeout={int(min(5.0, retry_seconds / 4) * 1000)}")
    await db.execute("PRAGMA synchronous=NORMAL")
    await db.execute("PRAGMA foreign_keys=ON")
    # Workers that start together on an older file: one brings it up (a rebuild must not run twice),
    # the others then find it done. Switching a file to WAL is done in turn too: connections that
    # all hold a shared lock and want the exclusive one make SQLite refuse one at once, unwaited.
    async with exclusive(path.with_name(path.name + ".migrating")):
        await db.execute("PRAGMA journal_mode=WAL")
        await migrate(db)


def _transient(exc: BaseException) -> bool:
    # "database is locked" / "disk I/O error": another writer or the disk, worth retrying.
    return isinstance(exc, sqlite3.OperationalError)


def _marks(count: int) -> str:
    return ", ".join("?" * count)


def _stamp(moment: datetime) -> str:
    # One fixed format (UTC, microseconds), so text comparison orders moments correctly.
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _stamp_ms(moment: datetime) -> str:
    # updated_at's format, as SQLite's strftime writes it (UTC, milliseconds): see _NOW.
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")


class SqliteRepository:
    """Every statement commits by itself (autocommit) and is one trip to aiosqlite's thread.

    No transaction is ever left open on the shared connection, so a failing write cannot roll back
    a concurrent one that was already acknowledged, and nothing waits for a lock: under load each
    extra trip costs an event-loop turn, which is what the time to first chunk is made of.
    """

    def __init__(self, db: aiosqlite.Connection, retry_seconds: float) -> None:
        self._db = db
        self._retry_seconds = retry_seconds

    @classmethod
    async def open(cls, path: Path, retry_seconds: float = 10.0) -> SqliteRepository:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            await _prepare(db, path, retry_seconds)
        except BaseException:
            await db.close()  # its thread would otherwise keep the process from exiting
            raise
        return cls(db, retry_seconds)

    async def _run(self, sql: str, parameters: tuple[object, ...], what: str) -> list[sqlite3.Row]:
        async def attempt() -> list[sqlite3.Row]:
            return list(await self._db.execute_fetchall(sql, parameters))

        return await with_retries(attempt, transient=_transient, what=what, budget_seconds=self._retry_seconds)

    async def ensure_session(self, session_id: str, user_id: str | None, start_time: datetime) -> Session:
        async def insert() -> Session | None:
            rows = await self._run(
                "INSERT INTO sessions (session_id, user_id, start_time) VALUES (?, ?, ?)"
                f" ON CONFLICT (session_id) DO NOTHING RETURNING {_SESSION_COLUMNS}",
                (session_id, user_id, start_time.isoformat()),
                "ensure session",
            )
            return to_session(rows[0]) if rows else None

        return await insert_or_existing(insert, lambda: self.get_session(session_id))

    async def get_session(self, session_id: str) -> Session | None:
        rows = await self._run(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE session_id = ?", (session_id,), "read session"
        )
        return to_session(rows[0]) if rows else None

    async def append_event(self, draft: EventDraft) -> StoredEvent:
        values = (
            draft.session_id,
            draft.event_type.value,
            draft.content,
            draft.timestamp.isoformat(),
            draft.turn_id,
            draft.event_key,
            draft.finish_reason,
            error_json(draft.error),
            attachments_json(draft.attachments),
        )

        # Without RETURNING the insert is one SQLite step, hence one GIL hand-back from the thread.
        async def attempt() -> tuple[int, int | None]:
            cursor = await self._db.execute(_INSERT_EVENT, values)
            return cursor.rowcount, cursor.lastrowid

        async def insert() -> StoredEvent | None:
            inserted, event_id = await with_retries(
                attempt, transient=_transient, what="append event", budget_seconds=self._retry_seconds
            )
            return StoredEvent(event_id=event_id, **draft.model_dump()) if inserted == 1 and event_id else None

        return await stored_event(
            insert,
            lambda: self.find_event(draft.session_id, draft.event_key),
            lambda: self.get_session(draft.session_id),
        )

    async def find_event(self, session_id: str, event_key: str) -> StoredEvent | None:
        rows = await self._run(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE session_id = ? AND event_key = ?",
            (session_id, event_key),
            "find event",
        )
        return to_event(rows[0]) if rows else None

    async def list_events(self, session_id: str, after_event_id: int | None = None) -> list[StoredEvent]:
        rows = await self._run(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE session_id = ? AND event_id > ? ORDER BY event_id",
            (session_id, after_event_id if after_event_id is not None else -1),
            "list events",
        )
        return [to_event(row) for row in rows]

    async def page_events(
        self, session_id: str, *, after: int | None = None, before: int | None = None, limit: int
    ) -> EventPage:
        # Read towards the direction asked, one row past the page (events_session_order serves it).
        ascending = after is not None
        rows = await self._run(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE session_id = ? AND event_id > ? AND event_id < ?"
            f" ORDER BY event_id {'ASC' if ascending else 'DESC'} LIMIT ?",
            (session_id, -1 if after is None else after, 2**63 - 1 if before is None else before, limit + 1),
            "page events",
        )
        return event_page([to_event(row) for row in rows], limit, ascending=ascending)

    async def list_sessions(self, user_id: str, limit: int, after: SessionCursor | None = None) -> list[Session]:
        # A keyset on sessions_by_user_updated; the cursor in updated_at's own text format.
        rows = await self._run(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE user_id = ? AND deleted_at IS NULL"
            " AND (updated_at, session_id) < (?, ?) ORDER BY updated_at DESC, session_id DESC LIMIT ?",
            (
                user_id,
                _stamp_ms(after.updated_at) if after is not None else "~",  # "~" sorts after any moment
                after.session_id if after is not None else "",
                limit,
            ),
            "list sessions",
        )
        return [to_session(row) for row in rows]

    async def rename_session(self, session_id: str, title: str) -> Session | None:
        rows = await self._run(
            f"UPDATE sessions SET title = ?, updated_at = {_NOW} WHERE session_id = ? AND deleted_at IS NULL"
            f" RETURNING {_SESSION_COLUMNS}",
            (title, session_id),
            "rename session",
        )
        return to_session(rows[0]) if rows else None

    async def set_generated_title(self, session_id: str, title: str) -> Session | None:
        rows = await self._run(
            "UPDATE sessions SET title = ? WHERE session_id = ? AND deleted_at IS NULL AND title IS NULL"
            f" RETURNING {_SESSION_COLUMNS}",
            (title, session_id),
            "set generated title",
        )
        return to_session(rows[0]) if rows else None

    async def delete_session(self, session_id: str) -> bool:
        # One statement: triggers (sessions_deleted_events_removed, sessions_deleted_attachments_removed)
        # remove the events and files in it.
        cleared = columns(tuple(f"{name} = NULL" for name in CLEARED_WHEN_DELETED))
        rows = await self._run(
            f"UPDATE sessions SET deleted_at = {_NOW}, {cleared} WHERE session_id = ? AND deleted_at IS NULL"
            " RETURNING session_id",
            (session_id,),
            "delete session",
        )
        return bool(rows)

    async def write_summary(self, session_id: str, summary: str, end_time: datetime, duration_seconds: int) -> None:
        await self._run(
            "UPDATE sessions SET summary = ?, end_time = ?, duration_seconds = ?,"
            " summary_due_at = CASE WHEN summary_due_at <= ? THEN NULL ELSE summary_due_at END"
            " WHERE session_id = ? AND deleted_at IS NULL",
            (summary, _stamp(end_time), duration_seconds, _stamp(end_time), session_id),
            "write summary",
        )

    async def write_context_summary(self, session_id: str, summary: str, upto: int, previous_upto: int | None) -> bool:
        # `IS`: SQLite's NULL-safe equality, so None matches only a session without one. The same
        # summary already stored matches too: a retry after a lost answer finds its own write.
        rows = await self._run(
            "UPDATE sessions SET context_summary = ?1, context_upto = ?2 WHERE session_id = ?3 AND deleted_at IS NULL"
            " AND (context_upto IS ?4 OR (context_upto = ?2 AND context_summary = ?1)) RETURNING session_id",
            (summary, upto, session_id, previous_upto),
            "write context summary",
        )
        return bool(rows)

    async def mark_emptied(self, session_id: str, emptied_at: datetime) -> None:
        await self._run(
            "UPDATE sessions SET end_time = ?1, summary_due_at = ?1,"
            " duration_seconds = max(0, CAST(round((julianday(?1) - julianday(start_time)) * 86400) AS INTEGER))"
            " WHERE session_id = ?2 AND deleted_at IS NULL",
            (_stamp(emptied_at), session_id),
            "mark session emptied",
        )

    async def due_summaries(self, limit: int) -> list[tuple[str, datetime]]:
        rows = await self._run(
            "SELECT session_id, summary_due_at FROM sessions WHERE summary_due_at IS NOT NULL"
            " ORDER BY summary_due_at LIMIT ?",
            (limit,),
            "list due summaries",
        )
        due = []
        for row in rows:
            try:
                due.append((row["session_id"], datetime.fromisoformat(row["summary_due_at"])))
            except (TypeError, ValueError):  # a column without types: someone else wrote something else
                log.warning("session %s has an unreadable summary_due_at; skipped", row["session_id"])
        return due

    async def open_turns(self, after: str | None, limit: int) -> list[tuple[str, str]]:
        rows = await self._run(
            "SELECT session_id, open_turn_id FROM sessions WHERE open_turn_id IS NOT NULL AND session_id > ?"
            " ORDER BY session_id LIMIT ?",
            (after or "", limit),
            "list open turns",
        )
        return [(row["session_id"], row["open_turn_id"]) for row in rows]

    async def turn_events(self, session_id: str, turn_id: str) -> list[StoredEvent]:
        rows = await self._run(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE session_id = ? AND turn_id = ? ORDER BY event_id",
            (session_id, turn_id),
            "list turn events",
        )
        return [to_event(row) for row in rows]

    async def add_attachment(self, info: AttachmentInfo, data: bytes) -> None:
        key = attachment_key(info.attachment_id)
        if key is None:
            raise ValueError("an attachment id is a UUID")
        values = (
            key,
            info.session_id,
            info.name,
            info.mime_type,
            info.size,
            info.sha256,
            _stamp(info.created_at),
            int(info.used),
            data,
        )

        async def attempt() -> int:
            return (await self._db.execute(_INSERT_ATTACHMENT, values)).rowcount

        inserted = await with_retries(
            attempt, transient=_transient, what="add attachment", budget_seconds=self._retry_seconds
        )
        # Nothing inserted: stored before (a retry), or the trigger skipped it (no live session).
        if inserted != 1 and await self.get_attachment(key) is None:
            raise SessionDeleted(info.session_id)

    async def get_attachment(self, attachment_id: str) -> AttachmentInfo | None:
        rows = await self._run(
            f"SELECT {_ATTACHMENT_COLUMNS} FROM attachments WHERE attachment_id = ?",
            (attachment_key(attachment_id),),
            "read attachment",
        )
        return to_attachment(rows[0]) if rows else None

    async def attachment_data(self, attachment_id: str) -> bytes | None:
        rows = await self._run(
            "SELECT data FROM attachments WHERE attachment_id = ?",
            (attachment_key(attachment_id),),
            "read attachment data",
        )
        return bytes(rows[0]["data"]) if rows else None

    async def session_attachments(self, session_id: str, attachment_ids: Sequence[str]) -> list[AttachmentInfo]:
        keys = attachment_keys(attachment_ids)
        if not keys:
            return []
        rows = await self._run(
            f"SELECT {_ATTACHMENT_COLUMNS} FROM attachments WHERE session_id = ?"
            f" AND attachment_id IN ({_marks(len(keys))})",
            (session_id, *keys),
            "read session attachments",
        )
        return in_asked_order([to_attachment(row) for row in rows], keys)

    async def mark_attachments_used(self, session_id: str, attachment_ids: Sequence[str]) -> None:
        keys = attachment_keys(attachment_ids)
        if keys:
            await self._run(
                f"UPDATE attachments SET used = 1 WHERE session_id = ? AND attachment_id IN ({_marks(len(keys))})",
                (session_id, *keys),
                "mark attachments used",
            )

    async def delete_unused_attachments(self, created_before: datetime, limit: int) -> int:
        # One statement: a row marked used meanwhile is not deleted (attachments_unused_by_age).
        rows = await self._run(
            "DELETE FROM attachments WHERE attachment_id IN (SELECT attachment_id FROM attachments"
            " WHERE used = 0 AND created_at < ? ORDER BY created_at LIMIT ?) RETURNING attachment_id",
            (_stamp(created_before), limit),
            "delete unused attachments",
        )
        return len(rows)

    async def ping(self) -> None:
        await self._db.execute_fetchall("SELECT 1")

    async def aclose(self) -> None:
        await self._db.close()
