from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import open_meteo_app
from tests.harness import RunningServer, Tab, start_plain_app, test_settings


@pytest.fixture
async def weather_url() -> AsyncIterator[str]:
    server, task, url = await start_plain_app(open_meteo_app())
    yield url
    server.should_exit = True
    await task


ServerFactory = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
async def start_server(tmp_path: Path, weather_url: str) -> AsyncIterator[ServerFactory]:
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


@pytest.fixture(params=["websocket", "polling"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def tabs(server: RunningServer) -> AsyncIterator[Callable[..., Awaitable[Tab]]]:
    opened: list[Tab] = []

    async def open_tab(transport: str = "websocket", url: str | None = None) -> Tab:
        tab = await Tab(url or server.url, transport).connect()
        opened.append(tab)
        return tab

    yield open_tab
    for tab in opened:
        await tab.close()
