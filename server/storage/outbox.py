"""The local durable queue: an SQLite file beside the service, for events storage cannot take yet."""

from __future__ import annotations

import asyncio
import fcntl
import sqlite3
from collections import Counter
from pathlib import Path
from typing import BinaryIO

import aiosqlite

from server.core.models import EventDraft

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    position   INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL,
    event_key  TEXT NOT NULL,
    draft      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_session ON outbox (session_id, position);
-- Events storage refused for good (not a transient failure): kept for an operator, never dropped.
CREATE TABLE IF NOT EXISTS outbox_set_aside (
    position   INTEGER PRIMARY KEY,
    session_id TEXT NOT NULL,
    draft      TEXT NOT NULL,
    reason     TEXT NOT NULL,
    set_aside  TEXT NOT NULL DEFAULT (datetime('now'))
);
"""


def claim_slot(path: Path) -> tuple[Path, BinaryIO]:
    """The first queue file beside `path` no other live process holds: `path`, then `name-1`, ...

    Each process drains its own file. Held by an exclusive lock on `<file>.lock`, which the OS
    frees when the process dies, so the worker that replaces a dead one takes over its queue.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for slot in range(1024):
        candidate = path if slot == 0 else path.with_name(f"{path.stem}-{slot}{path.suffix}")
        # Held open for as long as this process owns the slot.
        handle = open(candidate.with_name(candidate.name + ".lock"), "a+b")  # noqa: SIM115
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        return candidate, handle
    raise RuntimeError(f"no free local queue file beside {path}")


class SqliteOutbox:
    def __init__(self, db: aiosqlite.Connection, waiting: Counter[str], path: Path, claim: BinaryIO) -> None:
        self._db = db
        self._waiting = waiting
        self.path = path
        self._claim = claim
        # One connection, hence one transaction at a time.
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> SqliteOutbox:
        path, claim = await asyncio.to_thread(claim_slot, path)
        db = await aiosqlite.connect(path)
        await db.execute("PRAGMA journal_mode=WAL")
        # An event acknowledged from here must survive a power cut: sync every commit.
        await db.execute("PRAGMA synchronous=FULL")
        await db.executescript(SCHEMA)
        await db.commit()
        waiting: Counter[str] = Counter()
        async with db.execute("SELECT session_id, count(*) FROM outbox GROUP BY session_id") as cursor:
            for session_id, count in await cursor.fetchall():
                waiting[session_id] = count
        return cls(db, waiting, path, claim)

    @property
    def depth(self) -> int:
        return self._waiting.total()

    def holds(self, session_id: str) -> bool:
        return self._waiting[session_id] > 0

    async def put(self, draft: EventDraft) -> None:
        async with self._lock:
            await self._db.execute(
                "INSERT INTO outbox (session_id, event_key, draft) VALUES (?, ?, ?)",
                (draft.session_id, draft.event_key, draft.model_dump_json()),
            )
            await self._db.commit()
        self._waiting[draft.session_id] += 1

    async def oldest(self, limit: int) -> list[tuple[int, EventDraft]]:
        async with self._db.execute("SELECT position, draft FROM outbox ORDER BY position LIMIT ?", (limit,)) as cursor:
            rows = await cursor.fetchall()
        return [(position, EventDraft.model_validate_json(draft)) for position, draft in rows]

    async def remove(self, position: int, session_id: str) -> None:
        async with self._lock:
            cursor = await self._db.execute("DELETE FROM outbox WHERE position = ?", (position,))
            await self._db.commit()
        if cursor.rowcount:
            self._forget_one(session_id)

    async def set_aside(self, position: int, session_id: str, reason: str) -> None:
        async with self._lock:
            try:
                await self._db.execute(
                    "INSERT INTO outbox_set_aside (position, session_id, draft, reason)"
                    " SELECT position, session_id, draft, ? FROM outbox WHERE position = ?",
                    (reason, position),
                )
                cursor = await self._db.execute("DELETE FROM outbox WHERE position = ?", (position,))
                await self._db.commit()
            except sqlite3.Error:
                await self._db.rollback()
                raise
        if cursor.rowcount:
            self._forget_one(session_id)

    async def discard(self, session_id: str) -> int:
        """Drop the session's waiting and set-aside events in one transaction; how many waited."""
        async with self._lock:
            try:
                cursor = await self._db.execute("DELETE FROM outbox WHERE session_id = ?", (session_id,))
                await self._db.execute("DELETE FROM outbox_set_aside WHERE session_id = ?", (session_id,))
                await self._db.commit()
            except sqlite3.Error:
                await self._db.rollback()
                raise
        self._waiting.pop(session_id, None)
        return cursor.rowcount

    def _forget_one(self, session_id: str) -> None:
        self._waiting[session_id] -= 1
        if self._waiting[session_id] <= 0:
            del self._waiting[session_id]

    async def waiting(self, session_id: str) -> list[EventDraft]:
        if not self.holds(session_id):
            return []
        async with self._db.execute(
            "SELECT draft FROM outbox WHERE session_id = ? ORDER BY position", (session_id,)
        ) as cursor:
            rows = await cursor.fetchall()
        return [EventDraft.model_validate_json(draft) for (draft,) in rows]

    async def find(self, session_id: str, event_key: str) -> EventDraft | None:
        if not self.holds(session_id):
            return None
        async with self._db.execute(
            "SELECT draft FROM outbox WHERE session_id = ? AND event_key = ?", (session_id, event_key)
        ) as cursor:
            row = await cursor.fetchone()
        return EventDraft.model_validate_json(row[0]) if row else None

    async def aclose(self) -> None:
        await self._db.close()
        self._claim.close()  # frees the slot
