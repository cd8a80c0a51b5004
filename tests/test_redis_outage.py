"""Redis going away and coming back under two processes (contract: Faults, "Shared state (Redis) goes
away and comes back"): within 5 s of its return every client on the other process has every event
it missed except chunks, once each and in order, then a current `presence`. Also: what a turn costs
in Redis commands does not grow with its length, and the plain WebSocket needs no python-socketio."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from server.storage.postgres import PostgresRepository
from tests.conftest import Spawner
from tests.fake_gemini import FakeGemini, Pause, Reply, call_part, chunk, text_chunk
from tests.harness import REDIS_URL, ROOT, Tab, run_python
from tests.pg import scratch_database
from tests.tcp_proxy import TcpProxy
from tests.test_plain_ws import Plain

TURNS_BEFORE_SECONDS = 2.0
HOLD_SECONDS = 1.5  # the pause of the turn that the outage cuts through, more than a client may lag
OUTAGE_SECONDS = 8.0
TURNS_AFTER_SECONDS = 8.0
CATCH_UP_SECONDS = 5.0  # the contract's bound, from Redis coming back
CLIENTS = 3  # tab A, tab B and the plain WebSocket client on B
ROOM_EVENTS = ("user_message", "chunk", "tool_call", "tool_result", "done", "presence")
MISSABLE = ("chunk", "presence")  # the events a client may miss in an outage (presence: replaced)

Events = list[tuple[str, dict[str, Any]]]
Key = tuple[Any, ...]


@pytest.fixture
async def database() -> AsyncIterator[str]:
    async with scratch_database() as dsn:
        await (await PostgresRepository.open(dsn)).aclose()
        yield dsn


@pytest.fixture
async def redis_proxy() -> AsyncIterator[TcpProxy]:
    """Between both processes and Redis; set up before (so torn down after) the servers using it."""
    url = urlparse(REDIS_URL)
    proxy = await TcpProxy(url.hostname or "127.0.0.1", url.port or 6379).start()
    yield proxy
    await proxy.stop()


def through(proxy: TcpProxy) -> str:
    """REDIS_URL (its database number too), reached through the proxy."""
    return urlparse(REDIS_URL)._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()


@contextlib.asynccontextmanager
async def plain_client(url: str, session_id: str) -> AsyncIterator[Plain]:
    """A plain WebSocket client in the session, once its `session` frame arrived."""
    async with connect(url.replace("http://", "ws://") + f"/ws/session/{session_id}") as ws:
        client = Plain(ws)
        await client.wait_for(lambda frames: frames[:1])
        yield client
        await ws.close()
        await asyncio.wait([client._reader], timeout=5)


def room_events(frames: list[tuple[str, Any]]) -> Events:
    return [(n, d) for n, d in frames if n in ROOM_EVENTS]


def key(name: str, data: dict[str, Any]) -> Key | None:
    """What makes an event the one it is: a second event with the same key is a duplicate."""
    if name in ("user_message", "done"):
        return (name, data["turn_id"])
    if name in ("tool_call", "tool_result"):
        return (name, data["turn_id"], data["call_id"])
    if name == "chunk":
        return (name, data["turn_id"], data["index"])
    return None


async def send_until_accepted(tab: Tab, payload: dict[str, Any]) -> str:
    """The turn of a `message`, retried (the same client_message_id) while refused as retryable."""
    async with asyncio.timeout(60):
        while True:
            ack = await tab.call("message", payload, timeout=20)
            if ack["ok"]:
                return str(ack["turn_id"])
            assert ack["error"]["code"] in ("unavailable", "busy"), ack
            await asyncio.sleep(0.2)


def reply_to(message: int, hold: float = 0.0) -> list[Reply]:
    """The model's replies to a message: ten chunks over about 0.4 s, `hold` seconds more after the
    third; every fourth message first asks for the weather, so that turns have tool events too."""
    events: list[Any] = []
    for n in range(10):
        events += [Pause(hold if n == 3 else 0.04), text_chunk(f"answer {message}, word {n}. ")]
    text = Reply(events=[*events, text_chunk("The end.", "STOP")])
    if message % 4 != 3:
        return [text]
    return [Reply(events=[chunk([call_part("get_weather", {"location": "Paris"}, f"call-{message}")])]), text]


@dataclass
class Conversation:
    """Tab A's messages, one after another, each once the last one's `done` arrived, until `stop`.
    The first one sent from `hold_from` on is answered with a pause mid-way: its turn is `held`."""

    tab: Tab
    session_id: str
    gemini: FakeGemini
    hold_from: float
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    held: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    sent: int = 0

    async def run(self) -> int:
        """How many messages were sent."""
        loop = asyncio.get_running_loop()
        while not self.stop.is_set():
            hold = not self.held.done() and loop.time() >= self.hold_from
            self.gemini.stream(*reply_to(self.sent, HOLD_SECONDS if hold else 0.0))
            text = f"message {self.sent}: how's the weather?" if self.sent % 4 == 3 else f"message {self.sent}"
            payload = {"session_id": self.session_id, "text": text, "client_message_id": f"m-{self.sent}"}
            turn_id = await send_until_accepted(self.tab, payload)
            if hold:
                self.held.set_result(turn_id)
            await self.tab.turn(turn_id, timeout=30)
            self.sent += 1
        return self.sent


async def caught_up(view: Callable[[], Events], emitted: set[Key], seen_before: int, deadline: float) -> str | None:
    """None once the client has every non-chunk event emitted before Redis came back, then a
    `presence` after them (by `deadline`); else what it lacks."""
    loop = asyncio.get_running_loop()
    while True:
        events = view()
        keys = [key(n, d) for n, d in events]
        missing = [k for k in emitted if k not in keys]
        last = max([keys.index(k) for k in emitted if k in keys] + [seen_before - 1])
        presence = [d for n, d in events[last + 1 :] if n == "presence"]
        if not missing and presence:
            if presence[0]["clients"] != CLIENTS:
                return f"the presence after the catch-up counts {presence[0]['clients']} clients, not {CLIENTS}"
            return None
        if loop.time() > deadline:
            lacking = f"missing {sorted(missing)}" if missing else f"no presence after event {last}"
            return f"{CATCH_UP_SECONDS} s after Redis came back: {lacking}"
        await asyncio.sleep(0.05)


async def stored_events(url: str, session_id: str) -> list[dict[str, Any]]:
    """Every stored event of the session, in order (paged while the answer says there is more)."""
    events: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            query = {"after_event_id": events[-1]["event_id"]} if events else {}
            response = await client.get(f"{url}/api/sessions/{session_id}/events", params=query)
            assert response.status_code == 200, response.text
            page = response.json()
            events += page["events"]
            if not page.get("more") or not page["events"]:
                return events


async def every_turn_stored(url: str, session_id: str, turns: int) -> list[dict[str, Any]]:
    async with asyncio.timeout(15):
        while True:
            events = await stored_events(url, session_id)
            types = Counter(e["event_type"] for e in events)
            if types["user_message"] >= turns and types["ai_message"] == types["user_message"]:
                return events
            await asyncio.sleep(0.1)


def expected_sequence(stored: list[dict[str, Any]]) -> list[Key]:
    """The events a client may not miss, in storage order, as `received_sequence` names them."""
    sequence: list[Key] = []
    for event in stored:
        kind, content = event["event_type"], event["content"]
        if kind == "user_message":
            sequence.append(("user_message", content, event["event_id"]))
        elif kind in ("tool_call", "tool_result"):
            sequence.append((kind, json.loads(content)["call_id"]))
        else:
            sequence.append(("done", content))
    return sequence


def received_sequence(events: Events) -> list[Key]:
    sequence: list[Key] = []
    for name, data in events:
        if name == "user_message":
            sequence.append((name, data["text"], data["event_id"]))
        elif name in ("tool_call", "tool_result"):
            sequence.append((name, data["call_id"]))
        elif name == "done":
            sequence.append((name, data["text"]))
    return sequence


def shown(keys: list[Key], limit: int = 6) -> str:
    """Keys for a failure message: texts cut short, and only the first few."""
    cut = [tuple(f"{v[:40]}…" if isinstance(v, str) and len(v) > 40 else v for v in k) for k in keys[:limit]]
    return f"{cut}" + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def delivery_problems(client: str, events: Events, stored: list[dict[str, Any]]) -> list[str]:
    """What the client got wrong against the stored conversation: missed, repeated or reordered."""
    problems = []
    twice = [k for k, n in Counter(key(name, data) for name, data in events).items() if k is not None and n > 1]
    if twice:
        problems.append(f"{client}: received twice: {shown(twice)}")
    expected, received = expected_sequence(stored), received_sequence(events)
    if received != expected:
        missed = [k for k in expected if k not in received]
        extra = [k for k in received if k not in expected]
        first = next((i for i, (e, r) in enumerate(zip(expected, received, strict=False)) if e != r), None)
        problems.append(
            f"{client}: {len(received)} events for the {len(expected)} stored, first difference at {first}; "
            f"missed {len(missed)}: {shown(missed)}; not stored {len(extra)}: {shown(extra)}"
        )
    return problems


@pytest.mark.parametrize("outage", ["reset", "blackhole"])
async def test_a_redis_outage_loses_no_event_on_the_other_process(
    outage: str,
    database: str,
    redis_proxy: TcpProxy,
    redis_channel: str,
    weather_url: str,
    fake_gemini: FakeGemini,
    spawn: Spawner,
    tmp_path: Path,
    tabs: list[Tab],
) -> None:
    # "reset": Redis's connections are dropped and new ones refused; "blackhole": they stay open
    # and nothing passes either way, and what was sent arrives once the path is back.
    env = {
        "STORAGE_BACKEND": "postgres",
        "DATABASE_URL": database,
        "REDIS_URL": through(redis_proxy),
        "REDIS_CHANNEL": redis_channel,
        "LLM_PROVIDER": "gemini",
        "GEMINI_API_KEY": "outage-key",
        "GEMINI_BASE_URL": fake_gemini.url,
        "MESSAGE_RATE_LIMIT": "1000",  # one tab sends them all
        "WEATHER_GEOCODING_URL": weather_url,
        "WEATHER_FORECAST_URL": weather_url,
    }
    _, url_a = await spawn(sys.executable, "-m", "server", OUTBOX_PATH=str(tmp_path / "a.db"), **env)
    _, url_b = await spawn(sys.executable, "-m", "server", OUTBOX_PATH=str(tmp_path / "b.db"), **env)
    a = await Tab(url_a).connect()
    tabs.append(a)
    b = await Tab(url_b).connect()
    tabs.append(b)
    session_id = (await a.join())["session"]["session_id"]
    await b.join(session_id)
    async with plain_client(url_b, session_id) as plain:
        await a.wait_for(lambda ev: any(n == "presence" and d["clients"] == CLIENTS for n, d in ev))
        views: dict[str, Callable[[], Events]] = {
            "B's tab": lambda: b.events,
            "B's plain": lambda: room_events(plain.frames),
        }
        hold_from = asyncio.get_running_loop().time() + TURNS_BEFORE_SECONDS
        conversation = Conversation(a, session_id, fake_gemini, hold_from)
        lagging, turns = await outage_under_turns(conversation, redis_proxy, outage, views)

        stored = await every_turn_stored(url_a, session_id, turns)
        last_turn = next(d["turn_id"] for n, d in reversed(a.events) if n == "done")
        await asyncio.gather(*(arrived(view, last_turn) for view in views.values()))
        problems = [p for p in lagging if p is not None]
        # Running turns go on where they run: none is ended as interrupted by the other process.
        problems += [f"stored: {e}" for e in stored if e["event_type"] == "ai_message" and e["finish_reason"] != "stop"]
        for client, view in {"A's tab": lambda: a.events, **views}.items():
            problems += delivery_problems(client, view(), stored)
    assert turns >= 8, f"only {turns} turns ran"
    assert not problems, "\n".join(problems)


async def arrived(view: Callable[[], Events], turn_id: str) -> None:
    """Once the turn's `done` is in, or CATCH_UP_SECONDS later (what is missing is reported then)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CATCH_UP_SECONDS):
            while not any(n == "done" and d["turn_id"] == turn_id for n, d in view()):
                await asyncio.sleep(0.05)


async def outage_under_turns(
    conversation: Conversation, proxy: TcpProxy, outage: str, views: dict[str, Callable[[], Events]]
) -> tuple[list[str | None], int]:
    """The conversation's turns on tab A's process; Redis away for OUTAGE_SECONDS from the held
    turn's first chunk. What each client lacked CATCH_UP_SECONDS after Redis came back, and how
    many turns were sent."""
    loop = asyncio.get_running_loop()
    a = conversation.tab
    sender = asyncio.create_task(conversation.run())
    try:
        held = await asyncio.wait_for(asyncio.shield(conversation.held), 30)
        # The rest of that turn, its `done` included, goes out while Redis is away.
        await a.wait_for(lambda ev: any(n == "chunk" and d["turn_id"] == held for n, d in ev))
        if outage == "reset":
            proxy.cut()
        else:
            proxy.blackhole()
        await asyncio.sleep(OUTAGE_SECONDS)
        emitted = {k for n, d in a.events if n not in MISSABLE and (k := key(n, d)) is not None}
        seen = {client: len(view()) for client, view in views.items()}
        proxy.restore()
        back = loop.time()
        lagging = await asyncio.gather(
            *(caught_up(view, emitted, seen[client], back + CATCH_UP_SECONDS) for client, view in views.items())
        )
        await asyncio.sleep(max(0.0, back + TURNS_AFTER_SECONDS - loop.time()))
        conversation.stop.set()
        turns = await asyncio.wait_for(asyncio.shield(sender), 60)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
    return [f"{client}: {p}" if p else None for client, p in zip(views, lagging, strict=True)], turns


# ---------------------------------------------------------------- Redis commands per turn


def streamed(chunks: int) -> Reply:
    """`chunks` text chunks, then the end: streamed fast, but over many 20 ms intervals."""
    events: list[Any] = []
    for n in range(chunks - 1):
        events += [Pause(0.004), text_chunk(f"w{n} ")]
    return Reply(events=[*events, text_chunk("end.", "STOP")])


@contextlib.asynccontextmanager
async def commands_naming(url: str, text: str) -> AsyncIterator[list[str]]:
    """Every command Redis runs (in `url`'s database, scripts' own calls included) whose key,
    channel or argument holds `text`, while the block runs."""
    database = int(urlparse(url).path.lstrip("/") or 0)
    client = aioredis.Redis.from_url(url, decode_responses=True)  # no socket timeout: MONITOR waits
    seen: list[str] = []
    try:
        async with client.monitor() as monitor:

            async def record() -> None:
                async for command in monitor.listen():
                    if command["db"] == database and text in command["command"]:
                        seen.append(command["command"])

            recording = asyncio.create_task(record())
            try:
                yield seen
            finally:
                recording.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await recording
    finally:
        await client.aclose()


async def settled(seen: list[str], quiet: float = 0.5, timeout: float = 10) -> int:
    """How many commands were seen once none came for `quiet` seconds (a turn's lock is released
    after its `done` is sent)."""
    async with asyncio.timeout(timeout):
        while True:
            count = len(seen)
            await asyncio.sleep(quiet)
            if len(seen) == count:
                return count


async def counted_turn(tab: Tab, session_id: str, fake_gemini: FakeGemini, chunks: int, seen: list[str]) -> int:
    """The commands naming the session that one turn of `chunks` chunks caused."""
    before = await settled(seen)
    fake_gemini.stream(streamed(chunks))
    ack = await tab.call("message", {"session_id": session_id, "text": f"{chunks} chunks, please"})
    assert ack["ok"], ack
    turn = await tab.turn(ack["turn_id"])
    assert [n for n, _ in turn].count("chunk") == chunks and turn[-1][1]["finish_reason"] == "stop"
    return await settled(seen) - before


async def test_a_turn_costs_a_fixed_number_of_redis_commands(
    spawn: Spawner, fake_gemini: FakeGemini, redis_channel: str, tabs: list[Tab]
) -> None:
    url = urlparse(REDIS_URL)._replace(path="/13").geturl()  # a database no other test uses
    admin = aioredis.Redis.from_url(url)
    await admin.flushdb()
    process, service = await spawn(
        sys.executable,
        "-m",
        "server",
        LLM_PROVIDER="gemini",
        GEMINI_API_KEY="commands-key",
        GEMINI_BASE_URL=fake_gemini.url,
        REDIS_URL=url,
        REDIS_CHANNEL=redis_channel,
        TURN_LOCK_SECONDS="60",  # renewed every 20 s: never during these turns, short or long
    )
    try:
        tab = await Tab(service).connect()
        tabs.append(tab)
        session_id = (await tab.join())["session"]["session_id"]
        async with commands_naming(url, session_id) as seen:
            await counted_turn(tab, session_id, fake_gemini, 3, seen)  # the session's first turn may do more
            short = await counted_turn(tab, session_id, fake_gemini, 3, seen)
            long = await counted_turn(tab, session_id, fake_gemini, 300, seen)
            commands = list(seen)
        assert short <= 20 and long <= 20 and long - short <= 2, (short, long, Counter(c.split()[0] for c in commands))
    finally:
        process.terminate()  # stopped before the database is emptied, so it writes nothing after
        await asyncio.wait_for(process.wait(), 30)
        await admin.flushdb()
        await admin.aclose()


# ---------------------------------------------------------------- the plain WebSocket's imports


async def test_the_plain_websocket_never_imports_python_socketio(tmp_path: Path) -> None:
    code = (
        "import sys, server.transport.plain_ws\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('socketio', 'engineio')))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    status, out, err = await run_python(["-c", code], tmp_path, env)
    assert status == 0, err
    assert out.strip() == "[]", out


# ---------------------------------------------------------------- the proxy's blackhole


async def test_a_blackholed_proxy_holds_every_byte_until_restored() -> None:
    echoes: set[asyncio.Task[Any]] = set()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        echoes.update(filter(None, [asyncio.current_task()]))
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    upstream = await asyncio.start_server(echo, "127.0.0.1", 0)
    proxy = await TcpProxy("127.0.0.1", upstream.sockets[0].getsockname()[1]).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"before ")
        assert await reader.readexactly(7) == b"before "
        proxy.blackhole()
        writer.write(b"held ")
        late_reader, late_writer = await asyncio.open_connection("127.0.0.1", proxy.port)  # accepted
        late_writer.write(b"late")
        late_writer.write_eof()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.3)
        writer.write(b"in order")
        proxy.restore()
        assert await asyncio.wait_for(reader.readexactly(13), 5) == b"held in order"
        assert await asyncio.wait_for(late_reader.read(), 5) == b"late"  # then the end of its stream
        writer.close()
        late_writer.close()
    finally:
        await proxy.stop()
        upstream.close()
        await upstream.wait_closed()
        if echoes:
            await asyncio.wait(echoes, timeout=5)


def guarded_env(
    database: str, proxy: TcpProxy, redis_channel: str, fake_gemini: FakeGemini, **extra: str
) -> dict[str, str]:
    """A process of the approval tests: get_weather waits for a person; Redis through the proxy."""
    return {
        "STORAGE_BACKEND": "postgres",
        "DATABASE_URL": database,
        "REDIS_URL": through(proxy),
        "REDIS_CHANNEL": redis_channel,
        "LLM_PROVIDER": "gemini",
        "GEMINI_API_KEY": "outage-key",
        "GEMINI_BASE_URL": fake_gemini.url,
        "TOOL_APPROVAL": "get_weather",
        "TITLE_GENERATION": "false",
        **extra,
    }


async def test_an_approval_timing_out_during_an_outage_reaches_the_other_process_once_it_is_back(
    database: str,
    redis_proxy: TcpProxy,
    redis_channel: str,
    fake_gemini: FakeGemini,
    spawn: Spawner,
    tmp_path: Path,
    tabs: list[Tab],
) -> None:
    env = guarded_env(database, redis_proxy, redis_channel, fake_gemini, TOOL_APPROVAL_TIMEOUT_SECONDS="2")
    _, url_a = await spawn(sys.executable, "-m", "server", OUTBOX_PATH=str(tmp_path / "a.db"), **env)
    _, url_b = await spawn(sys.executable, "-m", "server", OUTBOX_PATH=str(tmp_path / "b.db"), **env)
    a = await Tab(url_a).connect()
    b = await Tab(url_b).connect()
    tabs += [a, b]
    session_id = (await a.join())["session"]["session_id"]
    await b.join(session_id)
    fake_gemini.stream(
        Reply(events=[chunk([call_part("get_weather", {"location": "Paris"}, "call-w")], "STOP")]),
        Reply(events=[text_chunk("Nobody said yes.", "STOP")]),
    )
    ack = await a.call("message", {"session_id": session_id, "text": "Weather in Paris?"})
    await b.wait_for(lambda ev: any(n == "tool_approval_request" for n, _ in ev))
    redis_proxy.cut()
    # No decision can be claimed for the cluster meanwhile: refused, and nothing is decided.
    refused = await b.call("approve_tool", {"session_id": session_id, "call_id": "call-w", "approved": True})
    assert refused["error"]["code"] == "unavailable", refused
    # The wait times out on A while Redis is away: B's process hears nothing of it meanwhile.
    await a.turn(ack["turn_id"])
    assert not any(n == "done" for n, _ in b.events)
    redis_proxy.restore()
    events = await b.turn(ack["turn_id"], timeout=CATCH_UP_SECONDS + 5)
    decided = [d for n, d in events if n == "tool_approval_result"]
    assert [(d["approved"], d["reason"]) for d in decided] == [(False, "timed out")]
    assert [d["error"]["code"] for n, d in events if n == "tool_result"] == ["approval_timeout"]
    order = [n for n, _ in events if n not in MISSABLE]
    assert order == [
        "user_message",
        "tool_call",
        "tool_approval_request",
        "tool_approval_result",
        "tool_result",
        "done",
    ]


async def test_a_call_that_needs_approval_while_redis_is_away_does_not_run(
    database: str,
    redis_proxy: TcpProxy,
    redis_channel: str,
    weather_url: str,
    fake_gemini: FakeGemini,
    spawn: Spawner,
    tmp_path: Path,
    tabs: list[Tab],
) -> None:
    env = guarded_env(
        database,
        redis_proxy,
        redis_channel,
        fake_gemini,
        WEATHER_GEOCODING_URL=weather_url,
        WEATHER_FORECAST_URL=weather_url,
    )
    _, url = await spawn(sys.executable, "-m", "server", OUTBOX_PATH=str(tmp_path / "a.db"), **env)
    tab = await Tab(url).connect()
    tabs.append(tab)
    session_id = (await tab.join())["session"]["session_id"]
    fake_gemini.stream(
        Reply(
            events=[text_chunk("Let me look. "), Pause(1.5), chunk([call_part("get_weather", {"location": "Paris"})])]
        ),
        Reply(events=[text_chunk("I could not ask.", "STOP")]),
    )
    ack = await tab.call("message", {"session_id": session_id, "text": "Weather in Paris?"})
    await tab.wait_for(lambda ev: any(n == "chunk" for n, _ in ev))
    redis_proxy.cut()  # before the model calls the tool
    events = await tab.turn(ack["turn_id"], timeout=20)
    redis_proxy.restore()
    names = [n for n, _ in events if n != "chunk"]
    assert "tool_approval_request" not in names and "tool_approval_result" not in names
    (result,) = [d for n, d in events if n == "tool_result"]
    assert result["error"]["code"] == "tool_error" and "cannot be asked now" in result["error"]["message"]
    assert next(d for n, d in events if n == "done")["text"] == "Let me look. I could not ask."
