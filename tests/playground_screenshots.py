"""`make screenshots`: docs/playground-laptop.png and docs/playground-phone.png, the real page in
Debian's Chromium: a user's chats in the list (named with PATCH), and a conversation whose answer
(scripted in the local Gemini stand-in) shows the rendered Markdown; on the phone, the list open as
its drawer."""

from __future__ import annotations

import asyncio
import json
import tempfile
import uuid
from pathlib import Path

import httpx
from playwright.async_api import expect

from tests.browser import chromium, watched
from tests.fake_gemini import FakeGemini, Reply, text_chunk, text_response, usage
from tests.harness import ROOT, RunningServer, Tab, serving, test_settings
from tests.test_playground import LAPTOP, PHONE, answers, finished, open_playground, send

USER = f"anon-{uuid.uuid4().hex}"
OLDER_CHATS = [
    "Packing list for Lisbon",
    "Why is the sky blue?",
    "Regex for ISO dates",
    "Sourdough starter schedule",
    "Explain Socket.IO rooms",
]
QUESTION = "Compare the weather in Delhi, Lisbon and Oslo, and show me how to convert to Fahrenheit"
ANSWER = [
    "Here is today's weather in the three cities:\n\n",
    "| City | Conditions | Temperature |\n|:--|:--|--:|\n",
    "| Delhi | Sunny | 31 °C |\n| Lisbon | Partly cloudy | 22 °C |\n| Oslo | Light rain | 9 °C |\n\n",
    "To convert to Fahrenheit:\n\n```python\ndef fahrenheit(celsius: float) -> float:\n",
    "    return celsius * 9 / 5 + 32\n```\n\n",
    "**Lisbon** is the mildest; the [Open-Meteo docs](https://open-meteo.com/en/docs) describe the data.",
]


async def older_chats(server: RunningServer) -> None:
    tab = await Tab(server.url).connect()
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            for title in OLDER_CHATS:
                session_id = (await tab.join(user_id=USER))["session"]["session_id"]
                await tab.call("leave", {"session_id": session_id})
                (await http.patch(f"/api/sessions/{session_id}", json={"title": title})).raise_for_status()
    finally:
        await tab.close()


async def main() -> None:
    gemini = FakeGemini()
    chunks = [text_chunk(part) for part in ANSWER[:-1]] + [text_chunk(ANSWER[-1], "STOP", usage(24, 96))]
    gemini.stream(Reply(events=chunks))
    gemini.title_replies.append(Reply(body=text_response("City weather and °F")))
    with tempfile.TemporaryDirectory() as folder:
        async with serving(gemini.app) as gemini.url:
            settings = test_settings(
                Path(folder), llm_provider="gemini", gemini_api_key="screenshots", gemini_base_url=gemini.url
            )
            server = await RunningServer(settings).start()
            try:
                await older_chats(server)
                await take(server)
            finally:
                await server.stop()


async def take(server: RunningServer) -> None:
    remember = f"localStorage.setItem('playground.user_id', {json.dumps(USER)})"
    remember = f"if (location.origin === {json.dumps(server.url)}) {remember}"  # not on about:blank
    async with chromium() as browser:
        laptop_watch = await watched(browser, server.url, **LAPTOP)
        await laptop_watch.context.add_init_script(remember)
        laptop = await open_playground(laptop_watch, server.url + "/")
        await send(laptop, QUESTION)
        await finished(answers(laptop).first)
        await expect(laptop.locator("#chat-title")).to_have_text("City weather and °F")
        await laptop.get_by_label("Message").fill("And tomorrow?")
        await laptop.screenshot(path=ROOT / "docs" / "playground-laptop.png")

        phone_watch = await watched(browser, server.url, **PHONE)
        await phone_watch.context.add_init_script(remember)
        phone = await open_playground(phone_watch, laptop.url)
        await finished(answers(phone).first)
        await phone.get_by_role("button", name="Chats", exact=True).click()
        await expect(phone.locator("#session-list li")).to_have_count(len(OLDER_CHATS) + 1)
        await phone.wait_for_timeout(300)  # the drawer's slide
        await phone.screenshot(path=ROOT / "docs" / "playground-phone.png")


if __name__ == "__main__":
    asyncio.run(main())
