"""The OpenAI fake itself, read by the real openai SDK: what the provider's tests rely on it for."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionChunk

from tests.fake_openai import (
    HANG,
    NULL_INDEX,
    FakeOpenAI,
    Reply,
    call_delta,
    call_reply,
    error_event,
    error_reply,
    finish_chunk,
    prompt_tokens,
    role_chunk,
    text_chunk,
    text_reply,
    tool_calls_chunk,
)

MODEL = "gpt-test-mini"
USER = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
async def client(fake_openai: FakeOpenAI) -> AsyncIterator[AsyncOpenAI]:
    sdk = AsyncOpenAI(base_url=f"{fake_openai.url}/v1", api_key="k", max_retries=0)
    yield sdk
    await sdk.close()


async def streamed(client: AsyncOpenAI, usage: bool = True, **extra: Any) -> list[ChatCompletionChunk]:
    options: Any = {"include_usage": True} if usage else openai.omit
    stream = await client.chat.completions.create(
        model=MODEL, messages=extra.pop("messages", USER), stream=True, stream_options=options, **extra
    )
    return [piece async for piece in stream]


async def test_a_text_reply_reads_as_chunks_then_usage(fake_openai: FakeOpenAI, client: AsyncOpenAI) -> None:
    fake_openai.stream(text_reply("Sunny all day.", prompt=12, completion=4))
    chunks = await streamed(client, tools=[{"type": "function", "function": {"name": "get_weather"}}])
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].model == MODEL
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Sunny all day."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage and chunks[-1].usage.total_tokens == 16
    (request,) = fake_openai.requests
    assert request.authorization == "Bearer k" and request.path == "/v1/chat/completions"
    assert request.messages == USER and request.tools[0]["function"]["name"] == "get_weather"
    assert fake_openai.hung_up == 0


async def test_the_default_reply_has_usage_only_when_asked(fake_openai: FakeOpenAI, client: AsyncOpenAI) -> None:
    with_usage, without = await streamed(client), await streamed(client, usage=False)
    assert with_usage[-1].usage and with_usage[-1].usage.prompt_tokens == 10
    assert all(c.usage is None for c in without) and without[-1].choices[0].finish_reason == "stop"
    fake_openai.count_tokens = True
    (*_, counted) = await streamed(client)
    assert counted.usage and counted.usage.prompt_tokens == prompt_tokens(USER) == len("Hello there") // 4


async def test_tool_call_pieces_in_each_servers_shape(fake_openai: FakeOpenAI, client: AsyncOpenAI) -> None:
    gemini_compat = [
        role_chunk(),
        tool_calls_chunk(call_delta(NULL_INDEX, "c1", "get_weather", '{"city":"Oslo"}', type_=False)),
        finish_chunk("tool_calls"),
    ]
    fake_openai.stream(call_reply(("call_a", "get_weather", {"city": "Paris"})), Reply(events=gemini_compat))
    pieces = [
        c.choices[0].delta.tool_calls[0] for c in await streamed(client) if c.choices and c.choices[0].delta.tool_calls
    ]
    assert [(p.index, p.id, p.type) for p in pieces][:2] == [(0, "call_a", "function"), (0, None, None)]
    assert "".join(p.function.arguments or "" for p in pieces if p.function) == '{"city": "Paris"}'
    (compat,) = [
        c.choices[0].delta.tool_calls for c in await streamed(client) if c.choices and c.choices[0].delta.tool_calls
    ]
    assert compat and compat[0].index is None and compat[0].type is None and compat[0].id == "c1"


async def test_errors_raise_the_sdks_exceptions(fake_openai: FakeOpenAI, client: AsyncOpenAI) -> None:
    fake_openai.stream(
        error_reply(429, "rate_limit_exceeded", retry_after="2"),
        error_reply(401, "invalid_api_key"),
        Reply(events=[role_chunk(), text_chunk("Hal"), error_event("overloaded")]),
        Reply(events=[role_chunk(), "data: {not json\n\n"]),
    )
    with pytest.raises(openai.RateLimitError) as limited:
        await streamed(client)
    assert limited.value.response.headers["retry-after"] == "2" and limited.value.code == "rate_limit_exceeded"
    with pytest.raises(openai.AuthenticationError):
        await streamed(client)
    with pytest.raises(openai.APIError, match="overloaded"):
        await streamed(client)
    with pytest.raises(ValueError):
        await streamed(client)
    with pytest.raises(openai.NotFoundError):
        await client.post("/responses", cast_to=object, body={})


async def test_a_request_openai_would_refuse_is_refused(fake_openai: FakeOpenAI, client: AsyncOpenAI) -> None:
    call = {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    unanswered = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]}, *USER]
    with pytest.raises(openai.BadRequestError, match="call_a"):
        await streamed(client, messages=unanswered)
    answered = [*unanswered[:2], {"role": "tool", "tool_call_id": "call_a", "content": "{}"}]
    assert (await streamed(client, messages=answered))[-1].usage
    assert len(fake_openai.requests) == 2


async def test_a_stream_closed_early_is_a_hang_up(fake_openai: FakeOpenAI, client: AsyncOpenAI) -> None:
    fake_openai.stream(Reply(events=[role_chunk(), HANG]), Reply(events=[text_chunk("cut")], done=False))
    stream = await client.chat.completions.create(model=MODEL, messages=USER, stream=True)
    await anext(aiter(stream))
    await stream.close()
    await asyncio.wait_for(fake_openai.hang_ups.wait(), 2)
    assert fake_openai.hung_up == 1
    assert [c.choices[0].delta.content for c in await streamed(client, usage=False)] == ["cut"]


async def test_non_streamed_summaries_titles_and_compactions(fake_openai: FakeOpenAI, client: AsyncOpenAI) -> None:
    async def answer(system: str) -> str | None:
        messages: Any = [{"role": "system", "content": system}, *USER]
        completion = await client.chat.completions.create(model=MODEL, messages=messages)
        return completion.choices[0].message.content

    assert await answer("Summarise the conversation below.") == "Summary."
    assert await answer("Give the conversation below a short title.") == "A fake title"
    assert await answer("You keep a running summary of a long conversation.") == "FAKE SUMMARY of 1 messages"
    assert [len(fake_openai.complete_requests), len(fake_openai.title_requests)] == [1, 1]
    assert len(fake_openai.compaction_requests) == 1 and fake_openai.requests == []
