"""The playground page at `/`, used the way a person uses it: in a real headless Chromium (Debian's,
driven by Playwright) against the running server, every request checked to stay on its origin."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import struct
import uuid
import zlib
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest
from playwright.async_api import (
    Browser,
    FilePayload,
    Locator,
    Page,
    Request,
    WebSocket,
    WebSocketRoute,
    expect,
)

from tests.browser import Watched, chromium, watched
from tests.conftest import ServerFactory, TabFactory
from tests.fake_gemini import FakeGemini, Pause, Reply, text_chunk, usage
from tests.fake_openai import FakeOpenAI, call_reply, completion_body, role_chunk, text_reply
from tests.fake_openai import Reply as OpenAIReply
from tests.fake_openai import text_chunk as openai_text
from tests.harness import ROOT, RunningServer
from tests.tcp_proxy import TcpProxy
from tests.test_auth import SECRET, token

STATIC = ROOT / "server/transport/playground/static"
SCRIPTS = ("app.js", "api.js", "approvals.js", "attachments.js", "conversation.js", "markdown.js", "sessions.js")
MARKDOWN_IT_VERSION = "15.0.3"  # the npm package markdown-it@15.0.3, dist/browser/markdown-it.esm.min.mjs
MARKDOWN_IT = "vendor/markdown-it.esm.min.js"
LAPTOP = {"viewport": {"width": 1280, "height": 800}}
PHONE = {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True, "device_scale_factor": 2}
WAIT_MS = 15_000

# Records each new length of the last answer's text (its words, as `text_of` reads them), so a test
# sees it grow chunk by chunk.
RECORD_GROWTH = """() => {
  window.growth = [];
  const log = document.getElementById("log");
  new MutationObserver(() => {
    const answers = log.querySelectorAll(".msg.ai");
    if (!answers.length) return;
    const text = Array.from(answers[answers.length - 1].querySelectorAll(".text"), (p) => p.textContent)
      .join(" ").replace(/\\s+/g, " ").trim();
    if (window.growth.at(-1) !== text.length) window.growth.push(text.length);
  }).observe(log, { subtree: true, childList: true, characterData: true });
}"""


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as browser:
        yield browser


async def open_playground(watch: Watched, url: str) -> Page:
    page = await watch.new_page()
    await page.goto(url)
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected", timeout=WAIT_MS)
    return page


def session_of(page: Page) -> str:
    match = re.fullmatch(r".*/\?session=([0-9a-f-]{36})", page.url)
    assert match, page.url
    return match.group(1)


async def send(page: Page, text: str) -> None:
    await page.get_by_label("Message").fill(text)
    await page.get_by_label("Message").press("Enter")


def answers(page: Page) -> Locator:
    return page.locator("#log .msg.ai")


def words(text: str) -> str:
    """A text's words, one space apart: an answer's Markdown, once rendered, keeps its words but
    not its line breaks and spaces."""
    return " ".join(text.split())


async def text_of(answer: Locator) -> str:
    return words(" ".join(await answer.locator(".text").all_text_contents()))


async def finished(answer: Locator, reason: str = "stop") -> None:
    await expect(answer).to_have_attribute("data-finish", reason, timeout=WAIT_MS)


async def stored(server: RunningServer, session_id: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=server.url) as http:
        events: list[dict[str, Any]] = (await http.get(f"/api/sessions/{session_id}/events")).json()["events"]
        return events


async def stored_answers(server: RunningServer, session_id: str) -> list[str]:
    return [words(e["content"]) for e in await stored(server, session_id) if e["event_type"] == "ai_message"]


async def test_a_conversation_streams_shows_its_tool_call_and_is_shared_by_a_second_tab(
    start_server: ServerFactory, browser: Browser
) -> None:
    server = await start_server(offline_chunk_delay_ms=20)
    watch = await watched(browser, server.url, **LAPTOP)
    first = await open_playground(watch, server.url + "/")
    session_id = session_of(first)
    await expect(first.locator("#session-id")).to_have_text(session_id)
    await expect(first.locator("#presence")).to_have_text("1 tab in this session")

    await first.evaluate(RECORD_GROWTH)
    await send(first, "How's the weather in Delhi?")
    await expect(first.locator("#log .msg.user .text")).to_have_text(re.compile("How's the weather in Delhi\\?"))
    answer = answers(first).first
    tool = answer.locator("details.tool")
    await expect(tool.locator(".tool-name")).to_have_text("get_weather", timeout=WAIT_MS)
    await finished(answer)
    await expect(tool.locator(".tool-status")).to_have_text("done")
    await expect(answer.locator(".finish")).to_contain_text("finished (stop)")
    await tool.locator("summary").click()
    assert json.loads(await tool.locator("pre.tool-json").first.inner_text()) == {"location": "Delhi"}
    assert json.loads(await tool.locator("pre.tool-json").nth(1).inner_text())["temperature_c"] == 24.5
    growth: list[int] = await first.evaluate("() => window.growth")
    text = await text_of(answer)
    assert len(growth) >= 10 and growth == sorted(growth) and growth[-1] == len(text), growth
    assert await stored_answers(server, session_id) == [text]

    # The same URL in a second tab (phone-sized) joins the session and shows its history.
    phone = await watched(browser, server.url, **PHONE)
    second = await open_playground(phone, first.url)
    assert session_of(second) == session_id
    await expect(second.locator("#log .msg.user .text")).to_have_text(["How's the weather in Delhi?"])
    assert await text_of(answers(second).first) == text
    await expect(answers(second).first.locator(".tool-status")).to_have_text("done")
    for page in (first, second):
        await expect(page.locator("#presence")).to_have_text("2 tabs in this session")
    assert await second.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")

    # Sent from the second tab, streamed in the first.
    await first.evaluate(RECORD_GROWTH)
    await second.get_by_label("Message").fill("Tell me about this service")
    await second.get_by_role("button", name="Send").click()
    await finished(answers(first).nth(1))
    growth = await first.evaluate("() => window.growth")
    second_text = await text_of(answers(first).nth(1))
    assert len(growth) >= 10 and growth[-1] == len(second_text), growth
    await finished(answers(second).nth(1))
    assert await text_of(answers(second).nth(1)) == second_text
    assert await stored_answers(server, session_id) == [text, second_text]

    await first.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    await first.get_by_role("button", name="Copy link").click()
    assert await first.evaluate("() => navigator.clipboard.readText()") == first.url
    watch.assert_clean()
    phone.assert_clean()


async def test_stop_refusals_and_the_keyboard(start_server: ServerFactory, browser: Browser) -> None:
    server = await start_server(offline_chunk_delay_ms=60, max_message_chars=120, message_rate_limit=3)
    watch = await watched(browser, server.url, **LAPTOP)
    page = await open_playground(watch, server.url + "/")
    message = page.get_by_label("Message")

    await message.fill("line one")
    await message.press("Shift+Enter")
    await message.press_sequentially("line two")
    assert await message.input_value() == "line one\nline two"
    await expect(page.locator("#log .msg.user")).to_have_count(0)
    await message.press("Enter")
    await expect(page.locator("#log .msg.user .text")).to_have_text(["line one\nline two"])

    # While it streams: another message is refused as busy (and stays in the box), Stop cancels.
    stop = page.get_by_role("button", name="Stop")
    await expect(stop).to_be_visible()
    await expect(answers(page).first.locator(".text")).not_to_have_text("", timeout=WAIT_MS)
    await send(page, "and another thing")
    await expect(page.locator("#notice")).to_contain_text("still answering")
    await expect(page.locator("#notice")).to_contain_text("busy")
    assert await message.input_value() == "and another thing"
    await stop.click()
    await finished(answers(page).first, "cancelled")
    await expect(answers(page).first.locator(".finish")).to_contain_text("stopped (cancelled)")
    await expect(stop).to_be_hidden()
    session_id = session_of(page)
    [answer] = [e for e in await stored(server, session_id) if e["event_type"] == "ai_message"]
    assert answer["finish_reason"] == "cancelled" and words(answer["content"]) == await text_of(answers(page).first)

    await send(page, "x" * 121)
    await expect(page.locator("#notice")).to_contain_text("longer than this service accepts")
    await expect(page.locator("#notice")).to_contain_text("message_too_long")
    await send(page, "a short one")
    await finished(answers(page).nth(1))
    await expect(page.locator("#notice")).to_be_hidden()
    await send(page, "stopped from the keyboard")
    await expect(answers(page).nth(2).locator(".text")).not_to_have_text("", timeout=WAIT_MS)
    await message.press("Escape")
    await finished(answers(page).nth(2), "cancelled")
    await send(page, "one too many")
    await expect(page.locator("#notice")).to_contain_text("Too many messages")
    await expect(page.locator("#notice")).to_contain_text("rate_limited")
    await expect(page.locator("#log .msg.user")).to_have_count(3)

    await page.goto(server.url + "/?session=not-a-session")
    await expect(page.locator("#notice")).to_contain_text("not a valid session id")
    await expect(page.get_by_label("Message")).to_be_disabled()
    await page.get_by_role("button", name="New chat", exact=True).click()
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected", timeout=WAIT_MS)
    assert session_of(page) != session_id
    watch.assert_clean()


async def test_errors_are_shown_with_their_message(start_server: ServerFactory, browser: Browser) -> None:
    unconfigured = await start_server(llm_provider="gemini", gemini_api_key=None)
    watch = await watched(browser, unconfigured.url, **LAPTOP)
    page = await open_playground(watch, unconfigured.url + "/")
    await send(page, "Hello?")
    await finished(answers(page).first, "error")
    await expect(answers(page).first.locator(".finish")).to_contain_text("GEMINI_API_KEY is not set")
    await expect(answers(page).first.locator(".finish")).to_contain_text("provider_not_configured")
    await page.reload()  # the stored answer keeps its finish reason and error
    await finished(answers(page).first, "error")
    await expect(answers(page).first.locator(".finish")).to_contain_text("provider_not_configured")
    watch.assert_clean()

    no_weather = await start_server(
        weather_geocoding_url="http://127.0.0.1:9", weather_forecast_url="http://127.0.0.1:9"
    )
    watch = await watched(browser, no_weather.url, **LAPTOP)
    page = await open_playground(watch, no_weather.url + "/")
    await send(page, "How's the weather in Paris?")
    await finished(answers(page).first)
    tool = answers(page).first.locator("details.tool")
    await expect(tool.locator(".tool-status")).to_have_text("error: weather_unavailable")
    await tool.locator("summary").click()
    await expect(tool.locator(".tool-error")).to_contain_text("could not be reached (weather_unavailable)")
    watch.assert_clean()


async def test_model_output_and_tool_arguments_are_shown_as_text_never_as_html(
    start_server: ServerFactory, browser: Browser
) -> None:
    server = await start_server()
    watch = await watched(browser, server.url, **LAPTOP)
    page = await open_playground(watch, server.url + "/")
    attack = '<img src=x onerror="pwned=1"><b>bold</b>'  # no ".": it would end the place
    await send(page, f"Say {attack}")
    await finished(answers(page).first)
    await send(page, f"How's the weather in {attack}")
    await finished(answers(page).nth(1))
    for _ in range(2):  # as streamed, then as rebuilt from the stored history
        await expect(page.locator("#log .msg.user .text").first).to_have_text(f"Say {attack}")
        assert attack in await text_of(answers(page).first)
        tool = answers(page).nth(1).locator("details.tool")
        await tool.locator("summary").click()
        assert json.loads(await tool.locator("pre.tool-json").first.inner_text()) == {"location": attack}
        assert await page.locator("#log img, #log b").count() == 0
        assert await page.evaluate("() => window.pwned") is None
        await page.reload()
        await expect(page.locator("#status")).to_have_attribute("data-state", "connected", timeout=WAIT_MS)
    watch.assert_clean()


async def test_a_dropped_connection_reconnects_and_catches_up(
    start_server: ServerFactory, browser: Browser, connect: TabFactory
) -> None:
    server = await start_server(offline_chunk_delay_ms=150)
    proxy = await TcpProxy("127.0.0.1", server.settings.port).start()
    origin = f"http://127.0.0.1:{proxy.port}"
    try:
        watch = await watched(browser, origin, **LAPTOP)
        page = await open_playground(watch, origin + "/")
        traffic = SocketTraffic(page)
        session_id = session_of(page)

        # Cut mid-answer, back a moment later: the answer goes on from where the turn is.
        await send(page, "Tell me a long story about streaming answers, please")
        answer = answers(page).first
        await expect(answer.locator(".text")).to_have_text(re.compile(r"(\S+\s+){4}"), timeout=WAIT_MS)
        proxy.cut()
        await expect(page.locator("#status")).to_have_attribute("data-state", "reconnecting", timeout=WAIT_MS)
        await expect(page.locator("#status")).to_contain_text("Reconnecting")
        await asyncio.sleep(0.3)
        proxy.restore()
        await expect(page.locator("#status")).to_have_attribute("data-state", "connected", timeout=WAIT_MS)
        await finished(answer)
        assert [await text_of(answer)] == await stored_answers(server, session_id)
        # The rejoin's answer had the running turn: the tab caught up from active_turn, not from scratch.
        assert any(re.search(r'"active_turn":\s*\{"turn_id"', packet) for packet in await traffic.received())

        # A whole turn while the tab is away (sent by another client) appears once, after the rest.
        proxy.cut()
        await expect(page.locator("#status")).to_have_attribute("data-state", "reconnecting", timeout=WAIT_MS)
        other = await connect(server)
        await other.join(session_id)
        ack = await other.call("message", {"session_id": session_id, "text": "Sent while the tab was away"})
        await other.turn(ack["turn_id"], timeout=WAIT_MS)
        proxy.restore()
        await finished(answers(page).nth(1))
        await expect(page.locator("#log .msg.user .text")).to_have_text(
            ["Tell me a long story about streaming answers, please", "Sent while the tab was away"]
        )
        assert [await text_of(a) for a in await answers(page).all()] == await stored_answers(server, session_id)
        joins = traffic.joins()
        rejoins = [j for j in joins if "after_event_id" in j]
        assert len(rejoins) >= 2 and all(j["session_id"] == session_id for j in rejoins), joins
    finally:
        await proxy.stop()
    # While cut off, the browser reports its failed connection attempts; nothing else went wrong.
    assert not watch.foreign and not watch.page_errors, (watch.foreign, watch.page_errors)
    assert all(re.search(r"failed|ERR_", error) for error in watch.console_errors), watch.console_errors


class SocketTraffic:
    """The Engine.IO packets a page's Socket.IO client sent and received, over either transport: a
    reconnect that finds the WebSocket refused comes back over long-polling (`tryAllTransports`)."""

    def __init__(self, page: Page) -> None:
        self.sent: list[str] = []
        self._frames_received: list[str] = []
        self._polls: list[Request] = []
        page.on("websocket", self._watch_socket)
        page.on("requestfinished", self._watch_poll)

    def _watch_socket(self, ws: WebSocket) -> None:
        ws.on("framesent", lambda frame: self.sent.append(frame) if isinstance(frame, str) else None)
        ws.on("framereceived", lambda frame: self._frames_received.append(frame) if isinstance(frame, str) else None)

    def _watch_poll(self, request: Request) -> None:
        if "/socket.io/" not in request.url or "transport=polling" not in request.url:
            return
        if request.method == "POST":
            self.sent.extend((request.post_data or "").split(RECORD_SEPARATOR))
        else:
            self._polls.append(request)

    async def received(self) -> list[str]:
        packets = list(self._frames_received)
        for poll in self._polls:
            response = await poll.response()
            if response is not None:
                packets.extend((await response.text()).split(RECORD_SEPARATOR))
        return packets

    def joins(self) -> list[dict[str, Any]]:
        # Socket.IO's packet for an event with an ack: 42<id>["join",{...}]
        matches = (re.fullmatch(r'42\d*\["join",(.*)\]', packet) for packet in self.sent)
        return [json.loads(match.group(1)) for match in matches if match]


RECORD_SEPARATOR = "\x1e"  # between Engine.IO packets in one long-polling body


async def test_with_authentication_on_the_page_asks_for_a_token(start_server: ServerFactory, browser: Browser) -> None:
    server = await start_server(auth_jwt_secret=SECRET)
    watch = await watched(browser, server.url, **LAPTOP)
    page = await watch.new_page()
    await page.goto(server.url + "/")
    field = page.get_by_label("Access token")
    await expect(field).to_be_visible(timeout=WAIT_MS)
    await expect(page.locator("#status")).to_have_attribute("data-state", "refused")

    await field.fill("not-a-token")
    await page.get_by_role("button", name="Connect").click()
    await expect(page.locator("#token-error")).to_contain_text("unauthorized")
    await expect(page.locator("#token-error")).to_contain_text("refused")
    assert await page.evaluate("() => sessionStorage.getItem('playground.token')") is None

    good = token("alice", expires_in=600)
    await field.fill(good)
    await page.get_by_role("button", name="Connect").click()
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected", timeout=WAIT_MS)
    await expect(field).to_be_hidden()
    assert await page.evaluate("() => sessionStorage.getItem('playground.token')") == good
    assert await page.evaluate("() => localStorage.length") == 0
    await send(page, "Hello as alice")
    await finished(answers(page).first)
    async with httpx.AsyncClient(base_url=server.url) as http:
        session = await http.get(f"/api/sessions/{session_of(page)}", headers={"Authorization": f"Bearer {good}"})
    assert session.json()["user_id"] == "alice"

    await page.reload()  # the tab keeps its token: no question again
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected", timeout=WAIT_MS)
    await expect(field).to_be_hidden()
    await expect(page.locator("#log .msg.user .text")).to_have_text(["Hello as alice"])
    # The list is the token's user's (asked with the token as a Bearer header), nothing in local storage.
    await expect(chat(page, session_of(page)).locator(".chat-name")).to_have_text("Hello as alice")
    await expect(chats(page)).to_have_count(1)
    assert await page.evaluate("() => localStorage.length") == 0
    # The browser logs the refused Socket.IO handshakes; nothing else went wrong.
    assert not watch.foreign and not watch.page_errors
    assert all("unauthorized" in e or "400" in e or "403" in e for e in watch.console_errors), watch.console_errors


async def test_the_page_gets_no_exception_from_cors_origins(start_server: ServerFactory, browser: Browser) -> None:
    # The page is a browser client like any other: its origin must be allowed, and when it is not,
    # the page says what to check instead of retrying in silence.
    server = await start_server(cors_origins="https://chat.example.com")
    watch = await watched(browser, server.url, **LAPTOP)
    page = await watch.new_page()
    await page.goto(server.url + "/")
    await expect(page.locator("#notice")).to_contain_text(f"({server.url}) in its CORS_ORIGINS", timeout=WAIT_MS)
    await expect(page.locator("#status")).to_have_attribute("data-state", "reconnecting")
    await expect(page.get_by_label("Message")).to_be_disabled()
    assert not watch.foreign and not watch.page_errors


class _Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline: list[str] = []  # inline script or style, event handler attributes

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.scripts.append(dict(attrs))
        if tag == "style":
            self.inline.append("<style>")
        self.inline += [name for name, _ in attrs if name.startswith("on") or name == "style"]

    def handle_data(self, data: str) -> None:
        if self.lasttag == "script" and data.strip():
            self.inline.append(data)


async def test_the_page_has_a_strict_policy_and_no_inline_code(http: httpx.AsyncClient) -> None:
    page = await http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == policy["connect-src"] == policy["style-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'" and "unsafe" not in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    markup = _Markup()
    markup.feed(page.text)
    assert markup.scripts == [{"type": "module", "src": "/playground/app.js"}] and not markup.inline
    for asset in (*SCRIPTS, "style.css", "favicon.svg", "vendor/socket.io.esm.min.js", MARKDOWN_IT):
        served = await http.get(f"/playground/{asset}")
        assert served.status_code == 200, asset
        assert served.headers["content-security-policy"] == page.headers["content-security-policy"]
    # CORS unchanged: the page's assets are no more shareable with other origins than the API.
    foreign = await http.get("/playground/app.js", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in foreign.headers
    assert (await http.head("/")).status_code == 200


def test_the_vendored_client_is_the_one_the_node_example_pins() -> None:
    lock = json.loads((ROOT / "client_examples/node/package-lock.json").read_text())
    version = lock["packages"]["node_modules/socket.io-client"]["version"]
    vendor = ROOT / "server/transport/playground/static/vendor"
    assert (vendor / "socket.io.esm.min.js").read_text().startswith(f"/*!\n * Socket.IO v{version}\n")
    assert "MIT License" in (vendor / "socket.io-client.LICENSE").read_text()


def test_the_vendored_markdown_renderer_is_the_pinned_one_with_its_licences() -> None:
    bundle = (STATIC / MARKDOWN_IT).read_text()
    assert bundle.startswith(f"/*! markdown-it {MARKDOWN_IT_VERSION} https://github.com/markdown-it/markdown-it")
    assert not re.search(r"^\s*import\b", bundle, re.MULTILINE)  # self-contained: nothing else to fetch
    licences = (STATIC / "vendor/markdown-it.LICENSE").read_text()
    assert f"markdown-it@{MARKDOWN_IT_VERSION}" in licences
    for package in ("markdown-it", "mdurl", "uc.micro", "entities", "linkify-it", "punycode.js"):
        assert f"=== {package} (" in licences, package
    assert f"markdown-it {MARKDOWN_IT_VERSION}" in (ROOT / "README.md").read_text()


async def test_playground_false_turns_the_page_and_its_assets_off(start_server: ServerFactory) -> None:
    server = await start_server(playground=False)
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.get("/")).status_code == 404
        assert (await http.get(f"/?session={uuid.uuid4()}")).status_code == 404
        assert (await http.get("/playground/app.js")).status_code == 404
        assert (await http.get("/playground/vendor/socket.io.esm.min.js")).status_code == 404
        assert (await http.get("/healthz")).status_code == 200


# ---------------------------------------------------------------- Markdown, the list of chats, paging

MARKDOWN_ANSWER = (
    "## Results\n\n"
    "Some **bold** text, a [good link](https://example.com/docs), [x](javascript:alert(1)), "
    "[a relative one](/api/sessions) and ![a picture](https://example.com/p.png).\n\n"
    "<img src=x onerror=alert(1)>\n\n"
    "| Name | Value |\n|:-----|------:|\n| alpha | 1 |\n| beta | 22 |\n\n",
    '```python\nprint("<b>hi</b>")\n```\n\nThe end.',
)


async def recorded_dialogs(page: Page) -> list[str]:
    """Every alert, confirm or prompt the page opens (dismissed): a script that ran would open one."""
    dialogs: list[str] = []

    async def dismiss(dialog: Any) -> None:
        dialogs.append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", dismiss)
    return dialogs


async def assert_rendered_safely(answer: Locator) -> None:
    markdown = answer.locator(".markdown")
    await expect(markdown.locator("h2")).to_have_text("Results")
    await expect(markdown.locator("strong")).to_have_text("bold")
    links = await markdown.locator("a").evaluate_all(
        "links => links.map(a => [a.getAttribute('href'), a.target, a.rel, a.textContent])"
    )
    assert links == [
        ["https://example.com/docs", "_blank", "noopener noreferrer", "good link"],
        ["https://example.com/p.png", "_blank", "noopener noreferrer", "image: a picture"],
    ]
    text = await answer.locator(".markdown").inner_text()
    for literal in ("[x](javascript:alert(1))", "[a relative one](/api/sessions)", "<img src=x onerror=alert(1)>"):
        assert literal in text, (literal, text)
    await expect(markdown.locator("th")).to_have_text(["Name", "Value"])
    await expect(markdown.locator("td")).to_have_text(["alpha", "1", "beta", "22"])
    await expect(markdown.locator("th.align-right")).to_have_text("Value")
    await expect(markdown.locator(".code-block code")).to_have_text('print("<b>hi</b>")\n')
    await expect(markdown.locator(".code-block button")).to_have_text("Copy")
    log = answer.page.locator("#log")
    for unsafe in ("img", "b", "script", "[style]", "[onerror]", "a:not([href^='https://'])"):
        assert await log.locator(unsafe).count() == 0, unsafe


async def test_answers_markdown_is_rendered_as_it_streams_and_never_runs_a_models_html(
    fake_gemini: FakeGemini, start_server: ServerFactory, browser: Browser
) -> None:
    fake_gemini.stream(
        Reply(
            events=[
                text_chunk(MARKDOWN_ANSWER[0]),
                Pause(0.6),
                text_chunk(MARKDOWN_ANSWER[1], "STOP", usage(10, 40)),
            ]
        )
    )
    server = await start_server(llm_provider="gemini", gemini_api_key="test-key", gemini_base_url=fake_gemini.url)
    watch = await watched(browser, server.url, **LAPTOP)
    page = await watch.new_page()
    dialogs = await recorded_dialogs(page)
    await page.goto(server.url + "/")
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected", timeout=WAIT_MS)
    await send(page, "Show me *Markdown* and <b>tags</b>, please")
    answer = answers(page).first
    # Drawn while it streams: the table is there before the rest of the answer.
    await expect(answer.locator(".markdown td")).to_have_text(["alpha", "1", "beta", "22"], timeout=WAIT_MS)
    await expect(answer.locator(".finish")).to_have_text("answering…")
    await finished(answer)
    # The user's own text is never Markdown.
    await expect(page.locator("#log .msg.user .text")).to_have_text("Show me *Markdown* and <b>tags</b>, please")
    # The title the model made for the session, in the list and the header.
    session_id = session_of(page)
    await expect(chat(page, session_id).locator(".chat-name")).to_have_text("A fake title", timeout=WAIT_MS)
    await expect(page.locator("#chat-title")).to_have_text("A fake title")

    await watch.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    for _ in range(2):  # as streamed, then as rebuilt from the stored history
        await assert_rendered_safely(answer)
        await answer.locator(".code-block button").click()
        await expect(answer.locator(".code-block button")).to_have_text("Copied")
        assert await page.evaluate("() => navigator.clipboard.readText()") == 'print("<b>hi</b>")\n'
        await page.reload()
        await expect(page.locator("#status")).to_have_attribute("data-state", "connected", timeout=WAIT_MS)
        await finished(answer)
    assert dialogs == []
    watch.assert_clean()  # no console error (a refused inline style or script would be one), nothing fetched


async def as_user(watch: Watched, user_id: str) -> None:
    """Every page of the context is the anonymous user `user_id` (the id the page keeps in local storage)."""
    remember = f"localStorage.setItem('playground.user_id', {json.dumps(user_id)})"
    await watch.context.add_init_script(f"if (location.origin === {json.dumps(watch.origin)}) {remember}")


def chats(page: Page) -> Locator:
    return page.locator("#session-list li.chat-entry")


def chat(page: Page, session_id: str) -> Locator:
    return page.locator(f'#session-list li[data-session="{session_id}"]')


async def chat_ids(page: Page) -> list[str]:
    ids: list[str] = await chats(page).evaluate_all("items => items.map(li => li.dataset.session)")
    return ids


async def listed(server: RunningServer, user: str) -> list[str]:
    async with httpx.AsyncClient(base_url=server.url) as http:
        answer = await http.get("/api/sessions", params={"user_id": user, "limit": 100})
    return [session["session_id"] for session in answer.json()["sessions"]]


def presence_fell_to_one(events: list[tuple[str, dict[str, Any]]]) -> bool:
    counts = [data["clients"] for name, data in events if name == "presence"]
    return 2 in counts and counts[-1] == 1 and counts.index(2) < len(counts) - 1


async def test_the_list_of_chats_newest_first_more_on_scroll_and_switching(
    start_server: ServerFactory, browser: Browser, connect: TabFactory
) -> None:
    server = await start_server()
    user = f"anon-{uuid.uuid4().hex}"
    maker = await connect(server)
    created = []
    for _ in range(24):
        created.append((await maker.join(user_id=user))["session"]["session_id"])
        await maker.call("leave", {"session_id": created[-1]})
    expected = await listed(server, user)
    assert sorted(expected) == sorted(created)
    watcher = await connect(server)
    await watcher.join(created[10])

    watch = await watched(browser, server.url, **LAPTOP)
    await as_user(watch, user)
    page = await open_playground(watch, f"{server.url}/?session={created[10]}")
    await expect(chats(page)).to_have_count(20)  # one page, newest first
    assert await chat_ids(page) == expected[:20]
    await expect(chat(page, created[10]).locator(".chat-open")).to_have_attribute("aria-current", "page")
    await expect(chats(page).first.locator(".chat-name")).to_have_text(re.compile(r"^Chat of "))
    await page.locator("#session-list").evaluate("list => list.scrollTop = list.scrollHeight")
    await expect(chats(page)).to_have_count(24)
    assert await chat_ids(page) == expected

    # Another chat: the old one is left, the new one joined, the address says which.
    await expect(page.locator("#presence")).to_have_text("2 tabs in this session")
    await chat(page, created[0]).locator(".chat-open").click()
    await expect(page).to_have_url(f"{server.url}/?session={created[0]}")
    await expect(page.locator("#session-id")).to_have_text(created[0])
    await expect(page.locator("#presence")).to_have_text("1 tab in this session")
    await expect(chat(page, created[0]).locator(".chat-open")).to_have_attribute("aria-current", "page")
    await expect(chat(page, created[10]).locator(".chat-open")).not_to_have_attribute("aria-current", "page")
    await watcher.wait_for(presence_fell_to_one)

    # A message moves it to the top; its title comes once the answer is done.
    await send(page, "Plan a trip to the mountains in spring")
    await finished(answers(page).first)
    await expect(chats(page).first.locator(".chat-name")).to_have_text("Plan a trip to the mountains", timeout=WAIT_MS)
    assert (await chat_ids(page))[0] == created[0]

    # "New chat": a session of its own, listed once it has a message; Back returns to the last one.
    await page.get_by_role("button", name="New chat", exact=True).click()
    await expect(page.locator("#log .msg")).to_have_count(0)
    await expect(page).not_to_have_url(re.compile(created[0]))
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected", timeout=WAIT_MS)
    fresh = session_of(page)
    await expect(chat(page, fresh)).to_have_count(0)
    await send(page, "Hello from a new chat")
    await expect(chats(page).first).to_have_attribute("data-session", fresh)
    await finished(answers(page).first)
    await page.go_back()
    await expect(page.locator("#session-id")).to_have_text(created[0])
    await expect(page.locator("#log .msg.user .text")).to_have_text(["Plan a trip to the mountains in spring"])
    watch.assert_clean()


async def test_a_rename_and_a_delete_in_one_tab_reach_the_others_list_and_conversation(
    start_server: ServerFactory, browser: Browser
) -> None:
    server = await start_server()
    user = f"anon-{uuid.uuid4().hex}"
    laptop = await watched(browser, server.url, **LAPTOP)
    await as_user(laptop, user)
    first = await open_playground(laptop, server.url + "/")
    kept = session_of(first)
    await send(first, "Tell me about renaming chats")
    await finished(answers(first).first)
    await expect(chat(first, kept).locator(".chat-name")).to_have_text("Tell me about renaming chats", timeout=WAIT_MS)

    # A phone of the same user: its list is a drawer.
    phone = await watched(browser, server.url, **PHONE)
    await as_user(phone, user)
    second = await open_playground(phone, server.url + "/")
    assert session_of(second) != kept
    drawer = second.locator("#sidebar")
    await expect(drawer).to_be_hidden()
    await second.get_by_role("button", name="Chats", exact=True).click()
    await expect(drawer).to_be_visible()
    item = chat(second, kept)
    await expect(item.locator(".chat-name")).to_have_text("Tell me about renaming chats")

    await item.get_by_role("button", name="Rename", exact=True).click()
    await item.get_by_label("New title").fill("Trip notes")
    await item.get_by_label("New title").press("Enter")
    await expect(item.locator(".chat-name")).to_have_text("Trip notes")
    await expect(chat(first, kept).locator(".chat-name")).to_have_text("Trip notes")
    await expect(first.locator("#chat-title")).to_have_text("Trip notes")
    assert (await chat_ids(first))[0] == kept and (await chat_ids(second))[0] == kept  # a rename updates it

    await item.get_by_role("button", name="Delete", exact=True).click()
    await expect(item).to_contain_text("Delete “Trip notes”?")
    await item.get_by_role("button", name="Delete", exact=True).click()
    await expect(item).to_have_count(0)
    await expect(chat(first, kept)).to_have_count(0)
    assert kept not in await listed(server, user)
    gone = first.locator("#log .gone")
    await expect(gone).to_contain_text("This chat was deleted")
    await expect(first.locator("#status")).to_have_attribute("data-state", "deleted")
    await expect(first.get_by_label("Message")).to_be_disabled()

    await gone.get_by_role("button", name="Start a new chat").click()
    await expect(first.locator("#status")).to_have_attribute("data-state", "connected", timeout=WAIT_MS)
    assert session_of(first) not in (kept, session_of(second))
    await expect(first.locator("#log .gone")).to_have_count(0)
    # The phone's own chat goes on; choosing it in the drawer closes the drawer.
    await chat(second, session_of(second)).locator(".chat-open").click()
    await expect(drawer).to_be_hidden()
    laptop.assert_clean()
    phone.assert_clean()


async def test_earlier_messages_load_in_place_and_a_rejoin_catches_up_over_several_pages(
    start_server: ServerFactory, browser: Browser, connect: TabFactory
) -> None:
    server = await start_server(join_history_limit=5)
    writer = await connect(server)
    session_id = (await writer.join())["session"]["session_id"]

    async def turn(text: str) -> None:
        ack = await writer.call("message", {"session_id": session_id, "text": text})
        assert ack["ok"], ack
        await writer.turn(ack["turn_id"], timeout=WAIT_MS)

    questions = [f"How's the weather in {city}?" for city in ("Delhi", "Paris", "Lima")] + ["Thanks, that is all"]
    for question in questions:  # a weather turn stores 4 events (message, call, result, answer)
        await turn(question)

    proxy = await TcpProxy("127.0.0.1", server.settings.port).start()
    origin = f"http://127.0.0.1:{proxy.port}"
    try:
        # A short window: the latest page fills the log, so there is something to keep in place.
        watch = await watched(browser, origin, viewport={"width": 1000, "height": 480})
        page = await open_playground(watch, f"{origin}/?session={session_id}")
        assert await page.locator("#log").evaluate("log => log.scrollHeight > log.clientHeight")
        fetched: list[str] = []
        page.on("request", lambda request: fetched.append(request.url) if "/events" in request.url else None)
        # The last 5 events: Lima's call, result and answer (its question is earlier), then the last turn.
        await expect(page.locator("#log .msg.user .text")).to_have_text([questions[-1]])
        await expect(answers(page)).to_have_count(2)
        lima = await answers(page).first.element_handle()
        earlier = page.get_by_role("button", name="Load earlier messages")
        await page.locator("#log").evaluate("log => log.scrollTop = 0")
        await expect(earlier).to_be_in_viewport()
        top = await lima.evaluate("answer => answer.getBoundingClientRect().top")
        await earlier.click()
        await expect(page.locator("#log .msg.user .text")).to_have_text(questions)
        await expect(earlier).to_be_hidden()
        # What the reader was looking at did not move; the answer split by the page is one again.
        assert abs(await lima.evaluate("answer => answer.getBoundingClientRect().top") - top) < 2
        assert await page.locator("#log").evaluate("log => log.scrollTop") > 0
        await expect(answers(page)).to_have_count(4)
        await expect(page.locator("#log [data-continued]")).to_have_count(0)
        await expect(page.locator("#log .tool-args")).to_have_text(
            [re.compile(city) for city in ("Delhi", "Paris", "Lima")]
        )
        assert [await text_of(a) for a in await answers(page).all()] == await stored_answers(server, session_id)
        assert any("before_event_id=" in url for url in fetched), fetched

        # Away for more than a page of events: what was stored meanwhile is fetched, then the rejoin
        # answers from there; every answer once, in order.
        proxy.cut()
        await expect(page.locator("#status")).to_have_attribute("data-state", "reconnecting", timeout=WAIT_MS)
        for question in ("How's the weather in Oslo?", "How's the weather in Rome?"):
            await turn(question)
        proxy.restore()
        await expect(page.locator("#log .msg.user .text")).to_have_count(6, timeout=WAIT_MS)
        await expect(page.locator("#status")).to_have_attribute("data-state", "connected", timeout=WAIT_MS)
        await expect(answers(page).nth(5)).to_have_attribute("data-finish", "stop")
        assert [await text_of(a) for a in await answers(page).all()] == await stored_answers(server, session_id)
        assert any("after_event_id=" in url for url in fetched), fetched
    finally:
        await proxy.stop()
    assert not watch.foreign and not watch.page_errors, (watch.foreign, watch.page_errors)
    assert all(re.search(r"failed|ERR_", error) for error in watch.console_errors), watch.console_errors


async def test_a_conversation_through_an_openai_compatible_endpoint(
    fake_openai: FakeOpenAI, start_server: ServerFactory, browser: Browser
) -> None:
    delhi = {"location": "Delhi"}
    call = call_reply(("c1", "get_weather", delhi)).events
    fake_openai.stream(
        OpenAIReply(events=[role_chunk(), openai_text("Let me check. "), *call]),
        text_reply("It is **mainly clear** in Delhi, 24.5 °C."),
    )
    fake_openai.title_replies.append(OpenAIReply(body=completion_body("Weather in Delhi")))
    server = await start_server(
        llm_provider="openai", openai_base_url=f"{fake_openai.url}/v1", openai_model="gpt-test-mini"
    )
    watch = await watched(browser, server.url, **LAPTOP)
    page = await open_playground(watch, server.url + "/")
    await send(page, "How's the weather in Delhi?")
    answer = answers(page).first
    tool = answer.locator("details.tool")
    await expect(tool.locator(".tool-name")).to_have_text("get_weather", timeout=WAIT_MS)
    await finished(answer)
    await expect(tool.locator(".tool-status")).to_have_text("done")
    await tool.locator("summary").click()
    assert json.loads(await tool.locator("pre.tool-json").first.inner_text()) == delhi
    assert await text_of(answer) == "Let me check. It is mainly clear in Delhi, 24.5 °C."
    await expect(answer.locator("strong")).to_have_text("mainly clear")
    # Its title, made by the same endpoint, in the list of chats.
    await expect(page.locator("#chat-title")).to_have_text("Weather in Delhi", timeout=WAIT_MS)
    await expect(page.locator("#session-list")).to_contain_text("Weather in Delhi")
    watch.assert_clean()


# ---------------------------------------------------------------- tool calls waiting for approval

WEATHER = "How's the weather in Delhi?"  # the offline model calls get_weather
WAITING = re.compile(r"^waiting for approval · (\d+:)?\d{1,2}:\d\d$")


async def waiting_call(page: Page) -> Locator:
    """The first answer's tool call, once it shows it waits for a decision (its controls open)."""
    tool = answers(page).first.locator("details.tool")
    await expect(tool.locator(".tool-status")).to_have_text(WAITING, timeout=WAIT_MS)
    await expect(tool.get_by_role("button", name="Approve", exact=True)).to_be_visible()
    await expect(tool.get_by_role("button", name="Deny", exact=True)).to_be_visible()
    return tool


def seconds_of(countdown: str) -> int:
    return sum(int(part) * 60**i for i, part in enumerate(reversed(countdown.split(":"))))


async def assert_counting_down(tool: Locator, at_most: int) -> None:
    countdown = tool.locator(".tool-countdown")
    first = await countdown.inner_text()
    await expect(countdown).not_to_have_text(first, timeout=3_000)
    later = await countdown.inner_text()
    assert at_most >= seconds_of(first) > seconds_of(later) >= seconds_of(first) - 3, (first, later)


async def decided_as(tool: Locator, outcome: str) -> None:
    await expect(tool.locator(".tool-approval-outcome")).to_have_text(outcome, timeout=WAIT_MS)
    await expect(tool.get_by_role("button", name="Approve", exact=True)).to_have_count(0)


def no_wider_than_the_screen(page: Page) -> Any:
    return page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")


async def test_a_call_waiting_for_approval_is_approved_in_a_second_tab_and_both_tabs_show_it(
    start_server: ServerFactory, browser: Browser
) -> None:
    server = await start_server(tool_approval="get_weather", offline_chunk_delay_ms=20)
    watch = await watched(browser, server.url, **LAPTOP)
    first = await open_playground(watch, server.url + "/")
    phone = await watched(browser, server.url, **PHONE)
    second = await open_playground(phone, first.url)
    await send(first, WEATHER)

    tools = [await waiting_call(page) for page in (first, second)]
    await assert_counting_down(tools[0], at_most=300)
    await assert_counting_down(tools[1], at_most=300)
    assert await no_wider_than_the_screen(second)
    await expect(answers(first).first.locator(".finish")).to_have_text("answering…")

    # From the keyboard: the reason, then Tab to Approve.
    reason = tools[1].get_by_label("Reason (optional)")
    await reason.fill("fine, it is only the weather")
    await reason.press("Tab")
    await expect(tools[1].get_by_role("button", name="Approve", exact=True)).to_be_focused()
    await second.keyboard.press("Enter")
    for page, tool in zip((first, second), tools, strict=True):
        await decided_as(tool, "approved: fine, it is only the weather")
        await finished(answers(page).first)
        await expect(tool.locator(".tool-status")).to_have_text("approved · done")
        assert json.loads(await tool.locator("pre.tool-json").nth(1).inner_text())["temperature_c"] == 24.5
        await expect(answers(page).first.locator(".finish")).to_contain_text("finished (stop)")
    await expect(tools[1].locator("summary")).to_be_focused()  # not lost with the button

    await first.reload()  # from the stored history
    tool = answers(first).first.locator("details.tool")
    await expect(tool.locator(".tool-status")).to_have_text("approved · done", timeout=WAIT_MS)
    await expect(tool.locator(".tool-approval-outcome")).to_have_text("approved: fine, it is only the weather")
    watch.assert_clean()
    phone.assert_clean()


async def test_a_call_denied_approval_with_a_reason_shows_the_denial_and_the_tools_error_in_every_tab(
    start_server: ServerFactory, browser: Browser
) -> None:
    server = await start_server(tool_approval="get_weather", offline_chunk_delay_ms=20)
    phone = await watched(browser, server.url, **PHONE)
    first = await open_playground(phone, server.url + "/")
    watch = await watched(browser, server.url, **LAPTOP)
    second = await open_playground(watch, first.url)
    await send(second, WEATHER)
    tools = [await waiting_call(page) for page in (first, second)]

    reason = "not <b>now</b>"  # text, never markup
    await tools[0].get_by_label("Reason (optional)").fill(reason)
    await tools[0].get_by_role("button", name="Deny", exact=True).click()
    for page, tool in zip((first, second), tools, strict=True):
        await decided_as(tool, f"denied: {reason}")
        await expect(tool.locator(".tool-status")).to_have_text("error: tool_denied")
        await expect(tool.locator(".tool-error")).to_have_text(f"a person denied this call: {reason} (tool_denied)")
        await finished(answers(page).first)
    assert await no_wider_than_the_screen(first)
    await first.reload()
    outcome = answers(first).first.locator(".tool-approval-outcome")
    await expect(outcome).to_have_text(f"denied: {reason}", timeout=WAIT_MS)
    assert await first.locator("#log b").count() == 0
    phone.assert_clean()
    watch.assert_clean()


async def test_a_call_waiting_for_approval_that_nobody_gives_times_out(
    start_server: ServerFactory, browser: Browser
) -> None:
    server = await start_server(tool_approval="get_*", tool_approval_timeout_seconds=2)
    watch = await watched(browser, server.url, **LAPTOP)
    page = await open_playground(watch, server.url + "/")
    await send(page, WEATHER)
    tool = await waiting_call(page)
    await expect(tool.locator(".tool-countdown")).to_have_text(re.compile(r"^0:0[0-2]$"))
    await decided_as(tool, "timed out")
    await expect(tool.locator(".tool-status")).to_have_text("error: approval_timeout")
    await finished(answers(page).first)
    await page.reload()
    await expect(answers(page).first.locator(".tool-approval-outcome")).to_have_text("timed out", timeout=WAIT_MS)
    watch.assert_clean()


class HeldEvents:
    """Once `hold` is set, the page's Socket.IO client hears no more room events (acks and pings
    still pass): a tab that missed a decision made elsewhere."""

    def __init__(self) -> None:
        self.hold = False

    async def install(self, page: Page) -> None:
        await page.route_web_socket(re.compile(r"/socket\.io/"), self._route)

    def _route(self, ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()
        ws.on_message(server.send)
        server.on_message(lambda message: None if self._held(message) else ws.send(message))

    def _held(self, message: str | bytes) -> bool:
        return self.hold and isinstance(message, str) and message.startswith("42")


async def test_a_page_opened_while_a_call_waits_for_approval_shows_it_and_a_late_decision_is_refused_readably(
    start_server: ServerFactory, browser: Browser
) -> None:
    server = await start_server(
        tool_approval="get_weather", tool_approval_timeout_seconds=3600, offline_chunk_delay_ms=20
    )
    watch = await watched(browser, server.url, **LAPTOP)
    first = await watch.new_page()
    held = HeldEvents()
    await held.install(first)
    await first.goto(server.url + "/")
    await expect(first.locator("#status")).to_have_attribute("data-state", "connected", timeout=WAIT_MS)
    await send(first, WEATHER)
    first_tool = await waiting_call(first)
    held.hold = True

    # Joined while the call waits: the join's active_turn.pending_approvals shows it.
    phone = await watched(browser, server.url, **PHONE)
    second = await open_playground(phone, first.url)
    tool = await waiting_call(second)
    await assert_counting_down(tool, at_most=3600)
    assert seconds_of(await tool.locator(".tool-countdown").inner_text()) > 3500
    await tool.get_by_role("button", name="Approve", exact=True).click()
    await decided_as(tool, "approved")
    await finished(answers(second).first)
    await expect(tool.locator(".tool-status")).to_have_text("approved · done")

    # The first tab missed it: its Approve is refused, said readably, and not offered again.
    await first_tool.get_by_role("button", name="Approve", exact=True).click()
    refusal = first_tool.get_by_role("alert")
    await expect(refusal).to_contain_text("Already decided", timeout=WAIT_MS)
    await expect(refusal).to_contain_text("no_pending_approval")
    for name in ("Approve", "Deny"):
        await expect(first_tool.get_by_role("button", name=name, exact=True)).to_be_disabled()
    held.hold = False
    await first.reload()
    await expect(answers(first).first.locator(".tool-approval-outcome")).to_have_text("approved", timeout=WAIT_MS)
    await finished(answers(first).first)
    watch.assert_clean()
    phone.assert_clean()


# ---------- attachments ----------


def png(width: int = 3, height: int = 2) -> bytes:
    """A real PNG (solid red), so that the browser decodes it and the service types it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


# Records the upload progress bars the page shows (by their labels), however short-lived.
RECORD_PROGRESS = """() => {
  window.progressBars = [];
  new MutationObserver((changes) => {
    for (const change of changes) for (const added of change.addedNodes) {
      const bar = added.querySelector?.("progress");
      if (bar) window.progressBars.push(bar.getAttribute("aria-label"));
    }
  }).observe(document.getElementById("attachments"), { childList: true });
}"""


# A file pasted (a screenshot) or dropped on the page, as the browser hands it to the page.
HAND_OVER = """async ([how, name, type, b64]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], name, { type }));
  const init = { bubbles: true, cancelable: true };
  if (how === "paste") {
    document.getElementById("message").dispatchEvent(new ClipboardEvent("paste", { ...init, clipboardData: data }));
  } else {
    const log = document.getElementById("log");
    for (const kind of ["dragenter", "dragover", "drop"]) {
      log.dispatchEvent(new DragEvent(kind, { ...init, dataTransfer: data }));
    }
  }
}"""


async def hand_over(page: Page, how: str, name: str, mime_type: str, data: bytes) -> None:
    await page.evaluate(HAND_OVER, [how, name, mime_type, base64.b64encode(data).decode()])


async def choose_files(page: Page, files: list[tuple[str, str, bytes]]) -> None:
    """Attach with the button, as a person does: it opens the file chooser."""
    async with page.expect_file_chooser() as chooser:
        await page.get_by_role("button", name="Attach").click()
    payloads = [FilePayload(name=name, mimeType=mime_type, buffer=data) for name, mime_type, data in files]
    await (await chooser.value).set_files(payloads)


async def loaded_images(images: Locator) -> list[str]:
    """The images' `src`, once each has loaded (naturalWidth > 0)."""
    handles = await images.element_handles()
    loaded = "(all) => all.every((img) => img.complete && img.naturalWidth > 0)"
    await images.page.wait_for_function(loaded, arg=handles, timeout=WAIT_MS)
    return [await handle.get_attribute("src") or "" for handle in handles]


class SentMessages:
    """The `message` payloads the page sends over Socket.IO, recorded by a route on its WebSocket."""

    def __init__(self, page: Page) -> None:
        self.messages: list[dict[str, Any]] = []
        self._page = page

    async def install(self) -> None:
        await self._page.route_web_socket(re.compile(r"/socket\.io/"), self._route)

    def _route(self, ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()
        ws.on_message(lambda message: server.send(self._sent(message)))
        server.on_message(ws.send)

    def _sent(self, message: str | bytes) -> str | bytes:
        match = isinstance(message, str) and re.fullmatch(r'42\d*\["message",(.*)\]', message)
        if match:
            self.messages.append(json.loads(match.group(1)))
        return message


async def test_attach_with_the_button_paste_and_drop_then_send_them_with_the_message(
    start_server: ServerFactory, browser: Browser
) -> None:
    server = await start_server()
    watch = await watched(browser, server.url, **LAPTOP)
    page = await watch.new_page()
    relay = SentMessages(page)
    await relay.install()
    await page.goto(server.url + "/")
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected", timeout=WAIT_MS)
    attached = page.locator("#attachments > li")
    await page.evaluate(RECORD_PROGRESS)

    await choose_files(page, [("red.png", "image/png", png()), ("notes.txt", "text/plain", b"Delhi, 24.5 C\n")])
    await expect(attached).to_have_count(2)
    await expect(attached.locator("img")).to_have_count(1, timeout=WAIT_MS)
    [src] = await loaded_images(attached.locator("img"))
    assert src.startswith("/api/attachments/") or src.startswith(server.url + "/api/attachments/"), src
    await expect(attached.nth(1)).to_have_attribute("data-state", "uploaded", timeout=WAIT_MS)
    await expect(attached.nth(1)).to_contain_text("notes.txt")
    await page.get_by_role("button", name="Remove notes.txt").click()
    await expect(attached).to_have_count(1)
    await expect(page.get_by_label("Message")).to_be_focused()

    await hand_over(page, "paste", "screenshot.png", "image/png", png(5, 4))
    await hand_over(page, "drop", "weather.csv", "text/csv", b"city,temp\nDelhi,24.5\n")
    await expect(attached).to_have_count(3)
    for index in range(3):
        await expect(attached.nth(index)).to_have_attribute("data-state", "uploaded", timeout=WAIT_MS)
    await loaded_images(attached.locator("img"))
    await expect(attached.nth(2)).to_contain_text("weather.csv")
    progress_bars = await page.evaluate("() => window.progressBars")
    assert progress_bars == [f"Uploading {name}" for name in ("red.png", "notes.txt", "screenshot.png", "weather.csv")]

    await send(page, "What do these say?")
    user = page.locator("#log .msg.user")
    await expect(user.locator(".text")).to_have_text(["What do these say?"])
    await expect(attached).to_have_count(0)
    [message] = relay.messages
    names = [(await server.runtime.repo.get_attachment(i)).name for i in message["attachments"]]
    assert names == ["red.png", "screenshot.png", "weather.csv"], message
    # The user message shows them: thumbnails and a name, each a link to the file's route.
    links = user.locator(".attachments a")
    await expect(links).to_have_count(3)
    sources = await loaded_images(user.locator(".attachments img"))
    assert len(sources) == 2 and all("/api/attachments/" in src for src in sources), sources
    assert await links.nth(2).get_attribute("href") == f"/api/attachments/{message['attachments'][2]}"
    await expect(links.nth(2)).to_contain_text("weather.csv")
    await finished(answers(page).first)
    watch.assert_clean()


async def test_attach_refusals_are_shown_readably(start_server: ServerFactory, browser: Browser) -> None:
    server = await start_server(attachment_max_bytes=2048)
    watch = await watched(browser, server.url, **PHONE)
    page = await open_playground(watch, server.url + "/")
    notice = page.locator("#attach-notice")

    await choose_files(page, [("fake.png", "image/png", bytes(range(256)) * 4)])
    await expect(notice).to_contain_text("“fake.png” is not a kind of file this service takes", timeout=WAIT_MS)
    await expect(notice).to_contain_text("unsupported_media_type")
    await choose_files(page, [("big.png", "image/png", png() + bytes(3000))])
    await expect(notice).to_contain_text("“big.png” is larger than this service accepts", timeout=WAIT_MS)
    await expect(notice).to_contain_text("2048 bytes")
    await expect(notice).to_contain_text("too_large")
    await expect(page.locator("#attachments > li")).to_have_count(0)
    assert await page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    # The browser logs the refused uploads; nothing else went wrong.
    assert not watch.foreign and not watch.page_errors
    assert all("415" in e or "413" in e for e in watch.console_errors), watch.console_errors


async def test_attach_with_authentication_on_shows_and_saves_files_through_blob_urls(
    start_server: ServerFactory, browser: Browser
) -> None:
    server = await start_server(auth_jwt_secret=SECRET)
    watch = await watched(browser, server.url, **LAPTOP)
    page = await watch.new_page()
    relay = SentMessages(page)
    await relay.install()
    await page.add_init_script(f"sessionStorage.setItem('playground.token', {json.dumps(token('alice'))})")
    await page.goto(server.url + "/")
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected", timeout=WAIT_MS)

    await choose_files(page, [("red.png", "image/png", png()), ("notes.txt", "text/plain", b"hello\n")])
    attached = page.locator("#attachments > li")
    await expect(attached.locator("img")).to_have_count(1, timeout=WAIT_MS)
    [src] = await loaded_images(attached.locator("img"))
    assert src.startswith("blob:"), src
    await expect(attached.nth(1)).to_have_attribute("data-state", "uploaded", timeout=WAIT_MS)
    await send(page, "Here they are")
    user = page.locator("#log .msg.user")
    await expect(user.locator(".attachments img")).to_have_count(1, timeout=WAIT_MS)
    [thumbnail] = await loaded_images(user.locator(".attachments img"))
    assert thumbnail.startswith("blob:"), thumbnail
    async with page.expect_download() as download:
        await user.locator(".attachments a", has_text="notes.txt").click()
    saved = await download.value
    assert saved.suggested_filename == "notes.txt"
    assert (await saved.path()).read_bytes() == b"hello\n"
    await finished(answers(page).first)
    watch.assert_clean()


async def sent_files(page: Page, image: str, text_file: str) -> tuple[list[str], list[str]]:
    """The last user message's two files (an image, then a text file) as the page shows them: the
    thumbnail's `src` once loaded, and the links' `href`."""
    user = page.locator("#log .msg.user").last
    await expect(user.locator(".attachments img")).to_have_count(1, timeout=WAIT_MS)
    await expect(user.locator(".attachments a")).to_have_count(2)
    await expect(user.locator(".attachments a").first).to_have_attribute("aria-label", f"{image}, download")
    await expect(user.locator(".attachments a").nth(1)).to_contain_text(text_file)
    links = [await link.get_attribute("href") or "" for link in await user.locator(".attachments a").all()]
    return await loaded_images(user.locator(".attachments img")), links


async def test_attached_files_reach_the_offline_answer_and_another_tab(
    start_server: ServerFactory, browser: Browser
) -> None:
    server = await start_server(offline_chunk_delay_ms=0)
    watch = await watched(browser, server.url, **LAPTOP)
    first = await open_playground(watch, server.url + "/")
    other = await watched(browser, server.url, **PHONE)
    second = await open_playground(other, first.url)
    for page in (first, second):  # the second tab is in the session before the message is sent
        await expect(page.locator("#presence")).to_have_text("2 tabs in this session")

    image, notes = png(4, 3), b"Delhi, 24.5 C\n"
    await choose_files(first, [("red.png", "image/png", image), ("notes.txt", "text/plain", notes)])
    attached = first.locator("#attachments > li")
    await expect(attached.locator("img")).to_have_count(1, timeout=WAIT_MS)
    await loaded_images(attached.locator("img"))
    await expect(attached.nth(1)).to_have_attribute("data-state", "uploaded", timeout=WAIT_MS)
    await send(first, "What do these say?")
    await expect(attached).to_have_count(0)

    # The offline script names each file it got, as the service typed and measured it.
    labels = f'"red.png" (image/png, {len(image)} bytes); "notes.txt" (text/plain, {len(notes)} bytes)'
    await finished(answers(first).first)
    text = await text_of(answers(first).first)
    assert text.endswith(f"It got 2 files with it: {labels}."), text
    assert await stored_answers(server, session_of(first)) == [text]
    sources, links = await sent_files(first, "red.png", "notes.txt")
    assert len(links) == 2 and all(link.startswith("/api/attachments/") for link in links), links
    assert sources[0].endswith(links[0]), sources

    # The other tab heard it live: the same files (the thumbnail loaded there too), the same answer.
    await expect(second.locator("#log .msg.user .text")).to_have_text(["What do these say?"])
    assert await sent_files(second, "red.png", "notes.txt") == (sources, links)
    await finished(answers(second).first)
    assert await text_of(answers(second).first) == text
    # Opened again, it shows them from the session's history.
    await second.reload()
    await expect(second.locator("#status")).to_have_attribute("data-state", "connected", timeout=WAIT_MS)
    assert await sent_files(second, "red.png", "notes.txt") == (sources, links)
    await finished(answers(second).first)
    assert await text_of(answers(second).first) == text
    watch.assert_clean()
    other.assert_clean()
