"""The SQLite repository against a real database file: idempotency, order, and transaction isolation."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from server.core.models import EventDraft, EventType
from server.storage.sqlite import SqliteRepository


def draft(session_id: str, key: str, content: str = "hi", kind: EventType = EventType.USER_MESSAGE) -> EventDraft:
    return EventDraft(
        session_id=session_id,
        event_type=kind,
        content=content,
        event_key=key,
        turn_id="t",
        timestamp=datetime.now(UTC),
    )


@pytest.fixture
async def repo(tmp_path: Path) -> SqliteRepository:
    repository = await SqliteRepository.open(tmp_path / "store.db", retry_seconds=1)
    yield repository  # type: ignore[misc]
    await repository.aclose()


async def test_sessions_are_created_once_and_read_back(repo: SqliteRepository) -> None:
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


async def test_a_repeated_write_returns_the_first_row(repo: SqliteRepository) -> None:
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


async def test_a_failing_write_never_takes_a_concurrent_one_down_with_it(
    repo: SqliteRepository, tmp_path: Path
) -> None:
    sid = str(uuid.uuid4())
    await repo.ensure_session(sid, None, datetime.now(UTC))
    acknowledged: list[int] = []

    async def good(n: int) -> None:
        acknowledged.append((await repo.append_event(draft(sid, f"good-{n}"))).event_id)

    async def bad(n: int) -> None:
        with pytest.raises(sqlite3.IntegrityError):  # no such session: the foreign key refuses it
            await repo.append_event(draft(str(uuid.uuid4()), f"bad-{n}"))

    await asyncio.gather(*(coro for n in range(50) for coro in (good(n), bad(n))))
    # Read through another connection: what was acknowledged must really be committed.
    other = sqlite3.connect(tmp_path / "store.db")
    committed = {row[0] for row in other.execute("SELECT event_id FROM events WHERE session_id = ?", (sid,))}
    other.close()
    assert len(acknowledged) == 50 and set(acknowledged) <= committed
