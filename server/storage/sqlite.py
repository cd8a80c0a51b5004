"""The embedded default: SQLite through aiosqlite, in WAL mode."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import aiosqlite

from server.core.models import EventDraft, Session, StoredEvent
from server.storage.retry import with_retries

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id       TEXT PRIMARY KEY,
    user_id          TEXT,
    start_time       TEXT NOT NULL,
    end_time         TEXT,
    summary          TEXT,
    duration_seconds INTEGER,
    summary_due_at   TEXT
);
CREATE TABLE IF NOT EXISTS events (
    event_id   INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(session_id) ON DELETE CASCADE,
    timestamp  TEXT NOT NULL,
    event_type TEXT NOT NULL
        CHECK (event_type IN ('user_message', 'ai_message', 'tool_call', 'tool_result')),
    content    TEXT NOT NULL,
    turn_id    TEXT,
    event_key  TEXT NOT NULL,
    UNIQUE (session_id, event_key)
);
CREATE INDEX IF NOT EXISTS events_session_order ON events (session_id, event_id);
"""

T = TypeVar("T")
_EVENT_COLUMNS = "event_id, session_id, event_type, content, timestamp, turn_id, event_key"
_SESSION_COLUMNS = "session_id, user_id, start_time, end_time, summary, duration_seconds"


def _transient(exc: BaseException) -> bool:
    # "database is locked" / "disk I/O error": another writer or the disk, worth retrying.
    return isinstance(exc, sqlite3.OperationalError)


def _stamp(moment: datetime) -> str:
    # One fixed format (UTC, microseconds), so text comparison orders moments correctly.
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


class SqliteRepository:
    def __init__(self, db: aiosqlite.Connection, retry_seconds: float) -> None:
        self._db = db
        self._retry_seconds = retry_seconds
        # Every coroutine shares this one connection, hence its one transaction: without the
        # lock, a failing write's rollback would also undo a concurrent write already acknowledged.
        self._transaction = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path, retry_seconds: float = 10.0) -> SqliteRepository:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path)
        db.row_factory = sqlite3.Row
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.execute("PRAGMA foreign_keys=ON")
        # SQLite waits this long on a lock inside one attempt; tenacity retries around it.
        await db.execute(f"PRAGMA busy_timeout={int(min(5.0, retry_seconds / 4) * 1000)}")
        await db.executescript(SCHEMA)
        async with db.execute("PRAGMA table_info(sessions)") as cursor:
            columns = {row["name"] for row in await cursor.fetchall()}
        if "summary_due_at" not in columns:  # a file made before the column existed
            await db.execute("ALTER TABLE sessions ADD COLUMN summary_due_at TEXT")
        await db.commit()
        return cls(db, retry_seconds)

    async def _retrying(self, operation: Callable[[], Awaitable[T]], what: str) -> T:
        async def attempt() -> T:
            async with self._transaction:
                try:
                    return await operation()
                except sqlite3.Error:
                    # A failed statement can leave its implicit transaction open; start the retry clean.
                    await self._db.rollback()
                    raise

        return await with_retries(attempt, transient=_transient, what=what, budget_seconds=self._retry_seconds)

    async def ensure_session(self, session_id: str, user_id: str | None, start_time: datetime) -> Session:
        async def op() -> Session:
            existing = await self._fetch_session(session_id)
            if existing is not None:
                return existing
            await self._db.execute(
                "INSERT INTO sessions (session_id, user_id, start_time) VALUES (?, ?, ?)"
                " ON CONFLICT (session_id) DO NOTHING",
                (session_id, user_id, start_time.isoformat()),
            )
            await self._db.commit()
            row = await self._fetch_session(session_id)
            assert row is not None
            return row

        return await self._retrying(op, "ensure session")

    async def get_session(self, session_id: str) -> Session | None:
        return await self._retrying(lambda: self._fetch_session(session_id), "read session")

    async def _fetch_session(self, session_id: str) -> Session | None:
        async with self._db.execute(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE session_id = ?", (session_id,)
        ) as cursor:
            row = await cursor.fetchone()
        return Session.model_validate(dict(row)) if row else None

    async def append_event(self, draft: EventDraft) -> StoredEvent:
        async def op() -> StoredEvent:
            async with self._db.execute(
                "INSERT INTO events (session_id, timestamp, event_type, content, turn_id, event_key)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (session_id, event_key) DO NOTHING"
                f" RETURNING {_EVENT_COLUMNS}",
                (
                    draft.session_id,
                    draft.timestamp.isoformat(),
                    draft.event_type.value,
                    draft.content,
                    draft.turn_id,
                    draft.event_key,
                ),
            ) as cursor:
                row = await cursor.fetchone()
            await self._db.commit()
            if row is not None:
                return StoredEvent.model_validate(dict(row))
            existing = await self._fetch_event(draft.session_id, draft.event_key)
            assert existing is not None
            return existing

        return await self._retrying(op, "append event")

    async def find_event(self, session_id: str, event_key: str) -> StoredEvent | None:
        return await self._retrying(lambda: self._fetch_event(session_id, event_key), "find event")

    async def _fetch_event(self, session_id: str, event_key: str) -> StoredEvent | None:
        async with self._db.execute(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE session_id = ? AND event_key = ?",
            (session_id, event_key),
        ) as cursor:
            row = await cursor.fetchone()
        return StoredEvent.model_validate(dict(row)) if row else None

    async def list_events(self, session_id: str, after_event_id: int | None = None) -> list[StoredEvent]:
        async def op() -> list[StoredEvent]:
            async with self._db.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE session_id = ? AND event_id > ? ORDER BY event_id",
                (session_id, after_event_id if after_event_id is not None else -1),
            ) as cursor:
                rows = await cursor.fetchall()
            return [StoredEvent.model_validate(dict(r)) for r in rows]

        return await self._retrying(op, "list events")

    async def write_summary(self, session_id: str, summary: str, end_time: datetime, duration_seconds: int) -> None:
        async def op() -> None:
            await self._db.execute(
                "UPDATE sessions SET summary = ?, end_time = ?, duration_seconds = ?,"
                " summary_due_at = CASE WHEN summary_due_at <= ? THEN NULL ELSE summary_due_at END"
                " WHERE session_id = ?",
                (summary, _stamp(end_time), duration_seconds, _stamp(end_time), session_id),
            )
            await self._db.commit()

        await self._retrying(op, "write summary")

    async def mark_summary_due(self, session_id: str, emptied_at: datetime) -> None:
        async def op() -> None:
            await self._db.execute(
                "UPDATE sessions SET summary_due_at = ? WHERE session_id = ?", (_stamp(emptied_at), session_id)
            )
            await self._db.commit()

        await self._retrying(op, "mark summary due")

    async def due_summaries(self, limit: int) -> list[tuple[str, datetime]]:
        async def op() -> list[tuple[str, datetime]]:
            async with self._db.execute(
                "SELECT session_id, summary_due_at FROM sessions WHERE summary_due_at IS NOT NULL"
                " ORDER BY summary_due_at LIMIT ?",
                (limit,),
            ) as cursor:
                rows = await cursor.fetchall()
            return [(row["session_id"], datetime.fromisoformat(row["summary_due_at"])) for row in rows]

        return await self._retrying(op, "list due summaries")

    async def ping(self) -> None:
        async with self._db.execute("SELECT 1") as cursor:
            await cursor.fetchone()

    async def aclose(self) -> None:
        await self._db.close()
