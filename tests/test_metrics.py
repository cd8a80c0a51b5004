"""`GET /metrics` (docs/protocol.md, Metrics), scraped over HTTP and read with prometheus-client's own
parser: every family from the start, and after a known workload every counter moved by exactly
what was done and every gauge saying what is true now."""

from __future__ import annotations

import inspect
import uuid

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from server.core.errors import ErrorCode
from server.metrics import STORAGE_OPERATIONS
from server.storage.measured import MeasuredRepository
from tests.conftest import ServerFactory, TabFactory
from tests.harness import RunningServer, Tab, wait_for_summary
from tests.test_auth import SECRET, refused, token
from tests.test_plain_ws import plain

# The contract's table: family (as the parser names it), type, label names.
FAMILIES: dict[str, tuple[str, set[str]]] = {
    "realtime_connections": ("gauge", {"transport"}),
    "realtime_turns": ("counter", {"finish_reason"}),
    "realtime_turns_running": ("gauge", set()),
    "realtime_chunks": ("counter", set()),
    "realtime_first_chunk_seconds": ("histogram", set()),
    "realtime_tool_calls": ("counter", {"tool", "outcome"}),
    "realtime_refusals": ("counter", {"code"}),
    "realtime_provider_requests": ("counter", {"provider", "outcome"}),
    "realtime_tokens": ("counter", {"direction"}),
    "realtime_storage_seconds": ("histogram", {"operation"}),
    "realtime_queued_events": ("gauge", set()),
    "realtime_summaries": ("counter", {"outcome"}),
    "realtime_titles": ("counter", {"outcome"}),
    "realtime_compactions": ("counter", {"outcome"}),
    "realtime_tool_approvals": ("counter", {"outcome"}),
}
WEATHER = "How's the weather in Delhi?"
STORY = "Tell me a long story about the sea and the ships on it"


class Scrape:
    def __init__(self, text: str) -> None:
        self.families = {family.name: family for family in text_string_to_metric_families(text)}
        self.samples: list[Sample] = [s for family in self.families.values() for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(found) == 1, f"{name}{labels}: {found}"
        return found[0]

    def by_label(self, name: str, label: str) -> dict[str, float]:
        return {s.labels[label]: s.value for s in self.samples if s.name == name}


async def scrape(url: str, **headers: str) -> Scrape:
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.get(f"{url}/metrics", headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return Scrape(answer.text)


def assert_contract_families(metrics: Scrape, tools: set[str]) -> None:
    for name, (kind, labels) in FAMILIES.items():
        family = metrics.families.get(name)
        assert family is not None, f"{name} is missing"
        assert family.type == kind and family.documentation, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == labels, sample
    assert metrics.by_label("realtime_connections", "transport") == {"socketio": 0, "websocket": 0}
    assert set(metrics.by_label("realtime_turns_total", "finish_reason")) == {
        "stop",
        "cancelled",
        "error",
        "max_tokens",
        "safety",
    }
    assert set(metrics.by_label("realtime_refusals_total", "code")) == {code.value for code in ErrorCode}
    assert {s.labels["tool"] for s in metrics.samples if s.name == "realtime_tool_calls_total"} == tools | {"unknown"}
    assert {
        (s.labels["provider"], s.labels["outcome"])
        for s in metrics.samples
        if s.name == "realtime_provider_requests_total"
    } == {("offline", "ok"), ("offline", "retried"), ("offline", "error")}
    assert set(metrics.by_label("realtime_tokens_total", "direction")) == {"input", "output"}
    assert set(metrics.by_label("realtime_summaries_total", "outcome")) == {"ok", "error"}
    assert metrics.by_label("realtime_tool_approvals_total", "outcome") == {"approved": 0, "denied": 0, "timeout": 0}
    assert "append_event" in metrics.by_label("realtime_storage_seconds_count", "operation")


async def test_every_family_is_exported_before_any_traffic(server: RunningServer) -> None:
    metrics = await scrape(server.url)
    assert_contract_families(metrics, tools={"get_weather"})
    assert all(s.value == 0 for s in metrics.samples if not s.name.startswith("realtime_storage_seconds")), [
        s for s in metrics.samples if s.value and not s.name.startswith("realtime_storage_seconds")
    ]


async def _refusals(tab: Tab, session_id: str) -> None:
    """One of each of four codes over Socket.IO."""
    empty = await tab.call("message", {"session_id": session_id, "text": "   "})
    elsewhere = await tab.call("message", {"session_id": str(uuid.uuid4()), "text": "hello"})
    not_a_uuid = await tab.call("join", {"session_id": "not-a-uuid"})
    wrong_type = await tab.call("join", {"session_id": 42})
    codes = [answer["error"]["code"] for answer in (empty, elsewhere, not_a_uuid, wrong_type)]
    assert codes == ["empty_message", "not_joined", "invalid_session_id", "invalid_payload"]


async def test_a_known_workload_moves_every_counter_by_exactly_what_was_done(
    start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await start_server(offline_chunk_delay_ms=15, summary_delay_seconds=0)
    session_id = str(uuid.uuid4())
    first, second = await connect(server), await connect(server)
    await first.join(session_id, user_id="user-metrics-1")
    await second.join(session_id)
    async with plain(server, session_id) as ws:
        await ws.wait_for(lambda f: f[:1])
        metrics = await scrape(server.url)
        assert metrics.by_label("realtime_connections", "transport") == {"socketio": 2, "websocket": 1}

        # A turn with a tool call, then one cancelled after its first chunk.
        weather = await first.call("message", {"session_id": session_id, "text": WEATHER})
        await first.turn(weather["turn_id"])
        story = await first.call("message", {"session_id": session_id, "text": STORY})
        await first.wait_for(lambda ev: any(n == "chunk" and d["turn_id"] == story["turn_id"] for n, d in ev))
        assert (await scrape(server.url)).value("realtime_turns_running") == 1
        busy = await second.call("message", {"session_id": session_id, "text": "me too"})
        assert busy["error"]["code"] == "busy"
        assert (await first.call("cancel", {"session_id": session_id}))["ok"]
        await first.turn(story["turn_id"])
        # Refusals on both transports.
        await _refusals(first, session_id)
        no_turn = await ws.ack('{"event": "cancel"}')
        unknown = await ws.ack('{"event": "dance"}')
        assert [no_turn["error"]["code"], unknown["error"]["code"]] == ["no_active_turn", "invalid_payload"]
        # A plain turn from the plain WebSocket.
        hello = await ws.ack("hello there")
        await first.turn(hello["turn_id"])
        await ws.turn(hello["turn_id"])
        # The session's title, made once after its first answer that ended with `stop`.
        await first.wait_for(lambda ev: any(n == "session_updated" for n, _ in ev))

        metrics = await scrape(server.url)
        turns = metrics.by_label("realtime_turns_total", "finish_reason")
        assert turns == {"stop": 2, "cancelled": 1, "error": 0, "max_tokens": 0, "safety": 0}
        assert metrics.value("realtime_turns_running") == 0
        # Once per chunk, however many tabs got it (three here).
        chunks = first.named("chunk")
        assert len(chunks) == len(second.named("chunk")) == len([n for n, _ in ws.frames if n == "chunk"])
        assert metrics.value("realtime_chunks_total") == len(chunks)
        assert metrics.value("realtime_first_chunk_seconds_count") == 3
        assert 0 < metrics.value("realtime_first_chunk_seconds_sum") < 3
        assert metrics.value("realtime_tool_calls_total", tool="get_weather", outcome="ok") == 1
        assert sum(s.value for s in metrics.samples if s.name == "realtime_tool_calls_total") == 1
        refusals = {code: n for code, n in metrics.by_label("realtime_refusals_total", "code").items() if n}
        assert refusals == {
            "busy": 1,
            "empty_message": 1,
            "not_joined": 1,
            "invalid_session_id": 1,
            "invalid_payload": 2,
            "no_active_turn": 1,
        }
        # The weather turn is two model requests (the tool round, the answer), the others and the
        # title one each.
        assert metrics.value("realtime_provider_requests_total", provider="offline", outcome="ok") == 5
        assert metrics.by_label("realtime_titles_total", "outcome") == {"ok": 1, "error": 0}
        usage = [d["usage"] for d in first.named("done") if d["usage"]]
        for direction in ("input", "output"):
            reported = sum(u[f"{direction}_tokens"] for u in usage)
            assert reported > 0 and metrics.value("realtime_tokens_total", direction=direction) == reported
        async with httpx.AsyncClient(base_url=server.url) as http:
            stored = (await http.get(f"/api/sessions/{session_id}/events")).json()["events"]
        storage = (await scrape(server.url)).by_label("realtime_storage_seconds_count", "operation")
        assert storage["append_event"] == len(stored) == 8  # 3 user messages, 3 answers, a tool call and its result
        assert storage["ensure_session"] == 3  # the three joins
        assert metrics.value("realtime_queued_events") == 0

    await first.close()
    await second.close()
    await wait_for_summary(server, session_id)
    metrics = await scrape(server.url)
    assert metrics.by_label("realtime_connections", "transport") == {"socketio": 0, "websocket": 0}
    assert metrics.by_label("realtime_summaries_total", "outcome") == {"ok": 1, "error": 0}
    assert metrics.value("realtime_provider_requests_total", provider="offline", outcome="ok") == 6  # and the summary
    assert metrics.value("realtime_provider_requests_total", provider="offline", outcome="error") == 0

    # No label carries a session, a turn, a user or any text.
    secret_values = {session_id, weather["turn_id"], story["turn_id"], "user-metrics-1", WEATHER, STORY, "hello there"}
    for sample in metrics.samples:
        assert not secret_values & set(sample.labels.values()), sample
        assert set(sample.labels) <= {
            "transport",
            "finish_reason",
            "tool",
            "outcome",
            "code",
            "provider",
            "direction",
        } | {
            "operation",
            "le",
        }


async def test_a_refused_connection_counts_by_its_code(start_server: ServerFactory) -> None:
    server = await start_server(auth_jwt_secret=SECRET, max_connections_per_address=2)
    assert await refused(server, None) == "unauthorized"
    assert await refused(server, {"token": token(expires_in=-10)}) == "unauthorized"
    metrics = await scrape(server.url)
    assert metrics.value("realtime_refusals_total", code="unauthorized") == 2
    assert metrics.by_label("realtime_connections", "transport") == {"socketio": 0, "websocket": 0}


async def test_metrics_token_guards_the_scrape_and_nothing_else(start_server: ServerFactory) -> None:
    server = await start_server(metrics_token="scrape-me-7f3a")
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "scrape-me-7f3a"}):
            answer = await http.get("/metrics", headers=headers)
            assert answer.status_code == 401, headers
            assert answer.headers["www-authenticate"] == "Bearer"
            assert "realtime_" not in answer.text
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 200
    metrics = await scrape(server.url, Authorization="Bearer scrape-me-7f3a")
    assert_contract_families(metrics, tools={"get_weather"})


def test_every_timed_storage_operation_is_exported_from_the_start() -> None:
    """Each operation `MeasuredRepository` times has its `realtime_storage_seconds` series at 0."""
    timed = {
        name
        for name, member in inspect.getmembers(MeasuredRepository, inspect.iscoroutinefunction)
        if not name.startswith("_") and name != "aclose"
    }
    assert timed == set(STORAGE_OPERATIONS)
