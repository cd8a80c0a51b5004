"""deploy/nginx.conf in front of `python -m server`: Debian's nginx run as it is shipped (with this
test's listen and upstream files), driven over both Socket.IO transports, the plain WebSocket and
half-sent handshakes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import socketio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from server.storage.postgres import PostgresRepository
from tests.conftest import Spawner
from tests.harness import REDIS_URL, ROOT, Tab, free_port, serving
from tests.pg import scratch_database
from tests.test_metrics import scrape
from tests.test_plain_ws import Plain

CONF = ROOT / "deploy" / "nginx.conf"
HEADER_TIMEOUT = 10  # client_header_timeout in deploy/nginx.conf (docs/deployment.md, "Behind a reverse proxy")


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("nginx is missing: .ci/run installs Debian's nginx package when run as root")
        pytest.skip("nginx is not installed (Debian: apt-get install nginx)")
    return found


@dataclass
class Proxy:
    port: int
    access_log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def nginx_in_front(tmp_path: Path, services: list[str]) -> AsyncIterator[Proxy]:
    """nginx in the foreground on a free port of 127.0.0.1, proxying to `services` (URLs) with
    deploy/nginx.conf included unchanged; its listen and upstream files are written here, in the
    layout the shipped file expects (realtime/*.conf beside the main configuration). Stopped after."""
    binary = nginx_binary()
    prefix = tmp_path / f"nginx-{uuid.uuid4().hex[:6]}"
    (prefix / "realtime").mkdir(parents=True)
    port = free_port()
    access_log = prefix / "access.log"
    (prefix / "realtime" / "listen.conf").write_text(
        f"listen 127.0.0.1:{port} default_server;\nserver_name _;\naccess_log {access_log} realtime;\n"
    )
    upstreams = "".join(f"server {url.removeprefix('http://')};\n" for url in services)
    (prefix / "realtime" / "upstream.conf").write_text(upstreams)
    temp_paths = "".join(
        f"{kind}_temp_path {prefix / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # Run as root (as CI does), the workers would otherwise switch to `nobody`, who cannot enter
    # pytest's private temporary directories.
    user = "user root;\n" if os.geteuid() == 0 else ""
    main = prefix / "nginx.conf"
    main.write_text(
        f"daemon off;\nworker_processes 1;\npid {prefix / 'nginx.pid'};\n{user}"
        f"events {{ worker_connections 1024; }}\nhttp {{\n{temp_paths}include {CONF};\n}}\n"
    )
    error_log = prefix / "error.log"
    process = await asyncio.create_subprocess_exec(
        binary,
        "-p",
        str(prefix),
        "-c",
        str(main),
        "-e",
        str(error_log),
        stdin=asyncio.subprocess.DEVNULL,
        start_new_session=True,  # its workers too are stopped with its group, whatever happens
    )
    try:
        for _ in range(200):
            if process.returncode is not None:
                raise RuntimeError(f"nginx exited with {process.returncode}: {error_log.read_text()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            break
        else:
            raise TimeoutError(f"nginx did not listen: {error_log.read_text()}")
        yield Proxy(port, access_log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()  # fast shutdown: the master stops its workers, then exits
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def python_server(spawn: Spawner, **extra: str) -> tuple[int, str]:
    """`python -m server` (offline, SQLite): its pid and URL."""
    process, url = await spawn(sys.executable, "-m", "server", OFFLINE_CHUNK_DELAY_MS="5", **extra)
    return process.pid, url


async def whole_turn(tab: Tab, session_id: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    sid = (await tab.join(session_id))["session"]["session_id"]
    ack = await tab.call("message", {"session_id": sid, "text": "hello through the proxy"})
    assert ack["ok"], ack
    turn = await tab.turn(ack["turn_id"])
    names = [n for n, _ in turn]
    assert names[0] == "user_message" and names[-1] == "done", names
    chunks = [d["text"] for n, d in turn if n == "chunk"]
    assert len(chunks) >= 12 and "".join(chunks) == turn[-1][1]["text"]
    assert turn[-1][1]["finish_reason"] == "stop"
    return turn


async def test_socketio_turn_through_nginx(spawn: Spawner, tmp_path: Path, transport: str) -> None:
    _, url = await python_server(spawn)
    async with nginx_in_front(tmp_path, [url]) as proxy:
        tab = await Tab(proxy.url, transport).connect()
        try:
            assert tab.client.transport() == transport
            await whole_turn(tab)
        finally:
            await tab.close()


async def test_plain_websocket_turn_through_nginx_and_no_token_in_its_log(spawn: Spawner, tmp_path: Path) -> None:
    _, url = await python_server(spawn)
    sid = str(uuid.uuid4())
    secret = uuid.uuid4().hex
    async with nginx_in_front(tmp_path, [url]) as proxy:
        async with connect(f"{proxy.ws_url}/ws/session/{sid}?token={secret}") as ws:
            client = Plain(ws)
            opened = await client.wait_for(lambda f: f[:1])
            assert opened[0][0] == "session" and opened[0][1]["session"]["session_id"] == sid
            ack = await client.ack(json.dumps({"event": "message", "data": {"text": "hello through the proxy"}}))
            assert ack["ok"], ack
            turn = await client.turn(ack["turn_id"])
            assert turn[0][0] == "user_message" and turn[-1][0] == "done"
            assert "".join(d["text"] for n, d in turn if n == "chunk") == turn[-1][1]["text"]
            await ws.close()
        logged = ""
        for _ in range(100):  # nginx writes a WebSocket's line when it closes
            logged = proxy.access_log.read_text()
            if f"/ws/session/{sid}" in logged:
                break
            await asyncio.sleep(0.05)
    assert f'"GET /ws/session/{sid} HTTP/1.1" 101' in logged
    assert secret not in logged


async def plain_from(proxy: Proxy, address: str, **headers: str) -> tuple[str, Any]:
    """The first frame the plain WebSocket sends a client connecting to nginx from `address`."""
    url = f"{proxy.ws_url}/ws/session/{uuid.uuid4()}"
    async with connect(url, local_addr=(address, 0), additional_headers=headers) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        return str(first["event"]), first["data"]


@pytest.mark.parametrize("trusted", [True, False], ids=["proxy-trusted", "proxy-not-trusted"])
async def test_the_limit_per_address_counts_the_clients_address(spawn: Spawner, tmp_path: Path, trusted: bool) -> None:
    # FORWARDED_ALLOW_IPS from `.env` like any setting: trusting no proxy, the service would count
    # every client through nginx under nginx's address.
    if not trusted:
        (tmp_path / ".env").write_text("FORWARDED_ALLOW_IPS=192.0.2.1\n")
    _, url = await python_server(spawn, MAX_CONNECTIONS_PER_ADDRESS="1")
    async with nginx_in_front(tmp_path, [url]) as proxy, contextlib.AsyncExitStack() as held:
        first = await held.enter_async_context(
            connect(f"{proxy.ws_url}/ws/session/{uuid.uuid4()}", local_addr=("127.0.0.2", 0))
        )
        assert json.loads(await asyncio.wait_for(first.recv(), 10))["event"] == "session"
        other_client, answer = await plain_from(proxy, "127.0.0.3")
        if not trusted:
            assert (other_client, answer.get("code")) == ("error", "rate_limited"), answer
            return
        assert other_client == "session", answer
        # A forged X-Forwarded-For changes nothing: nginx sends the address it saw.
        same_client, answer = await plain_from(proxy, "127.0.0.2", **{"X-Forwarded-For": "198.51.100.7"})
        assert (same_client, answer.get("code")) == ("error", "rate_limited"), answer


LIMIT_PER_ADDRESS = 200  # limit_conn in deploy/nginx.conf


async def test_nginx_answers_429_beyond_its_limit_per_address(spawn: Spawner, tmp_path: Path) -> None:
    _, url = await python_server(spawn, MAX_CONNECTIONS_PER_ADDRESS=str(LIMIT_PER_ADDRESS + 50))
    async with nginx_in_front(tmp_path, [url]) as proxy, contextlib.AsyncExitStack() as held:

        async def opened(address: str) -> None:
            ws = await held.enter_async_context(
                connect(f"{proxy.ws_url}/ws/session/{uuid.uuid4()}", local_addr=(address, 0))
            )
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["event"] == "session"

        await asyncio.gather(*(opened("127.0.0.4") for _ in range(LIMIT_PER_ADDRESS)))
        with pytest.raises(InvalidStatus) as refused:
            await opened("127.0.0.4")
        assert refused.value.response.status_code == 429
        await opened("127.0.0.5")  # another address is not affected


async def half_sent(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /ws/session/{uuid.uuid4()} HTTP/1.1\r\nHost: x\r\n".encode())
    await writer.drain()
    return reader, writer


async def test_half_sent_handshakes_are_closed_by_nginx_and_never_reach_the_service(
    spawn: Spawner, tmp_path: Path
) -> None:
    pid, url = await python_server(spawn)
    service_port = int(url.rsplit(":", 1)[1])
    held: list[asyncio.StreamWriter] = []
    async with nginx_in_front(tmp_path, [url]) as proxy:
        try:
            baseline = open_fds(pid)
            started = time.monotonic()
            proxied = [await half_sent(proxy.port) for _ in range(50)]
            held += [w for _, w in proxied]
            await asyncio.sleep(0.5)
            assert open_fds(pid) < baseline + 5  # nginx opens nothing to the service for them
            # The same handshakes sent to uvicorn itself: each holds a descriptor of the service.
            direct = [await half_sent(service_port) for _ in range(50)]
            held += [w for _, w in direct]
            await asyncio.sleep(0.5)
            assert open_fds(pid) >= baseline + 50

            # nginx closes its 50 after client_header_timeout, answering nothing.
            answers = await asyncio.wait_for(asyncio.gather(*(r.read() for r, _ in proxied)), HEADER_TIMEOUT + 10)
            assert answers == [b""] * 50
            assert time.monotonic() - started >= HEADER_TIMEOUT - 1
            # uvicorn still holds every one sent to it directly.
            assert not any(r.at_eof() for r, _ in direct)
            assert open_fds(pid) >= baseline + 50
        finally:
            for writer in held:
                writer.close()
    timeouts = [line for line in proxy.access_log.read_text().splitlines() if '" 408 ' in line]
    assert len(timeouts) == 50


@pytest.fixture
async def database() -> AsyncIterator[str]:
    """A scratch PostgreSQL database, migrated once before any process starts (requested before
    `spawn`, it is dropped after the processes stopped)."""
    async with scratch_database() as dsn:
        await (await PostgresRepository.open(dsn)).aclose()
        yield dsn


async def test_long_polling_keeps_to_one_process_of_two(
    database: str, redis_channel: str, spawn: Spawner, tmp_path: Path
) -> None:
    """Two processes on their own ports, one Redis, one PostgreSQL: long-polling clients from 16
    addresses each complete a turn through nginx, and both processes serve some of them."""
    shared = {
        "REDIS_URL": REDIS_URL,
        "REDIS_CHANNEL": redis_channel,
        "STORAGE_BACKEND": "postgres",
        "DATABASE_URL": database,
    }
    urls = [(await python_server(spawn, OUTBOX_PATH=str(tmp_path / f"outbox-{n}.db"), **shared))[1] for n in (1, 2)]
    async with nginx_in_front(tmp_path, urls) as proxy:
        tabs: list[Tab] = []
        try:
            for n in range(16):
                # One aiohttp session per client address: nginx hashes on the address.
                http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(f"127.0.0.{10 + n}", 0)))
                client = socketio.AsyncClient(reconnection=False, http_session=http)
                tabs.append(await Tab(proxy.url, "polling", client=client).connect())
            assert all(tab.client.transport() == "polling" for tab in tabs)
            await asyncio.gather(*(whole_turn(tab) for tab in tabs))
            served = [(await scrape(url)).value("realtime_connections", transport="socketio") for url in urls]
            assert sum(served) == 16 and min(served) > 0, served
        finally:
            for tab in tabs:
                await tab.close()


async def test_an_upload_through_nginx_is_taken_up_to_the_services_own_limit(spawn: Spawner, tmp_path: Path) -> None:
    _, url = await python_server(spawn)
    limit = 10 * 1024 * 1024  # ATTACHMENT_MAX_BYTES's default, which deploy/nginx.conf follows
    async with nginx_in_front(tmp_path, [url]) as proxy:
        tab = await Tab(proxy.url, "websocket").connect()
        try:
            sid = (await tab.join())["session"]["session_id"]
        finally:
            await tab.close()
        answers = []
        async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
            # Over nginx's 1 MiB for other requests; just over the service's limit (refused by the
            # service as it reads); far over it (refused by nginx from its declared length).
            for size in (9 * 1024 * 1024, limit + 1024, limit + 512 * 1024):
                picture = b"\x89PNG\r\n\x1a\n" + bytes(size - 8)
                files = {"file": ("big.png", picture)}
                answers.append(await http.post(f"/api/sessions/{sid}/attachments", files=files))
            # Refused before the service reads a byte of it: still its answer, not a reset (502).
            files = {"file": ("big.png", b"\x89PNG\r\n\x1a\n" + bytes(9 * 1024 * 1024))}
            unknown = await http.post(f"/api/sessions/{uuid.uuid4()}/attachments", files=files)
    assert unknown.status_code == 404 and unknown.json()["detail"]["code"] == "not_found", unknown.text
    taken, over, far_over = answers
    assert taken.status_code == 201 and taken.json()["size"] == 9 * 1024 * 1024, taken.text
    for refused in (over, far_over):  # a coded answer either way, never nginx's page or a 502
        assert refused.status_code == 413 and refused.json()["detail"]["code"] == "too_large", refused.text


async def test_an_upload_reaches_the_service_on_a_connection_it_may_keep_reading(tmp_path: Path) -> None:
    """What the upload location sends on: no `Connection: close` (the service would close mid-body
    when it answers before reading, a reset nginx reports as 502), the client's address as every
    request's; other requests keep `Connection: close`."""
    seen: list[tuple[str, dict[str, str]]] = []

    async def record(request: Request) -> Response:
        await request.body()
        seen.append((request.url.path, dict(request.headers)))
        return JSONResponse({"detail": {"code": "not_found", "message": "recorded"}}, status_code=404)

    recorder = Starlette(routes=[Route("/{path:path}", record, methods=["GET", "POST"])])
    async with (
        serving(recorder) as url,
        nginx_in_front(tmp_path, [url]) as proxy,
        httpx.AsyncClient(base_url=proxy.url) as http,
    ):
        files = {"file": ("a.png", b"\x89PNG\r\n\x1a\n" + bytes(1000))}
        assert (await http.post(f"/api/sessions/{uuid.uuid4()}/attachments", files=files)).status_code == 404
        assert (await http.get("/api/sessions")).status_code == 404
    (upload_path, upload), (_, other) = seen
    assert upload_path.endswith("/attachments")
    assert upload.get("connection", "").lower() != "close", upload
    assert other["connection"].lower() == "close", other
    assert upload["x-forwarded-for"] == other["x-forwarded-for"] == "127.0.0.1"
    assert upload["host"] == other["host"]
