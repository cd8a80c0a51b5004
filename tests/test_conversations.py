"""A user's conversations over real sockets: listed in pages, titled once, renamed, deleted, and
read a page at a time however long they grow."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from server.storage.postgres import PostgresRepository
from tests.conftest import ServerFactory, Spawner, TabFactory
from tests.fake_postgrest import FakePostgrest, make_key
from tests.fake_supabase_storage import FakeSupabaseStorage
from tests.harness import RunningServer, Tab, serving
from tests.pg import scratch_database
from tests.test_auth import SECRET, token
from tests.test_metrics import scrape


@pytest.fixture(params=["sqlite", "postgres", "supabase"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """The settings of a server on each storage backend."""
    if request.param == "sqlite":
        yield {}
        return
    async with scratch_database(supabase_roles=True) as dsn:
        await (await PostgresRepository.open(dsn)).aclose()  # the schema, as a Supabase project has it
        if request.param == "postgres":
            yield {"storage_backend": "postgres", "database_url": dsn}
            return
        stand_in = FakePostgrest(dsn)  # with Supabase Storage at the same URL, as a project has it
        async with serving(FakeSupabaseStorage().served_beside(stand_in.app), lifespan="on") as url:
            yield {
                "storage_backend": "supabase",
                "supabase_url": url,
                "supabase_key": make_key("service_role"),
                "outbox_path": tmp_path / "outbox.db",
            }


async def list_page(http: httpx.AsyncClient, user: str, **params: Any) -> dict[str, Any]:
    answer = await http.get("/api/sessions", params={"user_id": user, **params})
    assert answer.status_code == 200, answer.text
    page: dict[str, Any] = answer.json()
    return page


async def every_page(http: httpx.AsyncClient, user: str, limit: int) -> list[str]:
    seen: list[str] = []
    cursor = None
    while True:
        page = await list_page(http, user, limit=limit, **({"cursor": cursor} if cursor else {}))
        assert len(page["sessions"]) <= limit
        seen += [s["session_id"] for s in page["sessions"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return seen


async def frames_until_closed(ws: Any) -> list[dict[str, Any]]:
    """Every frame until the server closes (with a code of the contract's, not a normal close)."""
    frames = []
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            frames.append(json.loads(await ws.recv()))
    return frames


def refusal(answer: httpx.Response, status: int, code: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.json()["detail"]["code"] == code


async def test_a_users_sessions_come_newest_first_in_pages_while_new_ones_arrive(
    backend: dict[str, Any], start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await start_server(**backend)
    user, other = f"user-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"
    tab = await connect(server)
    created = []
    for _ in range(7):
        created.append((await tab.join(user_id=user))["session"]["session_id"])
        await asyncio.sleep(0.002)  # SQLite keeps milliseconds: each its own moment (ties: storage's tests)
    await tab.join(user_id=other)
    async with httpx.AsyncClient(base_url=server.url) as http:
        first = await list_page(http, user, limit=3)
        assert [s["session_id"] for s in first["sessions"]] == created[::-1][:3]
        # Sessions made while a client pages are newer: they come first, not inside later pages.
        newer = []
        for _ in range(3):
            newer.append((await tab.join(user_id=user))["session"]["session_id"])
            await asyncio.sleep(0.002)
        rest: list[str] = []
        cursor = first["next_cursor"]
        while cursor is not None:
            page = await list_page(http, user, limit=3, cursor=cursor)
            rest += [s["session_id"] for s in page["sessions"]]
            cursor = page["next_cursor"]
        assert rest == created[::-1][3:]
        assert await every_page(http, user, limit=100) == [*newer[::-1], *created[::-1]]

        # A stored event moves its session to the top; its `updated_at` says when.
        before = {s["session_id"]: s for s in (await list_page(http, user, limit=100))["sessions"]}
        ack = await tab.call("message", {"session_id": created[0], "text": "bump"})
        assert ack["ok"], ack
        await tab.turn(ack["turn_id"])
        top = (await list_page(http, user, limit=1))["sessions"][0]
        assert top["session_id"] == created[0] and top["updated_at"] > before[created[0]]["updated_at"]
        assert set(top) >= {"session_id", "user_id", "start_time", "title", "updated_at", "summary"}

        refusal(await http.get("/api/sessions"), 400, "invalid_payload")  # no user_id, no token
        for bad in ({"limit": 0}, {"limit": 101}, {"limit": "x"}, {"cursor": "not-a-cursor"}):
            refusal(await http.get("/api/sessions", params={"user_id": user, **bad}), 400, "invalid_payload")


async def test_a_rename_reaches_the_room_and_every_other_tab_of_the_user(
    server: RunningServer, connect: TabFactory, http: httpx.AsyncClient
) -> None:
    user = f"user-{uuid.uuid4().hex[:8]}"
    in_room, elsewhere, stranger = await connect(server), await connect(server), await connect(server)
    sid = (await in_room.join(user_id=user))["session"]["session_id"]
    await elsewhere.join(user_id=user)  # another session of the same user
    await stranger.join(user_id="someone-else")

    for bad in ("", "   ", "x" * 201, "line\nbreak", "nul\x00"):
        refusal(await http.patch(f"/api/sessions/{sid}", json={"title": bad}), 400, "invalid_payload")
    refusal(await http.patch(f"/api/sessions/{sid}", json={"name": "x"}), 400, "invalid_payload")
    refusal(await http.patch(f"/api/sessions/{uuid.uuid4()}", json={"title": "x"}), 404, "not_found")
    refusal(await http.patch("/api/sessions/nope", json={"title": "x"}), 400, "invalid_session_id")
    assert (await http.get(f"/api/sessions/{sid}")).json()["title"] is None

    answer = await http.patch(f"/api/sessions/{sid}", json={"title": "  Trip to Delhi  "})
    assert answer.status_code == 200, answer.text
    renamed = answer.json()
    assert renamed["title"] == "Trip to Delhi" and renamed["session_id"] == sid
    expected = {"session_id": sid, "title": "Trip to Delhi", "updated_at": renamed["updated_at"]}
    for tab in (in_room, elsewhere):
        await tab.wait_for(lambda events: ("session_updated", expected) in events)
    await asyncio.sleep(0.2)
    assert in_room.named("session_updated") == [expected] and elsewhere.named("session_updated") == [expected]
    assert stranger.named("session_updated") == []
    assert (await list_page(http, user, limit=1))["sessions"][0]["title"] == "Trip to Delhi"


async def test_a_title_is_made_once_from_the_first_answer_and_never_replaces_a_persons(
    server: RunningServer, connect: TabFactory, http: httpx.AsyncClient
) -> None:
    tab = await connect(server)
    sid = (await tab.join(user_id="titled"))["session"]["session_id"]
    ack = await tab.call("message", {"session_id": sid, "text": "Plan a weekend in Lisbon with kids please"})
    await tab.turn(ack["turn_id"])
    updated = await tab.wait_for(lambda _: tab.named("session_updated"))
    assert updated[0]["title"] == "Plan a weekend in Lisbon with"
    session = (await http.get(f"/api/sessions/{sid}")).json()
    assert session["title"] == "Plan a weekend in Lisbon with"
    # A generated title leaves `updated_at` as the turn's last event left it.
    assert updated[0]["updated_at"] == session["updated_at"]
    ack = await tab.call("message", {"session_id": sid, "text": "And in Porto?"})
    await tab.turn(ack["turn_id"])
    await asyncio.sleep(0.3)
    assert len(tab.named("session_updated")) == 1
    assert (await scrape(server.url)).by_label("realtime_titles_total", "outcome") == {"ok": 1, "error": 0}

    # A person's title stays, whatever turns follow.
    await http.patch(f"/api/sessions/{sid}", json={"title": "Mine"})
    ack = await tab.call("message", {"session_id": sid, "text": "one more"})
    await tab.turn(ack["turn_id"])
    await asyncio.sleep(0.3)
    assert (await http.get(f"/api/sessions/{sid}")).json()["title"] == "Mine"


async def test_title_generation_can_be_turned_off(start_server: ServerFactory, connect: TabFactory) -> None:
    server = await start_server(title_generation=False)
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    ack = await tab.call("message", {"session_id": sid, "text": "no title for this one"})
    await tab.turn(ack["turn_id"])
    await asyncio.sleep(0.3)
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.get(f"/api/sessions/{sid}")).json()["title"] is None
    assert tab.named("session_updated") == []


# ---------------------------------------------------------------- long sessions


def insert_with_original_sql(path: Path, session_id: str, count: int, text: str = "") -> None:
    """Rows as plain SQL on the base columns writes them (no keys, no turns)."""
    with sqlite3.connect(path) as db:
        db.execute("insert into sessions (session_id, user_id) values (?, ?)", (session_id, "pager"))
        db.executemany(
            "insert into events (session_id, event_type, content) values (?, ?, ?)",
            ((session_id, "user_message" if n % 2 == 0 else "ai_message", f"event {n} {text}") for n in range(count)),
        )


def contents(events: list[dict[str, Any]]) -> list[str]:
    return [e["content"].strip() for e in events]


async def test_history_pages_every_way_on_a_long_session(
    server: RunningServer, connect: TabFactory, http: httpx.AsyncClient
) -> None:
    sid = str(uuid.uuid4())
    await asyncio.to_thread(insert_with_original_sql, server.settings.sqlite_path, sid, 2500)
    every = [f"event {n}" for n in range(2500)]
    tab = await connect(server)

    latest = await tab.join(sid)
    assert contents(latest["history"]) == every[-1000:] and latest["history_more"] is True
    ids = [e["event_id"] for e in latest["history"]]
    assert ids == sorted(ids)
    small = await tab.join(sid, history_limit=10)
    assert contents(small["history"]) == every[-10:] and small["history_more"] is True
    first_id = latest["history"][0]["event_id"] - 1500
    after = await tab.join(sid, after_event_id=first_id - 1, history_limit=1000)
    assert contents(after["history"]) == every[:1000] and after["history_more"] is True
    last = await tab.join(sid, after_event_id=ids[-1])
    assert last["history"] == [] and last["history_more"] is False
    for bad in (0, 1001, "10", -1):
        ack = await tab.call("join", {"session_id": sid, "history_limit": bad})
        assert ack["error"]["code"] == "invalid_payload", ack

    async def events(**params: Any) -> dict[str, Any]:
        answer = await http.get(f"/api/sessions/{sid}/events", params=params)
        assert answer.status_code == 200, answer.text
        page: dict[str, Any] = answer.json()
        return page

    page = await events()
    assert contents(page["events"]) == every[-1000:] and page["more"] is True
    page = await events(before_event_id=page["events"][0]["event_id"], limit=1000)
    assert contents(page["events"]) == every[500:1500] and page["more"] is True
    page = await events(before_event_id=page["events"][0]["event_id"], limit=1000)
    assert contents(page["events"]) == every[:500] and page["more"] is False
    page = await events(after_event_id=first_id - 1, limit=700)
    assert contents(page["events"]) == every[:700] and page["more"] is True
    page = await events(after_event_id=ids[-2], limit=5)
    assert contents(page["events"]) == every[-1:] and page["more"] is False
    for bad in ({"limit": 0}, {"limit": 1001}, {"after_event_id": 1, "before_event_id": 9}, {"limit": "x"}):
        refusal(await http.get(f"/api/sessions/{sid}/events", params=bad), 400, "invalid_payload")

    ws_url = server.url.replace("http", "ws") + f"/ws/session/{sid}"
    async with websockets.connect(f"{ws_url}?history_limit=5") as plain:
        first = json.loads(await plain.recv())
        assert first["event"] == "session"
        assert contents(first["data"]["history"]) == every[-5:] and first["data"]["history_more"] is True
    async with websockets.connect(f"{ws_url}?history_limit=many") as plain:
        assert json.loads(await plain.recv())["data"]["code"] == "invalid_payload"
        await plain.wait_closed()
        assert plain.close_code == 4400


# ---------------------------------------------------------------- deletion


async def test_deletion_tells_every_client_and_leaves_nothing_behind(
    backend: dict[str, Any], start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await start_server(offline_chunk_delay_ms=50, **backend)
    user = f"user-{uuid.uuid4().hex[:8]}"
    first, second, follower = await connect(server), await connect(server), await connect(server)
    sid = (await first.join(user_id=user))["session"]["session_id"]
    await second.join(sid)
    await follower.join(user_id=user)  # the user's tab on another session: its list must hear it
    ws_url = server.url.replace("http", "ws") + f"/ws/session/{sid}"
    async with websockets.connect(ws_url) as plain, httpx.AsyncClient(base_url=server.url) as http:
        assert json.loads(await plain.recv())["event"] == "session"
        ack = await first.call("message", {"session_id": sid, "text": "tell me a long story"})
        await first.wait_for(lambda _: first.named("chunk"))

        answer = await http.delete(f"/api/sessions/{sid}")
        assert answer.status_code == 204, answer.text

        for tab in (first, second):
            await tab.wait_for(lambda _, tab=tab: tab.named("session_deleted"))  # type: ignore[misc]
            names = [n for n, d in tab.events if d.get("session_id") == sid and n in ("done", "session_deleted")]
            assert names == ["done", "session_deleted"], tab.events
            assert tab.named("done")[0]["finish_reason"] == "cancelled"
        await follower.wait_for(lambda _: follower.named("session_deleted"))
        assert follower.named("session_deleted") == [{"session_id": sid}]
        frames = await frames_until_closed(plain)
        assert [f["event"] for f in frames][-2:] == ["done", "session_deleted"]
        assert plain.close_code == 4404 and plain.close_reason == "session_deleted"

        # Out of the room, the id reserved, nothing of it left or written after the 204.
        ack = await first.call("message", {"session_id": sid, "text": "still there?"})
        assert ack["error"]["code"] == "session_deleted", ack
        for tab in (first, await connect(server)):
            ack = await tab.call("join", {"session_id": sid})
            assert ack["error"]["code"] == "session_deleted", ack
        async with websockets.connect(ws_url) as again:
            assert json.loads(await again.recv())["data"]["code"] == "session_deleted"
            await again.wait_closed()
            assert again.close_code == 4404
        refusal(await http.get(f"/api/sessions/{sid}"), 404, "session_deleted")
        refusal(await http.get(f"/api/sessions/{sid}/events"), 404, "session_deleted")
        refusal(await http.patch(f"/api/sessions/{sid}", json={"title": "back"}), 404, "session_deleted")
        refusal(await http.delete(f"/api/sessions/{sid}"), 404, "session_deleted")
        refusal(await http.delete(f"/api/sessions/{uuid.uuid4()}"), 404, "not_found")
        assert sid not in [s["session_id"] for s in (await list_page(http, user, limit=100))["sessions"]]
        await asyncio.sleep(0.5)  # the cancelled turn's last writes had their chance
        assert (await server.runtime.repo.page_events(sid, limit=1000)).events == []
        tombstone = await server.runtime.repo.get_session(sid)
        assert tombstone.deleted and tombstone.title is None and tombstone.summary is None


async def test_only_the_owner_lists_renames_or_deletes(start_server: ServerFactory, connect: TabFactory) -> None:
    server = await start_server(auth_jwt_secret=SECRET)
    alice, bob = token("alice"), token("bob")
    tab = Tab(server.url)
    await tab.connect(auth={"token": alice})
    try:
        sid = (await tab.join())["session"]["session_id"]
        async with httpx.AsyncClient(base_url=server.url) as http:
            as_bob = {"Authorization": f"Bearer {bob}"}
            as_alice = {"Authorization": f"Bearer {alice}"}
            refusal(await http.get("/api/sessions"), 401, "unauthorized")
            assert (await http.get("/api/sessions", headers=as_bob)).json() == {"sessions": [], "next_cursor": None}
            mine = (await http.get("/api/sessions", params={"user_id": "bob"}, headers=as_alice)).json()
            assert [s["session_id"] for s in mine["sessions"]] == [sid]  # the token's user, not ?user_id=
            refusal(await http.patch(f"/api/sessions/{sid}", json={"title": "x"}, headers=as_bob), 403, "forbidden")
            refusal(await http.delete(f"/api/sessions/{sid}", headers=as_bob), 403, "forbidden")
            assert (await http.delete(f"/api/sessions/{sid}", headers=as_alice)).status_code == 204
        await tab.wait_for(lambda _: tab.named("session_deleted"))
    finally:
        await tab.close()


async def test_ten_joins_of_a_session_of_50000_events_cost_a_page_each(spawn: Spawner, tmp_path: Path) -> None:
    """Answered whole, ten such joins took the server to 1,080 MiB (docs/performance.md)."""
    process, url = await spawn(sys.executable, "-m", "server")
    sid = str(uuid.uuid4())
    await asyncio.to_thread(insert_with_original_sql, tmp_path / "data" / "realtime.db", sid, 50_000, "x" * 190)
    tabs = [await Tab(url).connect() for _ in range(10)]
    try:
        before = rss_mib(process.pid)
        peak = before
        joins = asyncio.gather(*(tab.join(sid) for tab in tabs))
        while not joins.done():
            peak = max(peak, rss_mib(process.pid))
            await asyncio.sleep(0.005)
        for answer in await joins:
            assert len(answer["history"]) == 1000 and answer["history_more"] is True
        assert peak - before < 64, f"RSS went from {before:.0f} MiB to {peak:.0f} MiB"
    finally:
        for tab in tabs:
            await tab.close()


def rss_mib(pid: int) -> float:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


async def test_hostile_queries_and_bodies_are_refused_as_invalid_payload(
    backend: dict[str, Any], start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await start_server(**backend)
    sid = (await (await connect(server)).join(user_id="hostile"))["session"]["session_id"]
    deep = base64.urlsafe_b64encode(b"[" * 5000).decode()
    far = base64.urlsafe_b64encode(json.dumps(["0001-01-01T00:00:00+14:00", sid]).encode()).decode()
    async with httpx.AsyncClient(base_url=server.url) as http:
        for params in ({"after_event_id": 2**63}, {"before_event_id": -(2**63) - 5}):
            refusal(await http.get(f"/api/sessions/{sid}/events", params=params), 400, "invalid_payload")
        for cursor in (deep, far, "", "!!!"):
            answer = await http.get("/api/sessions", params={"user_id": "hostile", "cursor": cursor})
            refusal(answer, 400, "invalid_payload")
        for user_id in ("nul\x00", "x" * 257):
            refusal(await http.get("/api/sessions", params={"user_id": user_id}), 400, "invalid_payload")
        body = b'{"title": "\\ud800"}'  # a lone surrogate, as JSON allows it
        answer = await http.patch(f"/api/sessions/{sid}", content=body, headers={"content-type": "application/json"})
        refusal(answer, 400, "invalid_payload")
        assert (await http.get(f"/api/sessions/{sid}")).json()["title"] is None


async def test_unauthorized_comes_before_every_other_refusal(start_server: ServerFactory) -> None:
    server = await start_server(auth_jwt_secret=SECRET)
    sid = str(uuid.uuid4())
    async with httpx.AsyncClient(base_url=server.url) as http:
        refusal(await http.get("/api/sessions", params={"limit": "x"}), 401, "unauthorized")
        refusal(await http.get(f"/api/sessions/{sid}/events", params={"limit": "abc"}), 401, "unauthorized")
        refusal(await http.patch(f"/api/sessions/{sid}", json={"title": 5}), 401, "unauthorized")
        refusal(await http.delete("/api/sessions/not-a-uuid"), 401, "unauthorized")


async def test_a_join_that_overlaps_a_deletion_is_refused_not_left_in_an_empty_room(
    server: RunningServer, connect: TabFactory, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = (await (await connect(server)).join())["session"]["session_id"]
    repo = server.runtime.repo
    reading, deleted = asyncio.Event(), asyncio.Event()
    page_events = repo.page_events

    async def slow_page(*args: Any, **kwargs: Any) -> Any:
        page = await page_events(*args, **kwargs)
        reading.set()
        await deleted.wait()  # the deletion runs while this join holds its history
        return page

    monkeypatch.setattr(repo, "page_events", slow_page)
    late = await connect(server)
    join = asyncio.create_task(late.call("join", {"session_id": sid}))
    await reading.wait()
    monkeypatch.setattr(repo, "page_events", page_events)
    assert (await http.delete(f"/api/sessions/{sid}")).status_code == 204
    deleted.set()
    assert (await join)["error"]["code"] == "session_deleted"
    refused = await late.call("message", {"session_id": sid, "text": "anyone?"})
    assert refused["error"]["code"] == "session_deleted", refused


async def test_a_deletion_without_the_shared_state_is_refused_and_changes_nothing(
    server: RunningServer, connect: TabFactory, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]

    async def away() -> None:
        raise ConnectionError("Redis is away")

    monkeypatch.setattr(server.runtime.coordination, "ping", away)
    refusal(await http.delete(f"/api/sessions/{sid}"), 503, "unavailable")
    monkeypatch.undo()
    assert (await http.get(f"/api/sessions/{sid}")).status_code == 200
    ack = await tab.call("message", {"session_id": sid, "text": "still here"})
    assert ack["ok"], ack


async def test_a_plain_websocket_hears_only_its_own_sessions_events(
    server: RunningServer, connect: TabFactory, http: httpx.AsyncClient
) -> None:
    tab = await connect(server)
    mine = (await tab.join(user_id="pat"))["session"]["session_id"]
    other = (await tab.join(user_id="pat"))["session"]["session_id"]
    ws_url = server.url.replace("http", "ws") + f"/ws/session/{mine}?user_id=pat"
    async with websockets.connect(ws_url) as plain:
        assert json.loads(await plain.recv())["event"] == "session"
        await http.patch(f"/api/sessions/{other}", json={"title": "Not this one"})
        await http.delete(f"/api/sessions/{other}")
        await tab.wait_for(lambda _: tab.named("session_deleted"))  # the Socket.IO list heard both
        await http.patch(f"/api/sessions/{mine}", json={"title": "This one"})
        frames = []
        while not frames or frames[-1]["event"] != "session_updated":
            frames.append(json.loads(await asyncio.wait_for(plain.recv(), 5)))
        assert all(f["data"]["session_id"] == mine for f in frames), frames
        assert frames[-1]["data"]["title"] == "This one"
        assert "session_deleted" not in [f["event"] for f in frames]
