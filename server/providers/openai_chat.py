"""Any endpoint speaking OpenAI's Chat Completions API (OpenAI, Ollama, vLLM, LM Studio, llama.cpp,
LiteLLM, OpenRouter...) behind the provider interface, through the official `openai` SDK.

The servers differ most in how they stream tool calls (`ToolCallAssembler` takes every shape seen).
As for Gemini, the stream's first chunk is read inside the retry, so nothing is retried once a chunk
has been handed on, and tenacity is the one retry policy (the SDK's own is off, to count each retry).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import httpx2
import openai
from openai import AsyncOpenAI, AsyncStream, Omit, omit
from openai.types.chat import (
    ChatCompletionAssistantMessageParam,
    ChatCompletionChunk,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCallParam,
    ChatCompletionMessageParam,
)
from openai.types.chat.chat_completion_chunk import ChoiceDeltaToolCall
from tenacity import AsyncRetrying

from server.core.errors import TurnErrorCode
from server.core.models import JSONValue, Usage
from server.core.ports import (
    ConversationItem,
    Finished,
    Metrics,
    ModelEvent,
    ModelRequest,
    ModelText,
    NoMetrics,
    ProviderError,
    TextDelta,
    ToolCallItem,
    ToolCallRequest,
    ToolResultItem,
    ToolSpec,
    UsageReport,
    UserText,
)
from server.providers.prompts import (
    COMPACTION_PROMPT,
    DEFAULT_SYSTEM_PROMPT,
    SUMMARY_PROMPT,
    TITLE_PROMPT,
    compaction_input,
    transcript,
)
from server.providers.retry import RetryPolicy, capped, retry_after_seconds, retrying

log = logging.getLogger(__name__)

OPENAI_BASE_URL = "https://api.openai.com/v1"
# The SDK refuses to start without a key; a local server needs none (and is sent none).
NO_KEY = "none"
_FINISH: dict[str, Literal["stop", "max_tokens", "safety"]] = {
    "stop": "stop",
    "tool_calls": "stop",
    "function_call": "stop",
    "length": "max_tokens",
    "content_filter": "safety",
}
# Finish reasons some servers send when they failed (vLLM: `abort`).
_FAILED = frozenset({"error", "abort"})
_THINKING = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)


@dataclass(frozen=True)
class OpenAIConfig:
    model: str
    base_url: str = OPENAI_BASE_URL
    api_key: str | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    timeout_seconds: float = 60.0
    max_output_tokens: int | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)


class OpenAIChatProvider:
    name = "openai"

    def __init__(self, config: OpenAIConfig, metrics: Metrics | None = None) -> None:
        self._config = config
        self._metrics = metrics or NoMetrics()
        self._client = AsyncOpenAI(
            base_url=config.base_url,
            api_key=config.api_key or NO_KEY,
            timeout=httpx2.Timeout(config.timeout_seconds),
            max_retries=0,
        )
        # Without a key, no Authorization header at all (the SDK would send its placeholder).
        self._headers: dict[str, str | Omit] = {} if config.api_key else {"Authorization": omit}

    def not_ready_reason(self) -> str | None:
        if not self._config.api_key and httpx2.URL(self._config.base_url).host == "api.openai.com":
            return "OPENAI_API_KEY is not set (api.openai.com needs one)"
        return None

    async def aclose(self) -> None:
        await self._client.close()

    async def stream(self, request: ModelRequest) -> AsyncGenerator[ModelEvent, None]:
        calls = ToolCallAssembler()
        finish: str | None = None
        refused = False
        usage: Usage | None = None
        stream, chunk = await self._open_stream(request)
        try:
            while chunk is not None:
                usage = _usage_of(chunk) or usage
                for choice in chunk.choices or ():
                    if choice.index not in (0, None):
                        continue  # another candidate: only the first is asked for
                    delta = choice.delta
                    if delta is not None:
                        if delta.content:
                            yield TextDelta(delta.content)
                        if delta.refusal:
                            refused = True
                            yield TextDelta(delta.refusal)
                        for piece in delta.tool_calls or ():
                            calls.add(piece)
                    finish = choice.finish_reason or finish
                chunk = await anext(stream, None)
        except (openai.OpenAIError, ValueError) as exc:
            raise _provider_error(exc) from exc
        finally:
            await stream.close()
        requested = calls.finish()
        for call in requested:
            yield call
        if usage is not None:
            yield UsageReport(usage)
        # Tool calls run whatever the reason given with them (some servers say `stop`).
        yield Finished("stop" if requested else _map_finish(finish, refused))

    async def summarise(self, conversation: Sequence[ConversationItem]) -> str:
        return await self._one_answer(SUMMARY_PROMPT, conversation, "summary")

    async def title(self, conversation: Sequence[ConversationItem]) -> str:
        return await self._one_answer(TITLE_PROMPT, conversation, "title")

    async def compact(self, summary: str | None, conversation: Sequence[ConversationItem]) -> str:
        return await self._one_answer(COMPACTION_PROMPT, compaction_input(summary, conversation), "summary")

    # ------------------------------------------------------------------ internals

    async def _open_stream(
        self, request: ModelRequest
    ) -> tuple[AsyncStream[ChatCompletionChunk], ChatCompletionChunk | None]:
        """Open the stream and read its first chunk (where a failing server shows it), with retries."""
        messages = to_messages(request.conversation, self._config.system_prompt)
        tools = [_declaration(tool) for tool in request.tools]
        try:
            async for attempt in self._retrying():
                with attempt:
                    stream = await self._client.chat.completions.create(
                        model=self._config.model,
                        messages=messages,
                        tools=tools or omit,
                        stream=True,
                        stream_options={"include_usage": True},
                        max_completion_tokens=self._config.max_output_tokens or omit,
                        extra_headers=self._headers,
                    )
                    try:
                        return stream, await anext(stream, None)
                    except BaseException:
                        await stream.close()
                        raise
        except (openai.OpenAIError, ValueError) as exc:
            raise _provider_error(exc) from exc
        raise AssertionError("unreachable: tenacity re-raises the last failure")

    async def _one_answer(self, instruction: str, conversation: Sequence[ConversationItem], what: str) -> str:
        """One request, not streamed, about the conversation (a summary, a title, a compaction)."""
        try:
            async for attempt in self._retrying():
                with attempt:
                    response = await self._client.chat.completions.create(
                        model=self._config.model,
                        messages=[
                            {"role": "system", "content": instruction},
                            {"role": "user", "content": transcript(conversation)},
                        ],
                        max_completion_tokens=self._config.max_output_tokens or omit,
                        extra_headers=self._headers,
                    )
        except (openai.OpenAIError, ValueError) as exc:
            raise _provider_error(exc) from exc
        choice = response.choices[0] if response.choices else None
        content = choice.message.content if choice is not None and choice.message is not None else None
        text = _THINKING.sub("", content or "").strip()
        if not text:
            reason = choice.finish_reason if choice is not None else None
            raise ProviderError(TurnErrorCode.PROVIDER_ERROR, f"the model gave no {what} ({reason or 'no text'})")
        return text

    def _retrying(self) -> AsyncRetrying:
        return retrying(
            self._config.retry,
            transient=is_transient,
            wait_asked=_retry_delay_asked,
            describe=_describe,
            metrics=self._metrics,
            log=log,
        )


# ---------------------------------------------------------------------- conversation -> messages


def to_messages(conversation: Sequence[ConversationItem], system_prompt: str) -> list[ChatCompletionMessageParam]:
    """Chat messages: the text and the tool calls of one model answer in one assistant message,
    then one `tool` message per result."""
    messages: list[ChatCompletionMessageParam] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    answer: ChatCompletionAssistantMessageParam | None = None  # the model's answer being built
    calls: list[ChatCompletionMessageFunctionToolCallParam] = []  # its tool calls
    for item in conversation:
        if isinstance(item, UserText | ToolResultItem):
            messages.append(
                {"role": "user", "content": item.text}
                if isinstance(item, UserText)
                else {"role": "tool", "tool_call_id": item.call_id, "content": _result_content(item)}
            )
            answer = None
            continue
        if answer is None or (isinstance(item, ModelText) and calls):
            answer, calls = {"role": "assistant", "content": None}, []
            messages.append(answer)
        if isinstance(item, ModelText):
            answer["content"] = f"{answer.get('content') or ''}{item.text}"
        else:
            calls.append(_call_param(item))
            answer["tool_calls"] = calls
    return messages


def _call_param(call: ToolCallItem) -> ChatCompletionMessageFunctionToolCallParam:
    arguments = json.dumps(call.args, ensure_ascii=False)
    return {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": arguments}}


def _result_content(result: ToolResultItem) -> str:
    if result.error is not None:
        return json.dumps({"error": result.error.model_dump()}, ensure_ascii=False)
    if isinstance(result.result, str):
        return result.result
    return json.dumps(result.result, ensure_ascii=False)


def _declaration(tool: ToolSpec) -> ChatCompletionFunctionToolParam:
    return {
        "type": "function",
        "function": {"name": tool.name, "description": tool.description, "parameters": dict(tool.parameters)},
    }


# ---------------------------------------------------------------------- streamed tool calls


@dataclass
class _Call:
    call_id: str | None
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ToolCallAssembler:
    """The tool calls of one answer from their streamed pieces, however a server sends them:
    arguments in pieces keyed by `index` (OpenAI); each call whole in one piece (Ollama); pieces
    keyed by `id` without an `index`, or with `index: null`; a new `id` at an `index` already used
    (a server numbering every call 0) starting the next call. The calls come out in order."""

    def __init__(self) -> None:
        self._calls: list[_Call] = []
        self._by_index: dict[int, _Call] = {}
        self._by_id: dict[str, _Call] = {}

    def add(self, piece: ChoiceDeltaToolCall) -> None:
        index = piece.index if isinstance(piece.index, int) else None
        call_id = piece.id if isinstance(piece.id, str) and piece.id else None
        function = piece.function
        name = function.name if function is not None and isinstance(function.name, str) else None
        arguments: object = function.arguments if function is not None else None
        call = self._call_for(index, call_id, name)
        if call_id is not None:
            call.call_id = call.call_id or call_id
            self._by_id.setdefault(call_id, call)
        if index is not None:
            self._by_index[index] = call
        if name and name != call.name and not call.arguments:
            call.name += name  # a name in pieces; one repeated in every piece is taken once
        if isinstance(arguments, str):
            call.arguments.append(arguments)
        elif arguments is not None:
            call.arguments.append(json.dumps(arguments))  # an object where a string belongs

    def _call_for(self, index: int | None, call_id: str | None, name: str | None) -> _Call:
        if call_id is not None and call_id in self._by_id:
            return self._by_id[call_id]
        at_index = self._by_index.get(index) if index is not None else None
        if at_index is not None and (call_id is None or at_index.call_id is None):
            return at_index
        latest = self._calls[-1] if self._calls else None
        if index is None and call_id is None and latest is not None and not (name and latest.name):
            return latest  # neither index nor id: the rest of the call being sent
        call = _Call(call_id)
        self._calls.append(call)
        return call

    def finish(self) -> list[ToolCallRequest]:
        requests: list[ToolCallRequest] = []
        for call in self._calls:
            args, problem = parse_arguments("".join(call.arguments))
            requests.append(
                ToolCallRequest(
                    # The history pairs each result with its call by this id: one is made where none came.
                    call_id=call.call_id or f"call_{uuid.uuid4().hex[:24]}",
                    name=call.name,
                    args=args,
                    invalid_arguments=problem,
                )
            )
        return requests


def parse_arguments(raw: str) -> tuple[dict[str, JSONValue], str | None]:
    """The arguments as an object, or {} and why they cannot be read. No arguments at all are {}."""
    if not raw.strip():
        return {}, None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        return {}, f"the arguments are not valid JSON ({exc.msg} at character {exc.pos})"
    if not isinstance(value, dict):
        return {}, "the arguments are not a JSON object"
    return value, None


# ---------------------------------------------------------------------- chunks -> model events


def _usage_of(chunk: ChatCompletionChunk) -> Usage | None:
    usage = chunk.usage
    if usage is None:
        return None
    return Usage(input_tokens=usage.prompt_tokens or 0, output_tokens=usage.completion_tokens or 0)


def _map_finish(reason: str | None, refused: bool) -> Literal["stop", "max_tokens", "safety"]:
    if refused:
        return "safety"
    if reason in _FAILED:
        raise ProviderError(TurnErrorCode.PROVIDER_ERROR, f"the model stopped with {reason}")
    # A reason of a server's own (`eos`, `end_turn`...): it stopped of itself.
    return _FINISH.get(reason or "stop", "stop")


# ---------------------------------------------------------------------- failures


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return isinstance(exc, openai.APIConnectionError)  # timeouts included


def _retry_delay_asked(exc: BaseException | None) -> float | None:
    if not isinstance(exc, openai.APIStatusError):
        return None
    headers = exc.response.headers
    millis = retry_after_seconds(headers.get("retry-after-ms"))
    return millis / 1000 if millis is not None else retry_after_seconds(headers.get("retry-after"))


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}"
    return type(exc).__name__


def _provider_error(exc: BaseException) -> ProviderError:
    """A coded error for clients; what the server said goes only to the log (it can name internals)."""
    said = getattr(exc, "message", None) or str(exc)
    detail = capped(f"{_describe(exc)}: {said}" if said else _describe(exc))
    if isinstance(exc, openai.APITimeoutError):
        return ProviderError(TurnErrorCode.PROVIDER_TIMEOUT, "the model did not answer in time", detail)
    if isinstance(exc, openai.APIConnectionError):
        return ProviderError(TurnErrorCode.PROVIDER_UNAVAILABLE, "the model could not be reached", detail)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status == 429:
            code, message = TurnErrorCode.PROVIDER_RATE_LIMITED, "the model is rate limited; try again later"
        elif is_transient(exc):
            code, message = TurnErrorCode.PROVIDER_UNAVAILABLE, f"the model is unavailable (HTTP {status})"
        else:
            code, message = TurnErrorCode.PROVIDER_REJECTED, f"the model refused the request (HTTP {status})"
        return ProviderError(code, message, detail)
    if isinstance(exc, openai.APIError):  # an error event inside the stream
        return ProviderError(TurnErrorCode.PROVIDER_ERROR, "the model failed while answering", detail)
    return ProviderError(TurnErrorCode.PROVIDER_ERROR, "the model's answer could not be read", detail)
