"""The API page works offline: /docs loads everything from the service itself, and the
schema documents what the routes really answer (400, 401, 403, 404, 503; never FastAPI's 422)."""

from __future__ import annotations

from typing import Any

import httpx

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
        assert await page.locator("a[href='/docs/protocol.md']").count() == 1
        watch.assert_clean()


async def test_the_schema_documents_the_real_answers(http: httpx.AsyncClient) -> None:
    schema: dict[str, Any] = (await http.get("/openapi.json")).json()
    assert "[docs/protocol.md](/docs/protocol.md)" in schema["info"]["description"]
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
