"""OpenAI-compatible endpoints as the model: the real openai SDK against a local server speaking the
Chat Completions wire (tests/fake_openai.py), in every shape the servers in use stream tool calls."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.conftest import ServerFactory, TabFactory
from tests.fake_openai import (
    HANG,
    NULL_INDEX,
    FakeOpenAI,
    Gate,
    Reply,
    call_delta,
    call_reply,
    chunk,
    completion_body,
    error_event,
    error_reply,
    finish_chunk,
    role_chunk,
    text_chunk,
    text_reply,
    tool_calls_chunk,
    usage_chunk,
)
from tests.fakes import open_meteo_app
from tests.harness import RunningServer, Tab, hanging_up, serving, wait_for_summary
from tests.test_metrics import scrape

KEY = "sk-test-openai-key"
ERROR_CLASSES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
}
MODEL = "gpt-test-mini"
Events = list[tuple[str, dict[str, Any]]]


@pytest.fixture
def fake(fake_openai: FakeOpenAI) -> FakeOpenAI:
    return fake_openai


@pytest.fixture
async def weather() -> AsyncIterator[FastAPI]:
    """An Open-Meteo stand-in of this test's own: what the weather tool asked of it is known."""
    app = open_meteo_app()
    async with serving(app) as app.state.url:
        yield app


@pytest.fixture
def start_openai(fake: FakeOpenAI, start_server: ServerFactory) -> ServerFactory:
    # `fake` first: it is set up before and torn down after the servers that call it.
    async def start(**overrides: Any) -> RunningServer:
        settings: dict[str, Any] = {
            "llm_provider": "openai",
            "openai_base_url": f"{fake.url}/v1",
            "openai_api_key": KEY,
            "openai_model": MODEL,
            "openai_retry_initial_seconds": 0.01,
            "openai_timeout_seconds": 10,
        }
        settings.update(overrides)
        return await start_server(**settings)

    return start


async def ask(tab: Tab, sid: str, text: str) -> tuple[dict[str, Any], Events]:
    ack = await tab.call("message", {"session_id": sid, "text": text})
    assert ack["ok"], ack
    events = await tab.turn(ack["turn_id"])
    done = events[-1]
    assert done[0] == "done"
    return done[1], events


async def open_session(server: RunningServer, connect: TabFactory) -> tuple[Tab, str]:
    tab = await connect(server)
    return tab, (await tab.join())["session"]["session_id"]


def names(events: Events) -> list[str]:
    return [name for name, _ in events]


def of(events: Events, name: str) -> list[dict[str, Any]]:
    return [data for event, data in events if event == name]


# ---------------------------------------------------------------------------------------------- streaming


async def test_text_streams_as_it_comes_with_usage_and_the_request_says_what_the_contract_says(
    start_openai: ServerFactory, fake: FakeOpenAI, connect: TabFactory
) -> None:
    gate = Gate()
    fake.stream(
        Reply(
            events=[
                *(role_chunk(), text_chunk("Hel"), gate, text_chunk("lo, "), text_chunk("world.")),
                *(finish_chunk("stop"), usage_chunk(7, 4)),
            ]
        )
    )
    server = await start_openai()
    tab, sid = await open_session(server, connect)
    ack = await tab.call("message", {"session_id": sid, "text": "Say hello"})
    # The first chunk reaches the tab while the endpoint still holds the rest of its answer.
    first = await tab.wait_for(lambda events: [d for n, d in events if n == "chunk"])
    assert first == [{"session_id": sid, "turn_id": ack["turn_id"], "index": 0, "text": "Hel"}]
    gate.opened.set()
    events = await tab.turn(ack["turn_id"])
    done = events[-1][1]
    assert [d["text"] for d in of(events, "chunk")] == ["Hel", "lo, ", "world."]
    assert (done["text"], done["finish_reason"], done["error"]) == ("Hello, world.", "stop", None)
    assert done["usage"] == {"input_tokens": 7, "output_tokens": 4}

    (request,) = fake.requests
    assert request.path == "/v1/chat/completions" and request.authorization == f"Bearer {KEY}"
    assert request.body["model"] == MODEL and request.body["stream"] is True
    assert request.body["stream_options"] == {"include_usage": True}
    system, user = request.messages
    assert system["role"] == "system" and "concisely" in system["content"]
    assert user == {"role": "user", "content": "Say hello"}
    (tool,) = request.tools
    assert tool["type"] == "function" and tool["function"]["name"] == "get_weather"
    assert tool["function"]["parameters"]["properties"]["location"]["type"] == "string"
    assert "max_completion_tokens" not in request.body  # the model's own limit unless one is set

    stored = await server.runtime.repo.list_events(sid)
    assert [(e.event_type.value, e.content) for e in stored] == [
        ("user_message", "Say hello"),
        ("ai_message", "Hello, world."),
    ]


async def test_a_local_server_without_a_key_gets_no_authorization_and_the_prompt_and_cap_set(
    start_openai: ServerFactory, fake: FakeOpenAI, connect: TabFactory, tmp_path: Path
) -> None:
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("You are a pirate.", encoding="utf-8")
    server = await start_openai(openai_api_key="", system_prompt_file=prompt, openai_max_output_tokens=64)
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{server.url}/readyz")).status_code == 200  # no model call, no key needed
    tab, sid = await open_session(server, connect)
    done, _ = await ask(tab, sid, "Hi")
    assert done["text"] == "Hi."
    (request,) = fake.requests
    assert request.authorization is None
    assert request.messages[0] == {"role": "system", "content": "You are a pirate."}
    assert request.body["max_completion_tokens"] == 64


async def test_openai_itself_without_a_key_is_not_ready(start_server: ServerFactory) -> None:
    server = await start_server(llm_provider="openai", openai_model=MODEL)  # the default base URL
    async with httpx.AsyncClient() as http:
        answer = await http.get(f"{server.url}/readyz")
    assert answer.status_code == 503
    assert "OPENAI_API_KEY is not set (api.openai.com needs one)" in answer.text


@pytest.mark.parametrize(
    ("reason", "finish_reason"),
    [("stop", "stop"), ("length", "max_tokens"), ("content_filter", "safety"), ("tool_calls", "stop"), ("eos", "stop")],
)
async def test_finish_reasons_map_to_the_protocol(
    start_openai: ServerFactory, fake: FakeOpenAI, connect: TabFactory, reason: str, finish_reason: str
) -> None:
    fake.stream(Reply(events=[role_chunk(), text_chunk("Part of "), text_chunk("it", reason), usage_chunk(3, 2)]))
    server = await start_openai()
    tab, sid = await open_session(server, connect)
    done, _ = await ask(tab, sid, "Go on")
    assert (done["finish_reason"], done["text"], done["error"]) == (finish_reason, "Part of it", None)
    assert done["usage"] == {"input_tokens": 3, "output_tokens": 2}


async def test_a_refusal_is_shown_and_ends_the_turn_as_safety(
    start_openai: ServerFactory, fake: FakeOpenAI, connect: TabFactory
) -> None:
    fake.stream(Reply(events=[role_chunk(), chunk({"refusal": "I can't help with that."}), finish_chunk("stop")]))
    server = await start_openai()
    tab, sid = await open_session(server, connect)
    done, _ = await ask(tab, sid, "Something refused")
    assert (done["finish_reason"], done["text"]) == ("safety", "I can't help with that.")


async def test_reasoning_is_not_part_of_the_answer_and_an_aborted_one_is_an_error(
    start_openai: ServerFactory, fake: FakeOpenAI, connect: TabFactory
) -> None:
    fake.stream(
        Reply(events=[chunk({"reasoning_content": "Let me think."}), chunk({"reasoning": "Hm."}), text_chunk("42.")]),
        Reply(events=[text_chunk("Cut"), finish_chunk("abort")]),
    )
    server = await start_openai()
    tab, sid = await open_session(server, connect)
    done, events = await ask(tab, sid, "The answer?")
    assert (done["text"], done["finish_reason"]) == ("42.", "stop") and len(of(events, "chunk")) == 1
    done, _ = await ask(tab, sid, "Again?")
    assert (done["finish_reason"], done["text"]) == ("error", "Cut")
    assert done["error"] == {"code": "provider_error", "message": "the model stopped with abort"}


# ---------------------------------------------------------------------------------------------- tool calls

PARIS = '{"location": "Paris"}'
DELHI = '{"location": "Delhi"}'
# Each: what the server streams for one answer calling get_weather for Paris then for Delhi.
TOOL_CALL_SHAPES: dict[str, list[dict[str, Any]]] = {
    # OpenAI: the id and name first, then the arguments in pieces, each piece keyed by index.
    "openai-pieces-by-index": [
        tool_calls_chunk(call_delta(0, "call_p", "get_weather", "")),
        tool_calls_chunk(call_delta(0, arguments='{"loc')),
        tool_calls_chunk(call_delta(0, arguments='ation": "Paris"}')),
        tool_calls_chunk(call_delta(1, "call_d", "get_weather", "")),
        tool_calls_chunk(call_delta(1, arguments=DELHI)),
        finish_chunk("tool_calls"),
    ],
    # Ollama: each call whole in one chunk, no index, both in one delta.
    "ollama-whole-calls-without-index": [
        tool_calls_chunk(
            call_delta(None, "call_p", "get_weather", PARIS), call_delta(None, "call_d", "get_weather", DELHI)
        ),
        finish_chunk("stop"),
    ],
    # An index but never an id (continue#13225): the service makes the ids.
    "index-without-id": [
        tool_calls_chunk(call_delta(0, name="get_weather", arguments='{"location"')),
        tool_calls_chunk(call_delta(0, arguments=': "Paris"}')),
        tool_calls_chunk(call_delta(1, name="get_weather", arguments=DELHI)),
        finish_chunk("tool_calls"),
    ],
    # Index 0 for every parallel call (LiteLLM#33678): a new id at a used index is a new call.
    "index-0-for-every-call": [
        tool_calls_chunk(call_delta(0, "call_p", "get_weather", '{"location":')),
        tool_calls_chunk(call_delta(0, arguments=' "Paris"}')),
        tool_calls_chunk(call_delta(0, "call_d", "get_weather", '{"location":')),
        tool_calls_chunk(call_delta(0, arguments=' "Delhi"}')),
        finish_chunk("tool_calls"),
    ],
    # `index: null` (Gemini's compatibility endpoint): pieces keyed by id.
    "null-index-keyed-by-id": [
        tool_calls_chunk(call_delta(NULL_INDEX, "call_p", "get_weather", '{"location": ')),
        tool_calls_chunk(call_delta(NULL_INDEX, "call_p", arguments='"Paris"}')),
        tool_calls_chunk(call_delta(NULL_INDEX, "call_d", "get_weather", DELHI)),
        finish_chunk("tool_calls"),
    ],
    # The name itself in pieces (after an empty first piece of arguments).
    "name-in-pieces": [
        tool_calls_chunk(call_delta(0, "call_p", "get_", "")),
        tool_calls_chunk(call_delta(0, name="weather", arguments=PARIS)),
        tool_calls_chunk(call_delta(1, "call_d", "get_weather", DELHI)),
        finish_chunk("tool_calls"),
    ],
    # Pieces interleaved by index, the id and name repeated in every piece, no `type`.
    "interleaved-with-repeated-names": [
        tool_calls_chunk(
            call_delta(0, "call_p", "get_weather", '{"location"', type_=False),
            call_delta(1, "call_d", "get_weather", '{"location"', type_=False),
        ),
        tool_calls_chunk(call_delta(1, "call_d", "get_weather", ': "Delhi"}', type_=False)),
        tool_calls_chunk(call_delta(0, "call_p", "get_weather", ': "Paris"}', type_=False)),
        finish_chunk("tool_calls"),
    ],
}


@pytest.mark.parametrize("shape", list(TOOL_CALL_SHAPES))
async def test_tool_calls_are_assembled_however_the_server_streams_them(
    start_openai: ServerFactory, fake: FakeOpenAI, connect: TabFactory, shape: str
) -> None:
    fake.stream(
        Reply(events=[role_chunk(), text_chunk("Checking both. "), *TOOL_CALL_SHAPES[shape], usage_chunk(20, 9)]),
        text_reply("Paris and Delhi are clear.", prompt=40, completion=7),
    )
    server = await start_openai()
    tab, sid = await open_session(server, connect)
    done, events = await ask(tab, sid, "Weather in Paris and Delhi?")

    assert names(events) == ["user_message", "chunk", "tool_call", "tool_call"] + ["tool_result"] * 2 + [
        "chunk",
        "chunk",
        "chunk",
        "done",
    ]
    calls, results = of(events, "tool_call"), of(events, "tool_result")
    assert [(c["name"], c["args"]) for c in calls] == [
        ("get_weather", {"location": "Paris"}),
        ("get_weather", {"location": "Delhi"}),
    ]
    ids = [c["call_id"] for c in calls]
    assert len(set(ids)) == 2 and all(ids)
    if shape != "index-without-id":
        assert ids == ["call_p", "call_d"]
    assert [(r["call_id"], r["error"], r["result"]["location"]) for r in results] == [
        (ids[0], None, "Paris"),
        (ids[1], None, "Delhi"),
    ]
    assert done["text"] == "Checking both. Paris and Delhi are clear."
    assert done["usage"] == {"input_tokens": 60, "output_tokens": 16}  # summed over both requests

    # The next request carries the answer as one assistant message with both calls, then a tool
    # message per call, paired by id (the fake refuses a request where they are not).
    first, second = fake.requests
    assert second.messages[:2] == first.messages
    assistant, *tools = second.messages[2:]
    assert assistant == {
        "role": "assistant",
        "content": "Checking both. ",
        "tool_calls": [
            {"id": ids[0], "type": "function", "function": {"name": "get_weather", "arguments": PARIS}},
            {"id": ids[1], "type": "function", "function": {"name": "get_weather", "arguments": DELHI}},
        ],
    }
    assert [(t["role"], t["tool_call_id"]) for t in tools] == [("tool", ids[0]), ("tool", ids[1])]
    assert [json.loads(t["content"])["location"] for t in tools] == ["Paris", "Delhi"]


async def test_arguments_that_are_not_json_are_answered_invalid_arguments_without_running_the_tool(
    start_openai: ServerFactory, fake: FakeOpenAI, connect: TabFactory, weather: FastAPI
) -> None:
    fake.stream(
        Reply(
            events=[
                tool_calls_chunk(call_delta(0, "call_bad", "get_weather", '{"location": "Par')),
                tool_calls_chunk(call_delta(1, "call_list", "get_weather", '["Paris"]')),
                tool_calls_chunk(call_delta(2, "call_ok", "get_weather", PARIS)),
                finish_chunk("length"),  # cut off: the calls still run (or are answered)
            ]
        ),
        text_reply("Only Paris worked."),
    )
    server = await start_openai(weather_geocoding_url=weather.state.url, weather_forecast_url=weather.state.url)
    tab, sid = await open_session(server, connect)
    done, events = await ask(tab, sid, "Weather?")
    assert (done["text"], done["finish_reason"]) == ("Only Paris worked.", "stop")
    calls, results = of(events, "tool_call"), of(events, "tool_result")
    assert [(c["call_id"], c["args"]) for c in calls] == [
        ("call_bad", {}),
        ("call_list", {}),
        ("call_ok", {"location": "Paris"}),
    ]
    bad, not_object, ok = results
    assert bad["error"]["code"] == not_object["error"]["code"] == "invalid_arguments"
    assert "not valid JSON" in bad["error"]["message"] and "not a JSON object" in not_object["error"]["message"]
    assert ok["error"] is None and ok["result"]["location"] == "Paris"
    searched = [request[1] for request in weather.state.requests if request[0] == "search"]
    assert searched == ["Paris"]  # the tool ran for the valid call only

    # The model is told: each call, with what it can read of it, then its error.
    tools = [m for m in fake.requests[1].messages if m["role"] == "tool"]
    assert json.loads(tools[0]["content"])["error"]["code"] == "invalid_arguments"
    stored = [e for e in await server.runtime.repo.list_events(sid) if e.event_type.value == "tool_result"]
    assert json.loads(stored[0].content)["error"]["code"] == "invalid_arguments"


async def test_a_call_sent_with_finish_reason_stop_runs_and_the_turn_goes_on(
    start_openai: ServerFactory, fake: FakeOpenAI, connect: TabFactory
) -> None:
    fake.stream(
        Reply(events=[tool_calls_chunk(call_delta(None, "c1", "get_weather", PARIS)), finish_chunk("stop")]),
        text_reply("Clear."),
    )
    server = await start_openai()
    tab, sid = await open_session(server, connect)
    done, events = await ask(tab, sid, "Weather?")
    assert names(events)[:3] == ["user_message", "tool_call", "tool_result"] and names(events)[-1] == "done"
    assert done["text"] == "Clear." and len(fake.requests) == 2


async def test_history_is_replayed_with_paired_ids_after_a_restart(
    start_openai: ServerFactory, fake: FakeOpenAI, connect: TabFactory, tmp_path: Path
) -> None:
    database = tmp_path / "kept.db"
    fake.stream(
        Reply(events=[text_chunk("Checking. "), *call_reply(("call_9", "get_weather", {"location": "Delhi"})).events]),
        text_reply("Delhi is clear."),
    )
    first = await start_openai(sqlite_path=database)
    tab, sid = await open_session(first, connect)
    await ask(tab, sid, "Weather in Delhi?")
    in_turn = fake.requests[1].messages
    await tab.close()
    await first.stop()

    fake.stream(text_reply("You asked about Delhi."))
    second = await start_openai(sqlite_path=database)
    tab, _ = await open_session(second, connect)
    await tab.join(sid)
    done, _ = await ask(tab, sid, "What did I ask?")
    assert done["text"] == "You asked about Delhi."
    rebuilt = fake.requests[2].messages
    # Exactly what the model saw during the first turn, then its answer, then the new message.
    assert rebuilt[:4] == in_turn
    assert rebuilt[2]["tool_calls"][0]["id"] == rebuilt[3]["tool_call_id"] == "call_9"
    assert rebuilt[4:] == [
        {"role": "assistant", "content": "Delhi is clear."},
        {"role": "user", "content": "What did I ask?"},
    ]


# ---------------------------------------------------------------------------------------------- failures


async def test_429_then_success_is_retried_counted_and_honours_retry_after(
    start_openai: ServerFactory, fake: FakeOpenAI, connect: TabFactory
) -> None:
    fake.stream(
        error_reply(429, "rate_limit_exceeded", retry_after="0.4"),
        error_reply(500, "server_error"),
        text_reply("Third time lucky."),
    )
    server = await start_openai(title_generation=False)  # its request would count too
    tab, sid = await open_session(server, connect)
    done, events = await ask(tab, sid, "Hello?")
    assert (done["text"], done["finish_reason"]) == ("Third time lucky.", "stop")
    assert names(events)[0] == "user_message" and names(events).count("done") == 1
    assert len(fake.requests) == 3 and fake.requests[0].body == fake.requests[2].body
    assert fake.requests[1].at - fake.requests[0].at >= 0.4  # the server asked for that wait
    requests = (await scrape(server.url)).by_label("realtime_provider_requests_total", "outcome")
    assert requests == {"ok": 1, "retried": 2, "error": 0}


async def test_503_until_the_attempts_run_out_is_provider_unavailable(
    start_openai: ServerFactory, fake: FakeOpenAI, connect: TabFactory
) -> None:
    fake.stream(*[error_reply(503, "unavailable") for _ in range(3)], text_reply("never"))
    server = await start_openai(openai_retry_attempts=3)
    tab, sid = await open_session(server, connect)
    done, _ = await ask(tab, sid, "Hello?")
    assert len(fake.requests) == 3
    assert (done["finish_reason"], done["text"]) == ("error", "")
    assert done["error"] == {"code": "provider_unavailable", "message": "the model is unavailable (HTTP 503)"}
    requests = (await scrape(server.url)).by_label("realtime_provider_requests_total", "outcome")
    assert requests == {"ok": 0, "retried": 2, "error": 1}
    stored = await server.runtime.repo.list_events(sid)
    assert [(e.event_type.value, e.content) for e in stored] == [("user_message", "Hello?"), ("ai_message", "")]


async def test_a_429_that_never_ends_is_provider_rate_limited(
    start_openai: ServerFactory, fake: FakeOpenAI, connect: TabFactory
) -> None:
    fake.stream(*[error_reply(429, "rate_limit_exceeded") for _ in range(2)])
    server = await start_openai(openai_retry_attempts=2)
    tab, sid = await open_session(server, connect)
    done, _ = await ask(tab, sid, "Hello?")
    assert done["error"] == {"code": "provider_rate_limited", "message": "the model is rate limited; try again later"}


@pytest.mark.parametrize(
    ("status", "code"),
    [(401, "invalid_api_key"), (400, "invalid_request_error"), (403, "unsupported_country"), (404, None)],
)
async def test_a_refused_request_is_provider_rejected_at_once(
    start_openai: ServerFactory,
    fake: FakeOpenAI,
    connect: TabFactory,
    status: int,
    code: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake.stream(error_reply(status, code or "model_not_found", "secret internal detail"), text_reply("never"))
    server = await start_openai()
    tab, sid = await open_session(server, connect)
    done, _ = await ask(tab, sid, "Hello?")
    assert len(fake.requests) == 1
    assert done["error"] == {"code": "provider_rejected", "message": f"the model refused the request (HTTP {status})"}
    assert "secret internal detail" not in json.dumps(done)
    requests = (await scrape(server.url)).by_label("realtime_provider_requests_total", "outcome")
    assert requests == {"ok": 0, "retried": 0, "error": 1}
    # One WARNING naming the code and the cause's class; no traceback.
    (line,) = [r for r in caplog.records if r.getMessage().startswith("turn failed")]
    assert line.levelname == "WARNING" and line.exc_info is None
    assert line.getMessage().startswith(f"turn failed: provider_rejected ({ERROR_CLASSES[status]}: HTTP {status}")


async def test_connection_failures_are_retried_then_provider_unavailable(
    start_openai: ServerFactory, connect: TabFactory
) -> None:
    async with hanging_up() as endpoint:
        server = await start_openai(openai_base_url=f"{endpoint.url}/v1", openai_retry_attempts=3)
        tab, sid = await open_session(server, connect)
        done, _ = await ask(tab, sid, "Hello?")
    assert endpoint.accepted == 3
    assert done["error"] == {"code": "provider_unavailable", "message": "the model could not be reached"}


async def test_an_error_mid_stream_ends_the_turn_keeping_the_partial_text_without_retry(
    start_openai: ServerFactory, fake: FakeOpenAI, connect: TabFactory
) -> None:
    fake.stream(Reply(events=[role_chunk(), text_chunk("Half an "), error_event("overloaded")]), text_reply("never"))
    server = await start_openai()
    tab, sid = await open_session(server, connect)
    done, _ = await ask(tab, sid, "Hello?")
    assert len(fake.requests) == 1
    assert (done["finish_reason"], done["text"]) == ("error", "Half an ")
    assert done["error"] == {"code": "provider_error", "message": "the model failed while answering"}
    stored = await server.runtime.repo.list_events(sid)
    assert stored[-1].content == "Half an "


async def test_an_answer_that_cannot_be_read_is_provider_error(
    start_openai: ServerFactory, fake: FakeOpenAI, connect: TabFactory
) -> None:
    fake.stream(Reply(events=[text_chunk("Fine so far. "), "data: {not json\n\n"]))
    server = await start_openai()
    tab, sid = await open_session(server, connect)
    done, _ = await ask(tab, sid, "Hello?")
    assert (done["finish_reason"], done["text"]) == ("error", "Fine so far. ")
    assert done["error"] == {"code": "provider_error", "message": "the model's answer could not be read"}


async def test_a_stream_that_stalls_after_a_chunk_times_out_and_cancel_closes_a_stream(
    start_openai: ServerFactory, fake: FakeOpenAI, connect: TabFactory
) -> None:
    fake.stream(Reply(events=[text_chunk("Thinking"), HANG]), Reply(events=[text_chunk("Long answer"), HANG]))
    server = await start_openai(openai_timeout_seconds=0.5)
    tab, sid = await open_session(server, connect)
    done, _ = await ask(tab, sid, "Hello?")
    assert (done["finish_reason"], done["text"]) == ("error", "Thinking")
    assert done["error"] == {"code": "provider_timeout", "message": "the model did not answer in time"}
    assert len(fake.requests) == 1  # text had streamed: no retry
    await asyncio.wait_for(fake.hang_ups.wait(), 5)
    fake.hang_ups.clear()

    ack = await tab.call("message", {"session_id": sid, "text": "Go on"})
    await tab.wait_for(lambda events: any(n == "chunk" and d["turn_id"] == ack["turn_id"] for n, d in events))
    assert (await tab.call("cancel", {"session_id": sid}))["ok"]
    done = (await tab.turn(ack["turn_id"]))[-1][1]
    assert (done["finish_reason"], done["text"]) == ("cancelled", "Long answer")
    await asyncio.wait_for(fake.hang_ups.wait(), 5)  # the upstream stream was closed
    assert fake.hung_up == 2


# ---------------------------------------------------------------------------------------------- background


async def test_summary_title_and_compaction_go_through_the_same_endpoint_and_model(
    start_openai: ServerFactory, fake: FakeOpenAI, connect: TabFactory
) -> None:
    fake.title_replies.append(Reply(body=completion_body("<think>Weather, then.</think>Weather in Paris")))
    fake.complete(Reply(body=completion_body("They talked about the weather.")))
    fake.stream(
        call_reply(("call_w", "get_weather", {"location": "Paris"})),
        text_reply("It is clear in Paris. " * 20),
        *[text_reply(f"Answer number {n}. " * 20) for n in range(6)],
    )
    server = await start_openai(summary_delay_seconds=0, context_max_tokens=400)
    tab, sid = await open_session(server, connect)
    await ask(tab, sid, "Weather in Paris?")
    updated = await tab.wait_for(lambda events: [d for n, d in events if n == "session_updated"])
    assert updated[0]["title"] == "Weather in Paris"  # a reasoning model's <think> left out
    (title_request,) = fake.title_requests
    assert title_request.body["model"] == MODEL and "stream" not in title_request.body
    assert "User: Weather in Paris?" in title_request.messages[1]["content"]
    for n in range(6):
        await ask(tab, sid, f"Question {n}, " + "more words " * 30)
    assert fake.compaction_requests, "a long session is compacted through the endpoint"
    assert all(r.body["model"] == MODEL for r in fake.compaction_requests)
    assert any(m["role"] == "user" and "FAKE SUMMARY" in m["content"] for m in fake.requests[-1].messages), (
        "the summary is sent first, as context"
    )
    await tab.close()

    session = await wait_for_summary(server, sid)
    assert session.summary == "They talked about the weather."
    (summary_request,) = fake.complete_requests
    # Read within the budget too: the compaction summary stands for the turns it covers.
    assert summary_request.messages[1]["content"].startswith("User: Summary of the earlier part")
    metrics = await scrape(server.url)
    assert metrics.by_label("realtime_titles_total", "outcome") == {"ok": 1, "error": 0}
    assert metrics.value("realtime_compactions_total", outcome="ok") >= 1
    assert metrics.by_label("realtime_summaries_total", "outcome") == {"ok": 1, "error": 0}
    assert metrics.value("realtime_provider_requests_total", provider="openai", outcome="retried") == 0


async def test_a_summary_of_a_failed_tool_call_is_made(
    start_openai: ServerFactory, fake: FakeOpenAI, connect: TabFactory
) -> None:
    fake.stream(
        Reply(events=[tool_calls_chunk(call_delta(0, "c1", "get_weather", "{oops")), finish_chunk("tool_calls")]),
        text_reply("Sorry, that failed."),
    )
    server = await start_openai(summary_delay_seconds=0)
    tab, sid = await open_session(server, connect)
    await ask(tab, sid, "Weather?")
    await tab.close()
    assert (await wait_for_summary(server, sid)).summary == "Summary."
    transcript = fake.complete_requests[0].messages[1]["content"]
    assert "Tool result get_weather:" in transcript and "invalid_arguments" in transcript


async def test_a_failure_after_an_empty_first_chunk_is_still_retried(
    start_openai: ServerFactory, fake: FakeOpenAI, connect: TabFactory
) -> None:
    # Most servers open with a role-only chunk: nothing has streamed yet when they fail after it.
    fake.stream(Reply(events=[role_chunk(), HANG]), text_reply("After the retry."))
    server = await start_openai(openai_timeout_seconds=0.5, title_generation=False)
    tab, sid = await open_session(server, connect)
    done, _ = await ask(tab, sid, "Hello?")
    assert (done["text"], done["finish_reason"]) == ("After the retry.", "stop")
    assert len(fake.requests) == 2
    requests = (await scrape(server.url)).by_label("realtime_provider_requests_total", "outcome")
    assert requests == {"ok": 1, "retried": 1, "error": 0}


async def test_text_as_a_list_of_parts_and_a_null_chunk_are_read(
    start_openai: ServerFactory, fake: FakeOpenAI, connect: TabFactory
) -> None:
    parts = [{"type": "thinking", "thinking": "hm"}, {"type": "text", "text": "Hello "}]
    fake.stream(Reply(events=[chunk({"content": parts}), "data: null\n\n", text_chunk("there."), finish_chunk("stop")]))
    server = await start_openai()
    tab, sid = await open_session(server, connect)
    done, events = await ask(tab, sid, "Hi")
    assert [d["text"] for d in of(events, "chunk")] == ["Hello ", "there."]
    assert (done["text"], done["finish_reason"]) == ("Hello there.", "stop")


@pytest.mark.parametrize(
    "odd",
    [
        Reply(events=[text_chunk("So far. "), "data: [1]\n\n"]),
        Reply(events=[text_chunk("So far. "), chunk({"tool_calls": {"index": 0}})]),
        Reply(events=[text_chunk("So far. "), chunk({"content": 42})]),
        Reply(events=[text_chunk("So far. "), {"choices": ["x"]}]),
    ],
    ids=["a-list-for-a-chunk", "tool-calls-as-an-object", "a-number-for-text", "a-string-for-a-choice"],
)
async def test_odd_json_from_a_server_is_provider_error_without_a_traceback(
    start_openai: ServerFactory, fake: FakeOpenAI, connect: TabFactory, odd: Reply, caplog: pytest.LogCaptureFixture
) -> None:
    fake.stream(odd)
    server = await start_openai()
    tab, sid = await open_session(server, connect)
    done, _ = await ask(tab, sid, "Hello?")
    assert (done["finish_reason"], done["text"]) == ("error", "So far. ")
    assert done["error"] == {"code": "provider_error", "message": "the model's answer could not be read"}
    assert not [r for r in caplog.records if r.exc_info or r.levelname == "ERROR"]
    assert (await server.runtime.repo.list_events(sid))[-1].content == "So far. "


async def test_an_answer_that_is_no_event_stream_is_provider_error_not_an_empty_answer(
    start_openai: ServerFactory, fake: FakeOpenAI, connect: TabFactory
) -> None:
    fake.stream(Reply(body=completion_body("A whole answer, not streamed.")))
    fake.complete(Reply(body={"choices": ["x"]}))  # the summary: no chat completion either
    server = await start_openai(summary_delay_seconds=0, summary_retry_seconds=60)
    tab, sid = await open_session(server, connect)
    done, _ = await ask(tab, sid, "Hello?")
    assert (done["finish_reason"], done["text"]) == ("error", "")
    assert done["error"] == {"code": "provider_error", "message": "the model's answer could not be read"}
    await tab.close()
    async with asyncio.timeout(10):
        while (await scrape(server.url)).value("realtime_summaries_total", outcome="error") < 1:
            await asyncio.sleep(0.05)


async def test_openai_itself_without_a_key_fails_turns_at_once_as_not_configured(
    start_server: ServerFactory, connect: TabFactory
) -> None:
    server = await start_server(
        llm_provider="openai", openai_model=MODEL, openai_base_url="https://eu.api.openai.com/v1"
    )
    tab, sid = await open_session(server, connect)
    done, _ = await ask(tab, sid, "Hello?")
    assert done["error"] == {
        "code": "provider_not_configured",
        "message": "the model is not configured (OPENAI_API_KEY is not set (eu.api.openai.com needs one))",
    }
