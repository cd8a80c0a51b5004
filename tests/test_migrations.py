"""supabase/migrations applied to the real PostgreSQL (127.0.0.1:5432, database `test`)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

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
    # Nor does anyone but the service update or delete a session: another's, or their own.
    for session in (bob_session, alice_session):
        for statement in (
            "UPDATE sessions SET summary = 'mine now' WHERE session_id = $1",
            "UPDATE sessions SET deleted_at = now() WHERE session_id = $1",
            "DELETE FROM sessions WHERE session_id = $1",
            "DELETE FROM events WHERE session_id = $1",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await as_role("authenticated", alice, statement, session)

    # The service deletes one: the tombstone, and its events gone with it.
    await as_role("service_role", None, "UPDATE sessions SET deleted_at = now() WHERE session_id = $1", bob_session)
    assert await as_role("service_role", None, "SELECT * FROM events WHERE session_id = $1", bob_session) == []
    assert len(await as_role("service_role", None, "SELECT * FROM sessions WHERE session_id = $1", bob_session)) == 1


CONVERSATIONS = "20261208000000"


async def test_an_existing_schema_gets_conversations_with_updated_at_from_its_events(
    scratch_db: asyncpg.Connection,
) -> None:
    db = scratch_db
    for path in MIGRATIONS:
        if path.name < CONVERSATIONS:
            await db.execute(path.read_text())
    answered, unanswered = uuid.uuid4(), uuid.uuid4()
    await db.execute(
        "INSERT INTO sessions (session_id, user_id, start_time) VALUES ($1, 'ada', '2026-11-27T10:00:00Z'),"
        " ($2, 'ada', '2026-11-27T09:00:00Z')",
        answered,
        unanswered,
    )
    await db.execute(
        "INSERT INTO events (session_id, event_type, content, timestamp) VALUES"
        " ($1, 'user_message', 'q', '2026-11-27T10:00:01Z'), ($1, 'ai_message', 'a', '2026-11-27T10:05:00.123456Z')",
        answered,
    )
    await apply_migrations(db)
    await apply_migrations(db)

    async def updated_at(session_id: uuid.UUID) -> datetime:
        return await db.fetchval("SELECT updated_at FROM sessions WHERE session_id = $1", session_id)

    assert await updated_at(answered) == datetime(2026, 11, 27, 10, 5, 0, 123456, UTC)
    assert await updated_at(unanswered) == datetime(2026, 11, 27, 9, 0, 0, tzinfo=UTC)
    column = await db.fetchrow(
        "SELECT is_nullable, column_default FROM information_schema.columns"
        " WHERE table_name = 'sessions' AND column_name = 'updated_at'"
    )
    assert (column["is_nullable"], column["column_default"]) == ("NO", "now()")

    # Plain SQL naming the base columns only: a session updated at its creation, then by each event.
    created = uuid.uuid4()
    await db.execute("INSERT INTO sessions (session_id, user_id) VALUES ($1, 'ops')", created)
    await db.execute(
        "INSERT INTO events (session_id, event_type, content) VALUES ($1, 'user_message', 'x')", unanswered
    )
    for session in (created, unanswered):
        assert abs((datetime.now(UTC) - await updated_at(session)).total_seconds()) < 60


async def test_the_listing_is_an_index_range_on_every_page(scratch_db: asyncpg.Connection) -> None:
    await apply_migrations(scratch_db)
    await scratch_db.execute("SET enable_seqscan = off")  # an empty table: show the plan a big one gets
    plan = "\n".join(
        row[0]
        for row in await scratch_db.fetch(
            "EXPLAIN SELECT * FROM sessions WHERE user_id = 'ada' AND deleted_at IS NULL"
            " AND (updated_at, session_id) < (now(), '6a1f0c2e-0000-4000-8000-000000000001')"
            " ORDER BY updated_at DESC, session_id DESC LIMIT 20"
        )
    )
    assert "Index Scan using sessions_by_user_updated" in plan and "Sort" not in plan
    assert "Index Cond: ((user_id = 'ada'::text) AND (ROW(updated_at, session_id) < ROW(" in plan


@pytest.fixture
async def two_connections() -> AsyncIterator[tuple[asyncpg.Connection, asyncpg.Connection]]:
    async with scratch_database() as dsn:
        first, second = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
        try:
            await apply_migrations(first)
            yield first, second
        finally:
            await first.close()
            await second.close()


DELETE = "UPDATE sessions SET deleted_at = now() WHERE session_id = $1 AND deleted_at IS NULL RETURNING session_id"
INSERT = "INSERT INTO events (session_id, event_type, content) VALUES ($1, 'user_message', 'racing')"


async def test_an_event_stored_just_before_a_delete_goes_with_it(
    two_connections: tuple[asyncpg.Connection, asyncpg.Connection],
) -> None:
    writer, deleter = two_connections
    sid = uuid.uuid4()
    await writer.execute("INSERT INTO sessions (session_id) VALUES ($1)", sid)
    transaction = writer.transaction()
    await transaction.start()
    await writer.execute(INSERT, sid)  # its check passed; not committed yet
    delete = asyncio.create_task(deleter.fetchval(DELETE, sid))
    await asyncio.sleep(0.3)
    assert not delete.done()  # the insert's row lock holds the delete back
    await transaction.commit()
    assert await delete == sid
    assert await writer.fetchval("SELECT count(*) FROM events WHERE session_id = $1", sid) == 0


async def test_an_event_racing_a_delete_it_did_not_see_is_not_stored(
    two_connections: tuple[asyncpg.Connection, asyncpg.Connection],
) -> None:
    writer, deleter = two_connections
    sid = uuid.uuid4()
    await writer.execute("INSERT INTO sessions (session_id) VALUES ($1)", sid)
    transaction = deleter.transaction()
    await transaction.start()
    assert await deleter.fetchval(DELETE, sid) == sid  # not committed: the writer still sees the session
    insert = asyncio.create_task(writer.execute(INSERT, sid))
    await asyncio.sleep(0.3)
    assert not insert.done()  # waits for the delete, then checks the tombstone again
    await transaction.commit()
    assert await insert == "INSERT 0 0"
    assert await writer.fetchval("SELECT count(*) FROM events WHERE session_id = $1", sid) == 0
    # An unknown session is still the foreign key's to refuse.
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await writer.execute(INSERT, uuid.uuid4())


CONTEXT_SUMMARY = "20261210000000"


async def test_an_existing_schema_gets_context_summaries_with_its_rows_kept(scratch_db: asyncpg.Connection) -> None:
    db = scratch_db
    for path in MIGRATIONS:
        if path.name < CONTEXT_SUMMARY:
            await db.execute(path.read_text())
    kept, deleted = uuid.uuid4(), uuid.uuid4()
    await db.execute(
        "INSERT INTO sessions (session_id, user_id, title) VALUES ($1, 'ada', 'Plans'), ($2, 'bob', NULL)",
        kept,
        deleted,
    )
    await db.execute("INSERT INTO events (session_id, event_type, content) VALUES ($1, 'user_message', 'q')", kept)
    await db.execute(DELETE, deleted)
    sessions = [dict(r) for r in await db.fetch("SELECT * FROM sessions ORDER BY session_id")]
    events = [dict(r) for r in await db.fetch("SELECT * FROM events ORDER BY event_id")]

    await apply_migrations(db)
    await apply_migrations(db)

    after = [dict(r) for r in await db.fetch("SELECT * FROM sessions ORDER BY session_id")]
    assert [{name: row[name] for name in old} for old, row in zip(sessions, after, strict=True)] == sessions
    assert all((row["context_summary"], row["context_upto"]) == (None, None) for row in after)
    events_after = [dict(r) for r in await db.fetch("SELECT * FROM events ORDER BY event_id")]
    assert [{name: row[name] for name in old} for old, row in zip(events, events_after, strict=True)] == events
    columns = await db.fetch(
        "SELECT column_name, data_type, is_nullable, column_default FROM information_schema.columns"
        " WHERE table_name = 'sessions' AND column_name LIKE 'context_%' ORDER BY column_name"
    )
    assert [tuple(c) for c in columns] == [
        ("context_summary", "text", "YES", None),
        ("context_upto", "bigint", "YES", None),
    ]


ATTACHMENT_ROW = (
    "INSERT INTO attachments (attachment_id, session_id, name, mime_type, size, sha256, data)"
    " VALUES ($1, $2, 'a.txt', 'text/plain', 2, 'ab', 'hi')"
)


async def test_attachments_are_their_owners_to_read_and_go_with_their_session(supabase_db: asyncpg.Connection) -> None:
    db = supabase_db
    # Supabase Storage's bucket table, as a Supabase project has it: the migration adds the bucket.
    await db.execute(
        "CREATE SCHEMA storage; CREATE TABLE storage.buckets (id text PRIMARY KEY, name text, public bool)"
    )
    await apply_migrations(db)
    await apply_migrations(db)
    assert [tuple(r) for r in await db.fetch("SELECT id, public FROM storage.buckets")] == [("attachments", False)]
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    alice_session, bob_session = uuid.uuid4(), uuid.uuid4()
    alice_file, bob_file = uuid.uuid4(), uuid.uuid4()

    async def as_role(role: str, sub: str | None, query: str, *args: object) -> list[asyncpg.Record]:
        async with db.transaction():
            await db.execute(f"SET LOCAL ROLE {role}")
            if sub is not None:
                await db.execute("SELECT set_config('request.jwt.claims', $1, true)", json.dumps({"sub": sub}))
            return await db.fetch(query, *args)

    for owner, session, file in ((alice, alice_session, alice_file), (bob, bob_session, bob_file)):
        await as_role(
            "service_role", None, "INSERT INTO sessions (session_id, user_id) VALUES ($1, $2)", session, owner
        )
        await as_role("service_role", None, ATTACHMENT_ROW, file, session)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await as_role("anon", None, "SELECT * FROM attachments")
    mine = await as_role("authenticated", alice, "SELECT attachment_id FROM attachments")
    assert [r["attachment_id"] for r in mine] == [alice_file]
    for statement, args in (
        (ATTACHMENT_ROW, (uuid.uuid4(), alice_session)),
        ("UPDATE attachments SET used = true WHERE attachment_id = $1", (alice_file,)),
        ("DELETE FROM attachments WHERE attachment_id = $1", (alice_file,)),
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await as_role("authenticated", alice, statement, *args)

    # Deleting a session removes its files' rows in the same statement; it takes no more of them,
    # and neither does a session that does not exist.
    await as_role("service_role", None, "UPDATE sessions SET deleted_at = now() WHERE session_id = $1", bob_session)
    for session in (bob_session, uuid.uuid4()):
        await as_role("service_role", None, ATTACHMENT_ROW, uuid.uuid4(), session)
    rows = await as_role("service_role", None, "SELECT attachment_id FROM attachments")
    assert [r["attachment_id"] for r in rows] == [alice_file]
    relrowsecurity = await db.fetchval("SELECT relrowsecurity FROM pg_class WHERE relname = 'attachments'")
    assert relrowsecurity is True


async def test_no_file_outlives_a_delete_it_races() -> None:
    """A file stored while its session is deleted: whichever statement comes first, the other waits
    for its transaction, and no file of the deleted session is left."""
    async with scratch_database() as dsn:
        one, two = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
        try:
            await apply_migrations(one)
            for delete_first in (True, False):
                session = uuid.uuid4()
                await one.execute("INSERT INTO sessions (session_id) VALUES ($1)", session)
                delete = ("UPDATE sessions SET deleted_at = now() WHERE session_id = $1", session)
                upload = (ATTACHMENT_ROW, uuid.uuid4(), session)
                first, second = (delete, upload) if delete_first else (upload, delete)
                async with one.transaction():
                    await one.execute(*first)
                    waiting = asyncio.create_task(two.execute(*second))
                    await asyncio.sleep(0.2)
                    assert not waiting.done(), "the second statement waits for the first's transaction"
                await waiting
                assert await one.fetchval("SELECT count(*) FROM attachments WHERE session_id = $1", session) == 0
        finally:
            await one.close()
            await two.close()
