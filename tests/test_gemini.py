"""Gemini as the model: the real google-genai SDK against a local server speaking Gemini's REST API."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerFactory, TabFactory
from tests.fake_gemini import (
    HANG,
    FakeGemini,
    Pause,
    Reply,
    call_part,
    chunk,
    error_reply,
    signature_bytes,
    text_chunk,
    text_response,
    usage,
)
from tests.harness import RunningServer, Tab, hanging_up, wait_for_summary
from tests.test_metrics import scrape

KEY = "test-gemini-key"
MODEL = "gemini-test-flash"
# Real signatures are opaque base64; this one has '+' and '/' so an alphabet change would show.
SIGNATURE = "Cr4BAb4+9vv/Aa7pIo+dPq9u0mA/kEYk3Zs2fW8xR0h1ZGhxYzZ0L2V4YW1wbGU="
SIGNATURE_2 = "++//c2Vjb25kIHRob3VnaHQgc2lnbmF0dXJl/v8="


@pytest.fixture
def fake(fake_gemini: FakeGemini) -> FakeGemini:
    return fake_gemini


@pytest.fixture
def start_gemini(fake: FakeGemini, start_server: ServerFactory) -> ServerFactory:
    # `fake` first: it is set up before and torn down after the servers that call it.
    async def start(**overrides: Any) -> RunningServer:
        settings: dict[str, Any] = {
            "llm_provider": "gemini",
            "gemini_api_key": KEY,
            "gemini_model": MODEL,
            "gemini_base_url": fake.url,
            "gemini_retry_initial_seconds": 0.01,
            "gemini_timeout_seconds": 10,
        }
        settings.update(overrides)
        return await start_server(**settings)

    return start


async def ask(tab: Tab, sid: str, text: str) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    ack = await tab.call("message", {"session_id": sid, "text": text})
    assert ack["ok"], ack
    events = await tab.turn(ack["turn_id"])
    done = events[-1]
    assert done[0] == "done"
    return done[1], events


async def open_session(server: RunningServer, connect: TabFactory) -> tuple[Tab, str]:
    tab = await connect(server)
    return tab, (await tab.join())["session"]["session_id"]


def names(events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [name for name, _ in events]


# ---------------------------------------------------------------------------------------------- streaming


async def test_text_streams_as_chunks_with_usage(
    start_gemini: ServerFactory, fake: FakeGemini, connect: TabFactory
) -> None:
    fake.stream(
        Reply(
            events=[
                text_chunk("Hel", meta=usage(7, 1)),
                text_chunk("lo, "),
                chunk(
                    [{"text": "world."}, {"text": "", "thoughtSignature": SIGNATURE}], "STOP", usage(7, 4, thoughts=5)
                ),
            ]
        )
    )
    server = await start_gemini()
    tab, sid = await open_session(server, connect)
    done, events = await ask(tab, sid, "Say hello")

    assert [d["text"] for n, d in events if n == "chunk"] == ["Hel", "lo, ", "world."]
    assert [d["index"] for n, d in events if n == "chunk"] == [0, 1, 2]
    assert done["text"] == "Hello, world." and done["finish_reason"] == "stop" and done["error"] is None
    # usageMetadata is cumulative: the last one counts; thinking tokens are billed as output.
    assert done["usage"] == {"input_tokens": 7, "output_tokens": 9}

    (request,) = fake.requests
    assert request.method == "streamGenerateContent" and request.query == {"alt": "sse"}
    assert request.version == "v1beta" and request.model == MODEL
    assert request.headers["x-goog-api-key"] == KEY
    assert request.contents == [{"role": "user", "parts": [{"text": "Say hello"}]}]
    assert "concisely" in request.body["systemInstruction"]["parts"][0]["text"]
    (declaration,) = request.body["tools"][0]["functionDeclarations"]
    assert declaration["name"] == "get_weather" and "location" in json.dumps(declaration)

    stored = await server.runtime.repo.list_events(sid)
    assert [(e.event_type.value, e.content) for e in stored] == [
        ("user_message", "Say hello"),
        ("ai_message", "Hello, world."),
    ]


async def test_the_v1_api_and_a_system_prompt_file(
    start_gemini: ServerFactory, fake: FakeGemini, connect: TabFactory, tmp_path: Path
) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("You are a pirate.", encoding="utf-8")
    server = await start_gemini(gemini_api_version="v1", gemini_system_prompt_file=prompt)
    tab, sid = await open_session(server, connect)
    done, _ = await ask(tab, sid, "Hi")
    assert done["text"] == "Hi."
    (request,) = fake.requests
    assert request.version == "v1"
    assert request.body["systemInstruction"]["parts"] == [{"text": "You are a pirate."}]


@pytest.mark.parametrize(
    ("gemini_reason", "finish_reason"),
    [("MAX_TOKENS", "max_tokens"), ("SAFETY", "safety"), ("RECITATION", "safety"), ("PROHIBITED_CONTENT", "safety")],
)
async def test_finish_reasons_map_to_the_protocol(
    start_gemini: ServerFactory, fake: FakeGemini, connect: TabFactory, gemini_reason: str, finish_reason: str
) -> None:
    fake.stream(Reply(events=[text_chunk("Part of "), text_chunk("it", gemini_reason, usage(3, 2))]))
    server = await start_gemini()
    tab, sid = await open_session(server, connect)
    done, _ = await ask(tab, sid, "Go on")
    assert (done["finish_reason"], done["text"], done["error"]) == (finish_reason, "Part of it", None)
    assert done["usage"] == {"input_tokens": 3, "output_tokens": 2}


async def test_a_blocked_prompt_is_safety(start_gemini: ServerFactory, fake: FakeGemini, connect: TabFactory) -> None:
    fake.stream(Reply(events=[{"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": usage(4, 0)}]))
    server = await start_gemini()
    tab, sid = await open_session(server, connect)
    done, events = await ask(tab, sid, "Something blocked")
    assert names(events) == ["user_message", "done"]
    assert (done["finish_reason"], done["text"]) == ("safety", "")


async def test_an_abnormal_finish_is_an_error(
    start_gemini: ServerFactory, fake: FakeGemini, connect: TabFactory
) -> None:
    fake.stream(Reply(events=[text_chunk("Calling", "MALFORMED_FUNCTION_CALL")]))
    server = await start_gemini()
    tab, sid = await open_session(server, connect)
    done, _ = await ask(tab, sid, "Weather?")
    assert done["finish_reason"] == "error" and done["text"] == "Calling"
    assert done["error"] == {"code": "provider_error", "message": "the model stopped with MALFORMED_FUNCTION_CALL"}


# ---------------------------------------------------------------------------------------------- tools


async def test_a_function_call_round_trip_keeps_the_thought_signature(
    start_gemini: ServerFactory, fake: FakeGemini, connect: TabFactory
) -> None:
    fake.stream(
        Reply(
            events=[
                text_chunk("Let me check. ", meta=usage(20, 3)),
                chunk([call_part("get_weather", {"location": "Paris"}, "fc-1", SIGNATURE)], "STOP", usage(20, 9)),
            ]
        ),
        Reply(events=[text_chunk("It is mainly clear in Paris.", "STOP", usage(40, 7))]),
    )
    server = await start_gemini()
    tab, sid = await open_session(server, connect)
    done, events = await ask(tab, sid, "Weather in Paris?")

    assert names(events) == ["user_message", "chunk", "tool_call", "tool_result", "chunk", "done"]
    call, result = events[2][1], events[3][1]
    assert (call["call_id"], call["name"], call["args"]) == ("fc-1", "get_weather", {"location": "Paris"})
    assert result["call_id"] == "fc-1" and result["error"] is None and result["result"]["location"] == "Paris"
    assert done["text"] == "Let me check. It is mainly clear in Paris."
    assert done["usage"] == {"input_tokens": 60, "output_tokens": 16}  # summed over both requests

    first, second = fake.requests
    assert second.contents[0] == first.contents[0] == {"role": "user", "parts": [{"text": "Weather in Paris?"}]}
    model, response = second.contents[1], second.contents[2]
    assert model["role"] == "model" and model["parts"][0] == {"text": "Let me check. "}
    sent_call = model["parts"][1]
    assert sent_call["functionCall"] == {"id": "fc-1", "name": "get_weather", "args": {"location": "Paris"}}
    assert signature_bytes(sent_call["thoughtSignature"]) == signature_bytes(SIGNATURE)
    assert response["role"] == "user"
    (fr,) = response["parts"]
    assert fr["functionResponse"]["id"] == "fc-1" and fr["functionResponse"]["name"] == "get_weather"
    assert fr["functionResponse"]["response"]["output"] == result["result"]

    stored = await server.runtime.repo.list_events(sid)
    assert [e.event_type.value for e in stored] == ["user_message", "tool_call", "tool_result", "ai_message"]
    content = json.loads(stored[1].content)
    assert content["call_id"] == "fc-1" and content["text_offset"] == len("Let me check. ")
    assert content["provider_data"]["gemini_part"] == {
        "functionCall": {"id": "fc-1", "name": "get_weather", "args": {"location": "Paris"}},
        "thoughtSignature": SIGNATURE,  # as Gemini sent it
    }


async def test_two_rounds_with_parallel_calls(
    start_gemini: ServerFactory, fake: FakeGemini, connect: TabFactory
) -> None:
    fake.stream(
        Reply(
            events=[
                chunk(
                    [
                        call_part("get_weather", {"location": "Paris"}, signature=SIGNATURE),
                        call_part("get_weather", {"location": "Delhi"}),
                    ],
                    "STOP",
                    usage(10, 5),
                )
            ]
        ),
        Reply(events=[chunk([call_part("get_weather", {"location": "Atlantis"}, signature=SIGNATURE_2)], "STOP")]),
        Reply(events=[text_chunk("Paris and Delhi are clear; Atlantis is unknown.", "STOP", usage(30, 9))]),
    )
    server = await start_gemini()
    tab, sid = await open_session(server, connect)
    done, events = await ask(tab, sid, "Compare Paris, Delhi and Atlantis")

    assert names(events) == [
        "user_message",
        *["tool_call", "tool_call", "tool_result", "tool_result"],
        *["tool_call", "tool_result"],
        "chunk",
        "done",
    ]
    calls = [d for n, d in events if n == "tool_call"]
    assert len({c["call_id"] for c in calls}) == 3  # Gemini sent no ids: the server made unique ones
    atlantis = [d for n, d in events if n == "tool_result"][-1]
    assert atlantis["error"]["code"] == "unknown_location"
    assert done["finish_reason"] == "stop" and done["usage"] == {"input_tokens": 40, "output_tokens": 14}

    third = fake.requests[2].contents
    assert [c["role"] for c in third] == ["user", "model", "user", "model", "user"]
    parallel = third[1]["parts"]
    assert [p["functionCall"]["args"]["location"] for p in parallel] == ["Paris", "Delhi"]
    assert signature_bytes(parallel[0]["thoughtSignature"]) == signature_bytes(SIGNATURE)
    assert "thoughtSignature" not in parallel[1] and "id" not in parallel[0]["functionCall"]
    assert [p["functionResponse"]["name"] for p in third[2]["parts"]] == ["get_weather", "get_weather"]
    assert "id" not in third[2]["parts"][0]["functionResponse"]  # no id came, none goes back
    assert signature_bytes(third[3]["parts"][0]["thoughtSignature"]) == signature_bytes(SIGNATURE_2)
    assert third[4]["parts"][0]["functionResponse"]["response"]["error"]["code"] == "unknown_location"


async def test_history_is_rebuilt_from_storage_after_a_restart(
    start_gemini: ServerFactory, fake: FakeGemini, connect: TabFactory, tmp_path: Path
) -> None:
    database = tmp_path / "kept.db"
    fake.stream(
        Reply(
            events=[
                text_chunk("Checking. "),
                chunk([call_part("get_weather", {"location": "Delhi"}, "fc-9", SIGNATURE)], "STOP"),
            ]
        ),
        Reply(events=[text_chunk("Delhi is clear.", "STOP")]),
    )
    first = await start_gemini(sqlite_path=database)
    tab, sid = await open_session(first, connect)
    await ask(tab, sid, "Weather in Delhi?")
    in_turn_request = fake.calls()[1].contents
    await tab.close()
    await first.stop()

    fake.stream(Reply(events=[text_chunk("You asked about Delhi.", "STOP")]))
    second = await start_gemini(sqlite_path=database)
    tab, _ = await open_session(second, connect)
    await tab.join(sid)
    done, _ = await ask(tab, sid, "What did I ask?")
    assert done["text"] == "You asked about Delhi."

    rebuilt = fake.calls()[2].contents
    # Exactly what the model saw during the first turn, then its answer, then the new message.
    assert rebuilt[:3] == in_turn_request
    assert rebuilt[3:] == [
        {"role": "model", "parts": [{"text": "Delhi is clear."}]},
        {"role": "user", "parts": [{"text": "What did I ask?"}]},
    ]
    assert signature_bytes(rebuilt[1]["parts"][1]["thoughtSignature"]) == signature_bytes(SIGNATURE)


# ---------------------------------------------------------------------------------------------- failures


async def test_429_and_503_are_retried_honouring_the_retry_delay(
    start_gemini: ServerFactory, fake: FakeGemini, connect: TabFactory
) -> None:
    fake.stream(
        error_reply(429, "RESOURCE_EXHAUSTED", retry_delay="0.4s"),
        error_reply(503, "UNAVAILABLE"),
        Reply(events=[text_chunk("Third time lucky.", "STOP")]),
    )
    server = await start_gemini()
    tab, sid = await open_session(server, connect)
    done, events = await ask(tab, sid, "Hello?")
    assert (done["text"], done["finish_reason"]) == ("Third time lucky.", "stop")
    assert names(events) == ["user_message", "chunk", "done"]
    assert len(fake.requests) == 3 and fake.requests[0].body == fake.requests[2].body
    assert fake.requests[1].at - fake.requests[0].at >= 0.4  # the API asked for that wait


async def test_a_retry_delay_beyond_the_budget_ends_the_turn_at_once(
    start_gemini: ServerFactory, fake: FakeGemini, connect: TabFactory
) -> None:
    fake.stream(error_reply(429, "RESOURCE_EXHAUSTED", retry_delay="60s"))
    server = await start_gemini(gemini_retry_budget_seconds=5)
    tab, sid = await open_session(server, connect)
    done, _ = await ask(tab, sid, "Hello?")
    assert len(fake.requests) == 1
    assert done["finish_reason"] == "error" and done["text"] == ""
    assert done["error"] == {"code": "provider_rate_limited", "message": "the model is rate limited; try again later"}
    stored = await server.runtime.repo.list_events(sid)
    assert [(e.event_type.value, e.content) for e in stored] == [("user_message", "Hello?"), ("ai_message", "")]


async def test_a_400_is_not_retried(start_gemini: ServerFactory, fake: FakeGemini, connect: TabFactory) -> None:
    fake.stream(error_reply(400, "INVALID_ARGUMENT", "secret internal detail"))
    server = await start_gemini()
    tab, sid = await open_session(server, connect)
    done, _ = await ask(tab, sid, "Hello?")
    assert len(fake.requests) == 1
    assert done["finish_reason"] == "error"
    assert done["error"] == {
        "code": "provider_rejected",
        "message": "the model refused the request (HTTP 400 INVALID_ARGUMENT)",
    }


async def test_retries_stop_after_the_configured_attempts(
    start_gemini: ServerFactory, fake: FakeGemini, connect: TabFactory
) -> None:
    fake.stream(*[error_reply(503, "UNAVAILABLE") for _ in range(3)], Reply(events=[text_chunk("never", "STOP")]))
    server = await start_gemini(gemini_retry_attempts=3)
    tab, sid = await open_session(server, connect)
    done, _ = await ask(tab, sid, "Hello?")
    assert len(fake.requests) == 3
    assert done["error"] == {"code": "provider_unavailable", "message": "the model is unavailable (HTTP 503)"}


async def test_metrics_count_each_retried_attempt_and_each_final_failure(
    start_gemini: ServerFactory, fake: FakeGemini, connect: TabFactory
) -> None:
    fake.stream(
        error_reply(503, "UNAVAILABLE"),
        error_reply(503, "UNAVAILABLE"),
        Reply(events=[text_chunk("Third time lucky.", "STOP", meta=usage(7, 3))]),
        error_reply(400, "INVALID_ARGUMENT"),
    )
    fake.generate(error_reply(400, "INVALID_ARGUMENT"))  # the summary
    server = await start_gemini(summary_delay_seconds=0, summary_retry_seconds=60)
    tab, sid = await open_session(server, connect)
    assert (await ask(tab, sid, "Hello?"))[0]["finish_reason"] == "stop"
    await tab.wait_for(lambda ev: any(n == "session_updated" for n, _ in ev))  # its title: one more request
    assert (await ask(tab, sid, "Again?"))[0]["finish_reason"] == "error"
    metrics = await scrape(server.url)
    requests = metrics.by_label("realtime_provider_requests_total", "outcome")
    assert requests == {"ok": 2, "retried": 2, "error": 1}
    assert metrics.by_label("realtime_turns_total", "finish_reason")["error"] == 1
    assert metrics.by_label("realtime_tokens_total", "direction") == {"input": 7, "output": 3}

    await tab.close()
    async with asyncio.timeout(10):
        while (await scrape(server.url)).value("realtime_summaries_total", outcome="error") < 1:
            await asyncio.sleep(0.05)
    metrics = await scrape(server.url)
    assert metrics.by_label("realtime_summaries_total", "outcome") == {"ok": 0, "error": 1}
    assert metrics.by_label("realtime_provider_requests_total", "outcome") == {"ok": 2, "retried": 2, "error": 2}


async def test_transport_errors_are_retried(start_gemini: ServerFactory, connect: TabFactory) -> None:
    async with hanging_up() as endpoint:
        server = await start_gemini(gemini_base_url=endpoint.url, gemini_retry_attempts=3)
        tab, sid = await open_session(server, connect)
        done, _ = await ask(tab, sid, "Anyone there?")
    assert endpoint.accepted == 3
    assert done["error"] == {"code": "provider_unavailable", "message": "the model could not be reached"}


async def test_an_error_mid_stream_ends_the_turn_keeping_the_partial_text(
    start_gemini: ServerFactory, fake: FakeGemini, connect: TabFactory
) -> None:
    fake.stream(
        Reply(
            events=[
                text_chunk("Partial "),
                text_chunk("answer"),
                {"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}},
            ]
        )
    )
    server = await start_gemini()
    tab, sid = await open_session(server, connect)
    done, events = await ask(tab, sid, "Tell me")
    assert names(events) == ["user_message", "chunk", "chunk", "done"]
    assert done["finish_reason"] == "error" and done["text"] == "Partial answer"
    assert done["error"]["code"] == "provider_unavailable"
    assert len(fake.requests) == 1  # chunks were out: never retried
    stored = await server.runtime.repo.list_events(sid)
    assert stored[-1].content == "Partial answer" and stored[-1].event_id == done["event_id"]


async def test_a_stream_that_stalls_after_a_chunk_times_out_without_retry(
    start_gemini: ServerFactory, fake: FakeGemini, connect: TabFactory
) -> None:
    fake.stream(Reply(events=[text_chunk("Slow "), Pause(5), text_chunk("never")]))
    server = await start_gemini(gemini_timeout_seconds=0.5)
    tab, sid = await open_session(server, connect)
    done, _ = await ask(tab, sid, "Tell me")
    assert (done["finish_reason"], done["text"]) == ("error", "Slow ")
    assert done["error"] == {"code": "provider_timeout", "message": "the model did not answer in time"}
    assert len(fake.requests) == 1


async def test_cancel_closes_the_upstream_stream(
    start_gemini: ServerFactory, fake: FakeGemini, connect: TabFactory
) -> None:
    fake.stream(Reply(events=[text_chunk("Thinking about it "), HANG]))
    server = await start_gemini()
    tab, sid = await open_session(server, connect)
    ack = await tab.call("message", {"session_id": sid, "text": "Long story please"})
    await tab.wait_for(lambda ev: any(n == "chunk" for n, _ in ev))
    assert fake.hung_up == 0
    assert (await tab.call("cancel", {"session_id": sid}))["ok"]
    done = (await tab.turn(ack["turn_id"]))[-1][1]
    assert (done["finish_reason"], done["text"]) == ("cancelled", "Thinking about it ")
    await asyncio.wait_for(fake.hang_ups.wait(), 5)  # the fake saw the connection close
    assert fake.hung_up == 1


# ---------------------------------------------------------------------------------------------- summaries, readiness


async def test_the_summary_comes_from_gemini(
    start_gemini: ServerFactory, fake: FakeGemini, connect: TabFactory
) -> None:
    fake.generate(Reply(body=text_response("The user greeted the assistant.")))
    server = await start_gemini(summary_delay_seconds=0.05)
    tab, sid = await open_session(server, connect)
    await ask(tab, sid, "Good morning")
    await tab.call("leave", {"session_id": sid})
    session = await wait_for_summary(server, sid)
    assert session.summary == "The user greeted the assistant."

    (request,) = fake.calls("generateContent")
    assert request.model == MODEL and request.headers["x-goog-api-key"] == KEY
    prompt = request.contents[0]["parts"][0]["text"]
    assert "User: Good morning" in prompt and "Assistant: Hi." in prompt
    assert "Summarise" in request.body["systemInstruction"]["parts"][0]["text"]


async def test_a_session_whose_tool_failed_is_summarised(
    start_gemini: ServerFactory, fake: FakeGemini, connect: TabFactory
) -> None:
    fake.stream(
        Reply(events=[chunk([call_part("get_weather", {"location": "Atlantis"}, "fc-1")], "STOP")]),
        Reply(events=[text_chunk("No such place.", "STOP")]),
    )
    fake.generate(Reply(body=text_response("The user asked about a place that does not exist.")))
    server = await start_gemini(summary_delay_seconds=0.05)
    tab, sid = await open_session(server, connect)
    _, events = await ask(tab, sid, "Weather in Atlantis?")
    assert [d["error"]["code"] for n, d in events if n == "tool_result"] == ["unknown_location"]
    await tab.call("leave", {"session_id": sid})
    session = await wait_for_summary(server, sid)
    assert session.summary == "The user asked about a place that does not exist."
    prompt = fake.calls("generateContent")[0].contents[0]["parts"][0]["text"]
    assert 'Tool result get_weather: {"code": "unknown_location"' in prompt


async def test_a_failed_summary_is_retried_later(
    start_gemini: ServerFactory, fake: FakeGemini, connect: TabFactory
) -> None:
    fake.generate(
        error_reply(400, "FAILED_PRECONDITION"),  # not retried within the request
        Reply(body=text_response("Summary after a retry.")),
    )
    server = await start_gemini(summary_delay_seconds=0.05, summary_retry_seconds=0.2)
    tab, sid = await open_session(server, connect)
    await ask(tab, sid, "Hello")
    await tab.call("leave", {"session_id": sid})
    session = await wait_for_summary(server, sid)
    assert session.summary == "Summary after a retry."
    first, second = fake.calls("generateContent")
    assert second.at - first.at >= 0.2 and first.body == second.body


async def test_summary_retries_wait_twice_as_long_each_time_with_one_line_per_failure(
    start_gemini: ServerFactory, fake: FakeGemini, connect: TabFactory, caplog: pytest.LogCaptureFixture
) -> None:
    fake.generate(
        error_reply(400, "FAILED_PRECONDITION"),
        error_reply(400, "FAILED_PRECONDITION"),
        Reply(body=text_response("Summary at the third attempt.")),
    )
    server = await start_gemini(summary_delay_seconds=0.05, summary_retry_seconds=0.2)
    tab, sid = await open_session(server, connect)
    await ask(tab, sid, "Hello")
    with caplog.at_level(logging.WARNING, logger="server.core.summaries"):
        await tab.call("leave", {"session_id": sid})
        session = await wait_for_summary(server, sid)
    assert session.summary == "Summary at the third attempt."
    first, second, third = fake.calls("generateContent")
    assert second.at - first.at >= 0.2 and third.at - second.at >= 0.4
    failures = [r for r in caplog.records if r.name == "server.core.summaries"]
    assert [r.getMessage().split("; ")[1] for r in failures] == ["trying again in 0.2 s", "trying again in 0.4 s"]
    assert "(attempt 1, provider_rejected" in failures[0].getMessage()
    assert "(attempt 2, provider_rejected" in failures[1].getMessage()
    assert not any(r.exc_info for r in failures)  # a provider's failure is expected: no traceback


async def test_a_rejoin_while_a_failed_summary_waits_to_retry_cancels_it(
    start_gemini: ServerFactory, fake: FakeGemini, connect: TabFactory, caplog: pytest.LogCaptureFixture
) -> None:
    fake.generate(error_reply(400, "FAILED_PRECONDITION"), Reply(body=text_response("After the second leave.")))
    server = await start_gemini(summary_delay_seconds=0.05, summary_retry_seconds=1)
    tab, sid = await open_session(server, connect)
    await ask(tab, sid, "Hello")
    await tab.call("leave", {"session_id": sid})
    async with asyncio.timeout(10):
        while not fake.calls("generateContent"):
            await asyncio.sleep(0.02)
    await tab.join(sid)  # while the failed summary waits its second to retry
    await asyncio.sleep(1.5)
    assert len(fake.calls("generateContent")) == 1
    await tab.call("leave", {"session_id": sid})
    session = await wait_for_summary(server, sid)
    assert session.summary == "After the second leave."
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_readiness_needs_an_api_key_but_no_model_call(
    start_server: ServerFactory, fake: FakeGemini, connect: TabFactory
) -> None:
    keyless = await start_server(llm_provider="gemini", gemini_base_url=fake.url)
    keyed = await start_server(llm_provider="gemini", gemini_api_key=KEY, gemini_base_url=fake.url)
    async with httpx.AsyncClient(timeout=10) as http:
        refused = await http.get(f"{keyless.url}/readyz")
        ready = await http.get(f"{keyed.url}/readyz")
    assert refused.status_code == 503 and "GEMINI_API_KEY is not set" in refused.text
    assert ready.status_code == 200
    assert fake.requests == []

    tab, sid = await open_session(keyless, connect)
    done, _ = await ask(tab, sid, "Hello?")
    assert done["finish_reason"] == "error" and done["error"]["code"] == "provider_not_configured"


async def test_a_summary_left_undone_by_a_stopped_server_is_made_after_its_restart(
    start_gemini: ServerFactory, fake: FakeGemini, connect: TabFactory, tmp_path: Path
) -> None:
    database = tmp_path / "kept.db"
    fake.generate(*[error_reply(400, "FAILED_PRECONDITION") for _ in range(3)])
    first = await start_gemini(sqlite_path=database, summary_delay_seconds=0.05, summary_retry_seconds=60)
    tab, sid = await open_session(first, connect)
    await ask(tab, sid, "Remember me")
    await tab.call("leave", {"session_id": sid})
    async with asyncio.timeout(10):
        while not fake.calls("generateContent"):
            await asyncio.sleep(0.05)
    await tab.close()
    await first.stop()  # the summary failed and waits for a retry that this process will not make

    fake.generate_replies.clear()
    fake.generate(Reply(body=text_response("Made after the restart.")))
    await asyncio.sleep(1.1)  # past the grace period the rescan leaves to jobs still waiting
    second = await start_gemini(sqlite_path=database)
    session = await wait_for_summary(second, sid)
    assert session.summary == "Made after the restart."
    assert await second.runtime.repo.due_summaries(10) == []
