"""Garbage on the raw Engine.IO WebSocket: each malformed frame closes only its own connection,
with a WebSocket close frame and at most one log line, never a traceback (`python -m server`'s log)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from tests.harness import Tab, logged_server

MALFORMED = {
    "plain text": "How's the weather in Delhi ?",
    "a broken Socket.IO event": "42[",
    "an unknown packet type": "9zz",
    "a Socket.IO packet of no known type": "4zz",
    "an event that is not a list": '42{"a":1}',
    "an event without a name": "42[]",
    "a packet only the server sends": '44{"message":"x"}',
    "an empty frame": "",
    "a binary frame": b"\x00\x01binary",
}


@pytest.fixture
async def logged(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    async with logged_server(tmp_path, OFFLINE_CHUNK_DELAY_MS="0") as (_, url, log_path):
        yield url, log_path


@pytest.mark.parametrize("frame", list(MALFORMED.values()), ids=list(MALFORMED))
async def test_a_malformed_frame_closes_its_connection_cleanly(logged: tuple[str, Path], frame: str | bytes) -> None:
    url, log_path = logged
    bystander = await Tab(url).connect()
    try:
        sid = (await bystander.join())["session"]["session_id"]
        ws_url = url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"
        before = log_path.read_text()
        async with ws_connect(ws_url) as ws:
            assert str(await ws.recv()).startswith("0")  # Engine.IO OPEN
            await ws.send("40")  # Socket.IO CONNECT to the default namespace
            assert str(await ws.recv()).startswith("40")
            for _ in range(3):  # the first one closes the connection; the others find it closed
                try:
                    await ws.send(frame)
                except ConnectionClosed:
                    break
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(10):
                    while True:
                        await ws.recv()
        assert closed.value.rcvd is not None, "closed without a WebSocket close frame"
        # The other client of the server is not disturbed.
        ack = await bystander.call("message", {"session_id": sid, "text": "still here"})
        assert ack["ok"] and (await bystander.turn(ack["turn_id"]))[-1][1]["finish_reason"] == "stop"
        await asyncio.sleep(0.2)
        logged = log_path.read_text()[len(before) :]
        assert "Traceback" not in logged and "Exception in ASGI application" not in logged, logged
        assert len([line for line in logged.splitlines() if "closing" in line]) <= 1, logged
    finally:
        await bystander.close()
