"""Several server processes sharing the real Redis and the real PostgreSQL: one session across them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import asyncpg
import httpx
import pytest
import websockets
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from server.storage.postgres import PostgresRepository
from tests.conftest import ServerFactory, Spawner, TabFactory
from tests.fake_gemini import HANG, FakeGemini, Pause, Reply, text_chunk, text_response
from tests.harness import REDIS_URL, Tab, free_port, service_env
from tests.pg import scratch_database
from tests.tcp_proxy import TcpProxy
from tests.test_conversations import frames_until_closed
from tests.test_metrics import scrape

WORDS = [f"word{n} " for n in range(12)]


@pytest.fixture
async def database() -> AsyncIterator[str]:
    async with scratch_database() as dsn:
        await (await PostgresRepository.open(dsn)).aclose()
        yield dsn


def slow_answer(text: str = "", chunks: int = 12, pause: float = 0.15) -> Reply:
    events: list[Any] = []
    for n in range(chunks):
        events += [Pause(pause), text_chunk(f"{text}{WORDS[n % len(WORDS)]}")]
    events.append(text_chunk("end.", "STOP"))
    return Reply(events=events)


def cluster_env(fake_gemini: FakeGemini, redis_channel: str, database: str) -> dict[str, str]:
    """What every process of a test cluster shares: Redis, PostgreSQL, the fake Gemini."""
    return {
        "LLM_PROVIDER": "gemini",
        "GEMINI_API_KEY": "cluster-key",
        "GEMINI_BASE_URL": fake_gemini.url,
        "STORAGE_BACKEND": "postgres",
        "DATABASE_URL": database,
        "REDIS_URL": REDIS_URL,
        "REDIS_CHANNEL": redis_channel,
        "TURN_LOCK_SECONDS": "2",
    }


async def start_cluster(spawn: Spawner, env: dict[str, str], tmp_path: Path, **extra: str) -> tuple[str, str]:
    """Two `python -m server` processes on two ports sharing `env`, started at once."""
    (_, first), (_, second) = await asyncio.gather(
        *(
            spawn(sys.executable, "-m", "server", OUTBOX_PATH=str(tmp_path / f"outbox-{n}.db"), **env, **extra)
            for n in (1, 2)
        )
    )
    return first, second


@pytest.fixture
async def cluster(
    spawn: Spawner, fake_gemini: FakeGemini, redis_channel: str, database: str, tmp_path: Path
) -> tuple[str, str]:
    """Two processes, one Redis, one PostgreSQL, one fake Gemini."""
    env = cluster_env(fake_gemini, redis_channel, database)
    return await start_cluster(spawn, env, tmp_path, SUMMARY_DELAY_SECONDS="0.3")


async def open_tab(tabs: list[Tab], url: str) -> Tab:
    tab = await Tab(url, "websocket").connect()
    tabs.append(tab)
    return tab


async def both_in_one_session(tabs: list[Tab], first: str, second: str) -> tuple[Tab, Tab, str]:
    """Tab a on the first process starts a session; tab b on the second joins it."""
    a = await open_tab(tabs, first)
    b = await open_tab(tabs, second)
    sid = (await a.join())["session"]["session_id"]
    await b.join(sid)
    return a, b, sid


def turn_events(tab: Tab, turn_id: str) -> list[tuple[str, dict[str, Any]]]:
    return [(n, d) for n, d in tab.events if d.get("turn_id") == turn_id]


async def test_one_session_streams_identically_on_both_processes(
    cluster: tuple[str, str], fake_gemini: FakeGemini, tabs: list[Tab]
) -> None:
    first, second = cluster
    a, b, sid = await both_in_one_session(tabs, first, second)
    # Presence is counted across processes: both hear 2.
    for tab in (a, b):
        await tab.wait_for(lambda ev: any(n == "presence" and d["clients"] == 2 for n, d in ev))

    fake_gemini.stream(slow_answer(pause=0.05))
    ack = await a.call("message", {"session_id": sid, "text": "stream to both"})
    busy = await b.call("message", {"session_id": sid, "text": "me too"})
    assert busy["error"]["code"] == "busy"
    on_a = await a.turn(ack["turn_id"])
    on_b = await b.turn(ack["turn_id"])
    assert on_a == on_b
    assert [n for n, _ in on_a] == ["user_message", *["chunk"] * 13, "done"]
    assert on_a[-1][1]["text"] == "".join(WORDS) + "end." and on_a[-1][1]["finish_reason"] == "stop"


async def test_a_message_sent_as_soon_as_done_arrives_is_never_busy(cluster: tuple[str, str], tabs: list[Tab]) -> None:
    # `done` reaches a tab before the process running the turn has released its lock in Redis:
    # the next turn, asked for on the other process, waits for that release instead of `busy`.
    a, b, sid = await both_in_one_session(tabs, *cluster)
    for n in range(16):
        sender = (a, b)[n % 2]  # each turn on the other process than the last
        ack = await sender.call("message", {"session_id": sid, "text": f"message {n}"})
        assert ack["ok"], (n, ack)
        await sender.turn(ack["turn_id"])  # its `done` is here: the next message goes out at once


async def test_cancel_on_one_process_stops_the_turn_on_the_other(
    cluster: tuple[str, str], fake_gemini: FakeGemini, tabs: list[Tab]
) -> None:
    first, second = cluster
    a, b, sid = await both_in_one_session(tabs, first, second)
    fake_gemini.stream(Reply(events=[text_chunk("Started "), HANG]))
    ack = await a.call("message", {"session_id": sid, "text": "a long one"})
    await b.wait_for(lambda ev: any(n == "chunk" for n, _ in ev))
    assert (await b.call("cancel", {"session_id": sid})) == {"ok": True, "turn_id": ack["turn_id"]}
    done_a = (await a.turn(ack["turn_id"]))[-1][1]
    done_b = (await b.turn(ack["turn_id"]))[-1][1]
    assert done_a == done_b and (done_a["finish_reason"], done_a["text"]) == ("cancelled", "Started ")
    await asyncio.wait_for(fake_gemini.hang_ups.wait(), 5)  # process 1 closed the upstream stream


async def test_a_tab_joining_on_the_other_process_mid_turn_catches_up(
    cluster: tuple[str, str], fake_gemini: FakeGemini, tabs: list[Tab]
) -> None:
    first, second = cluster
    a = await open_tab(tabs, first)
    sid = (await a.join())["session"]["session_id"]
    fake_gemini.stream(slow_answer(pause=0.1))
    ack = await a.call("message", {"session_id": sid, "text": "catch me up"})
    await a.wait_for(lambda ev: len([n for n, _ in ev if n == "chunk"]) >= 4)

    late = await open_tab(tabs, second)
    active = (await late.join(sid))["active_turn"]
    assert active is not None and active["turn_id"] == ack["turn_id"] and active["text"]
    done = (await late.turn(ack["turn_id"]))[-1][1]
    live = [d for n, d in turn_events(late, ack["turn_id"]) if n == "chunk" and d["index"] >= active["next_index"]]
    assert active["text"] + "".join(d["text"] for d in live) == done["text"]


async def test_the_summary_is_made_once_for_the_whole_cluster(
    cluster: tuple[str, str], fake_gemini: FakeGemini, tabs: list[Tab], database: str
) -> None:
    first, second = cluster
    a, b, sid = await both_in_one_session(tabs, first, second)
    ack = await a.call("message", {"session_id": sid, "text": "hello cluster"})
    await b.turn(ack["turn_id"])
    fake_gemini.generate(Reply(body=text_response("One summary.")), Reply(body=text_response("A second summary!")))
    await asyncio.gather(a.call("leave", {"session_id": sid}), b.call("leave", {"session_id": sid}))

    conn = await asyncpg.connect(database)
    try:
        async with asyncio.timeout(10):
            while (summary := await conn.fetchval("SELECT summary FROM sessions WHERE session_id = $1", sid)) is None:
                await asyncio.sleep(0.1)
    finally:
        await conn.close()
    await asyncio.sleep(1)  # time for a second summary, were one to be made
    assert summary == "One summary." and len(fake_gemini.calls("generateContent")) == 1


async def test_a_killed_process_does_not_keep_the_session_locked(
    spawn: Spawner, fake_gemini: FakeGemini, redis_channel: str, database: str, tmp_path: Path, tabs: list[Tab]
) -> None:
    settings = cluster_env(fake_gemini, redis_channel, database)
    doomed, first = await spawn(sys.executable, "-m", "server", OUTBOX_PATH=str(tmp_path / "o1.db"), **settings)
    _, second = await spawn(sys.executable, "-m", "server", OUTBOX_PATH=str(tmp_path / "o2.db"), **settings)
    a, b, sid = await both_in_one_session(tabs, first, second)
    fake_gemini.stream(Reply(events=[text_chunk("Mid-"), HANG]))
    await a.call("message", {"session_id": sid, "text": "never finished"})
    await b.wait_for(lambda ev: any(n == "chunk" for n, _ in ev))

    doomed.send_signal(signal.SIGKILL)
    await doomed.wait()
    killed_at = asyncio.get_running_loop().time()
    assert (await b.call("message", {"session_id": sid, "text": "too soon"}))["error"]["code"] == "busy"
    async with asyncio.timeout(10):
        while not (ack := await b.call("message", {"session_id": sid, "text": "after expiry"}))["ok"]:
            assert ack["error"]["code"] == "busy"
            await asyncio.sleep(0.2)
    # Free once the lock expired (2 s), with a margin for the machine, never held forever.
    assert asyncio.get_running_loop().time() - killed_at < 6
    await b.turn(ack["turn_id"])
    # The dead process's tab is no ghost: it is no longer counted (its heartbeat stopped).
    c = await open_tab(tabs, second)
    await c.join(sid)
    await c.wait_for(lambda ev: any(n == "presence" for n, _ in ev))
    assert c.named("presence")[-1]["clients"] == 2


@pytest.fixture
async def redis_proxy(redis_channel: str) -> AsyncIterator[TcpProxy]:
    """Between the service and Redis; set up before (so torn down after) the server using it."""
    url = urlparse(REDIS_URL)
    proxy = await TcpProxy(url.hostname or "127.0.0.1", url.port or 6379).start()
    yield proxy
    await proxy.stop()


async def test_a_redis_outage_refuses_new_turns_and_recovers(
    redis_proxy: TcpProxy, start_server: ServerFactory, connect: TabFactory, redis_channel: str
) -> None:
    proxy = redis_proxy
    server = await start_server(
        redis_url=f"redis://127.0.0.1:{proxy.port}/0",
        redis_channel=redis_channel,
        offline_chunk_delay_ms=60,
    )
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    running = await tab.call("message", {"session_id": sid, "text": "a turn that outlives the outage"})
    await tab.wait_for(lambda ev: any(n == "chunk" for n, _ in ev))

    proxy.cut()
    refused = await tab.call("message", {"session_id": sid, "text": "a new turn"})
    assert refused["error"]["code"] == "unavailable"  # not run without the cluster-wide lock
    done = (await tab.turn(running["turn_id"]))[-1][1]  # the running turn finishes
    assert done["finish_reason"] == "stop"
    refused = await tab.call("message", {"session_id": sid, "text": "a new turn"})
    assert refused["error"]["code"] == "unavailable"
    async with httpx.AsyncClient() as http:
        ready = await http.get(f"{server.url}/readyz")
    assert ready.status_code == 503 and any(r.startswith("redis") for r in ready.json()["reasons"])

    proxy.restore()
    async with asyncio.timeout(10):
        while not (ack := await tab.call("message", {"session_id": sid, "text": "back again"}))["ok"]:
            assert ack["error"]["code"] in ("unavailable", "busy")
            await asyncio.sleep(0.2)
    assert (await tab.turn(ack["turn_id"]))[-1][1]["finish_reason"] == "stop"


def workers_of(pid: int) -> list[str]:
    """uvicorn's worker processes (multiprocessing also starts a resource tracker beside them)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [child for child in children if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()]


def alive(pid: str) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


async def spawn_workers(
    spawn: Spawner, redis_channel: str, database: str, tmp_path: Path, **extra: str
) -> tuple[asyncio.subprocess.Process, str]:
    """`python -m server` with WORKERS=2 on the real Redis and PostgreSQL."""
    return await spawn(
        sys.executable,
        "-m",
        "server",
        WORKERS="2",
        REDIS_URL=REDIS_URL,
        REDIS_CHANNEL=redis_channel,
        STORAGE_BACKEND="postgres",
        DATABASE_URL=database,
        OUTBOX_PATH=str(tmp_path / "queue" / "outbox.db"),
        **extra,
    )


async def test_workers_run_several_processes_on_one_port(
    spawn: Spawner, redis_channel: str, database: str, tmp_path: Path, tabs: list[Tab]
) -> None:
    supervisor, url = await spawn_workers(spawn, redis_channel, database, tmp_path, OFFLINE_CHUNK_DELAY_MS="5")
    workers = workers_of(supervisor.pid)
    assert len(workers) == 2
    async with asyncio.timeout(10):  # each worker holds a local queue of its own
        while sorted(p.name for p in (tmp_path / "queue").glob("*.lock")) != ["outbox-1.db.lock", "outbox.db.lock"]:
            await asyncio.sleep(0.1)

    a = await open_tab(tabs, url)
    b = await open_tab(tabs, url)
    sid = (await a.join())["session"]["session_id"]
    await b.join(sid)
    ack = await a.call("message", {"session_id": sid, "text": "hello workers"})
    assert await a.turn(ack["turn_id"]) == await b.turn(ack["turn_id"])
    for tab in tabs:
        await tab.close()

    supervisor.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(supervisor.wait(), 30) == 0
    assert not any(alive(pid) for pid in workers)


async def test_workers_without_redis_refuse_to_start(tmp_path: Path) -> None:
    env = service_env(tmp_path, free_port(), WORKERS="2")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", cwd=tmp_path, env=env, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode != 0 and b"WORKERS > 1 needs REDIS_URL" in err


def live_connections(directory: Path) -> dict[str, float]:
    """Each worker's `realtime_connections`, read from its own multiprocess file."""
    counts: dict[str, float] = {}
    for path in directory.glob("gauge_livesum_*.db"):
        pid = path.stem.rsplit("_", 1)[1]
        with contextlib.suppress(FileNotFoundError):
            for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
                if json.loads(key)[1] == "realtime_connections":
                    counts[pid] = counts.get(pid, 0) + value
    return counts


async def test_with_workers_every_scrape_reports_the_sum_of_all_of_them(
    spawn: Spawner, redis_channel: str, database: str, tmp_path: Path, tabs: list[Tab]
) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    # What an earlier run left: emptied at start, so its five turns do not count.
    stale = MmapedDict(str(directory / "counter_999999.db"))
    stale.write_value(
        mmap_key("realtime_turns", "realtime_turns_total", ["finish_reason"], ["stop"], "Turns ended"), 5.0, 0
    )
    stale.close()
    supervisor, url = await spawn_workers(
        spawn, redis_channel, database, tmp_path, OFFLINE_CHUNK_DELAY_MS="1", PROMETHEUS_MULTIPROC_DIR=str(directory)
    )
    workers = workers_of(supervisor.pid)
    async with asyncio.timeout(20):
        while set(live_connections(directory)) != set(workers):
            await asyncio.sleep(0.1)
    assert not (directory / "counter_999999.db").exists()
    assert (await scrape(url)).value("realtime_turns_total", finish_reason="stop") == 0

    # Tabs until both workers hold three. Which worker accepts is the kernel's choice (a worker
    # still starting, or busy, takes none), so a tab landing on a full worker is closed again.
    async with asyncio.timeout(60):
        while min(live_connections(directory).values()) < 3:
            before = live_connections(directory)
            tab = await Tab(url, "websocket").connect()
            landed = [pid for pid, n in live_connections(directory).items() if n > before[pid]]
            if landed and before[landed[0]] < 3:
                tabs.append(tab)
                continue
            await tab.close()
            while live_connections(directory) != before:
                await asyncio.sleep(0.05)
    per_worker = live_connections(directory)
    assert sum(per_worker.values()) == len(tabs)
    session_id = (await tabs[0].join())["session"]["session_id"]
    ack = await tabs[0].call("message", {"session_id": session_id, "text": "count me once"})
    await tabs[0].turn(ack["turn_id"])
    for _ in range(12):  # each scrape reaches either worker, and each reports the sum
        metrics = await scrape(url)
        assert metrics.value("realtime_connections", transport="socketio") == len(tabs)
        assert metrics.value("realtime_turns_total", finish_reason="stop") == 1
        assert metrics.value("realtime_chunks_total") == len(tabs[0].named("chunk"))

    # A worker dies: its connections stop counting, what it counted stays.
    victim = min(per_worker, key=lambda pid: per_worker[pid])
    os.kill(int(victim), signal.SIGKILL)
    survivors = len(tabs) - per_worker[victim]
    async with asyncio.timeout(20):
        while (await scrape(url)).value("realtime_connections", transport="socketio") != survivors:
            await asyncio.sleep(0.1)
    assert victim not in live_connections(directory)
    assert (await scrape(url)).value("realtime_turns_total", finish_reason="stop") == 1

    for tab in tabs:
        await tab.close()
    supervisor.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(supervisor.wait(), 30) == 0


async def test_a_deletion_on_one_process_reaches_every_client_on_both(
    cluster: tuple[str, str], fake_gemini: FakeGemini, tabs: list[Tab], database: str
) -> None:
    first, second = cluster
    a, b, follower = await open_tab(tabs, first), await open_tab(tabs, second), await open_tab(tabs, second)
    user = f"user-{uuid.uuid4().hex[:8]}"
    sid = (await a.join(user_id=user))["session"]["session_id"]
    await b.join(sid)
    await follower.join(user_id=user)  # the user's tab on another session, on the other process
    plain_url = first.replace("http", "ws") + f"/ws/session/{sid}"
    fake_gemini.stream(Reply(events=[text_chunk("Started "), HANG]))
    async with websockets.connect(plain_url) as plain:
        assert json.loads(await plain.recv())["event"] == "session"
        ack = await b.call("message", {"session_id": sid, "text": "a long one"})
        await a.wait_for(lambda ev: any(n == "chunk" for n, _ in ev))
        async with httpx.AsyncClient() as http:
            assert (await http.delete(f"{first}/api/sessions/{sid}")).status_code == 204
        for tab in (a, b):
            await tab.wait_for(lambda ev: any(n == "session_deleted" for n, _ in ev))
            order = [n for n, d in tab.events if n in ("done", "session_deleted")]
            assert order == ["done", "session_deleted"], tab.events
            assert tab.named("done")[0]["finish_reason"] == "cancelled"
        frames = await frames_until_closed(plain)
        assert [f["event"] for f in frames][-2:] == ["done", "session_deleted"] and plain.close_code == 4404
    await follower.wait_for(lambda ev: any(n == "session_deleted" for n, _ in ev))
    assert follower.named("session_deleted") == [{"session_id": sid}]
    for tab in (a, b):
        refused = await tab.call("message", {"session_id": sid, "text": "again"})
        assert refused["error"]["code"] == "session_deleted", refused
        rejoined = await tab.call("join", {"session_id": sid})
        assert rejoined["error"]["code"] == "session_deleted", rejoined
    await asyncio.sleep(1)  # the cancelled turn's writes, on the other process, had their chance
    conn = await asyncpg.connect(database)
    try:
        assert await conn.fetchval("select count(*) from events where session_id = $1", sid) == 0
        assert await conn.fetchval("select deleted_at is not null from sessions where session_id = $1", sid)
    finally:
        await conn.close()
    assert ack["ok"]


async def test_a_session_gets_one_title_however_many_processes_serve_it(
    cluster: tuple[str, str], fake_gemini: FakeGemini, tabs: list[Tab]
) -> None:
    a, b, sid = await both_in_one_session(tabs, *cluster)
    # The first title takes a while: the next turn ends on the other process meanwhile.
    fake_gemini.title_replies.append(Reply(events=[Pause(1.0)], body=text_response("Ships at sea")))
    for sender in (a, b):
        ack = await sender.call("message", {"session_id": sid, "text": "tell me about ships"})
        assert ack["ok"], ack
        await sender.turn(ack["turn_id"])
    for tab in (a, b):
        await tab.wait_for(lambda ev: any(n == "session_updated" for n, _ in ev))
    await asyncio.sleep(0.5)
    assert len(fake_gemini.title_requests) == 1
    for tab in (a, b):
        assert [d["title"] for d in tab.named("session_updated")] == ["Ships at sea"]


@pytest.fixture
async def guarded_cluster(
    spawn: Spawner, fake_gemini: FakeGemini, redis_channel: str, database: str, tmp_path: Path, weather_url: str
) -> tuple[str, str]:
    """The cluster, with get_weather waiting for a person's approval."""
    env = cluster_env(fake_gemini, redis_channel, database)
    weather = {"WEATHER_GEOCODING_URL": weather_url, "WEATHER_FORECAST_URL": weather_url}
    return await start_cluster(spawn, env, tmp_path, TOOL_APPROVAL="get_weather", TITLE_GENERATION="false", **weather)


async def test_a_call_waiting_on_one_process_is_decided_once_from_the_other(
    guarded_cluster: tuple[str, str], fake_gemini: FakeGemini, tabs: list[Tab]
) -> None:
    first, second = guarded_cluster
    a, b, sid = await both_in_one_session(tabs, first, second)
    weather = {"functionCall": {"name": "get_weather", "args": {"location": "Delhi"}, "id": "fc-w"}}
    fake_gemini.stream(
        Reply(events=[{"candidates": [{"content": {"role": "model", "parts": [weather]}, "finishReason": "STOP"}]}]),
        Reply(events=[text_chunk("Delhi is clear.", "STOP")]),
    )
    ack = await a.call("message", {"session_id": sid, "text": "Weather in Delhi?"})  # runs on the first
    await b.wait_for(lambda ev: any(n == "tool_approval_request" for n, _ in ev))
    late = await open_tab(tabs, second)
    pending = (await late.join(sid))["active_turn"]["pending_approvals"]
    assert [(p["call_id"], p["name"], p["args"]) for p in pending] == [("fc-w", "get_weather", {"location": "Delhi"})]

    # Two tabs of the second process and one of the first decide at once: one decision counts.
    payload = {"session_id": sid, "call_id": "fc-w"}
    answers = await asyncio.gather(
        b.call("approve_tool", {**payload, "approved": True, "reason": "b"}),
        late.call("approve_tool", {**payload, "approved": True, "reason": "late"}),
        a.call("approve_tool", {**payload, "approved": False, "reason": "a"}),
    )
    assert sorted(x["ok"] for x in answers) == [False, False, True], answers
    assert {x["error"]["code"] for x in answers if not x["ok"]} == {"no_pending_approval"}
    (winner,) = [x for x in answers if x["ok"]]
    for tab in (a, b, late):
        events = [(n, d) for n, d in await tab.turn(ack["turn_id"]) if n != "chunk"]
        decided = [d for n, d in events if n == "tool_approval_result"]
        assert len(decided) == 1 and decided[0]["approved"] is winner["approved"]
        (result,) = [d for n, d in events if n == "tool_result"]
        if winner["approved"]:
            assert result["result"]["location"] == "Delhi"
        else:
            assert result["error"]["code"] == "tool_denied"
    assert len(fake_gemini.requests) == 2  # the turn went on once


async def test_a_model_that_sends_no_call_ids_gets_each_turns_call_decided(
    guarded_cluster: tuple[str, str], fake_gemini: FakeGemini, tabs: list[Tab]
) -> None:
    # Gemini often gives a call no id: the turn names it call-1, in every turn. The decision of the
    # first turn's call-1 must not stand for the second's.
    a, b, sid = await both_in_one_session(tabs, *guarded_cluster)
    weather = {"functionCall": {"name": "get_weather", "args": {"location": "Delhi"}}}
    call = Reply(events=[{"candidates": [{"content": {"role": "model", "parts": [weather]}, "finishReason": "STOP"}]}])
    for approved in (True, False):
        fake_gemini.stream(call, Reply(events=[text_chunk("So.", "STOP")]))
        ack = await a.call("message", {"session_id": sid, "text": "Weather in Delhi?"})
        requests = await b.wait_for(
            lambda ev, turn=ack["turn_id"]: [d for n, d in ev if n == "tool_approval_request" and d["turn_id"] == turn]
        )
        assert requests[0]["call_id"] == "call-1"
        answer = await b.call("approve_tool", {"session_id": sid, "call_id": "call-1", "approved": approved})
        assert answer["ok"], answer
        events = await a.turn(ack["turn_id"])
        (decided,) = [d for n, d in events if n == "tool_approval_result"]
        assert decided["approved"] is approved
