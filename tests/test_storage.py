"""One repository contract, run against every backend: SQLite, PostgreSQL (asyncpg) and Supabase
(the real supabase-py over HTTP to a PostgREST stand-in on the real PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote

import asyncpg
import httpx
import pytest
from postgrest.exceptions import APIError
from supabase import AsyncClientOptions, acreate_client

from server.core.models import ErrorInfo, EventDraft, EventType, Session
from server.core.ports import (
    AttachmentInfo,
    NoMetrics,
    Repository,
    SessionCursor,
    SessionDeleted,
    Storage,
    StorageRefused,
)
from server.storage import supabase as supabase_storage
from server.storage.measured import MeasuredOutbox, MeasuredRepository
from server.storage.outbox import SqliteOutbox
from server.storage.postgres import PostgresRepository
from server.storage.sqlite import SCHEMA as SQLITE_SCHEMA
from server.storage.sqlite import SCHEMA_VERSION as SQLITE_SCHEMA_VERSION
from server.storage.sqlite import SqliteRepository
from server.storage.supabase import BUCKET, SupabaseRepository
from tests.fake_postgrest import MAX_REQUEST_LINE, FakePostgrest, make_key
from tests.fake_supabase_storage import FakeSupabaseStorage
from tests.harness import serving
from tests.pg import scratch_database


def draft(session_id: str, key: str, content: str = "hi", kind: EventType = EventType.USER_MESSAGE) -> EventDraft:
    return EventDraft(
        session_id=session_id,
        event_type=kind,
        content=content,
        event_key=key,
        turn_id="t",
        timestamp=datetime.now(UTC),
    )


@dataclass
class Backend:
    name: str
    open: Callable[[], Awaitable[Storage]]  # another repository on the same data
    # Runs one SQL statement as an operator would (plain SQL on the base columns; `?` placeholders).
    sql: Callable[..., Awaitable[None]]
    postgrest: FakePostgrest | None = None
    storage: FakeSupabaseStorage | None = None  # Supabase Storage, at the same URL as PostgREST


def sqlite_statement(path: Path) -> Callable[..., Awaitable[None]]:
    async def run(statement: str, *args: object) -> None:
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute(statement, args)

    return run


def postgres_statement(dsn: str) -> Callable[..., Awaitable[None]]:
    async def run(statement: str, *args: object) -> None:
        parts = statement.split("?")
        numbered = parts[0] + "".join(f"${n}{part}" for n, part in enumerate(parts[1:], start=1))
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(numbered, *args)
        finally:
            await conn.close()

    return run


@contextlib.asynccontextmanager
async def open_backend(name: str, tmp_path: Path) -> AsyncIterator[Backend]:
    if name == "sqlite":
        path = tmp_path / "store.db"
        yield Backend("sqlite", lambda: SqliteRepository.open(path, retry_seconds=1), sqlite_statement(path))
        return
    async with scratch_database(supabase_roles=name == "supabase") as dsn:
        if name == "postgres":
            yield Backend("postgres", lambda: PostgresRepository.open(dsn, retry_seconds=1), postgres_statement(dsn))
            return
        await (await PostgresRepository.open(dsn)).aclose()  # the schema, as `supabase db push` would
        postgrest, storage = FakePostgrest(dsn), FakeSupabaseStorage()
        async with serving(storage.served_beside(postgrest.app), lifespan="on") as postgrest.url:
            yield Backend(
                "supabase",
                lambda: SupabaseRepository.open(postgrest.url, make_key("service_role"), retry_seconds=1),
                postgres_statement(dsn),
                postgrest,
                storage,
            )


@pytest.fixture(params=["sqlite", "postgres", "supabase"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async with open_backend(request.param, tmp_path) as opened:
        yield opened


@pytest.fixture
async def supabase(tmp_path: Path) -> AsyncIterator[tuple[FakePostgrest, Repository]]:
    async with open_backend("supabase", tmp_path) as opened:
        assert opened.postgrest is not None
        repository = await opened.open()
        yield opened.postgrest, repository
        await repository.aclose()


@pytest.fixture
async def repo(backend: Backend) -> AsyncIterator[Storage]:
    repository = await backend.open()
    yield repository
    await repository.aclose()


async def test_sessions_are_created_once_and_read_back(repo: Repository) -> None:
    sid = str(uuid.uuid4())
    start = datetime.now(UTC)
    first = await repo.ensure_session(sid, "ada", start)
    again = await repo.ensure_session(sid, "someone else", start + timedelta(hours=1))
    assert first == again and again.user_id == "ada" and again.start_time == start
    assert await repo.get_session(str(uuid.uuid4())) is None
    end = start + timedelta(seconds=90)
    await repo.write_summary(sid, "a summary", end, 90)
    stored = await repo.get_session(sid)
    assert stored is not None and (stored.summary, stored.end_time, stored.duration_seconds) == ("a summary", end, 90)


async def test_a_repeated_write_returns_the_first_row(repo: Repository) -> None:
    sid = str(uuid.uuid4())
    await repo.ensure_session(sid, None, datetime.now(UTC))
    first = await repo.append_event(draft(sid, "k1", "original"))
    again = await repo.append_event(draft(sid, "k1", "a retry with other text"))
    second = await repo.append_event(draft(sid, "k2", "next", EventType.AI_MESSAGE))
    assert again == first and again.content == "original"
    assert second.event_id > first.event_id
    assert [e.event_id for e in await repo.list_events(sid)] == [first.event_id, second.event_id]
    assert [e.event_id for e in await repo.list_events(sid, first.event_id)] == [second.event_id]
    assert await repo.find_event(sid, "k2") == second and await repo.find_event(sid, "nope") is None
    assert (second.turn_id, second.event_key, second.event_type) == ("t", "k2", EventType.AI_MESSAGE)


async def test_history_comes_back_whole_and_in_order(
    repo: Repository, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supabase_storage, "PAGE_SIZE", 3)  # Supabase answers at most a page of rows
    sid, other = str(uuid.uuid4()), str(uuid.uuid4())
    for session in (sid, other):
        await repo.ensure_session(session, None, datetime.now(UTC))
    written = []
    for n in range(8):
        written.append(await repo.append_event(draft(sid, f"k{n}", f"event {n} ✓ «ünïcode»")))
        await repo.append_event(draft(other, f"k{n}", "another session"))
    events = await repo.list_events(sid)
    assert events == written
    assert await repo.list_events(sid, written[5].event_id) == written[6:]
    assert await repo.list_events(sid, written[-1].event_id) == []


async def test_text_a_database_cannot_hold_is_still_stored(repo: Repository, backend: Backend) -> None:
    sid = str(uuid.uuid4())
    await repo.ensure_session(sid, None, datetime.now(UTC))
    stored = await repo.append_event(draft(sid, "nul", "before\x00after"))
    # PostgreSQL text cannot hold NUL: it becomes U+FFFD there, rather than losing the event.
    assert stored.content == ("before\x00after" if backend.name == "sqlite" else "before\ufffdafter")
    assert (await repo.list_events(sid))[0].content == stored.content


async def test_a_failing_write_never_takes_a_concurrent_one_down_with_it(repo: Repository, backend: Backend) -> None:
    sid = str(uuid.uuid4())
    await repo.ensure_session(sid, None, datetime.now(UTC))
    acknowledged: list[int] = []
    refused: list[BaseException] = []

    async def good(n: int) -> None:
        acknowledged.append((await repo.append_event(draft(sid, f"good-{n}"))).event_id)

    async def bad(n: int) -> None:
        try:  # no such session: the foreign key refuses it
            await repo.append_event(draft(str(uuid.uuid4()), f"bad-{n}"))
        except Exception as exc:
            refused.append(exc)

    await asyncio.gather(*(coro for n in range(30) for coro in (good(n), bad(n))))
    assert len(refused) == 30 and len(acknowledged) == 30
    # Read through another repository: what was acknowledged must really be committed.
    other = await backend.open()
    try:
        committed = {e.event_id for e in await other.list_events(sid)}
    finally:
        await other.aclose()
    assert set(acknowledged) == committed


async def test_the_supabase_client_sends_what_postgrest_expects(supabase: tuple[FakePostgrest, Repository]) -> None:
    postgrest, repo = supabase
    sid = str(uuid.uuid4())
    await repo.ensure_session(sid, None, datetime.now(UTC))
    await repo.append_event(draft(sid, "k"))
    await repo.append_event(draft(sid, "k"))  # a retry: ignored as a duplicate, the first row answered
    posts = [unquote(path) for method, path in postgrest.requests if method == "POST"]
    assert posts[0].startswith("/rest/v1/sessions?on_conflict=session_id")
    assert posts[1].startswith("/rest/v1/events?on_conflict=session_id,event_key")
    assert len(await repo.list_events(sid)) == 1


async def test_an_anon_key_is_warned_about_and_refused_by_row_level_security(
    supabase: tuple[FakePostgrest, Repository], caplog: pytest.LogCaptureFixture
) -> None:
    postgrest, _ = supabase
    anon = await SupabaseRepository.open(postgrest.url, make_key("anon"), retry_seconds=1)
    try:
        assert "looks like the anon key" in caplog.text
        with pytest.raises(APIError) as refused:
            await anon.ensure_session(str(uuid.uuid4()), None, datetime.now(UTC))
        assert refused.value.code == "42501"
    finally:
        await anon.aclose()


def test_key_roles_are_read_from_the_key() -> None:
    assert supabase_storage.key_role(make_key("service_role")) == "service_role"
    assert supabase_storage.key_role(make_key("anon")) == "anon"
    assert supabase_storage.key_role("sb_publishable_abc") == "anon"
    assert supabase_storage.key_role("sb_secret_abc") == "service_role"
    assert supabase_storage.key_role("not a jwt") is None


async def test_summaries_due_are_remembered_until_written(repo: Repository) -> None:
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    start = datetime.now(UTC)
    for sid in (first, second):
        await repo.ensure_session(sid, None, start)
    emptied = start + timedelta(seconds=30)
    await repo.mark_emptied(second, emptied + timedelta(seconds=5))
    await repo.mark_emptied(first, emptied)
    assert await repo.due_summaries(10) == [(first, emptied), (second, emptied + timedelta(seconds=5))]
    assert await repo.due_summaries(1) == [(first, emptied)]

    await repo.write_summary(first, "done", emptied, 30)
    assert await repo.due_summaries(10) == [(second, emptied + timedelta(seconds=5))]
    # The session emptied again after the emptying this summary is for: still due.
    await repo.mark_emptied(second, emptied + timedelta(seconds=60))
    await repo.write_summary(second, "an older summary", emptied + timedelta(seconds=5), 35)
    assert await repo.due_summaries(10) == [(second, emptied + timedelta(seconds=60))]


async def test_the_sqlite_log_stays_bounded_under_writes_without_a_pause(tmp_path: Path) -> None:
    # SQLite checkpoints in the commit that crosses 1,000 pages, and the log then starts over. A
    # checkpoint from a second connection (tried for speed) never caught up with a writer that
    # does not pause: the log kept every write (88 MB here) and would have filled the disk.
    path = tmp_path / "bounded.db"
    wal = path.with_name(path.name + "-wal")
    repo = await SqliteRepository.open(path, retry_seconds=1)
    try:
        sid = str(uuid.uuid4())
        await repo.ensure_session(sid, None, datetime.now(UTC))
        events = [await repo.append_event(draft(sid, f"k{n}", "x" * 6000)) for n in range(3000)]
        assert wal.stat().st_size < 2 * path.stat().st_size
        assert [e.event_id for e in await repo.list_events(sid)] == [e.event_id for e in events]
    finally:
        await repo.aclose()
    assert not wal.exists()  # closing checkpointed the rest


async def test_rows_written_with_the_original_designs_sql_are_valid_and_in_history(
    repo: Repository, backend: Backend
) -> None:
    sid = str(uuid.uuid4())
    await backend.sql("insert into sessions (session_id, user_id) values (?, ?)", sid, "ops")
    await backend.sql("insert into events (session_id, event_type, content) values (?, 'user_message', 'hi')", sid)
    await backend.sql("insert into events (session_id, event_type, content) values (?, 'user_message', 'hi')", sid)
    await backend.sql("insert into events (session_id, event_type, content) values (?, 'ai_message', 'hello')", sid)
    session = await repo.ensure_session(sid, "someone else", datetime.now(UTC))
    assert session.user_id == "ops" and abs((datetime.now(UTC) - session.start_time).total_seconds()) < 60

    # The service's own idempotent writes stay unique beside them.
    own = await repo.append_event(draft(sid, "user:turn:1", "mine"))
    assert await repo.append_event(draft(sid, "user:turn:1", "a retry")) == own
    history = await repo.list_events(sid)
    assert [(e.event_type, e.content) for e in history] == [
        (EventType.USER_MESSAGE, "hi"),
        (EventType.USER_MESSAGE, "hi"),
        (EventType.AI_MESSAGE, "hello"),
        (EventType.USER_MESSAGE, "mine"),
    ]
    keys = [e.event_key for e in history]
    assert len(set(keys)) == 4 and all(k and k.startswith("external:") for k in keys[:3])
    assert all(abs((datetime.now(UTC) - e.timestamp).total_seconds()) < 60 for e in history)
    assert history[2].public()["finish_reason"] is None and history[2].public()["error"] is None


async def test_an_answer_keeps_how_its_turn_ended(repo: Repository) -> None:
    sid = str(uuid.uuid4())
    await repo.ensure_session(sid, None, datetime.now(UTC))
    failed = draft(sid, "ai:1", "", EventType.AI_MESSAGE).model_copy(
        update={"finish_reason": "error", "error": ErrorInfo(code="provider_unavailable", message="down")}
    )
    cancelled = draft(sid, "ai:2", "half an", EventType.AI_MESSAGE).model_copy(update={"finish_reason": "cancelled"})
    written = [await repo.append_event(failed), await repo.append_event(cancelled)]
    for stored in (written, await repo.list_events(sid)):
        assert [(e.finish_reason, e.error) for e in stored] == [
            ("error", ErrorInfo(code="provider_unavailable", message="down")),
            ("cancelled", None),
        ]
    assert (await repo.list_events(sid))[0].public()["error"] == {"code": "provider_unavailable", "message": "down"}


async def test_an_emptied_session_has_its_end_before_its_summary(repo: Repository) -> None:
    sid = str(uuid.uuid4())
    start = datetime.now(UTC).replace(microsecond=0)
    await repo.ensure_session(sid, None, start)
    await repo.mark_emptied(sid, start + timedelta(seconds=75))
    session = await repo.get_session(sid)
    assert session is not None and session.summary is None
    assert (session.end_time, session.duration_seconds) == (start + timedelta(seconds=75), 75)
    assert await repo.due_summaries(10) == [(sid, start + timedelta(seconds=75))]


# The SQLite schema as files were made before it was versioned (the summary_due_at column came later).
UNVERSIONED_SQLITE_SCHEMA = """
CREATE TABLE sessions (
    session_id TEXT PRIMARY KEY, user_id TEXT, start_time TEXT NOT NULL, end_time TEXT, summary TEXT,
    duration_seconds INTEGER
);
CREATE TABLE events (
    event_id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(session_id) ON DELETE CASCADE,
    timestamp TEXT NOT NULL,
    event_type TEXT NOT NULL CHECK (event_type IN ('user_message', 'ai_message', 'tool_call', 'tool_result')),
    content TEXT NOT NULL, turn_id TEXT, event_key TEXT NOT NULL, UNIQUE (session_id, event_key)
);
CREATE INDEX events_session_order ON events (session_id, event_id);
INSERT INTO sessions VALUES ('6a1f0c2e-0000-4000-8000-000000000001', 'ada', '2026-11-27T10:00:00+00:00',
    NULL, NULL, NULL);
INSERT INTO events VALUES (7, '6a1f0c2e-0000-4000-8000-000000000001', '2026-11-27T10:00:01+00:00', 'user_message',
    'kept', 't1', 'user:turn:t1');
"""


async def test_an_sqlite_file_from_before_the_schema_was_versioned_is_rebuilt_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(UNVERSIONED_SQLITE_SCHEMA)
    sid = "6a1f0c2e-0000-4000-8000-000000000001"
    for _ in range(2):  # and opening it again changes nothing
        repo = await SqliteRepository.open(path, retry_seconds=1)
        try:
            assert (await repo.get_session(sid)).user_id == "ada"  # type: ignore[union-attr]
            assert [(e.event_id, e.content) for e in await repo.list_events(sid)] == [(7, "kept")]
        finally:
            await repo.aclose()
    await sqlite_statement(path)(
        "insert into events (session_id, event_type, content) values (?, 'ai_message', 'x')", sid
    )
    await sqlite_statement(path)("insert into sessions (session_id, user_id) values (?, 'ops')", str(uuid.uuid4()))
    repo = await SqliteRepository.open(path, retry_seconds=1)
    try:
        events = await repo.list_events(sid)
        assert [e.event_id for e in events] == [7, 8] and events[1].finish_reason is None
        await repo.mark_emptied(sid, datetime(2026, 11, 27, 10, 1, tzinfo=UTC))
        assert (await repo.due_summaries(5)) == [(sid, datetime(2026, 11, 27, 10, 1, tzinfo=UTC))]
    finally:
        await repo.aclose()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] >= 1
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        assert {r[1] for r in db.execute("PRAGMA index_list(events)")} >= {"events_session_order"}
        # Its last event's moment (the one written above), in updated_at's one format.
        ((updated_at,),) = db.execute("SELECT updated_at FROM sessions WHERE session_id = ?", (sid,)).fetchall()
        ((last,),) = db.execute("SELECT max(timestamp) FROM events WHERE session_id = ?", (sid,)).fetchall()
        assert UPDATED_AT_FORMAT.fullmatch(updated_at) and updated_at == last


# ---------------------------------------------------------------- conversations (issue 29)


def raw_moment(backend: Backend, moment: datetime) -> object:
    """`updated_at` as an operator's SQL writes it: SQLite's one text format, else a timestamptz."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds") if backend.name == "sqlite" else moment


async def session_of(repo: Repository, session_id: str) -> Session:
    session = await repo.get_session(session_id)
    assert session is not None
    return session


async def all_pages(repo: Repository, user_id: str, limit: int) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = None
    while True:
        page = await repo.list_sessions(user_id, limit, cursor)
        if not page:
            return pages
        pages.append([s.session_id for s in page])
        assert page[-1].updated_at is not None
        cursor = SessionCursor(updated_at=page[-1].updated_at, session_id=page[-1].session_id)


async def listed_user(repo: Repository, backend: Backend) -> tuple[str, list[str]]:
    """A user of seven sessions, four of them updated at the very same moment, and sessions that are
    never listed around them; with the order the listing must give."""
    user = f"user-{uuid.uuid4()}"
    sessions = [str(uuid.uuid4()) for _ in range(7)]
    for sid in sessions:
        await repo.ensure_session(sid, user, datetime.now(UTC))
    tie = datetime(2026, 12, 1, 10, 0, 0, 123000, tzinfo=UTC)
    for sid in sessions[:4]:
        await backend.sql("update sessions set updated_at = ? where session_id = ?", raw_moment(backend, tie), sid)
    later = raw_moment(backend, tie + timedelta(seconds=1))
    await backend.sql("update sessions set updated_at = ? where session_id = ?", later, sessions[4])
    await repo.ensure_session(str(uuid.uuid4()), "someone else", datetime.now(UTC))
    await repo.ensure_session(str(uuid.uuid4()), None, datetime.now(UTC))
    deleted = str(uuid.uuid4())
    await repo.ensure_session(deleted, user, datetime.now(UTC))
    assert await repo.delete_session(deleted)
    stored = [await session_of(repo, sid) for sid in sessions]
    return user, [s.session_id for s in sorted(stored, key=lambda s: (s.updated_at, s.session_id), reverse=True)]


async def test_a_users_sessions_come_newest_first_in_pages_ties_included(repo: Repository, backend: Backend) -> None:
    user, expected = await listed_user(repo, backend)
    assert len(set(expected)) == 7
    assert await all_pages(repo, user, 3) == [expected[:3], expected[3:6], expected[6:]]
    assert await all_pages(repo, user, 2) == [expected[:2], expected[2:4], expected[4:6], expected[6:]]
    assert await all_pages(repo, user, 100) == [expected]
    assert await repo.list_sessions(f"user-{uuid.uuid4()}", 10) == []


async def test_a_session_created_while_paging_does_not_disturb_the_pages_after(
    repo: Repository, backend: Backend
) -> None:
    user, expected = await listed_user(repo, backend)
    first = await repo.list_sessions(user, 3)
    assert [s.session_id for s in first] == expected[:3]
    newest = str(uuid.uuid4())
    await repo.ensure_session(newest, user, datetime.now(UTC))  # lands before the cursor, on page one
    assert first[-1].updated_at is not None
    cursor = SessionCursor(updated_at=first[-1].updated_at, session_id=first[-1].session_id)
    second = await repo.list_sessions(user, 3, cursor)
    assert [s.session_id for s in second] == expected[3:6]
    assert [s.session_id for s in await repo.list_sessions(user, 1)] == [newest]


async def test_updated_at_follows_events_and_renames_but_not_a_generated_title(
    repo: Repository, backend: Backend
) -> None:
    sid = str(uuid.uuid4())
    created = await repo.ensure_session(sid, "ada", datetime.now(UTC))
    assert created.updated_at is not None and abs((datetime.now(UTC) - created.updated_at).total_seconds()) < 60
    assert created.title is None and created.deleted_at is None

    moments = [created.updated_at]

    async def changed() -> Session:
        session = await session_of(repo, sid)
        assert session.updated_at is not None and session.updated_at > moments[-1]
        moments.append(session.updated_at)
        return session

    await asyncio.sleep(0.01)  # SQLite keeps milliseconds
    await repo.append_event(draft(sid, "k1"))
    await changed()
    await asyncio.sleep(0.01)
    await backend.sql("insert into events (session_id, event_type, content) values (?, 'user_message', 'raw')", sid)
    await changed()

    titled = await repo.set_generated_title(sid, "A generated title")
    assert titled is not None and (titled.title, titled.updated_at) == ("A generated title", moments[-1])
    assert await repo.set_generated_title(sid, "Another one") is None
    assert (await session_of(repo, sid)).title == "A generated title"

    await asyncio.sleep(0.01)
    renamed = await repo.rename_session(sid, "My «title»")
    assert renamed is not None and renamed.title == "My «title»"
    assert renamed == await changed()
    assert await repo.set_generated_title(sid, "Never over a person's") is None
    assert (await session_of(repo, sid)).title == "My «title»"

    unknown = str(uuid.uuid4())
    assert await repo.rename_session(unknown, "x") is None and await repo.set_generated_title(unknown, "x") is None


async def test_a_session_inserted_with_the_original_sql_has_its_updated_at(repo: Repository, backend: Backend) -> None:
    sid = str(uuid.uuid4())
    await backend.sql("insert into sessions (session_id, user_id) values (?, ?)", sid, "ops")
    session = await session_of(repo, sid)
    assert session.updated_at is not None and abs((datetime.now(UTC) - session.updated_at).total_seconds()) < 60
    assert [s.session_id for s in await repo.list_sessions("ops", 100)].count(sid) == 1


async def test_a_deleted_session_keeps_only_its_tombstone_and_takes_no_more_events(
    repo: Repository, backend: Backend
) -> None:
    sid, user = str(uuid.uuid4()), f"user-{uuid.uuid4()}"
    start = datetime.now(UTC).replace(microsecond=0)
    await repo.ensure_session(sid, user, start)
    stored = [await repo.append_event(draft(sid, f"k{n}")) for n in range(3)]  # a turn left open too
    await repo.rename_session(sid, "Secret plans")
    await repo.mark_emptied(sid, start + timedelta(seconds=5))
    await repo.write_summary(sid, "a summary", start + timedelta(seconds=5), 5)
    await repo.mark_emptied(sid, start + timedelta(seconds=9))  # a summary still due

    assert await repo.delete_session(sid) is True
    tomb = await session_of(repo, sid)
    assert (tomb.session_id, tomb.user_id, tomb.start_time) == (sid, user, start)
    assert tomb.deleted and abs((datetime.now(UTC) - tomb.deleted_at).total_seconds()) < 60  # type: ignore[operator]
    assert (tomb.title, tomb.summary, tomb.end_time, tomb.duration_seconds) == (None, None, None, None)
    assert await repo.list_events(sid) == [] and await repo.find_event(sid, "k0") is None
    assert (await repo.page_events(sid, limit=10)).events == []
    assert await repo.delete_session(sid) is False
    assert await repo.delete_session(str(uuid.uuid4())) is False
    assert sid not in [s for s, _ in await repo.due_summaries(100)]
    assert sid not in [s for s, _ in await repo.open_turns(None, 100)]
    assert await repo.list_sessions(user, 10) == []

    # Storage itself refuses its events: the service's (a new one, a retry of a stored one) and raw SQL.
    for key in ("late", stored[0].event_key):
        with pytest.raises(SessionDeleted):
            await repo.append_event(draft(sid, key or ""))
    await backend.sql("insert into events (session_id, event_type, content) values (?, 'user_message', 'raw')", sid)
    assert await repo.list_events(sid) == []

    # And writes nothing else of it; its id stays taken.
    assert await repo.rename_session(sid, "back") is None and await repo.set_generated_title(sid, "back") is None
    await repo.mark_emptied(sid, start + timedelta(seconds=20))
    await repo.write_summary(sid, "late summary", start + timedelta(seconds=20), 20)
    assert await repo.ensure_session(sid, "someone else", datetime.now(UTC)) == tomb
    assert await session_of(repo, sid) == tomb


async def test_events_come_in_pages_in_every_direction(
    repo: Repository, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid, other = str(uuid.uuid4()), str(uuid.uuid4())
    for session in (sid, other):
        await repo.ensure_session(session, None, datetime.now(UTC))
    await repo.append_event(draft(other, "before"))
    # A few thousand events, written with plain SQL on the base columns.
    await backend.sql(
        "with recursive n(i) as (select 1 union all select i + 1 from n where i < 3000)"
        f" insert into events (session_id, event_type, content) select '{sid}', 'user_message', 'event ' || i from n"
    )
    await repo.append_event(draft(other, "after"))
    every = await repo.list_events(sid)
    assert [e.content for e in every] == [f"event {n}" for n in range(1, 3001)]

    async def page(limit: int, **bound: int) -> tuple[list[int], bool]:
        answer = await repo.page_events(sid, limit=limit, **bound)
        return [e.event_id for e in answer.events], answer.more

    ids = [e.event_id for e in every]
    assert await page(1000) == (ids[2000:], True)
    assert await page(1000, before=ids[2000]) == (ids[1000:2000], True)
    assert await page(1000, before=ids[1000]) == (ids[:1000], False)
    assert await page(1000, after=ids[999]) == (ids[1000:2000], True)
    assert await page(1000, after=ids[1999]) == (ids[2000:], False)
    assert await page(1, after=ids[1]) == ([ids[2]], True)
    assert await page(5, before=ids[3]) == (ids[:3], False)
    assert await page(3000) == (ids, False)
    assert await page(2999) == (ids[1:], True)
    assert await page(10, after=ids[-1]) == ([], False) and await page(10, before=ids[0]) == ([], False)
    if backend.postgrest is not None:  # a page larger than Supabase answers at once still comes whole
        monkeypatch.setattr(supabase_storage, "PAGE_SIZE", 7)
        backend.postgrest.max_rows = 7
        assert await page(20, before=ids[100]) == (ids[80:100], True)
        assert await page(20, after=ids[2979]) == (ids[2980:], False)


async def test_a_page_of_events_is_one_request_to_postgrest(supabase: tuple[FakePostgrest, Repository]) -> None:
    postgrest, repo = supabase
    sid = str(uuid.uuid4())
    await repo.ensure_session(sid, None, datetime.now(UTC))
    for n in range(5):
        await repo.append_event(draft(sid, f"k{n}"))
    del postgrest.requests[:]
    page = await repo.page_events(sid, limit=3)
    assert [e.content for e in page.events] == ["hi"] * 3 and page.more
    ((method, path),) = postgrest.requests
    assert method == "GET" and "limit=4" in path and "order=event_id.desc" in path


async def test_a_signed_in_user_updates_or_deletes_no_session_through_postgrest(
    supabase: tuple[FakePostgrest, Repository],
) -> None:
    """Row level security as the browser's client meets it: a user's own token, Supabase's API."""
    postgrest, repo = supabase
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    alices, bobs = str(uuid.uuid4()), str(uuid.uuid4())
    await repo.ensure_session(alices, alice, datetime.now(UTC))
    await repo.ensure_session(bobs, bob, datetime.now(UTC))
    await repo.append_event(draft(bobs, "k"))
    token = make_key("authenticated", sub=alice)
    http = httpx.AsyncClient(timeout=5)
    client = await acreate_client(
        postgrest.url,
        make_key("anon"),
        options=AsyncClientOptions(
            httpx_client=http, postgrest_client_retry=False, headers={"Authorization": f"Bearer {token}"}
        ),
    )
    try:
        mine = await client.table("sessions").select("session_id").execute()
        assert mine.data == [{"session_id": alices}]  # the token is hers: she reads her own
        for session in (bobs, alices):
            for request in (
                client.table("sessions").update({"title": "mine now"}).eq("session_id", session),
                client.table("sessions")
                .update({"deleted_at": datetime.now(UTC).isoformat()})
                .eq("session_id", session),
                client.table("sessions").delete().eq("session_id", session),
                client.table("events").delete().eq("session_id", session),
            ):
                with pytest.raises(APIError) as refused:
                    await request.execute()
                assert refused.value.code == "42501"
    finally:
        await http.aclose()
    bob_session = await session_of(repo, bobs)
    assert bob_session.title is None and not bob_session.deleted and len(await repo.list_events(bobs)) == 1


async def test_supabase_without_the_conversations_migration_is_not_ready_and_says_which(
    supabase: tuple[FakePostgrest, Repository],
) -> None:
    postgrest, repo = supabase
    await repo.ping()
    await postgres_statement(postgrest.dsn)("alter table sessions drop column deleted_at cascade")
    with pytest.raises(StorageRefused, match=re.escape("apply supabase/migrations/20261208000000_conversations.sql")):
        await repo.ping()


async def test_the_sqlite_listing_and_pages_are_each_one_indexed_query(tmp_path: Path) -> None:
    path = tmp_path / "plans.db"
    repo = await SqliteRepository.open(path, retry_seconds=1)
    statements: list[str] = []
    try:
        sid = str(uuid.uuid4())
        session = await repo.ensure_session(sid, "ada", datetime.now(UTC))
        assert session.updated_at is not None
        await repo._db.set_trace_callback(statements.append)
        await repo.list_sessions("ada", 10, SessionCursor(updated_at=session.updated_at, session_id=sid))
        await repo.page_events(sid, before=10, limit=10)
        await repo.page_events(sid, after=10, limit=10)
        await repo._db.set_trace_callback(None)
    finally:
        await repo.aclose()
    assert len(statements) == 3
    with contextlib.closing(sqlite3.connect(path)) as db:
        plans = [" ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}")) for sql in statements]
    assert (
        plans[0] == "SEARCH sessions USING INDEX sessions_by_user_updated (user_id=? AND (updated_at,session_id)<(?,?))"
    )
    for plan in plans[1:]:
        assert plan == "SEARCH events USING INDEX events_session_order (session_id=? AND event_id>? AND event_id<?)"


async def test_the_local_queue_drops_a_deleted_sessions_events_for_good(tmp_path: Path) -> None:
    gone, kept = str(uuid.uuid4()), str(uuid.uuid4())
    outbox = await SqliteOutbox.open(tmp_path / "queue.db")
    try:
        for n in range(3):
            await outbox.put(draft(gone, f"g{n}"))
            await outbox.put(draft(kept, f"k{n}"))
        (position, _), *_ = await outbox.oldest(1)
        await outbox.set_aside(position, gone, "refused")
        assert await outbox.discard(gone) == 2
        assert outbox.depth == 3 and not outbox.holds(gone) and outbox.holds(kept)
        assert await outbox.discard(gone) == 0
    finally:
        await outbox.aclose()
    outbox = await SqliteOutbox.open(tmp_path / "queue.db")  # and so it stays
    try:
        assert outbox.depth == 3 and await outbox.waiting(gone) == [] and await outbox.find(gone, "g1") is None
        assert [d.event_key for d in await outbox.waiting(kept)] == ["k0", "k1", "k2"]
    finally:
        await outbox.aclose()
    with contextlib.closing(sqlite3.connect(tmp_path / "queue.db")) as db:
        assert db.execute("SELECT count(*) FROM outbox_set_aside").fetchone() == (0,)


# updated_at as SQLite keeps it: one format whose text order is the order of the moments.
UPDATED_AT_FORMAT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00")

# The SQLite schema of version 2, the last before conversations, as files made with it have it
# (version 1: the same without the open-turn marker, its triggers and its index).
SQLITE_SCHEMA_V2 = """
CREATE TABLE sessions (
    session_id TEXT PRIMARY KEY, user_id TEXT,
    start_time TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    end_time TEXT, summary TEXT, duration_seconds INTEGER, summary_due_at TEXT, open_turn_id TEXT
);
CREATE TABLE events (
    event_id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(session_id) ON DELETE CASCADE,
    timestamp TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    event_type TEXT NOT NULL CHECK (event_type IN ('user_message', 'ai_message', 'tool_call', 'tool_result')),
    content TEXT NOT NULL, turn_id TEXT,
    event_key TEXT NOT NULL DEFAULT ('external:' || lower(hex(randomblob(16)))),
    finish_reason TEXT, error TEXT, UNIQUE (session_id, event_key)
);
CREATE INDEX events_session_order ON events (session_id, event_id);
CREATE INDEX sessions_open_turn ON sessions (session_id) WHERE open_turn_id IS NOT NULL;
CREATE TRIGGER events_turn_opened AFTER INSERT ON events
    WHEN NEW.turn_id IS NOT NULL AND NEW.event_type = 'user_message'
BEGIN
    UPDATE sessions SET open_turn_id = NEW.turn_id WHERE session_id = NEW.session_id;
END;
CREATE TRIGGER events_turn_answered AFTER INSERT ON events
    WHEN NEW.turn_id IS NOT NULL AND NEW.event_type = 'ai_message'
BEGIN
    UPDATE sessions SET open_turn_id = NULL WHERE session_id = NEW.session_id AND open_turn_id = NEW.turn_id;
END;
PRAGMA user_version = 2;
"""
SQLITE_SCHEMA_V1 = (
    SQLITE_SCHEMA_V2.split("CREATE INDEX sessions_open_turn")[0].replace(", open_turn_id TEXT", "")
    + "PRAGMA user_version = 1;"
)
OLD_ROWS = """
INSERT INTO sessions (session_id, user_id, start_time) VALUES
    ('00000000-0000-4000-8000-00000000000a', 'ada', '2026-11-27T10:00:00+00:00'),
    ('00000000-0000-4000-8000-00000000000b', 'ada', '2026-11-27T09:00:00.250000+00:00'),
    ('00000000-0000-4000-8000-00000000000c', 'bob', '2026-11-27T08:00:00+00:00');
INSERT INTO events (session_id, timestamp, event_type, content, turn_id, event_key) VALUES
    ('00000000-0000-4000-8000-00000000000a', '2026-11-27T10:00:01.5+00:00', 'user_message', 'q', 't1', 'user:t1'),
    ('00000000-0000-4000-8000-00000000000a', '2026-11-27T10:05:00.123456+00:00', 'ai_message', 'a', 't1', 'ai:t1'),
    ('00000000-0000-4000-8000-00000000000c', '2026-11-27T08:00:02+00:00', 'user_message', 'cut off', 't9', 'user:t9');
"""


@pytest.mark.parametrize("schema", [SQLITE_SCHEMA_V1, SQLITE_SCHEMA_V2], ids=["version 1", "version 2"])
async def test_an_sqlite_file_of_an_earlier_version_gets_conversations(tmp_path: Path, schema: str) -> None:
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(schema + OLD_ROWS)
    answered, unanswered, cut_off = (f"00000000-0000-4000-8000-00000000000{c}" for c in "abc")
    # Three workers starting together on it, then one more: it is brought up once.
    opened = await asyncio.gather(*(SqliteRepository.open(path, retry_seconds=1) for _ in range(3)))
    opened.append(await SqliteRepository.open(path, retry_seconds=1))
    try:
        for repo in opened:
            assert (await session_of(repo, answered)).updated_at == datetime(2026, 11, 27, 10, 5, 0, 123000, UTC)
            assert (await session_of(repo, unanswered)).updated_at == datetime(2026, 11, 27, 9, 0, 0, 250000, UTC)
            assert [s.session_id for s in await repo.list_sessions("ada", 10)] == [answered, unanswered]
            assert await repo.open_turns(None, 10) == [(cut_off, "t9")]
            assert [e.content for e in await repo.list_events(answered)] == ["q", "a"]
    finally:
        for repo in opened:
            await repo.aclose()

    await sqlite_statement(path)(
        "insert into events (session_id, event_type, content) values (?, 'user_message', 'x')", unanswered
    )
    repo = await SqliteRepository.open(path, retry_seconds=1)
    try:
        assert [s.session_id for s in await repo.list_sessions("ada", 10)] == [unanswered, answered]
        assert await repo.delete_session(answered) and await repo.list_events(answered) == []
        with pytest.raises(SessionDeleted):
            await repo.append_event(draft(answered, "late"))
    finally:
        await repo.aclose()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SQLITE_SCHEMA_VERSION,)
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        assert {r[2] for r in db.execute("PRAGMA foreign_key_list(events)")} == {"sessions"}
        assert {r[1] for r in db.execute("PRAGMA index_list(sessions)")} >= {
            "sessions_by_user_updated",
            "sessions_open_turn",
        }
        assert len(db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall()) == 7
        assert all(UPDATED_AT_FORMAT.fullmatch(v) for (v,) in db.execute("SELECT updated_at FROM sessions"))
        assert db.execute("SELECT name FROM sqlite_master WHERE name LIKE '%v2%'").fetchall() == []


class RecordedMetrics(NoMetrics):
    def __init__(self) -> None:
        self.operations: list[str] = []
        self.queued: list[int] = []

    def storage_operation(self, operation: str, seconds: float) -> None:
        assert seconds >= 0
        self.operations.append(operation)

    def events_queued(self, count: int) -> None:
        self.queued.append(count)


async def test_the_conversation_operations_are_timed_by_name(tmp_path: Path) -> None:
    metrics = RecordedMetrics()
    repo = MeasuredRepository(await SqliteRepository.open(tmp_path / "timed.db", retry_seconds=1), metrics)
    outbox = MeasuredOutbox(await SqliteOutbox.open(tmp_path / "queue.db"), metrics)
    try:
        sid = str(uuid.uuid4())
        await repo.ensure_session(sid, "ada", datetime.now(UTC))
        await outbox.put(draft(sid, "k"))
        del metrics.operations[:]
        assert (await repo.page_events(sid, limit=5)).events == []
        assert [s.session_id for s in await repo.list_sessions("ada", 5)] == [sid]
        assert (await repo.set_generated_title(sid, "generated")) is not None
        assert (await repo.rename_session(sid, "renamed")) is not None
        assert await repo.delete_session(sid)
        assert await outbox.discard(sid) == 1
    finally:
        await outbox.aclose()
        await repo.aclose()
    assert metrics.operations == [
        "page_events",
        "list_sessions",
        "set_generated_title",
        "rename_session",
        "delete_session",
    ]
    assert metrics.queued[-1] == 0


# ---------------------------------------------------------------- compaction summaries (issue 30)


async def test_a_context_summary_is_a_compare_and_set_that_leaves_updated_at(
    repo: Repository, backend: Backend
) -> None:
    sid = str(uuid.uuid4())
    created = await repo.ensure_session(sid, "ada", datetime.now(UTC))
    assert (created.context_summary, created.context_upto) == (None, None)
    ids = [(await repo.append_event(draft(sid, f"k{n}"))).event_id for n in range(4)]
    before = await session_of(repo, sid)
    await asyncio.sleep(0.01)  # SQLite keeps milliseconds: a change of updated_at would show

    assert await repo.write_context_summary(sid, "first «summary»", ids[1], None)
    stored = await session_of(repo, sid)
    assert (stored.context_summary, stored.context_upto) == ("first «summary»", ids[1])
    # Stale writers store nothing: None matches only a session without one, and an older upto loses.
    assert not await repo.write_context_summary(sid, "stale", ids[2], None)
    assert not await repo.write_context_summary(sid, "stale", ids[2], ids[0])
    assert await repo.write_context_summary(sid, "summary two", ids[3], ids[1])
    assert not await repo.write_context_summary(sid, "also from the first", ids[2], ids[1])
    # The same write again (a retry after a lost answer) finds itself stored.
    assert await repo.write_context_summary(sid, "summary two", ids[3], ids[1])
    assert not await repo.write_context_summary(str(uuid.uuid4()), "unknown", 1, None)

    other = await backend.open()  # what another process reads
    try:
        for reader in (repo, other):
            after = await session_of(reader, sid)
            assert (after.context_summary, after.context_upto) == ("summary two", ids[3])
            assert (after.updated_at, after.title, after.summary) == (before.updated_at, None, None)
    finally:
        await other.aclose()
    wire = after.model_dump_json()
    assert "context" not in wire and "summary two" not in wire


async def test_two_writers_extending_the_same_summary_store_exactly_one(repo: Repository, backend: Backend) -> None:
    sid = str(uuid.uuid4())
    await repo.ensure_session(sid, None, datetime.now(UTC))
    assert await repo.write_context_summary(sid, "base", 1, None)
    other = await backend.open()
    try:
        for _ in range(3):
            upto = (await session_of(repo, sid)).context_upto
            assert upto is not None
            first, second = await asyncio.gather(
                repo.write_context_summary(sid, f"one from {upto}", upto + 1, upto),
                other.write_context_summary(sid, f"another from {upto}", upto + 2, upto),
            )
            assert [first, second].count(True) == 1
            stored = await session_of(repo, sid)
            expected = (f"one from {upto}", upto + 1) if first else (f"another from {upto}", upto + 2)
            assert (stored.context_summary, stored.context_upto) == expected
    finally:
        await other.aclose()


async def test_a_deleted_session_has_no_context_summary_and_takes_none(repo: Repository) -> None:
    sid = str(uuid.uuid4())
    await repo.ensure_session(sid, "ada", datetime.now(UTC))
    event_id = (await repo.append_event(draft(sid, "k"))).event_id
    assert await repo.write_context_summary(sid, "a summary of secrets", event_id, None)

    assert await repo.delete_session(sid)
    tomb = await session_of(repo, sid)
    assert tomb.deleted and (tomb.context_summary, tomb.context_upto) == (None, None)
    assert not await repo.write_context_summary(sid, "late", event_id, None)
    assert not await repo.write_context_summary(sid, "late", event_id + 1, event_id)
    assert not await repo.write_context_summary(sid, "a summary of secrets", event_id, None)
    assert await session_of(repo, sid) == tomb


async def test_the_supabase_context_summary_is_one_filtered_patch_and_survives_a_lost_answer(
    supabase: tuple[FakePostgrest, Repository],
) -> None:
    postgrest, _ = supabase
    # A short read timeout, so that a held answer is lost and retried.
    repo = await SupabaseRepository.open(postgrest.url, make_key("service_role"), retry_seconds=8, timeout_seconds=1)
    try:
        sid = str(uuid.uuid4())
        await repo.ensure_session(sid, None, datetime.now(UTC))
        ids = [(await repo.append_event(draft(sid, f"k{n}"))).event_id for n in range(2)]
        del postgrest.requests[:]
        assert await repo.write_context_summary(sid, "first", ids[0], None)
        assert await repo.write_context_summary(sid, "second", ids[1], ids[0])
        patches = [unquote(path) for method, path in postgrest.requests if method == "PATCH"]
        assert [method for method, _ in postgrest.requests] == ["PATCH", "PATCH"]  # each one request
        for patch, condition in zip(patches, ("context_upto=is.null", f"context_upto=eq.{ids[0]}"), strict=True):
            assert patch.startswith(f"/rest/v1/sessions?session_id=eq.{sid}")
            assert condition in patch and "deleted_at=is.null" in patch

        postgrest.lose_next_response(hold_seconds=2)  # stored, but its answer never arrives
        assert await repo.write_context_summary(sid, "third", ids[1] + 1, ids[1])
        assert postgrest.lost.is_set()
        stored = await session_of(repo, sid)
        assert (stored.context_summary, stored.context_upto) == ("third", ids[1] + 1)
    finally:
        await repo.aclose()


async def test_supabase_without_the_context_summary_migration_is_not_ready_and_says_which(
    supabase: tuple[FakePostgrest, Repository],
) -> None:
    postgrest, repo = supabase
    await repo.ping()
    await postgres_statement(postgrest.dsn)("alter table sessions drop column context_upto")
    with pytest.raises(StorageRefused, match=re.escape("apply supabase/migrations/20261210000000_context_summary.sql")):
        await repo.ping()


async def test_the_context_summary_write_is_timed_by_name(tmp_path: Path) -> None:
    metrics = RecordedMetrics()
    repo = MeasuredRepository(await SqliteRepository.open(tmp_path / "timed.db", retry_seconds=1), metrics)
    try:
        sid = str(uuid.uuid4())
        await repo.ensure_session(sid, "ada", datetime.now(UTC))
        del metrics.operations[:]
        assert await repo.write_context_summary(sid, "summary", 1, None)
        assert not await repo.write_context_summary(sid, "summary", 2, None)
    finally:
        await repo.aclose()
    assert metrics.operations == ["write_context_summary", "write_context_summary"]


# The SQLite schema of version 4, the last before attachments: today's without their table.
# Version 4, the last before files: without their table, nor a user message's `attachments` column.
SQLITE_SCHEMA_BEFORE_ATTACHMENTS = SQLITE_SCHEMA.split("\n-- Files uploaded to a session")[0].replace(
    "    attachments   TEXT,\n", ""
)
SQLITE_SCHEMA_V4 = SQLITE_SCHEMA_BEFORE_ATTACHMENTS + "\nPRAGMA user_version = 4;"
# Version 3, the last before compaction summaries: version 4's without their columns.
SQLITE_SCHEMA_V3 = (
    re.sub(
        r",\n\s*-- The compaction summary.*?context_upto\s+INTEGER\n",
        "\n",
        SQLITE_SCHEMA_BEFORE_ATTACHMENTS,
        flags=re.S,
    )
    + "\nPRAGMA user_version = 3;"
)


@pytest.mark.parametrize(
    "schema", [SQLITE_SCHEMA_V1, SQLITE_SCHEMA_V2, SQLITE_SCHEMA_V3], ids=["version 1", "version 2", "version 3"]
)
async def test_an_sqlite_file_of_an_earlier_version_gets_context_summaries_its_rows_kept(
    tmp_path: Path, schema: str
) -> None:
    assert "context_" not in SQLITE_SCHEMA_V3 and "deleted_at" in SQLITE_SCHEMA_V3
    assert "attachments" not in SQLITE_SCHEMA_V3
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(schema + OLD_ROWS)
    answered = "00000000-0000-4000-8000-00000000000a"
    sessions_before = await asyncio.to_thread(sqlite_rows, path, "SELECT * FROM sessions ORDER BY session_id")
    events_before = await asyncio.to_thread(sqlite_rows, path, "SELECT * FROM events ORDER BY event_id")
    for _ in range(2):  # and opening it again changes nothing
        repo = await SqliteRepository.open(path, retry_seconds=1)
        try:
            session = await session_of(repo, answered)
            assert (session.user_id, session.context_summary, session.context_upto) == ("ada", None, None)
        finally:
            await repo.aclose()
    # Every row as it was, each column it had unchanged (a file of version 3 keeps its updated_at too).
    sessions_after = await asyncio.to_thread(sqlite_rows, path, "SELECT * FROM sessions ORDER BY session_id")
    assert len(sessions_after) == len(sessions_before) == 3
    for old, new in zip(sessions_before, sessions_after, strict=True):
        assert {name: new[name] for name in old} == old
        assert (new["context_summary"], new["context_upto"]) == (None, None)
    events_after = await asyncio.to_thread(sqlite_rows, path, "SELECT * FROM events ORDER BY event_id")
    assert [{name: row[name] for name in old} for old, row in zip(events_before, events_after, strict=True)] == (
        events_before
    )  # the older columns as they were (a user message's `attachments` is new, and empty)
    assert all(row["attachments"] is None for row in events_after)
    repo = await SqliteRepository.open(path, retry_seconds=1)
    try:
        last = (await repo.list_events(answered))[-1].event_id
        assert await repo.write_context_summary(answered, "kept", last, None)
        assert (await session_of(repo, answered)).context_summary == "kept"
    finally:
        await repo.aclose()
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SQLITE_SCHEMA_VERSION,)
        columns = {r[1]: (r[2], r[3], r[4]) for r in db.execute("PRAGMA table_info(sessions)")}
        assert columns["context_summary"] == ("TEXT", 0, None) and columns["context_upto"] == ("INTEGER", 0, None)
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        assert len(db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall()) == 7


def sqlite_rows(path: Path, query: str) -> list[dict[str, object]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute(query)]


# ---------------------------------------------------------------- attachments


def attachment(session_id: str, data: bytes, *, age: timedelta = timedelta(0)) -> AttachmentInfo:
    return AttachmentInfo(
        attachment_id=str(uuid.uuid4()),
        session_id=session_id,
        name="photo «été».png",
        mime_type="image/png",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        created_at=datetime.now(UTC) - age,
    )


def objects_left(backend: Backend) -> set[str] | None:
    """The Storage objects (Supabase); None for a backend that keeps the bytes in its table."""
    return backend.storage.paths() if backend.storage is not None else None


async def test_a_file_comes_back_as_it_was_stored(repo: Storage, backend: Backend) -> None:
    sid = str(uuid.uuid4())
    await repo.ensure_session(sid, "ada", datetime.now(UTC))
    data = bytes(range(256)) * 40 + b"\x00 the end"
    info = attachment(sid, data)
    await repo.add_attachment(info, data)
    assert await repo.get_attachment(info.attachment_id) == info
    stored = await repo.attachment_data(info.attachment_id)
    assert stored == data and hashlib.sha256(stored).hexdigest() == info.sha256
    for unknown in (str(uuid.uuid4()), "not a uuid", ""):
        assert await repo.get_attachment(unknown) is None and await repo.attachment_data(unknown) is None
    assert objects_left(backend) in (None, {f"{sid}/{info.attachment_id}"})


async def test_adding_a_file_again_is_a_no_op(repo: Storage, backend: Backend) -> None:
    sid = str(uuid.uuid4())
    await repo.ensure_session(sid, None, datetime.now(UTC))
    info = attachment(sid, b"first")
    await repo.add_attachment(info, b"first")
    await repo.add_attachment(info, b"first")
    other = await backend.open()  # another process retrying the same upload
    try:
        await other.add_attachment(info, b"first")
    finally:
        await other.aclose()
    assert await repo.get_attachment(info.attachment_id) == info
    assert await repo.attachment_data(info.attachment_id) == b"first"
    assert await repo.session_attachments(sid, [info.attachment_id]) == [info]


async def test_a_deleted_or_unknown_session_takes_no_file(repo: Storage, backend: Backend) -> None:
    sid = str(uuid.uuid4())
    await repo.ensure_session(sid, None, datetime.now(UTC))
    assert await repo.delete_session(sid)
    for session in (sid, str(uuid.uuid4())):
        info = attachment(session, b"late")
        with pytest.raises(SessionDeleted):
            await repo.add_attachment(info, b"late")
        assert await repo.get_attachment(info.attachment_id) is None
        assert await repo.attachment_data(info.attachment_id) is None
    assert objects_left(backend) in (None, set())


async def test_a_sessions_files_are_read_in_the_order_asked_and_no_others(repo: Storage) -> None:
    sid, other = str(uuid.uuid4()), str(uuid.uuid4())
    for session in (sid, other):
        await repo.ensure_session(session, None, datetime.now(UTC))
    first, second, third = (attachment(sid, bytes([n])) for n in range(3))
    elsewhere = attachment(other, b"theirs")
    for info in (first, second, third, elsewhere):
        await repo.add_attachment(info, b"x")
    asked = [third.attachment_id, elsewhere.attachment_id, str(uuid.uuid4()), "not a uuid"]
    asked += [first.attachment_id.upper(), third.attachment_id]
    assert await repo.session_attachments(sid, asked) == [third, first]
    assert await repo.session_attachments(sid, []) == []
    assert await repo.session_attachments(other, asked) == [elsewhere]


async def test_only_unused_files_older_than_the_bound_expire(repo: Storage, backend: Backend) -> None:
    sid, other = str(uuid.uuid4()), str(uuid.uuid4())
    for session in (sid, other):
        await repo.ensure_session(session, None, datetime.now(UTC))
    day = timedelta(days=1)
    old_unused = [attachment(sid, b"old", age=2 * day + timedelta(minutes=n)) for n in range(3)]
    old_used, recent = attachment(sid, b"named", age=3 * day), attachment(sid, b"new", age=day / 2)
    marked_by_another_session = attachment(other, b"theirs", age=2 * day)
    for info in (*old_unused, old_used, recent, marked_by_another_session):
        await repo.add_attachment(info, info.name.encode())
    # A message of `sid` names its file and, wrongly, the other session's: only its own is marked.
    await repo.mark_attachments_used(sid, [old_used.attachment_id, marked_by_another_session.attachment_id, "x"])
    await repo.mark_attachments_used(sid, [old_used.attachment_id])  # again: no change
    stored_used = await repo.get_attachment(old_used.attachment_id)
    assert stored_used is not None and stored_used.used
    assert not (await session_file(repo, marked_by_another_session.attachment_id)).used

    bound = datetime.now(UTC) - day
    assert await repo.delete_unused_attachments(bound, limit=2) == 2
    assert await repo.delete_unused_attachments(bound, limit=10) == 2
    assert await repo.delete_unused_attachments(bound, limit=10) == 0
    for gone in (*old_unused, marked_by_another_session):
        assert await repo.get_attachment(gone.attachment_id) is None
        assert await repo.attachment_data(gone.attachment_id) is None
    for kept in (old_used, recent):
        assert await repo.attachment_data(kept.attachment_id) == kept.name.encode()
    assert objects_left(backend) in (None, {f"{sid}/{old_used.attachment_id}", f"{sid}/{recent.attachment_id}"})


async def session_file(repo: Storage, attachment_id: str) -> AttachmentInfo:
    info = await repo.get_attachment(attachment_id)
    assert info is not None
    return info


async def test_deleting_a_session_removes_its_files(repo: Storage, backend: Backend) -> None:
    sid, other = str(uuid.uuid4()), str(uuid.uuid4())
    for session in (sid, other):
        await repo.ensure_session(session, None, datetime.now(UTC))
    mine = [attachment(sid, b"mine") for _ in range(3)]
    theirs = attachment(other, b"theirs")
    for info in (*mine, theirs):
        await repo.add_attachment(info, b"bytes")
    await repo.mark_attachments_used(sid, [mine[0].attachment_id])
    assert await repo.delete_session(sid)
    for gone in mine:
        assert await repo.get_attachment(gone.attachment_id) is None
        assert await repo.attachment_data(gone.attachment_id) is None
    assert await repo.session_attachments(sid, [info.attachment_id for info in mine]) == []
    assert await repo.attachment_data(theirs.attachment_id) == b"bytes"
    assert objects_left(backend) in (None, {f"{other}/{theirs.attachment_id}"})


@pytest.fixture
async def supabase_files(tmp_path: Path) -> AsyncIterator[tuple[FakeSupabaseStorage, Storage]]:
    """Supabase, with its Storage stand-in (the other backends keep the bytes in their table)."""
    async with open_backend("supabase", tmp_path) as opened:
        assert opened.storage is not None
        repository = await opened.open()
        yield opened.storage, repository
        await repository.aclose()


async def test_a_session_deleted_with_many_files_has_every_object_removed(
    supabase_files: tuple[FakeSupabaseStorage, Storage], monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, repo = supabase_files
    monkeypatch.setattr(supabase_storage, "OBJECT_PAGE_SIZE", 2)  # listed and removed in pages
    sid = str(uuid.uuid4())
    await repo.ensure_session(sid, None, datetime.now(UTC))
    for _ in range(5):
        await repo.add_attachment(attachment(sid, b"x"), b"x")
    assert len(storage.paths()) == 5
    assert await repo.delete_session(sid)
    assert storage.paths() == set()


async def test_supabase_storage_failing_for_a_moment_is_retried(
    supabase_files: tuple[FakeSupabaseStorage, Storage],
) -> None:
    storage, repo = supabase_files
    sid = str(uuid.uuid4())
    await repo.ensure_session(sid, None, datetime.now(UTC))
    info = attachment(sid, b"bytes")
    storage.fail_next(1)
    await repo.add_attachment(info, b"bytes")
    storage.fail_next(1)
    assert await repo.attachment_data(info.attachment_id) == b"bytes"
    assert storage.content_types == {(BUCKET, f"{sid}/{info.attachment_id}"): "image/png"}


@pytest.mark.parametrize(
    "schema",
    [SQLITE_SCHEMA_V1, SQLITE_SCHEMA_V3, SQLITE_SCHEMA_V4],
    ids=["version 1", "version 3", "version 4"],
)
async def test_an_sqlite_file_of_an_earlier_version_gets_attachments_its_rows_kept(tmp_path: Path, schema: str) -> None:
    assert "attachments" not in SQLITE_SCHEMA_V4
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(schema + OLD_ROWS)
    answered = "00000000-0000-4000-8000-00000000000a"
    events_before = await asyncio.to_thread(sqlite_rows, path, "SELECT * FROM events ORDER BY event_id")
    opened = await asyncio.gather(*(SqliteRepository.open(path, retry_seconds=1) for _ in range(2)))
    try:
        info = attachment(answered, b"file")
        await opened[0].add_attachment(info, b"file")
        assert await opened[1].attachment_data(info.attachment_id) == b"file"
        assert await opened[1].session_attachments(answered, [info.attachment_id]) == [info]
        assert await opened[0].delete_session(answered)
        assert await opened[1].get_attachment(info.attachment_id) is None
    finally:
        for repo in opened:
            await repo.aclose()
    events_after = await asyncio.to_thread(sqlite_rows, path, "SELECT * FROM events ORDER BY event_id")
    kept = [event for event in events_before if event["session_id"] != answered]
    assert [{name: row[name] for name in old} for old, row in zip(kept, events_after, strict=True)] == kept
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SQLITE_SCHEMA_VERSION,)
        assert {r[2] for r in db.execute("PRAGMA foreign_key_list(attachments)")} == {"sessions"}
        assert {r[1] for r in db.execute("PRAGMA index_list(attachments)")} >= {
            "attachments_by_session",
            "attachments_unused_by_age",
        }
        assert len(db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall()) == 7
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []


async def test_the_attachment_operations_are_timed_by_name(tmp_path: Path) -> None:
    metrics = RecordedMetrics()
    repo = MeasuredRepository(await SqliteRepository.open(tmp_path / "timed.db", retry_seconds=1), metrics)
    try:
        sid = str(uuid.uuid4())
        await repo.ensure_session(sid, None, datetime.now(UTC))
        info = attachment(sid, b"x")
        await repo.add_attachment(info, b"x")
        await repo.get_attachment(info.attachment_id)
        await repo.attachment_data(info.attachment_id)
        await repo.session_attachments(sid, [info.attachment_id])
        await repo.mark_attachments_used(sid, [info.attachment_id])
        await repo.delete_unused_attachments(datetime.now(UTC), 10)
    finally:
        await repo.aclose()
    assert metrics.operations[1:] == [
        "add_attachment",
        "get_attachment",
        "attachment_data",
        "session_attachments",
        "mark_attachments_used",
        "delete_unused_attachments",
    ]


async def test_supabase_without_the_attachments_migration_refuses_files_and_says_which(
    supabase_files: tuple[FakeSupabaseStorage, Storage],
) -> None:
    storage, repo = supabase_files
    sid = str(uuid.uuid4())
    await repo.ensure_session(sid, None, datetime.now(UTC))
    storage.buckets.clear()  # a project where the bucket was never made
    with pytest.raises(StorageRefused, match=re.escape("apply supabase/migrations/20261212000000_attachments.sql")):
        await repo.add_attachment(attachment(sid, b"x"), b"x")


@pytest.fixture
async def supabase_project(tmp_path: Path) -> AsyncIterator[tuple[Backend, Storage]]:
    """Supabase whole: the PostgREST and Storage stand-ins at one URL, and a repository on them."""
    async with open_backend("supabase", tmp_path) as opened:
        repository = await opened.open()
        yield opened, repository
        await repository.aclose()


async def test_more_files_than_one_url_can_name_are_read_marked_and_expired_on_supabase(
    supabase_project: tuple[Backend, Storage],
) -> None:
    project, repo = supabase_project
    assert project.postgrest is not None and project.storage is not None
    sid = str(uuid.uuid4())
    await repo.ensure_session(sid, None, datetime.now(UTC))
    # 300 ids in one `in.(...)` filter make a URL of about 11 KB: Supabase's gateway answers 414.
    ids = [str(uuid.uuid4()) for _ in range(600)]
    await project.sql(
        "insert into attachments (attachment_id, session_id, name, mime_type, size, sha256, created_at)"
        " select unnest(?::uuid[]), ?, 'f.png', 'image/png', 1, 'x', now() - interval '2 days'",
        ids,
        uuid.UUID(sid),
    )
    for key in ids:
        project.storage.objects[BUCKET, f"{sid}/{key}"] = b"x"
    asked = ids[::-1]
    assert [info.attachment_id for info in await repo.session_attachments(sid, asked)] == asked
    await repo.mark_attachments_used(sid, ids[:300])
    assert all(info.used == (n < 300) for n, info in enumerate(await repo.session_attachments(sid, ids)))

    assert await repo.delete_unused_attachments(datetime.now(UTC) - timedelta(days=1), limit=500) == 300
    assert project.storage.paths() == {f"{sid}/{key}" for key in ids[:300]}
    assert [info.attachment_id for info in await repo.session_attachments(sid, ids)] == ids[:300]
    assert max(len(path) for _, path in project.postgrest.requests) <= MAX_REQUEST_LINE


async def test_a_file_whose_row_supabase_refuses_leaves_no_storage_object(
    supabase_project: tuple[Backend, Storage],
) -> None:
    project, repo = supabase_project
    assert project.storage is not None
    sid = str(uuid.uuid4())
    await repo.ensure_session(sid, None, datetime.now(UTC))
    # Every insert into `attachments` fails, after the bytes were uploaded.
    await project.sql("alter table attachments add constraint no_file_taken check (size < 0) not valid")
    info = attachment(sid, b"bytes")
    with pytest.raises(APIError):
        await repo.add_attachment(info, b"bytes")
    assert ("POST", f"/storage/v1/object/{BUCKET}/{sid}/{info.attachment_id}") in project.storage.requests
    assert project.storage.paths() == set()
    assert await repo.get_attachment(info.attachment_id) is None


async def test_supabase_storage_objects_a_failure_left_are_removed_at_the_next_sweep(
    supabase_project: tuple[Backend, Storage], caplog: pytest.LogCaptureFixture
) -> None:
    project, repo = supabase_project
    assert project.storage is not None
    old, deleted = str(uuid.uuid4()), str(uuid.uuid4())
    for session in (old, deleted):
        await repo.ensure_session(session, None, datetime.now(UTC))
    unused = [attachment(old, b"x", age=timedelta(days=2)) for _ in range(2)]
    for info in (*unused, attachment(deleted, b"y")):
        await repo.add_attachment(info, b"x")
    bound = datetime.now(UTC) - timedelta(days=1)

    project.storage.fail_next(10_000)  # Storage away past the retry budget
    with caplog.at_level(logging.WARNING, logger="server.storage"):
        assert await repo.delete_unused_attachments(bound, limit=10) == 2
        assert await repo.delete_session(deleted)
    assert len(project.storage.paths()) == 3  # the rows are gone, the objects are left
    left = [r.getMessage() for r in caplog.records if "tried again" in r.getMessage()]
    assert len(left) == 2 and left[0].startswith("2 unused files' Storage objects are not removed"), left
    assert deleted in left[1]

    project.storage.heal()
    assert await repo.delete_unused_attachments(bound, limit=10) == 0
    assert project.storage.paths() == set()


async def test_supabase_without_the_message_attachments_migration_stores_messages_and_says_which(
    supabase_project: tuple[Backend, Storage],
) -> None:
    project, repo = supabase_project
    assert project.postgrest is not None
    await repo.ping()
    await project.sql("alter table events drop column attachments")
    await project.postgrest.reload_schema()
    sid = str(uuid.uuid4())
    await repo.ensure_session(sid, None, datetime.now(UTC))
    stored = await repo.append_event(draft(sid, "k"))  # a message without files names no such column
    assert (stored.content, stored.attachments) == ("hi", None)
    migration = "20261212100000_message_attachments.sql"
    with pytest.raises(
        StorageRefused, match=re.escape(f"events.attachments is missing: apply supabase/migrations/{migration}")
    ):
        await repo.ping()


async def test_supabase_without_the_attachments_table_or_bucket_is_not_ready_and_says_which(
    supabase_project: tuple[Backend, Storage],
) -> None:
    project, repo = supabase_project
    assert project.postgrest is not None and project.storage is not None
    await repo.ping()
    project.storage.buckets.clear()
    needed = "is missing: apply supabase/migrations/20261212000000_attachments.sql"
    with pytest.raises(StorageRefused, match=re.escape(f"the Storage bucket `attachments` {needed}")):
        await repo.ping()
    await project.sql("drop table attachments cascade")
    await project.postgrest.reload_schema()
    with pytest.raises(StorageRefused, match=re.escape(f"the attachments table {needed}")):
        await repo.ping()
