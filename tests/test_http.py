"""The HTTP routes."""

from __future__ import annotations

import uuid

import httpx

from tests.conftest import TabFactory
from tests.harness import RunningServer
from tests.test_metrics import scrape


async def test_health_and_readiness(server: RunningServer, http: httpx.AsyncClient) -> None:
    assert (await http.get("/healthz")).status_code == 200
    ready = await http.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "queued_events": 0}


async def test_readiness_fails_with_a_reason_when_storage_does_not_answer(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    await server.runtime.repo.aclose()  # the database connection is gone
    ready = await http.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["status"] == "unavailable" and ready.json()["reasons"][0].startswith("storage")
    assert (await http.get("/healthz")).status_code == 200  # still serving


async def test_session_and_events_routes(server: RunningServer, connect: TabFactory, http: httpx.AsyncClient) -> None:
    tab = await connect(server)
    joined = await tab.join(user_id="linus")
    sid = joined["session"]["session_id"]
    ack = await tab.call("message", {"session_id": sid, "text": "store me"})
    done = (await tab.turn(ack["turn_id"]))[-1][1]

    session = await http.get(f"/api/sessions/{sid}")
    assert session.status_code == 200
    # As joined, but for what the turn changed: when it was updated, and its title once made.
    unchanged = {k: v for k, v in session.json().items() if k not in ("updated_at", "title")}
    assert unchanged == {k: v for k, v in joined["session"].items() if k not in ("updated_at", "title")}
    assert session.json()["updated_at"] > joined["session"]["updated_at"]
    events = (await http.get(f"/api/sessions/{sid}/events")).json()["events"]
    assert [(e["event_id"], e["event_type"]) for e in events] == [
        (ack["event_id"], "user_message"),
        (done["event_id"], "ai_message"),
    ]
    assert events == (await tab.join(sid))["history"]
    after = (await http.get(f"/api/sessions/{sid}/events", params={"after_event_id": ack["event_id"]})).json()
    assert [e["event_id"] for e in after["events"]] == [done["event_id"]]


async def test_unknown_and_malformed_session_ids(server: RunningServer, http: httpx.AsyncClient) -> None:
    unknown = str(uuid.uuid4())
    for path in (f"/api/sessions/{unknown}", f"/api/sessions/{unknown}/events"):
        response = await http.get(path)
        assert response.status_code == 404 and response.json()["detail"]["code"] == "not_found"
    bad = await http.get("/api/sessions/not-a-uuid")
    assert bad.status_code == 400 and bad.json()["detail"]["code"] == "invalid_session_id"


async def test_cors_allows_local_development_origins_only(server: RunningServer, http: httpx.AsyncClient) -> None:
    allowed = await http.get("/healthz", headers={"Origin": "http://localhost:5173"})
    assert allowed.headers.get("access-control-allow-origin") == "http://localhost:5173"
    refused = await http.get("/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in refused.headers
    handshake = "/socket.io/?EIO=4&transport=polling"
    assert (await http.get(handshake, headers={"Origin": "http://127.0.0.1:3000"})).status_code == 200
    assert (await http.get(handshake, headers={"Origin": "https://evil.example"})).status_code == 400


async def test_a_frontend_on_another_allowed_origin_may_rename_delete_and_upload(
    server: RunningServer, http: httpx.AsyncClient
) -> None:
    origin = "http://localhost:5173"
    for method in ("PATCH", "DELETE", "POST"):
        preflight = await http.options(
            f"/api/sessions/{uuid.uuid4()}",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": method,
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200, (method, preflight.text)
        assert preflight.headers["access-control-allow-origin"] == origin
        assert method in preflight.headers["access-control-allow-methods"]
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()


async def test_http_refusals_are_counted_by_their_code(server: RunningServer, http: httpx.AsyncClient) -> None:
    before = (await scrape(server.url)).by_label("realtime_refusals_total", "code")
    assert (await http.get(f"/api/sessions/{uuid.uuid4()}")).status_code == 404
    assert (await http.get("/api/sessions/not-a-uuid")).status_code == 400
    assert (await http.get(f"/api/sessions/{uuid.uuid4()}/events?after_event_id=x")).status_code == 400
    after = (await scrape(server.url)).by_label("realtime_refusals_total", "code")
    assert after["not_found"] == before["not_found"] + 1
    assert after["invalid_session_id"] == before["invalid_session_id"] + 1
    assert after["invalid_payload"] == before["invalid_payload"] + 1


async def test_cors_origins_star_allows_every_origin(start_server) -> None:  # type: ignore[no-untyped-def]
    server = await start_server(cors_origins="*")
    async with httpx.AsyncClient(base_url=server.url) as client:
        handshake = await client.get("/socket.io/?EIO=4&transport=polling", headers={"Origin": "https://any.example"})
        assert handshake.status_code == 200
        assert (await client.get("/healthz", headers={"Origin": "https://any.example"})).headers[
            "access-control-allow-origin"
        ] in {"*", "https://any.example"}
