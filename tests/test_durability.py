"""Storage failing under a live conversation: every acknowledged event is stored once, in order.

PostgreSQL is cut off by a TCP proxy between the service and the real database; Supabase's API is
the PostgREST stand-in, answering 503s or losing a response after its insert committed.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import asyncpg
import httpx
import pytest

from server.core.event_store import EventStore
from server.core.models import EventDraft, EventType
from server.core.tasks import TaskTracker
from server.storage.outbox import SqliteOutbox
from server.storage.postgres import PostgresRepository
from tests.conftest import ServerFactory, TabFactory
from tests.fake_postgrest import FakePostgrest, make_key
from tests.fake_supabase_storage import FakeSupabaseStorage
from tests.harness import RunningServer, Tab, serving
from tests.pg import scratch_database
from tests.tcp_proxy import TcpProxy
from tests.test_metrics import scrape


@pytest.fixture
async def database() -> AsyncIterator[str]:
    async with scratch_database(supabase_roles=True) as dsn:
        await (await PostgresRepository.open(dsn)).aclose()  # the schema
        yield dsn


@pytest.fixture
async def proxy(database: str) -> AsyncIterator[TcpProxy]:
    url = urlparse(database)
    running = await TcpProxy(url.hostname or "127.0.0.1", url.port or 5432).start()
    yield running
    await running.stop()


def through(dsn: str, proxy: TcpProxy) -> str:
    url = urlparse(dsn)
    return url._replace(netloc=f"{url.username}@127.0.0.1:{proxy.port}").geturl()


async def stored_rows(dsn: str, session_id: str) -> list[tuple[str, str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT event_type, content, event_key FROM events WHERE session_id = $1 ORDER BY event_id", session_id
        )
    finally:
        await conn.close()
    return [(r["event_type"], r["content"], r["event_key"]) for r in rows]


async def stored_summary(dsn: str, session_id: str) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT summary FROM sessions WHERE session_id = $1", session_id)
    finally:
        await conn.close()


async def say(tab: Tab, sid: str, text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    ack = await tab.call("message", {"session_id": sid, "text": text, "client_message_id": text})
    assert ack["ok"], ack
    done = (await tab.turn(ack["turn_id"], timeout=20))[-1][1]
    return ack, done


async def readiness(server: RunningServer) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.get(f"{server.url}/readyz")
    return answer.status_code, answer.json()


async def until_drained(server: RunningServer, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while (await readiness(server)) != (200, {"status": "ready", "queued_events": 0}):
            await asyncio.sleep(0.1)


def user_and_ai(texts: list[str], rows: list[tuple[str, str, str]]) -> None:
    """Each message stored once, each followed by its answer, in the order they were sent."""
    assert [kind for kind, _, _ in rows] == ["user_message", "ai_message"] * len(texts)
    assert [content for kind, content, _ in rows if kind == "user_message"] == texts
    assert len({key for _, _, key in rows}) == len(rows)


POSTGRES_FAULTS = {"storage_retry_seconds": 0.5, "storage_timeout_seconds": 1, "summary_retry_seconds": 0.2}


async def test_postgres_cut_mid_conversation_loses_and_duplicates_nothing(
    start_server: ServerFactory, connect: TabFactory, database: str, proxy: TcpProxy, tmp_path: Path
) -> None:
    server = await start_server(
        storage_backend="postgres",
        database_url=through(database, proxy),
        outbox_path=tmp_path / "outbox.db",
        summary_delay_seconds=0.1,
        **POSTGRES_FAULTS,
    )
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    ack, done = await say(tab, sid, "before the outage")
    assert isinstance(ack["event_id"], int) and isinstance(done["event_id"], int)

    proxy.cut()
    during = ["during the outage", "still out"]
    for text in during:
        ack, done = await say(tab, sid, text)
        # Accepted into the local queue: no id yet, and the conversation goes on.
        assert ack["event_id"] is None and done["event_id"] is None
        assert done["finish_reason"] == "stop" and "words" in done["text"]
    status, body = await readiness(server)
    assert status == 503 and body["queued_events"] == 4
    assert any("events queued" in reason for reason in body["reasons"])
    assert (await scrape(server.url)).value("realtime_queued_events") == 4

    await tab.call("leave", {"session_id": sid})
    await asyncio.sleep(0.6)  # the summary waits: its session's events are not all stored

    proxy.restore()
    await until_drained(server)
    user_and_ai(["before the outage", *during], await stored_rows(database, sid))
    assert (await scrape(server.url)).value("realtime_queued_events") == 0
    async with asyncio.timeout(10):
        while (summary := await stored_summary(database, sid)) is None:
            await asyncio.sleep(0.1)
    assert "3 user messages and 3 answers" in summary


async def test_the_queue_survives_a_restart(
    start_server: ServerFactory, connect: TabFactory, database: str, proxy: TcpProxy, tmp_path: Path
) -> None:
    settings = {
        "storage_backend": "postgres",
        "database_url": through(database, proxy),
        "outbox_path": tmp_path / "outbox.db",
        **POSTGRES_FAULTS,
    }
    first = await start_server(**settings)
    tab = await connect(first)
    sid = (await tab.join())["session"]["session_id"]
    await say(tab, sid, "one")
    proxy.cut()
    await say(tab, sid, "two")
    await say(tab, sid, "three")
    await tab.close()
    await first.stop()

    with sqlite3.connect(tmp_path / "outbox.db") as kept:
        assert kept.execute("SELECT count(*) FROM outbox").fetchone() == (4,)
    user_and_ai(["one"], await stored_rows(database, sid))  # the rest waits on disk

    proxy.restore()
    second = await start_server(**settings)
    await until_drained(second)
    user_and_ai(["one", "two", "three"], await stored_rows(database, sid))
    with sqlite3.connect(tmp_path / "outbox.db") as kept:
        assert kept.execute("SELECT count(*) FROM outbox").fetchone() == (0,)


@pytest.fixture
async def postgrest(database: str) -> AsyncIterator[FakePostgrest]:
    stand_in = FakePostgrest(database)  # with Supabase Storage at the same URL, as a project has it
    async with serving(FakeSupabaseStorage().served_beside(stand_in.app), lifespan="on") as stand_in.url:
        yield stand_in


async def on_supabase(
    start_server: ServerFactory, postgrest: FakePostgrest, tmp_path: Path, storage_retry_seconds: float
) -> RunningServer:
    """The service on the PostgREST stand-in with the real supabase client, short timeouts."""
    return await start_server(
        storage_backend="supabase",
        supabase_url=postgrest.url,
        supabase_key=make_key("service_role"),
        outbox_path=tmp_path / "outbox.db",
        storage_retry_seconds=storage_retry_seconds,
        storage_timeout_seconds=0.5,
    )


async def test_supabase_503s_and_a_lost_response_are_retried_without_duplicates(
    start_server: ServerFactory, connect: TabFactory, database: str, postgrest: FakePostgrest, tmp_path: Path
) -> None:
    server = await on_supabase(start_server, postgrest, tmp_path, storage_retry_seconds=5)
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]

    postgrest.fail_next(2)
    ack, done = await say(tab, sid, "through two 503s")
    assert isinstance(ack["event_id"], int) and postgrest.answered_503 == 2

    postgrest.lose_next_response()  # the user message's insert commits, its answer never arrives
    ack, done = await say(tab, sid, "answer lost")
    assert postgrest.lost.is_set()
    assert isinstance(ack["event_id"], int) and isinstance(done["event_id"], int)

    rows = await stored_rows(database, sid)
    user_and_ai(["through two 503s", "answer lost"], rows)


async def test_supabase_down_then_back(
    start_server: ServerFactory, connect: TabFactory, database: str, postgrest: FakePostgrest, tmp_path: Path
) -> None:
    server = await on_supabase(start_server, postgrest, tmp_path, storage_retry_seconds=0.5)
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    await say(tab, sid, "first")
    postgrest.fail_next(10_000)
    ack, _ = await say(tab, sid, "second")
    assert ack["event_id"] is None
    # A retried message during the outage is answered like the first, from the local queue.
    again = await tab.call("message", {"session_id": sid, "text": "second", "client_message_id": "second"})
    assert again == ack

    other = await connect(server)
    refused = await other.call("join", {"session_id": sid})
    assert refused["error"]["code"] == "unavailable"

    postgrest.heal()
    await until_drained(server)
    user_and_ai(["first", "second"], await stored_rows(database, sid))
    history = (await other.join(sid))["history"]
    assert [e["content"] for e in history if e["event_type"] == "user_message"] == ["first", "second"]


async def test_an_event_storage_refuses_for_good_is_set_aside_not_dropped(database: str, tmp_path: Path) -> None:
    repo = await PostgresRepository.open(database, retry_seconds=0.5)
    outbox = await SqliteOutbox.open(tmp_path / "queue.db")
    tasks = TaskTracker()
    sid, orphan = str(uuid.uuid4()), str(uuid.uuid4())
    await repo.ensure_session(sid, None, datetime.now(UTC))

    def draft(session_id: str, key: str) -> EventDraft:
        return EventDraft(
            session_id=session_id,
            event_type=EventType.USER_MESSAGE,
            content=key,
            event_key=key,
            timestamp=datetime.now(UTC),
        )

    # Left by an earlier run: one event of a session storage does not know, then a good one.
    await outbox.put(draft(orphan, "orphan"))
    await outbox.put(draft(sid, "good"))
    store = EventStore(repo, tasks, outbox)
    store.start()
    try:
        async with asyncio.timeout(10):
            while outbox.depth:
                await asyncio.sleep(0.05)
        assert [e.content for e in await repo.list_events(sid)] == ["good"]
        with sqlite3.connect(tmp_path / "queue.db") as kept:
            (aside,) = kept.execute("SELECT session_id, reason FROM outbox_set_aside").fetchall()
        assert aside[0] == orphan and "ForeignKeyViolation" in aside[1]
    finally:
        await store.close()
        await tasks.drain(1)
        await outbox.aclose()
        await repo.aclose()


async def test_readiness_says_when_the_supabase_key_cannot_write(
    start_server: ServerFactory, database: str, postgrest: FakePostgrest, tmp_path: Path
) -> None:
    """The anon key, which a browser bundle ships and a server might be given: every write is refused by row
    level security, so the service is not ready, and says which key it needs."""
    anon = await start_server(
        storage_backend="supabase",
        supabase_url=postgrest.url,
        supabase_key=make_key("anon"),
        outbox_path=tmp_path / "anon-outbox.db",
    )
    async with httpx.AsyncClient(base_url=anon.url) as http:
        answer = await http.get("/readyz")
    assert answer.status_code == 503
    (reason,) = answer.json()["reasons"]
    assert reason.startswith("storage: SUPABASE_KEY has the role anon") and "service_role key" in reason

    # A key that claims the service role but whose role lost its rights: the write probe finds out.
    conn = await asyncpg.connect(database)
    try:
        await conn.execute("REVOKE UPDATE ON public.sessions FROM service_role")
    finally:
        await conn.close()
    service = await on_supabase(start_server, postgrest, tmp_path, storage_retry_seconds=1)
    async with httpx.AsyncClient(base_url=service.url) as http:
        answer = await http.get("/readyz")
    assert answer.status_code == 503
    assert "permission denied" in answer.json()["reasons"][0], answer.json()


async def test_readiness_with_the_service_role_key_is_ok(
    start_server: ServerFactory, postgrest: FakePostgrest, tmp_path: Path
) -> None:
    server = await on_supabase(start_server, postgrest, tmp_path, storage_retry_seconds=1)
    async with httpx.AsyncClient(base_url=server.url) as http:
        answer = await http.get("/readyz")
    assert answer.status_code == 200, answer.json()
    assert any(
        method == "PATCH" and "00000000-0000-0000-0000-000000000000" in path for method, path in postgrest.requests
    )


async def test_an_upload_supabase_refuses_is_a_coded_503_and_readiness_names_the_migration(
    start_server: ServerFactory,
    connect: TabFactory,
    database: str,
    postgrest: FakePostgrest,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await on_supabase(start_server, postgrest, tmp_path, storage_retry_seconds=1)
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    conn = await asyncpg.connect(database)
    try:
        await conn.execute("drop table attachments cascade")  # a project without 20261212000000_attachments.sql
    finally:
        await conn.close()
    await postgrest.reload_schema()
    migration = "apply supabase/migrations/20261212000000_attachments.sql"
    async with httpx.AsyncClient(base_url=server.url) as http:
        with caplog.at_level(logging.WARNING):
            upload = await http.post(
                f"/api/sessions/{sid}/attachments", files={"file": ("notes.txt", b"hello\n", "text/plain")}
            )
        ready = await http.get("/readyz")
    assert upload.status_code == 503 and upload.json()["detail"]["code"] == "unavailable", upload.text
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], caplog.text  # no traceback
    assert len([r for r in caplog.records if migration in r.getMessage()]) == 1, caplog.text
    assert (
        ready.status_code == 503
        and f"storage: the attachments table is missing: {migration}" in ready.json()["reasons"]
    )
