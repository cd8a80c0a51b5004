from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from tests.fake_gemini import FakeGemini
from tests.fake_openai import FakeOpenAI
from tests.fake_otlp import FakeOtlp
from tests.fakes import open_meteo_app
from tests.harness import (
    REDIS_URL,
    RunningServer,
    Tab,
    free_port,
    service_env,
    serving,
    serving_in_thread,
    test_settings,
    wait_healthy,
)

ServerFactory = Callable[..., Awaitable[RunningServer]]
Spawner = Callable[..., Awaitable[tuple[asyncio.subprocess.Process, str]]]
TabFactory = Callable[..., Awaitable[Tab]]


@pytest.fixture(scope="session")
def weather_url() -> Iterator[str]:
    """One fake Open-Meteo for the whole run (it keeps no state a test reads)."""
    with serving_in_thread(open_meteo_app()) as url:
        yield url


@pytest.fixture
async def fake_gemini() -> AsyncIterator[FakeGemini]:
    """A local server speaking Gemini's REST API (see tests/fake_gemini.py)."""
    gemini = FakeGemini()
    async with serving(gemini.app) as gemini.url:
        yield gemini


@pytest.fixture
async def fake_otlp(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeOtlp]:
    """A local OTLP/HTTP receiver (see tests/fake_otlp.py); servers started in this test export
    their spans within a tenth of a second (the SDK's batch delay, read from the environment)."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    receiver = FakeOtlp()
    async with serving(receiver.app) as receiver.url:
        yield receiver


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    """A local server speaking OpenAI's Chat Completions API (see tests/fake_openai.py); a client's
    base URL is `{fake_openai.url}/v1`."""
    fake = FakeOpenAI()
    async with serving(fake.app) as fake.url:
        yield fake


@pytest.fixture
async def start_server(tmp_path: Path, weather_url: str) -> AsyncIterator[ServerFactory]:
    """Start our app under uvicorn with settings overridden per test; all are stopped afterwards."""
    started: list[RunningServer] = []

    async def start(**overrides: Any) -> RunningServer:
        overrides.setdefault("weather_geocoding_url", weather_url)
        overrides.setdefault("weather_forecast_url", weather_url)
        server = await RunningServer(test_settings(tmp_path, **overrides)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
async def server(start_server: ServerFactory) -> RunningServer:
    return await start_server()


@pytest.fixture
async def connect() -> AsyncIterator[TabFactory]:
    """Open a tab (a real socketio.AsyncClient) on a running server; all are closed afterwards."""
    opened: list[Tab] = []

    async def open_tab(server: RunningServer, transport: str = "websocket") -> Tab:
        tab = await Tab(server.url, transport).connect()
        opened.append(tab)
        return tab

    yield open_tab
    for tab in opened:
        await tab.close()


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawner]:
    """Start `python -m server` (or any command) as a subprocess; all are killed afterwards."""
    processes: list[asyncio.subprocess.Process] = []

    async def start(*argv: str, port: int | None = None, **extra: str) -> tuple[asyncio.subprocess.Process, str]:
        port = port or free_port()
        # A group of its own: a failed test still kills the workers a supervisor started.
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=tmp_path,
            env=service_env(tmp_path, port, **extra),
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        await wait_healthy(url, process)
        return process, url

    yield start
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


@pytest.fixture
async def tabs() -> AsyncIterator[list[Tab]]:
    """Tabs a test opens by hand (other URLs, tokens, headers); all are closed afterwards."""
    opened: list[Tab] = []
    yield opened
    for tab in opened:
        await tab.close()


@pytest.fixture(params=["websocket", "polling"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def http(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        yield client


@pytest.fixture
async def redis_channel() -> AsyncIterator[str]:
    """A key prefix and channel of this test's own on the real Redis, cleaned up afterwards."""
    client = aioredis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        await client.ping()
    except (OSError, aioredis.RedisError) as exc:
        await client.aclose()
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"Redis is not reachable at {REDIS_URL}: {exc}")
    channel = f"test-{uuid.uuid4().hex[:10]}"
    yield channel
    keys = [key async for key in client.scan_iter(f"{channel}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()
