"""DATABASE_URL as operators get it wrong, and PostgreSQL as it goes away: `python -m server` (and
uvicorn) stop with one line naming the variable for a URL PostgreSQL refuses, wait for a server that
does not answer yet, and retry an operation for STORAGE_RETRY_SECONDS, logging it by name."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import asyncpg
import httpx
import pytest

from server.storage.postgres import PostgresRepository
from tests.harness import Tab, free_port, logged_server, run_python, service_env
from tests.pg import ADMIN_DSN, admin_connection, scratch_database
from tests.tcp_proxy import TcpProxy

PASSWORD = "Pa55-w0rd-Xq7"  # trust authentication ignores it; it must never be printed


def with_password(dsn: str, *, user: str | None = None, port: int | None = None, database: str | None = None) -> str:
    url = urlparse(dsn)
    host = f"{url.hostname or '127.0.0.1'}:{port or url.port or 5432}"
    netloc = f"{user or url.username or 'postgres'}:{PASSWORD}@{host}"
    return url._replace(netloc=netloc, path=f"/{database}" if database else url.path).geturl()


async def run_until_exit(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[int | None, str, str]:
    """Run Python with `argv` until it exits: its status, stdout and stderr."""
    return await run_python(argv, cwd, env)


def postgres_env(tmp_path: Path, database_url: str, **extra: str) -> dict[str, str]:
    return service_env(
        tmp_path,
        free_port(),
        STORAGE_BACKEND="postgres",
        DATABASE_URL=database_url,
        OUTBOX_PATH=str(tmp_path / "data" / "outbox.db"),
        **extra,
    )


# (what is wrong, the URL, what the line says)
UNUSABLE = [
    ("not a URL", f"host=127.0.0.1 password={PASSWORD}", "it must be a URL"),
    ("mysql", f"mysql://app:{PASSWORD}@127.0.0.1:3306/chat", "not mysql://"),
    ("a port that is not a number", f"postgresql://app:{PASSWORD}@127.0.0.1:54x2/chat", "Port could not be cast"),
    ("a database that does not exist", "missing", 'database "no_such_db_'),
    # Trust authentication accepts any password, so a wrong one cannot be tried here; a role that
    # does not exist is refused at the same point (authentication, SQLSTATE 28000).
    ("a role that does not exist", "no role", 'role "no_such_role_'),
]


def unusable_url(kind: str) -> str:
    suffix = uuid.uuid4().hex[:8]
    if kind == "missing":
        return with_password(ADMIN_DSN, database=f"no_such_db_{suffix}")
    if kind == "no role":
        return with_password(ADMIN_DSN, user=f"no_such_role_{suffix}")
    return kind


@pytest.mark.parametrize(("what", "url", "says"), UNUSABLE, ids=[case[0] for case in UNUSABLE])
async def test_an_unusable_database_url_stops_it_with_one_line_naming_it(
    tmp_path: Path, what: str, url: str, says: str
) -> None:
    if url in ("missing", "no role"):
        await (await admin_connection()).close()  # skips when there is no PostgreSQL to refuse it
    returncode, out, err = await run_until_exit(["-m", "server"], tmp_path, postgres_env(tmp_path, unusable_url(url)))
    assert returncode not in (0, None)
    assert out == ""
    (line,) = err.strip().splitlines()  # one line, the whole of what it says
    assert "DATABASE_URL" in line and says in line, line
    assert PASSWORD not in err and "Traceback" not in err
    assert not (tmp_path / "data").exists()  # nothing was opened or created


async def test_uvicorn_says_a_missing_database_in_one_line_without_a_traceback(tmp_path: Path) -> None:
    await (await admin_connection()).close()
    url = unusable_url("missing")
    returncode, out, err = await run_until_exit(
        ["-m", "uvicorn", "server.main:app", "--port", "0"], tmp_path, postgres_env(tmp_path, url)
    )
    assert returncode not in (0, None)
    # uvicorn's own lines (starting, "Application startup failed") and ours: one names the variable.
    (line,) = [line for line in (out + err).splitlines() if "DATABASE_URL" in line]
    assert "does not exist" in line and url.rsplit("/", 1)[1] in line
    assert PASSWORD not in out + err and "Traceback" not in out + err
    assert len((out + err).strip().splitlines()) <= 4, out + err


@pytest.fixture
async def database() -> AsyncIterator[str]:
    async with scratch_database() as dsn:
        await (await PostgresRepository.open(dsn)).aclose()  # the schema
        yield dsn


async def readiness(url: str) -> tuple[int, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.get(f"{url}/readyz")
    return answer.status_code, answer.json()


async def stored_texts(dsn: str, session_id: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT content FROM events WHERE session_id = $1 ORDER BY event_id", session_id)
    finally:
        await conn.close()
    return [row["content"] for row in rows]


async def test_a_database_that_does_not_answer_yet_is_waited_for(database: str, tmp_path: Path) -> None:
    """As PostgreSQL starting beside the service (compose, Kubernetes): the service serves, not
    ready, says why once, and is ready as soon as PostgreSQL answers, without a restart."""
    port = free_port()  # nothing listens there yet: connections are refused
    async with logged_server(
        tmp_path,
        STORAGE_BACKEND="postgres",
        DATABASE_URL=with_password(database, port=port),
        OUTBOX_PATH=str(tmp_path / "outbox.db"),
    ) as (process, url, log_path):
        status, body = await readiness(url)
        assert status == 503 and body["reasons"] == ["storage: DATABASE_URL does not answer (ConnectionRefusedError)"]
        early = await Tab(url, "websocket").connect()  # meanwhile a client is told, not left hanging
        try:
            assert (await early.call("join", {}))["error"]["code"] == "unavailable"
        finally:
            await early.close()
        proxy = await TcpProxy("127.0.0.1", urlparse(database).port or 5432).start(port)
        try:
            async with asyncio.timeout(15):
                while (await readiness(url))[0] != 200:
                    await asyncio.sleep(0.1)
            tab = await Tab(url, "websocket").connect()
            sid = (await tab.join())["session"]["session_id"]
            ack = await tab.call("message", {"session_id": sid, "text": "stored once it answered"})
            assert isinstance(ack["event_id"], int)
            await tab.turn(ack["turn_id"])
            await tab.close()
            assert process.returncode is None  # it never stopped
            process.terminate()
            await asyncio.wait_for(process.wait(), 15)
        finally:
            await proxy.stop()
    assert (await stored_texts(database, sid))[0] == "stored once it answered"
    log = log_path.read_text()
    # One line when it starts waiting, one when PostgreSQL answers: not one per try.
    (waiting,) = [line for line in log.splitlines() if "PostgreSQL does not answer" in line]
    assert "WARNING" in waiting and "DATABASE_URL" in waiting and "ConnectionRefusedError" in waiting
    assert len([line for line in log.splitlines() if "PostgreSQL answers after" in line]) == 1, log
    assert PASSWORD not in log and "Traceback" not in log


async def test_an_operation_is_retried_for_storage_retry_seconds(database: str, tmp_path: Path) -> None:
    """PostgreSQL cut for less than STORAGE_RETRY_SECONDS: the message is stored when it is back (not
    queued locally), and the log names the operation and the cause, once when it starts retrying and
    once when it gets through, never tenacity's `<unknown>` per attempt."""
    proxy = await TcpProxy("127.0.0.1", urlparse(database).port or 5432).start()
    try:
        async with logged_server(
            tmp_path,
            STORAGE_BACKEND="postgres",
            DATABASE_URL=with_password(database, port=proxy.port),
            OUTBOX_PATH=str(tmp_path / "outbox.db"),
            STORAGE_RETRY_SECONDS="8",
            STORAGE_TIMEOUT_SECONDS="2",
            OFFLINE_CHUNK_DELAY_MS="0",
            # Every line: two operations retrying at once share one template, which the log's
            # repeat limit would otherwise write once (the start's expiry pass may be one of them).
            LOG_REPEAT_SECONDS="0",
        ) as (_, url, log_path):
            tab = await Tab(url, "websocket").connect()
            try:
                sid = (await tab.join())["session"]["session_id"]
                proxy.cut()
                sending = asyncio.create_task(
                    tab.call("message", {"session_id": sid, "text": "through the cut"}, timeout=30)
                )
                await asyncio.sleep(3)  # more than the six attempts (~1.2 s) it used to stop after
                proxy.restore()
                ack = await sending
                assert isinstance(ack["event_id"], int), ack  # stored, not left in the local queue
                await tab.turn(ack["turn_id"], timeout=20)
            finally:
                await tab.close()
            assert (await readiness(url))[1]["queued_events"] == 0
    finally:
        await proxy.stop()
    assert (await stored_texts(database, sid))[0] == "through the cut"
    log = log_path.read_text()
    assert "<unknown>" not in log and PASSWORD not in log and "Traceback" not in log, log
    retrying = re.findall(r"WARNING server\.storage: (.+) failed \((\w+).*\); retrying for up to 8 s", log)
    through = re.findall(r"INFO server\.storage: (.+) got through at attempt \d+ after (\d+\.\d) s", log)
    assert retrying and through, log
    # Each operation that retried says so once and gets through once, seconds later.
    assert sorted(name for name, _ in retrying) == sorted(name for name, _ in through)
    assert max(float(seconds) for _, seconds in through) >= 2.5
