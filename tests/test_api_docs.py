"""The API page works offline: /docs loads everything from the service itself, the schema
documents what the routes really answer (400, 401, 403, 404, 503; never FastAPI's 422), and the
page links docs/protocol.md rendered for a person (`/docs/protocol`) under the playground's CSP."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.transport import http as http_routes
from server.transport.playground import CONTENT_SECURITY_POLICY
from tests.browser import chromium, watched
from tests.harness import RunningServer


async def test_the_api_page_fetches_nothing_from_other_hosts(server: RunningServer) -> None:
    async with chromium() as browser:
        watch = await watched(browser, server.url)
        page = await watch.new_page()
        async with page.expect_response(server.url + "/openapi.json"):
            await page.goto(server.url + "/docs")
        await page.wait_for_selector(".opblock", timeout=15_000)
        operations = await page.locator(".opblock-summary-path").all_inner_texts()
        assert {"/healthz", "/readyz", "/api/sessions/{session_id}", "/api/sessions/{session_id}/events"} <= {
            o.replace("\u200b", "") for o in operations
        }
        assert await page.locator("a[href='/docs/protocol']").count() == 1

        # The rendered protocol, as a person opens it: its stylesheet applies under the CSP (a
        # refused one would be a console error), and a contents link leads to its section.
        await page.goto(server.url + "/docs/protocol")
        await page.wait_for_selector("h2#the-plain-websocket-endpoint")
        assert await page.evaluate("getComputedStyle(document.querySelector('main')).maxWidth") == "960px"
        await page.click("a[href='#errors']")
        assert page.url.endswith("/docs/protocol#errors")
        assert await page.evaluate("document.getElementById('errors').getBoundingClientRect().top") < 50
        watch.assert_clean()


async def test_the_schema_documents_the_real_answers(http: httpx.AsyncClient) -> None:
    schema: dict[str, Any] = (await http.get("/openapi.json")).json()
    assert "[the protocol](/docs/protocol)" in schema["info"]["description"]
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            assert "422" not in operation["responses"], path
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for path in ("/api/sessions/{session_id}", "/api/sessions/{session_id}/events"):
        responses = schema["paths"][path]["get"]["responses"]
        assert set(responses) == {"200", "400", "401", "403", "404", "503"}
        assert responses["404"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Refusal"}
    assert schema["paths"]["/api/sessions/{session_id}"]["get"]["responses"]["200"]["content"]["application/json"][
        "schema"
    ] == {"$ref": "#/components/schemas/Session"}
    history_item = schema["components"]["schemas"]["HistoryItem"]["properties"]
    assert {"finish_reason", "error", "attachments"} <= set(history_item)  # what each event type adds
    assert set(schema["components"]["schemas"]["AttachmentRef"]["properties"]) == {
        "attachment_id",
        "name",
        "mime_type",
        "size",
    }
    assert set(schema["paths"]["/readyz"]["get"]["responses"]) == {"200", "503"}
    assert "text/plain" in str(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"])
    protocol = await http.get("/docs/protocol.md")
    assert protocol.status_code == 200 and protocol.text.startswith("# Protocol by example")


async def test_what_the_schema_says_is_what_the_routes_answer(http: httpx.AsyncClient) -> None:
    malformed = await http.get("/api/sessions/not-a-uuid")
    assert (malformed.status_code, malformed.json()["detail"]["code"]) == (400, "invalid_session_id")
    unknown = await http.get("/api/sessions/5b0f4c8e-0d1b-4a51-8d38-7c2b7f1a9e01")
    assert (unknown.status_code, unknown.json()["detail"]["code"]) == (404, "not_found")
    bad_query = await http.get("/api/sessions/5b0f4c8e-0d1b-4a51-8d38-7c2b7f1a9e01/events?after_event_id=abc")
    assert (bad_query.status_code, bad_query.json()["detail"]["code"]) == (400, "invalid_payload")
    assert (await http.get("/healthz")).json() == {"status": "ok"}


async def test_the_protocol_is_served_rendered_for_people_and_raw_for_tools(http: httpx.AsyncClient) -> None:
    page = await http.get("/docs/protocol")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert page.headers["x-content-type-options"] == "nosniff"
    assert '<h1 id="protocol-by-example">Protocol by example</h1>' in page.text
    assert '<h2 id="the-plain-websocket-endpoint">The plain WebSocket endpoint</h2>' in page.text
    assert '<h3 id="approve_tool"><code>approve_tool</code></h3>' in page.text
    assert "<table>" in page.text and '<link rel="stylesheet" href="/docs/protocol.css">' in page.text
    # Nothing the CSP would refuse: no script, no inline style.
    assert "<script" not in page.text and not re.search(r"\sstyle=", page.text)

    stylesheet = await http.get("/docs/protocol.css")
    assert stylesheet.status_code == 200 and stylesheet.headers["content-type"] == "text/css; charset=utf-8"
    raw = await http.get("/docs/protocol.md")
    assert raw.headers["content-type"] == "text/markdown; charset=utf-8"
    assert raw.text == http_routes.PROTOCOL_DOC.read_text(encoding="utf-8")


async def test_without_the_file_both_answer_not_found(
    http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # An install without the docs folder: the routes say so in the contract's shape.
    monkeypatch.setattr(http_routes, "PROTOCOL_DOC", tmp_path / "protocol.md")
    for path in ("/docs/protocol", "/docs/protocol.md"):
        answer = await http.get(path)
        assert (answer.status_code, answer.json()["detail"]["code"]) == (404, "not_found"), path
