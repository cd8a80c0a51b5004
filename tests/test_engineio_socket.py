"""Engine.IO's WebSocket loop with fewer event-loop turns (server/upstream/engineio.py), over real sockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import engineio
import httpx
import pytest
import socketio
import uvicorn
from engineio.async_drivers import asgi as asgi_driver
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from server.upstream import engineio as engineio_patch
from server.upstream.engineio import FastWebSocket
from tests.conftest import ServerFactory
from tests.harness import listening_socket


@asynccontextmanager
async def engineio_server(**options: Any) -> AsyncIterator[tuple[engineio.AsyncServer, str, list[str]]]:
    """A bare Engine.IO server using FastWebSocket under uvicorn (the service's WebSocket
    implementation); yields it, its ws:// URL and the sids it saw disconnect."""
    engineio_patch.install()
    eio = engineio.AsyncServer(async_mode="asgi", **options)
    gone: list[str] = []

    @eio.on("disconnect")  # type: ignore[misc]
    async def disconnect(sid: str, reason: Any) -> None:
        gone.append(sid)

    sock = listening_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        engineio.ASGIApp(eio), ws="websockets-sansio", log_level="warning", lifespan="off", loop="asyncio"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield eio, f"ws://127.0.0.1:{port}/engine.io/?EIO=4&transport=websocket", gone
    finally:
        server.should_exit = True
        await task
        sock.close()


async def test_packets_queued_in_bursts_arrive_complete_and_in_order() -> None:
    async with engineio_server() as (eio, url, _gone):

        @eio.on("message")  # type: ignore[misc]
        async def burst(sid: str, data: Any) -> None:
            # Bursts queued within one step, then single packets a turn apart: the writer sends
            # some at once and gathers others over its rest.
            for i in range(300):
                await eio.send(sid, str(i))
                if i % 50 == 49:
                    await asyncio.sleep(0)
            for i in range(300, 330):
                await eio.send(sid, str(i))
                await asyncio.sleep(0)

        async with ws_connect(url) as ws:
            assert str(await ws.recv()).startswith("0")  # OPEN
            await ws.send("4go")
            received = [int(str(await asyncio.wait_for(ws.recv(), 10))[1:]) for _ in range(330)]
        assert received == list(range(330))


async def test_a_socket_that_stops_answering_pings_is_closed_and_its_disconnect_runs() -> None:
    async with engineio_server(ping_interval=0.2, ping_timeout=0.2) as (_eio, url, gone):
        async with ws_connect(url) as ws:
            opened = json.loads(str(await ws.recv())[1:])
            pings = 0
            try:
                async with asyncio.timeout(5):
                    while True:
                        if await ws.recv() == "2":
                            pings += 1  # never answered
            except ConnectionClosed:
                pass
            assert pings >= 1
        for _ in range(100):
            if gone:
                break
            await asyncio.sleep(0.02)
        assert gone == [opened["sid"]]


async def test_a_frame_over_the_size_limit_closes_only_that_socket() -> None:
    async with engineio_server(max_http_buffer_size=100) as (eio, url, gone):
        echoed: list[str] = []

        @eio.on("message")  # type: ignore[misc]
        async def echo(sid: str, data: Any) -> None:
            echoed.append(data)
            await eio.send(sid, data)

        async with ws_connect(url) as bystander, ws_connect(url) as offender:
            bystander_sid = json.loads(str(await bystander.recv())[1:])["sid"]
            offender_sid = json.loads(str(await offender.recv())[1:])["sid"]
            await offender.send("4" + "x" * 500)
            try:
                async with asyncio.timeout(5):
                    while True:
                        await offender.recv()
            except ConnectionClosed:
                pass
            for _ in range(250):
                if gone:
                    break
                await asyncio.sleep(0.02)
            assert gone == [offender_sid]
            await bystander.send("4still here")
            assert await asyncio.wait_for(bystander.recv(), 5) == "4still here"
            assert bystander_sid not in gone
        assert echoed == ["still here"]  # the oversized frame reached no handler


async def test_the_service_uses_it_and_a_client_that_starts_with_polling_upgrades(
    start_server: ServerFactory,
) -> None:
    server = await start_server()
    client = socketio.AsyncClient(reconnection=False)
    chunks: list[dict[str, Any]] = []
    done = asyncio.Event()
    client.on("chunk", chunks.append)
    client.on("done", lambda data: done.set())
    await client.connect(server.url, transports=["polling", "websocket"], wait_timeout=10)
    try:
        for _ in range(200):
            if client.transport() == "websocket":
                break
            await asyncio.sleep(0.02)
        assert client.transport() == "websocket"
        sockets = list(server.app.engineio_server.eio.sockets.values())
        assert sockets and all(isinstance(s, FastWebSocket) for s in sockets)

        joined = await client.call("join", {}, timeout=10)
        ack = await client.call("message", {"session_id": joined["session"]["session_id"], "text": "hello"}, timeout=10)
        assert ack["ok"], ack
        await asyncio.wait_for(done.wait(), 10)
        assert [c["index"] for c in chunks] == list(range(len(chunks))) and chunks
    finally:
        await client.disconnect()


async def test_a_frame_reaches_its_handler_and_a_queued_packet_its_socket_within_a_turn_of_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Counted in turns of the event loop, not time: python-engineio's own loop takes three each way.
    turns = 0
    marks: dict[str, int] = {}

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    receive, send = asgi_driver.WebSocket.wait, asgi_driver.WebSocket.send

    async def wait(self: Any) -> Any:
        data = await receive(self)
        if data == "4ping me":
            marks["received"] = turns
        return data

    async def sent(self: Any, data: Any) -> None:
        if data == "4pong":
            marks["sent"] = turns
        await send(self, data)

    monkeypatch.setattr(asgi_driver.WebSocket, "wait", wait)
    monkeypatch.setattr(asgi_driver.WebSocket, "send", sent)
    async with engineio_server() as (eio, url, _gone):

        @eio.on("message")  # type: ignore[misc]
        async def answer(sid: str, data: Any) -> None:
            marks["handled"] = turns
            await asyncio.sleep(0.05)  # the writer is idle again
            marks["queued"] = turns
            await eio.send(sid, "pong")

        counter = asyncio.create_task(count_turns())
        try:
            async with ws_connect(url) as ws:
                await ws.recv()  # OPEN
                await asyncio.sleep(0.05)
                await ws.send("4ping me")
                assert await asyncio.wait_for(ws.recv(), 5) == "4pong"
        finally:
            counter.cancel()
    # Engine.IO starts the handler as a task: one turn; the writer wakes one turn after the put.
    assert marks["handled"] - marks["received"] <= 1, marks
    assert marks["sent"] - marks["queued"] <= 1, marks


async def test_a_cancelled_loop_cleans_up_and_passes_the_cancellation_on(monkeypatch: pytest.MonkeyPatch) -> None:
    handler = FastWebSocket._websocket_handler
    running: list[asyncio.Task[Any]] = []
    outcome: list[str] = []

    async def watched(self: FastWebSocket, ws: Any) -> Any:
        running.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            result = await handler(self, ws)
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        outcome.append("returned")
        return result

    monkeypatch.setattr(FastWebSocket, "_websocket_handler", watched)
    async with engineio_server() as (_eio, url, gone):
        async with ws_connect(url) as ws:
            opened = json.loads(str(await ws.recv())[1:])
            for _ in range(100):
                if running:
                    break
                await asyncio.sleep(0.01)
            running[0].cancel()
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(5):
                    while True:
                        await ws.recv()
        for _ in range(100):
            if outcome and gone:
                break
            await asyncio.sleep(0.02)
    assert outcome == ["cancelled"]  # python-engineio's loop swallowed it and returned
    assert gone == [opened["sid"]]  # the socket was still cleaned up


async def test_garbage_instead_of_the_upgrade_probe_closes_cleanly() -> None:
    async with engineio_server() as (_eio, url, _gone):
        http_url = url.replace("ws://", "http://").replace("transport=websocket", "transport=polling")
        async with httpx.AsyncClient() as http:
            sid = json.loads((await http.get(http_url)).text[1:])["sid"]
        async with ws_connect(f"{url}&sid={sid}") as ws:
            await ws.send("How's the weather in Delhi ?")
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(5):
                    while True:
                        await ws.recv()
        assert closed.value.rcvd is not None
