"""OpenTelemetry traces (docs/protocol.md, Traces): the real SDK and OTLP/HTTP exporter in the
running server, sending to a local receiver that decodes what a collector would get."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from tests.conftest import ServerFactory, TabFactory
from tests.fake_gemini import FakeGemini, error_reply, text_chunk, usage
from tests.fake_gemini import Reply as GeminiReply
from tests.fake_openai import FakeOpenAI
from tests.fake_otlp import FakeOtlp, ReceivedSpan
from tests.harness import RunningServer, Tab, logged_server
from tests.test_mcp import servers_file
from tests.test_tool_approval import decide, request_of

TURN = "invoke_agent realtime"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


async def traced(start_server: ServerFactory, receiver: FakeOtlp, **settings: Any) -> RunningServer:
    return await start_server(otel_exporter_otlp_endpoint=receiver.url, offline_chunk_delay_ms=0, **settings)


async def one_turn(tab: Tab, text: str, **message: Any) -> tuple[str, str, list[tuple[str, dict[str, Any]]]]:
    sid = (await tab.join())["session"]["session_id"]
    ack = await tab.call("message", {"session_id": sid, "text": text, **message})
    assert ack["ok"], ack
    return sid, ack["turn_id"], await tab.turn(ack["turn_id"])


async def turn_span(receiver: FakeOtlp, turn_id: str) -> ReceivedSpan:
    async with asyncio.timeout(10):
        while True:
            found = [s for s in await receiver.wait_for(TURN) if s.attributes["realtime.turn.id"] == turn_id]
            if found:
                return found[0]
            await asyncio.sleep(0.05)


async def test_a_turn_with_a_tool_call_is_a_span_with_its_model_requests_tool_and_writes_beneath(
    fake_otlp: FakeOtlp, start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await traced(start_server, fake_otlp)
    tab = await connect(server)
    sid, turn_id, events = await one_turn(tab, "How's the weather in Delhi?", traceparent=TRACEPARENT)
    call_id = next(data["call_id"] for name, data in events if name == "tool_call")
    done = events[-1][1]

    turn = await turn_span(fake_otlp, turn_id)
    assert (turn.trace_id, turn.parent_span_id, turn.kind, turn.error) == (TRACE_ID, PARENT_ID, "internal", False)
    assert turn.resource["service.name"] == "realtime-ai-backend"
    assert {k: turn.attributes[k] for k in turn.attributes if not k.startswith("gen_ai.usage")} == {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": "realtime",
        "gen_ai.conversation.id": sid,
        "realtime.turn.id": turn_id,
        "gen_ai.provider.name": "offline",
        "gen_ai.request.model": "offline",
        "gen_ai.response.finish_reasons": ["stop"],
    }
    assert turn.attributes["gen_ai.usage.output_tokens"] == done["usage"]["output_tokens"]

    beneath = fake_otlp.children(turn)
    requests = [s for s in beneath if s.name == "chat offline" and "realtime.request.purpose" not in s.attributes]
    assert len(requests) == 2  # the round that asked for the tool, then the answer (a title may follow)
    for request in requests:
        assert request.kind == "client" and request.trace_id == TRACE_ID and not request.error
        assert request.attributes["gen_ai.operation.name"] == "chat"
        assert request.attributes["gen_ai.provider.name"] == "offline"
        assert request.attributes["gen_ai.response.finish_reasons"] == ["stop"]
        assert request.attributes["gen_ai.usage.input_tokens"] > 0
    [tool] = [s for s in beneath if s.name == "execute_tool get_weather"]
    assert tool.attributes == {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "get_weather",
        "gen_ai.tool.call.id": call_id,
        "gen_ai.tool.type": "function",
    }
    writes = [s for s in beneath if s.name == "storage append_event"]
    assert len(writes) >= 4  # the user message, the tool call, its result, the answer
    assert all(w.kind == "client" and w.attributes["db.system.name"] == "sqlite" for w in writes)
    # Content is off unless asked: no text anyone wrote is on any span.
    assert not any("Delhi" in json.dumps(span.attributes) for span in fake_otlp.spans)


async def test_a_trace_from_the_socketio_auth_or_a_message_and_an_invalid_one_starts_anew(
    fake_otlp: FakeOtlp, start_server: ServerFactory
) -> None:
    server = await traced(start_server, fake_otlp)
    other_trace = uuid.uuid4().hex
    tab = await Tab(server.url).connect(auth={"traceparent": f"00-{other_trace}-{PARENT_ID}-01"})
    try:
        _, from_auth, _ = await one_turn(tab, "hello")
        _, from_message, _ = await one_turn(tab, "hello again", traceparent=TRACEPARENT, tracestate="vendor=1")
        _, invalid, _ = await one_turn(tab, "and again", traceparent="00-not-a-trace-01")
    finally:
        await tab.close()
    assert (await turn_span(fake_otlp, from_auth)).trace_id == other_trace
    assert (await turn_span(fake_otlp, from_message)).trace_id == TRACE_ID  # the message's wins
    fresh = await turn_span(fake_otlp, invalid)
    assert fresh.parent_span_id == "" and fresh.trace_id not in (TRACE_ID, other_trace)
    refused = await Tab(server.url).connect()
    try:
        sid = (await refused.join())["session"]["session_id"]
        ack = await refused.call("message", {"session_id": sid, "text": "x", "traceparent": 5})
        assert ack["error"]["code"] == "invalid_payload"
    finally:
        await refused.close()


async def test_a_plain_websocket_handshake_header_continues_a_trace(
    fake_otlp: FakeOtlp, start_server: ServerFactory
) -> None:
    server = await traced(start_server, fake_otlp)
    url = server.url.replace("http://", "ws://") + f"/ws/session/{uuid.uuid4()}"
    async with connect(url, additional_headers={"traceparent": TRACEPARENT}) as ws:
        assert json.loads(await ws.recv())["event"] == "session"
        await ws.send("hello over the plain socket")
        while (frame := json.loads(await ws.recv()))["event"] != "done":
            turn_id = frame["data"].get("turn_id", None) if isinstance(frame["data"], dict) else None
    assert turn_id is not None
    turn = await turn_span(fake_otlp, frame["data"]["turn_id"])
    assert (turn.trace_id, turn.parent_span_id) == (TRACE_ID, PARENT_ID)


async def test_gemini_requests_are_client_spans_one_per_request_with_its_retries_inside(
    fake_otlp: FakeOtlp, fake_gemini: FakeGemini, start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await traced(
        start_server,
        fake_otlp,
        llm_provider="gemini",
        gemini_api_key="k",
        gemini_model="gemini-test",
        gemini_base_url=fake_gemini.url,
        gemini_retry_initial_seconds=0.01,
        gemini_retry_attempts=2,
    )
    fake_gemini.stream(GeminiReply(events=[text_chunk("Hi there.", "STOP", usage(7, 3))]))
    tab = await connect(server)
    _, ok_turn, _ = await one_turn(tab, "hello")
    fake_gemini.stream(error_reply(503, "UNAVAILABLE"), error_reply(503, "UNAVAILABLE"))
    _, failed_turn, events = await one_turn(tab, "again")
    assert events[-1][1]["error"]["code"] == "provider_unavailable"

    [ok] = [
        s
        for s in fake_otlp.children(await turn_span(fake_otlp, ok_turn))
        if s.name.startswith("generate") and "realtime.request.purpose" not in s.attributes
    ]
    host = fake_gemini.url.split("//")[1].split(":")
    assert (ok.name, ok.kind, ok.error) == ("generate_content gemini-test", "client", False)
    assert {k: ok.attributes[k] for k in ok.attributes if k != "gen_ai.usage.output_tokens"} == {
        "gen_ai.operation.name": "generate_content",
        "gen_ai.provider.name": "gcp.gemini",
        "gen_ai.request.model": "gemini-test",
        "server.address": host[0],
        "server.port": int(host[1]),
        "gen_ai.response.finish_reasons": ["stop"],
        "gen_ai.usage.input_tokens": 7,
    }
    failed = await turn_span(fake_otlp, failed_turn)
    assert failed.error and failed.attributes["error.type"] == "provider_unavailable"
    assert failed.attributes["gen_ai.response.finish_reasons"] == ["error"]
    [request] = [
        s
        for s in fake_otlp.children(failed)
        if s.name.startswith("generate") and "realtime.request.purpose" not in s.attributes
    ]
    assert request.error and request.attributes["error.type"] == "provider_unavailable"
    assert len(fake_gemini.calls()) == 3  # two attempts of the failed request inside its one span


async def test_content_when_asked_and_summaries_titles_as_their_own_model_spans(
    fake_otlp: FakeOtlp, fake_openai: FakeOpenAI, start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await traced(
        start_server,
        fake_otlp,
        llm_provider="openai",
        openai_base_url=f"{fake_openai.url}/v1",
        openai_model="m",
        otel_instrumentation_genai_capture_message_content=True,
        summary_delay_seconds=0.05,
    )
    tab = await connect(server)
    _, turn_id, _ = await one_turn(tab, "Tell me about the sea")
    await tab.close()
    beneath = fake_otlp.children(await turn_span(fake_otlp, turn_id))
    [request] = [s for s in beneath if s.name == "chat m" and "realtime.request.purpose" not in s.attributes]
    inputs = json.loads(request.attributes["gen_ai.input.messages"])
    assert inputs[-1] == {"role": "user", "parts": [{"type": "text", "content": "Tell me about the sea"}]}
    outputs = json.loads(request.attributes["gen_ai.output.messages"])
    assert outputs == [{"role": "assistant", "parts": [{"type": "text", "content": "Hi."}]}]
    purposes = {s.attributes.get("realtime.request.purpose") for s in await fake_otlp.wait_for("chat m", 3)}
    assert purposes == {None, "title", "summary"}
    summary = next(s for s in fake_otlp.named("chat m") if s.attributes.get("realtime.request.purpose") == "summary")
    assert summary.parent_span_id == ""  # a job of its own, after the last tab left


async def test_json_log_lines_within_a_span_carry_its_trace_and_span_ids(tmp_path: Path, fake_otlp: FakeOtlp) -> None:
    async with logged_server(
        tmp_path,
        LOG_FORMAT="json",
        OTEL_EXPORTER_OTLP_ENDPOINT=fake_otlp.url,
        OTEL_BSP_SCHEDULE_DELAY="100",
        WEATHER_GEOCODING_URL="http://127.0.0.1:9",
        OFFLINE_CHUNK_DELAY_MS="0",
    ) as (process, url, log_path):
        tab = await Tab(url).connect()
        try:
            _, turn_id, _ = await one_turn(tab, "How's the weather in Oslo?", traceparent=TRACEPARENT)
        finally:
            await tab.close()
        [tool] = await fake_otlp.wait_for("execute_tool get_weather")
        process.send_signal(signal.SIGTERM)
        await process.wait()
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    [warning] = [r for r in records if r["message"].startswith("tool get_weather failed")]
    assert (warning["trace_id"], warning["span_id"], warning["turn_id"]) == (TRACE_ID, tool.span_id, turn_id)
    assert tool.error and tool.attributes["error.type"] == "weather_unavailable"


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"])
async def test_either_endpoint_variable_turns_tracing_on_and_the_sdk_reads_the_others_even_from_dotenv(
    tmp_path: Path, fake_otlp: FakeOtlp, variable: str
) -> None:
    endpoint = fake_otlp.url + ("/v1/traces" if variable.endswith("TRACES_ENDPOINT") else "")
    headers = "authorization=Bearer collector-key"
    # One run with the SDK's own variables in the environment, the other with them in `.env`.
    in_dotenv = variable == "OTEL_EXPORTER_OTLP_ENDPOINT"
    sdk_variables = {"OTEL_SERVICE_NAME": "chat-edge", "OTEL_EXPORTER_OTLP_HEADERS": headers}
    if in_dotenv:
        (tmp_path / ".env").write_text("".join(f"{name}={value}\n" for name, value in sdk_variables.items()))
    async with logged_server(
        tmp_path,
        **{variable: endpoint},
        OTEL_BSP_SCHEDULE_DELAY="100",
        OFFLINE_CHUNK_DELAY_MS="0",
        **({} if in_dotenv else sdk_variables),
    ) as (_process, url, _log):
        tab = await Tab(url).connect()
        try:
            await one_turn(tab, "hello")
        finally:
            await tab.close()
        [turn] = await fake_otlp.wait_for(TURN)
    assert turn.resource["service.name"] == "chat-edge"
    assert fake_otlp.requests[0]["authorization"] == "Bearer collector-key"


async def test_an_mcp_call_that_waited_for_approval_names_its_server_and_the_decision(
    fake_otlp: FakeOtlp, tmp_path: Path, start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await traced(start_server, fake_otlp, mcp_servers_file=servers_file(tmp_path), tool_approval="local__*")
    tab = await connect(server)
    sid = (await tab.join())["session"]["session_id"]
    ack = await tab.call("message", {"session_id": sid, "text": 'use local__echo with {"text": "hi"}'})
    request = await request_of(tab, ack["turn_id"])
    assert (await decide(tab, sid, request["call_id"], approved=True))["ok"]
    assert (await tab.turn(ack["turn_id"]))[-1][1]["error"] is None
    [tool] = await fake_otlp.wait_for("execute_tool local__echo")
    assert tool.attributes["realtime.mcp.server"] == "local"
    assert tool.attributes["realtime.tool.approval"] == "approved"
    assert tool.attributes["gen_ai.tool.call.id"] == request["call_id"] and not tool.error
    assert tool.parent_span_id == (await turn_span(fake_otlp, ack["turn_id"])).span_id
