"""supabase/migrations applied to the real PostgreSQL (127.0.0.1:5432, database `test`)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.pg import MIGRATIONS, apply_migrations, scratch_database


@pytest.fixture
async def scratch_db() -> AsyncIterator[asyncpg.Connection]:
    """A fresh plain PostgreSQL database (no Supabase roles)."""
    async with scratch_database() as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            yield conn
        finally:
            await conn.close()


@pytest.fixture
async def supabase_db() -> AsyncIterator[asyncpg.Connection]:
    """A fresh database with stand-ins for Supabase's roles and auth.uid()."""
    async with scratch_database(supabase_roles=True) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            yield conn
        finally:
            await conn.close()


async def test_migrations_apply_to_a_fresh_database_twice(scratch_db: asyncpg.Connection) -> None:
    assert MIGRATIONS, "no migration files"
    await apply_migrations(scratch_db)
    await apply_migrations(scratch_db)
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
    await apply_migrations(scratch_db)
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


async def test_row_level_security_with_supabase_roles(supabase_db: asyncpg.Connection) -> None:
    db = supabase_db
    await apply_migrations(db)
    await apply_migrations(db)  # the policies too are safe to apply again
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    alice_session, bob_session = uuid.uuid4(), uuid.uuid4()

    async def as_role(role: str, sub: str | None, query: str, *args: object) -> list[asyncpg.Record]:
        async with db.transaction():
            await db.execute(f"SET LOCAL ROLE {role}")
            if sub is not None:
                await db.execute("SELECT set_config('request.jwt.claims', $1, true)", json.dumps({"sub": sub}))
            return await db.fetch(query, *args)

    # The server's key: service_role writes (and reads) everything, whatever the policies say.
    for owner, session in ((alice, alice_session), (bob, bob_session)):
        await as_role(
            "service_role", None, "INSERT INTO sessions (session_id, user_id) VALUES ($1, $2)", session, owner
        )
        await as_role(
            "service_role",
            None,
            "INSERT INTO events (session_id, event_type, content, event_key) VALUES ($1, 'user_message', $2, 'k1')",
            session,
            f"hello from {owner}",
        )
    assert len(await as_role("service_role", None, "SELECT * FROM events")) == 2

    # anon: no access at all.
    for table in ("sessions", "events"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await as_role("anon", None, f"SELECT * FROM {table}")

    # A signed-in user reads only their own rows, and writes nothing.
    mine = await as_role("authenticated", alice, "SELECT session_id FROM sessions")
    assert [r["session_id"] for r in mine] == [alice_session]
    events = await as_role("authenticated", alice, "SELECT content FROM events")
    assert [r["content"] for r in events] == [f"hello from {alice}"]
    assert await as_role("authenticated", str(uuid.uuid4()), "SELECT * FROM events") == []
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await as_role(
            "authenticated",
            alice,
            "INSERT INTO events (session_id, event_type, content, event_key) VALUES ($1, 'user_message', 'x', 'k2')",
            alice_session,
        )
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await as_role(
            "authenticated", alice, "UPDATE sessions SET summary = 'mine now' WHERE session_id = $1", bob_session
        )
