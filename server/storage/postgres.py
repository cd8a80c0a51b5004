"""PostgreSQL through asyncpg: any PostgreSQL, or Supabase's direct or pooled connection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import asyncpg

from server.config import UnusableSetting
from server.core.models import EventDraft, Session, StoredEvent, attachments_json, error_json
from server.core.ports import AttachmentInfo, EventPage, SessionCursor, SessionDeleted, StorageUnavailable
from server.storage import dsn as dsn_text
from server.storage.retry import cause, with_retries
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
    storable,
    stored_event,
    to_attachment,
    to_event,
    to_session,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

MIGRATIONS = Path(__file__).resolve().parent.parent.parent / "supabase" / "migrations"
_EVENT_COLUMNS = columns(EVENT_COLUMNS)
_SESSION_COLUMNS = columns(SESSION_COLUMNS)
_INSERT_EVENT = (
    f"INSERT INTO events ({columns(INSERTED_EVENT_COLUMNS)})"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9::jsonb) ON CONFLICT (session_id, event_key) DO NOTHING"
    f" RETURNING {_EVENT_COLUMNS}"
)
# A user's sessions after a cursor: one keyset query on sessions_by_user_updated. No cursor is a
# bound past every row rather than an `IS NULL OR`, which would keep a generic plan (asyncpg's
# prepared statements) from using the bound in the index scan.
_LIST_SESSIONS = (
    f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE user_id = $1 AND deleted_at IS NULL"
    " AND (updated_at, session_id)"
    " < (coalesce($2::timestamptz, 'infinity'), coalesce($3::uuid, '00000000-0000-0000-0000-000000000000'))"
    " ORDER BY updated_at DESC, session_id DESC LIMIT $4"
)
# Bounds past every event for the side not asked, for the same reason.
_PAGE_EVENTS = (
    f"SELECT {_EVENT_COLUMNS} FROM events WHERE session_id = $1"
    " AND event_id > coalesce($2::bigint, -1) AND event_id < coalesce($3::bigint, 9223372036854775807)"
    " ORDER BY event_id {direction} LIMIT $4"
)
# One statement: triggers (sessions_deleted_events_removed, sessions_deleted_attachments_removed)
# remove the events and files in it.
_DELETE_SESSION = (
    "UPDATE sessions SET deleted_at = now(), "
    + columns(tuple(f"{name} = NULL" for name in CLEARED_WHEN_DELETED))
    + " WHERE session_id = $1 AND deleted_at IS NULL RETURNING session_id"
)
_ATTACHMENT_COLUMNS = columns(ATTACHMENT_COLUMNS)
# The trigger attachments_need_live_session skips the row when the session is not live.
_INSERT_ATTACHMENT = (
    f"INSERT INTO attachments ({_ATTACHMENT_COLUMNS}, data) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
    " ON CONFLICT (attachment_id) DO NOTHING RETURNING attachment_id"
)
# One statement: a row marked used meanwhile is not deleted (its row lock is waited for, then
# `used` read again).
_DELETE_UNUSED_ATTACHMENTS = (
    "DELETE FROM attachments WHERE attachment_id IN (SELECT attachment_id FROM attachments"
    " WHERE NOT used AND created_at < $1 ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
    " AND NOT used RETURNING attachment_id"
)
# Only one process applies the migrations at a time (several may start together).
_MIGRATION_LOCK = 7_305_921_116
CONNECT_TIMEOUT_SECONDS = 5.0
# While PostgreSQL does not answer: the longest pause between two tries, and between two log lines
# that only say it still does not.
MAX_RECONNECT_WAIT_SECONDS = 5.0
STILL_WAITING_LOG_SECONDS = 60.0


def transient(exc: BaseException) -> bool:
    """Failures a retry can outlive: the connection, the server's availability, serialization."""
    if isinstance(exc, asyncpg.InterfaceError):
        # A DSN asyncpg cannot use, or a value it cannot encode, fails the same way every time.
        return not isinstance(exc, ValueError)
    if isinstance(exc, OSError | TimeoutError):
        return True
    state = getattr(exc, "sqlstate", None) or ""
    return state.startswith(("08", "53", "57P")) or state in ("40001", "40P01")


def refusal(dsn: str, exc: BaseException) -> UnusableSetting | None:
    """DATABASE_URL unusable as it is (no such database, a role or password refused, a parameter
    asyncpg rejects), as opposed to a server that does not answer yet; None for the latter."""
    if transient(exc) or not isinstance(exc, asyncpg.PostgresError | ValueError):
        return None
    said = dsn_text.scrubbed(str(exc), dsn)
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        reason = f"names a database that does not exist ({said})"
    elif isinstance(exc, asyncpg.PostgresError):
        reason = f"is refused by PostgreSQL: {said} ({exc.sqlstate} {type(exc).__name__})"
    else:
        reason = f"is refused by asyncpg: {said}"
    return UnusableSetting("DATABASE_URL", dsn_text.shown(dsn), reason)


def not_answering(exc: BaseException) -> str:
    """Why PostgreSQL does not answer, for a log line: connection errors say where they failed."""
    detail = f": {exc}" if isinstance(exc, OSError) and str(exc) else ""
    return f"{cause(exc)}{detail}"


async def probe(dsn: str) -> None:
    """Raise UnusableSetting when PostgreSQL refuses `dsn`; return when it accepts it or does not
    answer (the service then starts and waits for it)."""
    try:
        conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_SECONDS)
    except Exception as exc:
        if (refused := refusal(dsn, exc)) is not None:
            raise refused from None
        return
    await conn.close()


class PostgresRepository:
    def __init__(self, dsn: str, retry_seconds: float, *, command_timeout: float, migrate: bool) -> None:
        self._dsn = dsn
        self._retry_seconds = retry_seconds
        self._command_timeout = command_timeout
        self._migrate = migrate
        self._pool: asyncpg.Pool | None = None
        self._waiting: asyncio.Task[None] | None = None
        self._not_ready = ""

    @classmethod
    async def open(
        cls,
        dsn: str,
        retry_seconds: float = 10.0,
        *,
        command_timeout: float = 10.0,
        migrate: bool = True,
        wait: bool = False,
    ) -> PostgresRepository:
        """Connected and migrated, or UnusableSetting when PostgreSQL refuses DATABASE_URL. When it
        does not answer: StorageUnavailable after `retry_seconds`; with `wait`, at once a repository
        that answers `unavailable` and connects in the background as soon as PostgreSQL answers."""
        repo = cls(dsn, retry_seconds, command_timeout=command_timeout, migrate=migrate)
        try:
            if wait:
                await repo._connect()
            else:
                await with_retries(
                    repo._connect, transient=transient, what="connect to PostgreSQL", budget_seconds=retry_seconds
                )
        except Exception as exc:
            failure = exc.__cause__ if isinstance(exc, StorageUnavailable) and exc.__cause__ else exc
            if (refused := refusal(dsn, failure)) is not None:
                raise refused from None
            if not (wait and transient(exc)):
                raise
            repo._wait_for_server(exc)
        return repo

    async def _connect(self) -> None:
        # Supabase's pooler (port 6543, transaction mode) cannot keep prepared statements.
        pooled = urlparse(self._dsn).port == 6543 or "pooler.supabase.com" in self._dsn
        # No connection floor: asyncpg would keep one with a background task that logs a traceback
        # per try during an outage; idle connections are still kept (max_inactive_connection_lifetime).
        pool = await asyncpg.create_pool(
            self._dsn,
            min_size=0,
            max_size=10,
            timeout=CONNECT_TIMEOUT_SECONDS,
            command_timeout=self._command_timeout,
            statement_cache_size=0 if pooled else 100,
        )
        try:
            async with pool.acquire() as conn:  # the pool connects lazily: this is the first try
                if self._migrate:
                    await self._apply_migrations(conn)
        except BaseException:
            pool.terminate()
            raise
        self._pool = pool

    def _wait_for_server(self, first: BaseException) -> None:
        self._not_ready = f"DATABASE_URL does not answer ({cause(first)})"
        log.warning(
            "DATABASE_URL (%s): PostgreSQL does not answer (%s); serving, /readyz 503, until it does",
            dsn_text.shown(self._dsn),
            not_answering(first),
        )
        self._waiting = asyncio.create_task(self._connect_when_answered(first), name="connect to PostgreSQL")

    async def _connect_when_answered(self, first: BaseException) -> None:
        loop = asyncio.get_running_loop()
        started = logged_at = loop.time()
        logged = not_answering(first)
        pause = 0.2
        while True:
            await asyncio.sleep(pause)
            pause = min(pause * 2, MAX_RECONNECT_WAIT_SECONDS)
            try:
                await self._connect()
            except Exception as exc:
                # Refused now (the database is not created yet, say): waiting still helps, as the
                # operator may create it; each new reason is logged once, the same one once a minute.
                refused = refusal(self._dsn, exc)
                reason = str(refused) if refused is not None else not_answering(exc)
                self._not_ready = f"DATABASE_URL {'is refused' if refused else 'does not answer'} ({cause(exc)})"
                if reason != logged or loop.time() - logged_at >= STILL_WAITING_LOG_SECONDS:
                    log.warning(
                        "DATABASE_URL: still waiting for PostgreSQL after %.0f s: %s", loop.time() - started, reason
                    )
                    logged, logged_at = reason, loop.time()
                continue
            log.warning("DATABASE_URL: PostgreSQL answers after %.1f s; storage is ready", loop.time() - started)
            return

    @staticmethod
    async def _apply_migrations(conn: asyncpg.Connection) -> None:
        """Create what is missing by applying supabase/migrations (each is safe to apply again)."""
        scripts = await asyncio.to_thread(lambda: [p.read_text("utf-8") for p in sorted(MIGRATIONS.glob("*.sql"))])
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        try:
            for script in scripts:
                await conn.execute(script)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)

    def _ready_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StorageUnavailable(self._not_ready)
        return self._pool

    async def _retrying(self, operation: Callable[[asyncpg.Connection], Awaitable[T]], what: str) -> T:
        pool = self._ready_pool()  # while PostgreSQL has not answered since start: unavailable at once

        async def attempt() -> T:
            async with pool.acquire() as conn:
                return await operation(conn)

        return await with_retries(attempt, transient=transient, what=what, budget_seconds=self._retry_seconds)

    async def ensure_session(self, session_id: str, user_id: str | None, start_time: datetime) -> Session:
        async def op(conn: asyncpg.Connection) -> Session:
            async def insert() -> Session | None:
                row = await conn.fetchrow(
                    "INSERT INTO sessions (session_id, user_id, start_time) VALUES ($1, $2, $3)"
                    f" ON CONFLICT (session_id) DO NOTHING RETURNING {_SESSION_COLUMNS}",
                    session_id,
                    user_id,
                    start_time,
                )
                return to_session(row) if row else None

            return await insert_or_existing(insert, lambda: self._fetch_session(conn, session_id))

        return await self._retrying(op, "ensure session")

    async def get_session(self, session_id: str) -> Session | None:
        return await self._retrying(lambda conn: self._fetch_session(conn, session_id), "read session")

    async def append_event(self, draft: EventDraft) -> StoredEvent:
        async def op(conn: asyncpg.Connection) -> StoredEvent:
            async def insert() -> StoredEvent | None:
                row = await conn.fetchrow(
                    _INSERT_EVENT,
                    draft.session_id,
                    draft.event_type.value,
                    storable(draft.content),
                    draft.timestamp,
                    draft.turn_id,
                    draft.event_key,
                    draft.finish_reason,
                    error_json(draft.error),
                    attachments_json(draft.attachments),
                )
                return to_event(row) if row else None

            return await stored_event(
                insert,
                lambda: self._fetch_event(conn, draft.session_id, draft.event_key),
                lambda: self._fetch_session(conn, draft.session_id),
            )

        return await self._retrying(op, "append event")

    async def find_event(self, session_id: str, event_key: str) -> StoredEvent | None:
        return await self._retrying(lambda conn: self._fetch_event(conn, session_id, event_key), "find event")

    @staticmethod
    async def _fetch_session(conn: asyncpg.Connection, session_id: str) -> Session | None:
        row = await conn.fetchrow(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE session_id = $1", session_id)
        return to_session(row) if row else None

    @staticmethod
    async def _fetch_event(conn: asyncpg.Connection, session_id: str, event_key: str) -> StoredEvent | None:
        row = await conn.fetchrow(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE session_id = $1 AND event_key = $2", session_id, event_key
        )
        return to_event(row) if row else None

    async def list_events(self, session_id: str, after_event_id: int | None = None) -> list[StoredEvent]:
        async def op(conn: asyncpg.Connection) -> list[StoredEvent]:
            rows = await conn.fetch(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE session_id = $1 AND event_id > $2 ORDER BY event_id",
                session_id,
                after_event_id if after_event_id is not None else -1,
            )
            return [to_event(row) for row in rows]

        return await self._retrying(op, "list events")

    async def page_events(
        self, session_id: str, *, after: int | None = None, before: int | None = None, limit: int
    ) -> EventPage:
        # Read towards the direction asked, one row past the page (events_session_order serves it).
        ascending = after is not None

        async def op(conn: asyncpg.Connection) -> EventPage:
            rows = await conn.fetch(
                _PAGE_EVENTS.format(direction="ASC" if ascending else "DESC"),
                session_id,
                after,
                before,
                limit + 1,
            )
            return event_page([to_event(row) for row in rows], limit, ascending=ascending)

        return await self._retrying(op, "page events")

    async def list_sessions(self, user_id: str, limit: int, after: SessionCursor | None = None) -> list[Session]:
        async def op(conn: asyncpg.Connection) -> list[Session]:
            rows = await conn.fetch(
                _LIST_SESSIONS,
                user_id,
                after.updated_at if after is not None else None,
                after.session_id if after is not None else None,
                limit,
            )
            return [to_session(row) for row in rows]

        return await self._retrying(op, "list sessions")

    async def rename_session(self, session_id: str, title: str) -> Session | None:
        return await self._update_session(
            "UPDATE sessions SET title = $2, updated_at = now() WHERE session_id = $1 AND deleted_at IS NULL",
            session_id,
            storable(title),
            what="rename session",
        )

    async def set_generated_title(self, session_id: str, title: str) -> Session | None:
        return await self._update_session(
            "UPDATE sessions SET title = $2 WHERE session_id = $1 AND deleted_at IS NULL AND title IS NULL",
            session_id,
            storable(title),
            what="set generated title",
        )

    async def _update_session(self, update: str, *args: object, what: str) -> Session | None:
        async def op(conn: asyncpg.Connection) -> Session | None:
            row = await conn.fetchrow(f"{update} RETURNING {_SESSION_COLUMNS}", *args)
            return to_session(row) if row else None

        return await self._retrying(op, what)

    async def delete_session(self, session_id: str) -> bool:
        async def op(conn: asyncpg.Connection) -> bool:
            return await conn.fetchval(_DELETE_SESSION, session_id) is not None

        return await self._retrying(op, "delete session")

    async def write_summary(self, session_id: str, summary: str, end_time: datetime, duration_seconds: int) -> None:
        async def op(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "UPDATE sessions SET summary = $2, end_time = $3, duration_seconds = $4,"
                " summary_due_at = CASE WHEN summary_due_at <= $3 THEN NULL ELSE summary_due_at END"
                " WHERE session_id = $1 AND deleted_at IS NULL",
                session_id,
                storable(summary),
                end_time,
                duration_seconds,
            )

        await self._retrying(op, "write summary")

    async def write_context_summary(self, session_id: str, summary: str, upto: int, previous_upto: int | None) -> bool:
        async def op(conn: asyncpg.Connection) -> bool:
            # The same summary already stored matches too: a retry after a lost answer finds its write.
            stored = await conn.fetchval(
                "UPDATE sessions SET context_summary = $2, context_upto = $3 WHERE session_id = $1"
                " AND deleted_at IS NULL AND (context_upto IS NOT DISTINCT FROM $4::bigint"
                " OR (context_upto = $3 AND context_summary = $2)) RETURNING session_id",
                session_id,
                storable(summary),
                upto,
                previous_upto,
            )
            return stored is not None

        return await self._retrying(op, "write context summary")

    async def mark_emptied(self, session_id: str, emptied_at: datetime) -> None:
        async def op(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "UPDATE sessions SET end_time = $2, summary_due_at = $2,"
                " duration_seconds = greatest(0, round(extract(epoch FROM $2 - start_time)))::integer"
                " WHERE session_id = $1 AND deleted_at IS NULL",
                session_id,
                emptied_at,
            )

        await self._retrying(op, "mark session emptied")

    async def due_summaries(self, limit: int) -> list[tuple[str, datetime]]:
        async def op(conn: asyncpg.Connection) -> list[tuple[str, datetime]]:
            rows = await conn.fetch(
                "SELECT session_id, summary_due_at FROM sessions WHERE summary_due_at IS NOT NULL"
                " ORDER BY summary_due_at LIMIT $1",
                limit,
            )
            return [(str(row["session_id"]), row["summary_due_at"]) for row in rows]

        return await self._retrying(op, "list due summaries")

    async def open_turns(self, after: str | None, limit: int) -> list[tuple[str, str]]:
        async def op(conn: asyncpg.Connection) -> list[tuple[str, str]]:
            rows = await conn.fetch(
                "SELECT session_id, open_turn_id FROM sessions WHERE open_turn_id IS NOT NULL"
                " AND ($1::uuid IS NULL OR session_id > $1::uuid) ORDER BY session_id LIMIT $2",
                after,
                limit,
            )
            return [(str(row["session_id"]), row["open_turn_id"]) for row in rows]

        return await self._retrying(op, "list open turns")

    async def turn_events(self, session_id: str, turn_id: str) -> list[StoredEvent]:
        async def op(conn: asyncpg.Connection) -> list[StoredEvent]:
            rows = await conn.fetch(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE session_id = $1 AND turn_id = $2 ORDER BY event_id",
                session_id,
                turn_id,
            )
            return [to_event(row) for row in rows]

        return await self._retrying(op, "list turn events")

    async def add_attachment(self, info: AttachmentInfo, data: bytes) -> None:
        key = attachment_key(info.attachment_id)
        if key is None:
            raise ValueError("an attachment id is a UUID")

        async def op(conn: asyncpg.Connection) -> None:
            inserted = await conn.fetchval(
                _INSERT_ATTACHMENT,
                key,
                info.session_id,
                storable(info.name),
                info.mime_type,
                info.size,
                info.sha256,
                info.created_at,
                info.used,
                data,
            )
            # Nothing inserted: stored before (a retry), or skipped (no live session).
            if (
                inserted is None
                and await conn.fetchval("SELECT 1 FROM attachments WHERE attachment_id = $1", key) is None
            ):
                raise SessionDeleted(info.session_id)

        await self._retrying(op, "add attachment")

    async def get_attachment(self, attachment_id: str) -> AttachmentInfo | None:
        if (key := attachment_key(attachment_id)) is None:
            return None

        async def op(conn: asyncpg.Connection) -> AttachmentInfo | None:
            row = await conn.fetchrow(f"SELECT {_ATTACHMENT_COLUMNS} FROM attachments WHERE attachment_id = $1", key)
            return to_attachment(row) if row else None

        return await self._retrying(op, "read attachment")

    async def attachment_data(self, attachment_id: str) -> bytes | None:
        if (key := attachment_key(attachment_id)) is None:
            return None

        async def op(conn: asyncpg.Connection) -> bytes | None:
            data = await conn.fetchval("SELECT data FROM attachments WHERE attachment_id = $1", key)
            return bytes(data) if data is not None else None

        return await self._retrying(op, "read attachment data")

    async def session_attachments(self, session_id: str, attachment_ids: Sequence[str]) -> list[AttachmentInfo]:
        if not (keys := attachment_keys(attachment_ids)):
            return []

        async def op(conn: asyncpg.Connection) -> list[AttachmentInfo]:
            rows = await conn.fetch(
                f"SELECT {_ATTACHMENT_COLUMNS} FROM attachments"
                " WHERE session_id = $1 AND attachment_id = ANY($2::uuid[])",
                session_id,
                keys,
            )
            return in_asked_order([to_attachment(row) for row in rows], keys)

        return await self._retrying(op, "read session attachments")

    async def mark_attachments_used(self, session_id: str, attachment_ids: Sequence[str]) -> None:
        if not (keys := attachment_keys(attachment_ids)):
            return

        async def op(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "UPDATE attachments SET used = true WHERE session_id = $1 AND attachment_id = ANY($2::uuid[])",
                session_id,
                keys,
            )

        await self._retrying(op, "mark attachments used")

    async def delete_unused_attachments(self, created_before: datetime, limit: int) -> int:
        async def op(conn: asyncpg.Connection) -> int:
            return len(await conn.fetch(_DELETE_UNUSED_ATTACHMENTS, created_before, limit))

        return await self._retrying(op, "delete unused attachments")

    async def ping(self) -> None:
        async with self._ready_pool().acquire(timeout=2) as conn:
            await conn.fetchval("SELECT 1")

    async def aclose(self) -> None:
        if self._waiting is not None:
            self._waiting.cancel()
            await asyncio.wait([self._waiting])
        if self._pool is None:
            return
        try:
            await asyncio.wait_for(self._pool.close(), timeout=5)
        except TimeoutError:
            self._pool.terminate()
