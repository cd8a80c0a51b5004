"""supabase/migrations applied to the real PostgreSQL (127.0.0.1:5432, database `test`)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

MIGRATIONS = sorted((Path(__file__).resolve().parent.parent / "supabase" / "migrations").glob("*.sql"))
ADMIN_DSN = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
async def scratch_db() -> AsyncIterator[asyncpg.Connection]:
    """A fresh database, dropped afterwards."""
    try:
        admin = await asyncpg.connect(ADMIN_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"PostgreSQL is not reachable at {ADMIN_DSN}: {exc}")
    name = f"migrations_{uuid.uuid4().hex[:12]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    conn = await asyncpg.connect(ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}")
    try:
        yield conn
    finally:
        await conn.close()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


async def apply_all(conn: asyncpg.Connection) -> None:
    for path in MIGRATIONS:
        await conn.execute(path.read_text())


async def test_migrations_apply_to_a_fresh_database_twice(scratch_db: asyncpg.Connection) -> None:
    assert MIGRATIONS, "no migration files"
    await apply_all(scratch_db)
    await apply_all(scratch_db)
    columns = await scratch_db.fetch(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'"
    )
    by_table: dict[str, set[str]] = {}
    for row in columns:
        by_table.setdefault(row["table_name"], set()).add(row["column_name"])
    assert {"session_id", "user_id", "start_time", "end_time", "summary", "duration_seconds"} <= by_table["sessions"]
    assert {"event_id", "session_id", "timestamp", "event_type", "content"} <= by_table["events"]
    rls = await scratch_db.fetch("SELECT relname, relrowsecurity FROM pg_class WHERE relname IN ('sessions', 'events')")
    assert {r["relname"]: r["relrowsecurity"] for r in rls} == {"sessions": True, "events": True}


async def test_a_retried_event_write_is_stored_once(scratch_db: asyncpg.Connection) -> None:
    await apply_all(scratch_db)
    sid = uuid.uuid4()
    await scratch_db.execute("INSERT INTO sessions (session_id, user_id) VALUES ($1, 'u1')", sid)
    insert = (
        "INSERT INTO events (session_id, event_type, content, event_key) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (session_id, event_key) DO NOTHING RETURNING event_id"
    )
    first = await scratch_db.fetchval(insert, sid, "user_message", "hi", "user:cmid:1")
    again = await scratch_db.fetchval(insert, sid, "user_message", "hi", "user:cmid:1")
    later = await scratch_db.fetchval(insert, sid, "ai_message", "hello", "ai:t1")
    assert isinstance(first, int) and again is None and later > first
    assert await scratch_db.fetchval("SELECT count(*) FROM events WHERE session_id = $1", sid) == 2
    with pytest.raises(asyncpg.CheckViolationError):
        await scratch_db.execute(insert, sid, "shout", "x", "k")
