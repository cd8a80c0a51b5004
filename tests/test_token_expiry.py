"""A token that expires while its client is connected: at `exp` plus the leeway the server stops
sending it anything and closes it (Socket.IO at the Engine.IO transport, so the client reconnects by
itself and asks its `auth` callable for a fresh token; the plain WebSocket with `error` and 4401).

Each test keeps a session streaming across the deadline through a bystander whose token stays
valid, so "nothing after the deadline" is measured while events still flow."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import socketio
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import ServerFactory
from tests.harness import RunningServer, Tab
from tests.test_auth import SECRET, token
from tests.test_client_examples import installed_node_example, node_example  # noqa: F401 (fixtures)

NODE_CLIENT = Path(__file__).with_name("token_expiry_client.mjs")
LIFE = 3  # seconds a short token lives
LEEWAY = 1  # AUTH_LEEWAY_SECONDS in these tests
# Client-side slack for "at the deadline": the loopback, the event loop, the client's own turns.
SLACK = 1.0
EXPIRED = {"code": "unauthorized", "message": "the token has expired; reconnect with a fresh one"}
EVENTS = ("user_message", "chunk", "tool_call", "tool_result", "done", "presence")


def deadline_of(bearer: str) -> float:
    """When the server must be done with a client holding `bearer`: its `exp` plus the leeway."""
    exp: int = jwt.decode(bearer, options={"verify_signature": False})["exp"]
    return exp + LEEWAY


async def streaming_server(start_server: ServerFactory) -> RunningServer:
    # ~35 words at 200 ms: one turn streams for about 7 s, across a deadline 3 to 4 s away.
    return await start_server(auth_jwt_secret=SECRET, auth_leeway_seconds=LEEWAY, offline_chunk_delay_ms=200)


async def bystander_in_a_session(server: RunningServer, transport: str, tabs: list[Tab]) -> tuple[Tab, str]:
    tab = await Tab(server.url, transport).connect(auth={"token": token("zoe")})
    tabs.append(tab)
    return tab, (await tab.join())["session"]["session_id"]


async def streams_on_after(bystander: Tab, deadline: float, turn_id: str) -> None:
    """The bystander still gets chunks of the turn after the deadline (and its slack): the session
    was streaming when the other client's token expired, and it is untouched."""
    await asyncio.sleep(max(0.0, deadline + SLACK - time.time()))
    since = len(bystander.events)
    await bystander.turn(turn_id, timeout=20)
    assert any(name == "chunk" for name, _ in bystander.events[since:])


class RecordingClient:
    """A python-socketio client that reconnects by itself, with an `auth` callable handing out the
    tokens of `tokens` in turn, and that times everything it receives."""

    def __init__(self, tokens: Callable[[int], str], transport: str) -> None:
        self.client = socketio.AsyncClient(reconnection=True, reconnection_delay=0.2, randomization_factor=0)
        self.transport = transport
        self.issued: list[str] = []
        self.received: list[tuple[float, str, Any]] = []  # (time, event, data), connects included
        self.changed = asyncio.Event()
        self._tokens = tokens
        for name in (*EVENTS, "connect", "disconnect", "connect_error"):
            self.client.on(name, self._recorder(name))

    def auth(self) -> dict[str, str]:
        self.issued.append(self._tokens(len(self.issued)))
        return {"token": self.issued[-1]}

    def _recorder(self, name: str) -> Callable[..., None]:
        def record(*args: Any) -> None:
            self.received.append((time.time(), name, args[0] if args else None))
            self.changed.set()

        return record

    async def connect(self, url: str) -> None:
        await self.client.connect(url, transports=[self.transport], auth=self.auth, wait_timeout=10)

    def times(self, name: str) -> list[float]:
        return [at for at, event, _ in self.received if event == name]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    async def close(self) -> None:
        # python-engineio's polling client waits out its pending long-poll on disconnect; a browser aborts it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.client.disconnect(), 0.5 if self.transport == "polling" else 5)
        http = self.client.eio.http
        if http is not None and not http.closed:
            await http.close()


async def test_an_expired_socketio_client_gets_nothing_more_and_reconnects_with_a_fresh_token(
    start_server: ServerFactory, transport: str, tabs: list[Tab]
) -> None:
    server = await streaming_server(start_server)
    bystander, sid = await bystander_in_a_session(server, transport, tabs)
    # The first token lives LIFE seconds, the ones asked for at reconnection 5 minutes.
    client = RecordingClient(lambda n: token("zoe", expires_in=LIFE if n == 0 else 300), transport)
    try:
        await client.connect(server.url)
        deadline = deadline_of(client.issued[0])
        assert (await client.client.call("join", {"session_id": sid}, timeout=10))["ok"]
        ack = await bystander.call("message", {"session_id": sid, "text": "keep talking past the deadline"})
        assert ack["ok"], ack

        # The server closes the connection at the deadline; socket.io's client reconnects by itself,
        # calling its auth callable again, and gets a fresh connection.
        await client.wait_for(lambda: len(client.times("connect")) == 2, timeout=LIFE + LEEWAY + 10)
        lost = client.times("disconnect")
        assert len(lost) == 1 and deadline - 0.1 <= lost[0] <= deadline + SLACK, (lost, deadline)
        first_connection = [(at, name) for at, name, _ in client.received if at < lost[0] and name in EVENTS]
        assert first_connection and max(at for at, _ in first_connection) <= deadline + SLACK
        assert any(name == "chunk" for _, name in first_connection)  # it did get the stream until then
        assert len(client.issued) == 2 and client.issued[1] != client.issued[0]

        await streams_on_after(bystander, deadline, ack["turn_id"])

        # The new connection is a client like any other: it rejoins and hears the next turn.
        rejoined = await client.client.call("join", {"session_id": sid}, timeout=10)
        assert rejoined["ok"] and rejoined["session"]["user_id"] == "zoe", rejoined
        again = await bystander.call("message", {"session_id": sid, "text": "are you back?"})
        await client.wait_for(
            lambda: any(n == "done" and d["turn_id"] == again["turn_id"] for _, n, d in client.received), timeout=20
        )
    finally:
        await client.close()


async def test_a_refused_fresh_token_is_a_connect_error_unauthorized(
    start_server: ServerFactory, transport: str, tabs: list[Tab]
) -> None:
    server = await streaming_server(start_server)
    # The auth callable has nothing better at reconnection than an expired token.
    client = RecordingClient(lambda n: token("zoe", expires_in=LIFE if n == 0 else -60), transport)
    client.client.reconnection_attempts = 1
    try:
        await client.connect(server.url)
        await client.wait_for(lambda: bool(client.times("connect_error")), timeout=LIFE + LEEWAY + 10)
        errors = [data for _, name, data in client.received if name == "connect_error"]
        message = errors[0]["message"] if isinstance(errors[0], dict) else errors[0]
        assert message == "unauthorized" and len(client.issued) == 2
        assert not client.client.connected
    finally:
        await client.close()


async def test_an_expired_plain_websocket_gets_error_then_4401_and_nothing_more(
    start_server: ServerFactory, tabs: list[Tab]
) -> None:
    server = await streaming_server(start_server)
    bystander, sid = await bystander_in_a_session(server, "websocket", tabs)
    short = token("zoe", expires_in=LIFE)
    deadline = deadline_of(short)
    frames: list[tuple[float, str, Any]] = []
    url = server.url.replace("http://", "ws://") + f"/ws/session/{sid}?token={short}"
    async with connect(url) as ws:
        assert json.loads(await ws.recv())["event"] == "session"
        ack = await bystander.call("message", {"session_id": sid, "text": "keep talking past the deadline"})
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(LIFE + LEEWAY + 10):
                while True:
                    decoded = json.loads(await ws.recv())
                    frames.append((time.time(), decoded["event"], decoded["data"]))
        closed_at = time.time()
    assert (ws.close_code, ws.close_reason) == (4401, "unauthorized")
    assert deadline - 0.1 <= closed_at <= deadline + SLACK, (closed_at, deadline)
    # The last frame is the error, and every event came before the deadline.
    assert frames[-1][1:] == ("error", EXPIRED), frames[-3:]
    events = [(at, name) for at, name, _ in frames[:-1]]
    assert any(name == "chunk" for _, name in events)
    assert max(at for at, _ in events) <= deadline + SLACK
    assert deadline - 0.1 <= frames[-1][0] <= deadline + SLACK
    await streams_on_after(bystander, deadline, ack["turn_id"])


async def test_each_connection_holds_one_expiry_timer_until_it_closes_or_the_server_stops(
    start_server: ServerFactory, tabs: list[Tab]
) -> None:
    server = await start_server(auth_jwt_secret=SECRET, auth_leeway_seconds=LEEWAY)
    gate = server.app.api.state.gate
    tab = await Tab(server.url).connect(auth={"token": token("zoe")})
    tabs.append(tab)
    sid = (await tab.join())["session"]["session_id"]
    url = server.url.replace("http://", "ws://") + f"/ws/session/{sid}?token={token('zoe')}"
    async with connect(url) as ws:
        await ws.recv()
        assert len(gate.expiry_timers()) == 2
    await tab.close()
    async with asyncio.timeout(5):  # both disconnects ran: their timers are gone, cancelled
        while gate.expiry_timers():
            await asyncio.sleep(0.02)

    # Open at shutdown: cancelled with the rest.
    tab = await Tab(server.url).connect(auth={"token": token("zoe")})
    tabs.append(tab)
    timers = gate.expiry_timers()
    assert len(timers) == 1 and not timers[0].cancelled()
    await server.stop()
    assert timers[0].cancelled() and not gate.expiry_timers()


@dataclass
class NodeRun:
    """tests/token_expiry_client.mjs running: its lines as they come, `joined` set at its first join."""

    process: asyncio.subprocess.Process
    lines: list[dict[str, Any]] = field(default_factory=list)
    joined: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            try:
                self.lines.append(json.loads(raw))
            except ValueError:
                self.lines.append({"output": raw.decode(errors="replace")})
            if self.lines[-1].get("joined") == 1:
                self.joined.set()
        self.joined.set()  # a client that ended early: the test fails on its lines, it does not hang

    async def exit_status(self, timeout: float) -> int | None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), timeout)
        return self.process.returncode


@contextlib.asynccontextmanager
async def node_client(
    directory: Path, url: str, transport: str, session_id: str, until: str, tokens: list[str]
) -> AsyncIterator[NodeRun]:
    """The official socket.io-client with `tokens` for its auth function; killed if still running after."""
    shutil.copy(NODE_CLIENT, directory)
    process = await asyncio.create_subprocess_exec(
        "node",
        NODE_CLIENT.name,
        url,
        transport,
        session_id,
        until,
        cwd=directory,
        env={**os.environ, "TOKENS": ",".join(tokens)},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    run = NodeRun(process)
    reader = asyncio.create_task(run.read())
    try:
        yield run
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await asyncio.wait_for(reader, 5)


async def test_the_official_socketio_client_reconnects_by_itself_with_a_fresh_token(
    start_server: ServerFactory,
    transport: str,
    tabs: list[Tab],
    installed_node_example: Path,  # noqa: F811
) -> None:
    server = await streaming_server(start_server)
    bystander, sid = await bystander_in_a_session(server, transport, tabs)
    short = token("zoe", expires_in=LIFE)
    deadline = deadline_of(short)
    async with node_client(installed_node_example, server.url, transport, sid, "rejoin", [short, token("zoe")]) as run:
        await asyncio.wait_for(run.joined.wait(), 15)
        assert any(line.get("joined") == 1 and line["ok"] for line in run.lines), run.lines
        ack = await bystander.call("message", {"session_id": sid, "text": "keep talking past the deadline"})
        assert await run.exit_status(LIFE + LEEWAY + 20) == 0, run.lines
    lines = run.lines

    # Its transport was closed at the deadline (not "io server disconnect", after which it would
    # not reconnect); it called its auth function again and rejoined on the new connection.
    lost = [line for line in lines if line.get("disconnect", "io client disconnect") != "io client disconnect"]
    assert len(lost) == 1 and lost[0]["disconnect"] in ("transport close", "transport error"), lines
    assert deadline - 0.1 <= lost[0]["t"] <= deadline + SLACK, (lost, deadline)
    first = [line for line in lines if line.get("connection") == 1]
    assert any(line["event"] == "chunk" for line in first)
    assert max(line["t"] for line in first) <= deadline + SLACK
    assert [line["auth"] for line in lines if "auth" in line] == [0, 1]
    assert any(line.get("joined") == 2 and line["ok"] and line["user_id"] == "zoe" for line in lines), lines
    await streams_on_after(bystander, deadline, ack["turn_id"])


async def test_the_official_socketio_client_is_told_unauthorized_when_its_fresh_token_is_refused(
    start_server: ServerFactory,
    transport: str,
    tabs: list[Tab],
    installed_node_example: Path,  # noqa: F811
) -> None:
    server = await streaming_server(start_server)
    _, sid = await bystander_in_a_session(server, transport, tabs)
    short, expired = token("zoe", expires_in=LIFE), token("zoe", expires_in=-60)
    async with node_client(installed_node_example, server.url, transport, sid, "refused", [short, expired]) as run:
        await asyncio.wait_for(run.joined.wait(), 15)
        assert await run.exit_status(LIFE + LEEWAY + 20) == 0, run.lines
    lines = run.lines
    assert [line["connect_error"] for line in lines if "connect_error" in line] == ["unauthorized"], lines
    assert [line["auth"] for line in lines if "auth" in line] == [0, 1]
