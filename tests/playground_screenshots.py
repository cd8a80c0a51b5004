"""`make screenshots`: docs/playground-laptop.png and docs/playground-phone.png, one conversation
in two tabs of the real page (offline provider, the local weather fake), in Debian's Chromium."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from playwright.async_api import expect

from tests.browser import chromium, watched
from tests.fakes import open_meteo_app
from tests.harness import ROOT, RunningServer, serving_in_thread, test_settings
from tests.test_playground import LAPTOP, PHONE, answers, finished, open_playground, send


async def main() -> None:
    with tempfile.TemporaryDirectory() as folder, serving_in_thread(open_meteo_app()) as weather:
        settings = test_settings(
            Path(folder), offline_chunk_delay_ms=5, weather_geocoding_url=weather, weather_forecast_url=weather
        )
        server = await RunningServer(settings).start()
        try:
            async with chromium() as browser:
                screen = {**LAPTOP, "viewport": {"width": 1280, "height": 1100}}
                laptop = await open_playground(await watched(browser, server.url, **screen), server.url + "/")
                await send(laptop, "How's the weather in Delhi?")
                await finished(answers(laptop).first)
                await laptop.locator("details.tool summary").first.click()
                phone = await open_playground(await watched(browser, server.url, **PHONE), laptop.url)
                await send(phone, "Thanks! What is this page?")
                for page in (laptop, phone):
                    await finished(answers(page).nth(1))
                    await expect(page.locator("#presence")).to_have_text("2 tabs in this session")
                await laptop.get_by_label("Message").fill("And tomorrow?")
                await laptop.locator("#log").evaluate("log => log.scrollTop = log.scrollHeight")
                await laptop.screenshot(path=ROOT / "docs" / "playground-laptop.png")
                await phone.locator("#log").evaluate("log => log.scrollTop = log.scrollHeight")
                await phone.screenshot(path=ROOT / "docs" / "playground-phone.png")
        finally:
            await server.stop()


if __name__ == "__main__":
    asyncio.run(main())
