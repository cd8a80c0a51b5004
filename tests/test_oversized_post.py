"""A long-polling POST that an Engine.IO connection cannot take (over MAX_PACKET_BYTES, or not an
Engine.IO payload), sent after the handshake and without any token, over a real `python -m server`:
that connection is closed at once (the POST answered 400), nothing stays held for it (file
descriptors back to the baseline, no socket left in CLOSE-WAIT), it counts against the connections
per address while it lives, and shutdown is not delayed by it (no traceback in the log)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import httpx
import socketio

from tests.harness import Tab, logged_server
from tests.test_auth import SECRET, close_refused

POLLING = "/socket.io/?EIO=4&transport=polling"
LIMIT = 65536
OVERSIZED = "4" + "x" * (LIMIT + 1)
GRACE_SECONDS = 10
CLOSE_WAIT = "08"  # the state's code in /proc/net/tcp


async def connect_error(url: str) -> object:
    """The `connect_error` a refused Socket.IO client gets (its message)."""
    client = socketio.AsyncClient(reconnection=False)
    errors: list[object] = []
    client.on("connect_error", errors.append)
    with contextlib.suppress(socketio.exceptions.ConnectionError):  # connected: an assertion below fails
        await client.connect(url, transports=["websocket"], wait_timeout=10)
    await close_refused(client)
    assert len(errors) == 1, errors
    return errors[0]["message"] if isinstance(errors[0], dict) else errors[0]


async def handshake(http: httpx.AsyncClient) -> str:
    """An Engine.IO connection (no Socket.IO connect, no token): its sid."""
    opened = (await http.get(POLLING)).text
    assert opened.startswith("0"), opened
    sid: str = json.loads(opened[1:])["sid"]
    return sid


async def post(url: str, sid: str, body: str | bytes) -> int | str:
    """POST `body` to that connection from a client of its own; its status, or the error that ended it."""
    async with httpx.AsyncClient(base_url=url, timeout=3) as http:
        try:
            return (await http.post(f"{POLLING}&sid={sid}", content=body)).status_code
        except httpx.HTTPError as exc:
            return type(exc).__name__  # the client gives up and closes its end


async def attack(url: str, body: str | bytes) -> int | str:
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        sid = await handshake(http)
    return await post(url, sid, body)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def close_wait_sockets(port: int) -> int:
    """Sockets on the server's port whose client closed while the server kept its end open."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                local, state = row.split()[1], row.split()[3]
                if int(local.rsplit(":", 1)[1], 16) == port and state == CLOSE_WAIT:
                    count += 1
    return count


async def settled_fds(pid: int, baseline: int) -> int:
    """The process's open file descriptors, once back to `baseline` or after 5 s."""
    for _ in range(50):
        now = open_fds(pid)
        if now <= baseline:
            return now
        await asyncio.sleep(0.1)
    return open_fds(pid)


async def test_oversized_posts_hold_nothing_and_do_not_delay_shutdown(tmp_path: Path) -> None:
    async with logged_server(
        tmp_path,
        AUTH_JWT_SECRET=SECRET,
        MAX_PACKET_BYTES=str(LIMIT),
        SHUTDOWN_GRACE_SECONDS=str(GRACE_SECONDS),
        LOG_LEVEL="info",
    ) as (process, url, log_path):
        port = urlparse(url).port
        assert port is not None
        assert await attack(url, "40") == 200  # a POST it can take: a Socket.IO CONNECT (refused: no token)
        baseline = open_fds(process.pid)

        answers: Counter[int | str] = Counter()
        for _ in range(5):  # 100, twenty at a time
            answers.update(await asyncio.gather(*(attack(url, OVERSIZED) for _ in range(20))))
        # Not UTF-8, JSON nested thousands deep, an unknown Engine.IO packet: 400 too. A broken
        # Socket.IO packet is taken (200), and closes its connection all the same.
        malformed = [await attack(url, body) for body in (b"4\xff\xfe", "4" + "[" * 30_000, "9zz", "42[")]
        fds = await settled_fds(process.pid, baseline)
        close_wait = close_wait_sockets(port)

        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), GRACE_SECONDS + 10)
        shutdown_seconds = time.monotonic() - started
        log = log_path.read_text()

    figures = {"answers": (answers, malformed), "fds": (baseline, fds), "close_wait": close_wait}
    figures["shutdown"] = shutdown_seconds
    assert answers == {400: 100} and malformed == [400, 400, 400, 200], figures  # answered at once
    assert fds <= baseline and close_wait == 0, figures
    assert shutdown_seconds < GRACE_SECONDS, figures  # it did not wait out its grace for anything
    assert "graceful shutdown exceeded" not in log and "Traceback" not in log, log[-3000:]
    assert log.count("closing Engine.IO connection") == 103 and log.count("closing Socket.IO connection") == 1


async def test_engineio_connections_count_against_the_address_until_closed(tmp_path: Path, tabs: list[Tab]) -> None:
    async with logged_server(tmp_path, MAX_CONNECTIONS_PER_ADDRESS="3", MAX_PACKET_BYTES=str(LIMIT)) as (_, url, _log):
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            sids = [await handshake(http) for _ in range(3)]  # never connected to Socket.IO
        assert await connect_error(url) == "rate_limited"  # a 4th connection from 127.0.0.1

        assert [await post(url, sid, OVERSIZED) for sid in sids] == [400, 400, 400]
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            gone = await http.get(f"{POLLING}&sid={sids[0]}")
        assert gone.status_code == 400  # closed at once: its sid is unknown now

        tab = Tab(url)
        tabs.append(tab)
        await tab.connect()  # their places are free again
        assert (await tab.join())["ok"]
