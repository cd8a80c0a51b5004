"""The embedded default: SQLite through aiosqlite, in WAL mode."""

from __future__ import annotations

import logging
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import aiosqlite

from server.core.models import EventDraft, Session, StoredEvent, error_json
from server.storage.retry import with_retries
from server.storage.rows import (
    EVENT_COLUMNS,
    INSERTED_EVENT_COLUMNS,
    SESSION_COLUMNS,
    columns,
    insert_or_existing,
    to_event,
    to_session,
)

log = logging.getLogger(__name__)

# One definition of the tables (read at import, before any event loop runs).
SCHEMA = (Path(__file__).with_name("sqlite_schema.sql")).read_text("utf-8")
SCHEMA_VERSION = 2

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
PRAGMA user_version = {SCHEMA_VERSION};
COMMIT;
"""

# Version 1 -> 2: the open-turn marker (its triggers and index come with SCHEMA); turns left open
# before it are each session's last unanswered user message.
_ADD_OPEN_TURNS = f"""
BEGIN;
ALTER TABLE sessions ADD COLUMN open_turn_id TEXT;
UPDATE sessions SET open_turn_id = (
    SELECT u.turn_id FROM events u
    WHERE u.session_id = sessions.session_id AND u.event_type = 'user_message' AND u.turn_id IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM events a WHERE a.session_id = u.session_id AND a.event_key = 'ai:' || u.turn_id)
    ORDER BY u.event_id DESC LIMIT 1
);
{SCHEMA}
PRAGMA user_version = {SCHEMA_VERSION};
COMMIT;
"""

_EVENT_COLUMNS = columns(EVENT_COLUMNS)
_SESSION_COLUMNS = columns(SESSION_COLUMNS)
_INSERT_EVENT = (
    f"INSERT INTO events ({columns(INSERTED_EVENT_COLUMNS)}) VALUES ({', '.join('?' * len(INSERTED_EVENT_COLUMNS))})"
    " ON CONFLICT (session_id, event_key) DO NOTHING"
)


async def migrate(db: aiosqlite.Connection) -> None:
    """Bring the file to SCHEMA_VERSION: create the tables, or rebuild those of an older file."""
    (version,) = next(iter(await db.execute_fetchall("PRAGMA user_version")))
    if version >= SCHEMA_VERSION:
        return
    tables = {row[0] for row in await db.execute_fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "events" not in tables:
        await db.executescript(f"BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        return
    if version == 1:
        await db.executescript(_ADD_OPEN_TURNS)
        return
    columns = {row[1] for row in await db.execute_fetchall("PRAGMA table_info(sessions)")}
    if "summary_due_at" not in columns:  # made before that column existed
        await db.execute("ALTER TABLE sessions ADD COLUMN summary_due_at TEXT")
    await db.execute("PRAGMA foreign_keys=OFF")  # the rebuild drops tables rows refer to
    try:
        await db.executescript(_REBUILD_UNVERSIONED)
    finally:
        await db.execute("PRAGMA foreign_keys=ON")


def _transient(exc: BaseException) -> bool:
    # "database is locked" / "disk I/O error": another writer or the disk, worth retrying.
    return isinstance(exc, sqlite3.OperationalError)


def _stamp(moment: datetime) -> str:
    # One fixed format (UTC, microseconds), so text comparison orders moments correctly.
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


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
        db.row_factory = sqlite3.Row
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.execute("PRAGMA foreign_keys=ON")
        # SQLite waits this long on a lock inside one attempt; tenacity retries around it.
        await db.execute(f"PRAGMA busy_timeout={int(min(5.0, retry_seconds / 4) * 1000)}")
        await migrate(db)
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

        return await insert_or_existing(insert, lambda: self.find_event(draft.session_id, draft.event_key))

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

    async def write_summary(self, session_id: str, summary: str, end_time: datetime, duration_seconds: int) -> None:
        await self._run(
            "UPDATE sessions SET summary = ?, end_time = ?, duration_seconds = ?,"
            " summary_due_at = CASE WHEN summary_due_at <= ? THEN NULL ELSE summary_due_at END"
            " WHERE session_id = ?",
            (summary, _stamp(end_time), duration_seconds, _stamp(end_time), session_id),
            "write summary",
        )

    async def mark_emptied(self, session_id: str, emptied_at: datetime) -> None:
        await self._run(
            "UPDATE sessions SET end_time = ?1, summary_due_at = ?1,"
            " duration_seconds = max(0, CAST(round((julianday(?1) - julianday(start_time)) * 86400) AS INTEGER))"
            " WHERE session_id = ?2",
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

    async def ping(self) -> None:
        await self._db.execute_fetchall("SELECT 1")

    async def aclose(self) -> None:
        await self._db.close()
