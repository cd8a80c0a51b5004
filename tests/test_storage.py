"""One repository contract, run against every backend: SQLite, PostgreSQL (asyncpg) and Supabase
(the real supabase-py over HTTP to a PostgREST stand-in on the real PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote

import asyncpg
import pytest
from postgrest.exceptions import APIError

from server.core.models import ErrorInfo, EventDraft, EventType
from server.core.ports import Repository
from server.storage import supabase as supabase_storage
from server.storage.postgres import PostgresRepository
from server.storage.sqlite import SqliteRepository
from server.storage.supabase import SupabaseRepository
from tests.fake_postgrest import FakePostgrest, make_key
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
    open: Callable[[], Awaitable[Repository]]  # another repository on the same data
    # Runs one SQL statement as an operator would (the original design's SQL; `?` placeholders).
    sql: Callable[..., Awaitable[None]]
    postgrest: FakePostgrest | None = None


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
        postgrest = FakePostgrest(dsn)
        async with serving(postgrest.app, lifespan="on") as postgrest.url:
            yield Backend(
                "supabase",
                lambda: SupabaseRepository.open(postgrest.url, make_key("service_role"), retry_seconds=1),
                postgres_statement(dsn),
                postgrest,
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
async def repo(backend: Backend) -> AsyncIterator[Repository]:
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
