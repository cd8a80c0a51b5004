"""A real headless Chromium for the tests: the PyPI `playwright` package driving Debian's `chromium`
(`playwright install` cannot download browsers here; .ci/run installs the package when missing)."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, Page, Request, Route, async_playwright

# Without the background-networking flags Chromium keeps calling Google's hosts on a closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium")
    if path is None:
        if os.environ.get("CI") == "true":
            raise RuntimeError("chromium is missing (.ci/run installs Debian's package)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return path


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class Watched:
    """A browser context that lets only `origin` through and records what its pages did."""

    context: BrowserContext
    origin: str
    foreign: list[str] = field(default_factory=list)  # requests to other hosts (aborted)
    sockets: list[str] = field(default_factory=list)  # every WebSocket the pages opened
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)  # uncaught exceptions

    async def new_page(self) -> Page:
        page = await self.context.new_page()
        page.on("websocket", lambda ws: self.sockets.append(ws.url))
        return page

    def assert_clean(self) -> None:
        """Nothing fetched from another host, no WebSocket elsewhere, no console error, no exception."""
        ws_origin = "ws" + self.origin.removeprefix("http") + "/"
        assert not self.foreign, self.foreign
        assert all(url.startswith(ws_origin) for url in self.sockets), self.sockets
        assert not self.console_errors, self.console_errors
        assert not self.page_errors, self.page_errors


async def watched(browser: Browser, origin: str, **options: Any) -> Watched:
    watch = Watched(await browser.new_context(**options), origin)

    async def only_the_origin(route: Route, request: Request) -> None:
        if request.url.startswith((origin + "/", "data:")):
            await route.continue_()
        else:
            watch.foreign.append(request.url)
            await route.abort()

    await watch.context.route("**/*", only_the_origin)
    watch.context.on("console", lambda m: watch.console_errors.append(m.text) if m.type == "error" else None)
    watch.context.on("weberror", lambda e: watch.page_errors.append(str(e.error)))
    return watch
