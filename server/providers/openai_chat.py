"""Any endpoint speaking OpenAI's Chat Completions API (OpenAI, Ollama, vLLM, LM Studio, llama.cpp,
LiteLLM, OpenRouter...) behind the provider interface, through the official `openai` SDK.

The servers differ most in how they stream tool calls (`ToolCallAssembler` takes every shape seen)
and in what odd JSON they may send (read defensively: the SDK does not validate chunks). A stream is
read inside the retry up to its first chunk that says something, so nothing is retried once text
has been handed on; tenacity is the one retry policy (the SDK's own is off, to count each retry).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import httpx2
import openai
from openai import AsyncOpenAI, AsyncStream, Omit, omit
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionAssistantMessageParam,
    ChatCompletionChunk,
    ChatCompletionContentPartParam,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCallParam,
    ChatCompletionMessageParam,
    ChatCompletionUserMessageParam,
)
from openai.types.chat.chat_completion_chunk import Choice, ChoiceDelta, ChoiceDeltaToolCall
from tenacity import AsyncRetrying

from server.core.errors import TurnErrorCode
from server.core.file_types import IMAGE_TYPES
from server.core.models import AttachmentRef, JSONValue, Usage
from server.core.ports import (
    ConversationItem,
    FileWithheld,
    Finished,
    Metrics,
    ModelEvent,
    ModelInfo,
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
from server.providers.files import RefusedFiles, user_parts
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
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class OpenAIConfig:
    model: str
    base_url: str = "https://api.openai.com/v1"
    api_key: str | None = None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    timeout_seconds: float = 60.0
    max_output_tokens: int | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)


_DEFAULT_PORTS = {"https": 443, "http": 80}
# What one request carries of files at most: OpenAI documents 32 MB of file content a request.
MAX_REQUEST_FILE_BYTES = 32_000_000


class OpenAIChatProvider:
    name = "openai"
    max_request_file_bytes: int | None = MAX_REQUEST_FILE_BYTES
    takes_files = True

    def __init__(self, config: OpenAIConfig, metrics: Metrics | None = None) -> None:
        self._config = config
        self._metrics = metrics or NoMetrics()
        endpoint = httpx2.URL(config.base_url)
        self.info = ModelInfo(
            "openai", "chat", config.model, endpoint.host, endpoint.port or _DEFAULT_PORTS.get(endpoint.scheme)
        )
        self._client = AsyncOpenAI(
            base_url=config.base_url,
            api_key=config.api_key or NO_KEY,
            timeout=httpx2.Timeout(config.timeout_seconds),
            max_retries=0,
        )
        # Without a key, no Authorization header at all (the SDK would send its placeholder).
        self._headers: dict[str, str | Omit] = {} if config.api_key else {"Authorization": omit}
        self._refused_files = RefusedFiles()

    def not_ready_reason(self) -> str | None:
        host = httpx2.URL(self._config.base_url).host
        if not self._config.api_key and (host == "api.openai.com" or host.endswith(".openai.com")):
            return f"OPENAI_API_KEY is not set ({host} needs one)"
        return None

    async def aclose(self) -> None:
        await self._client.close()

    async def stream(self, request: ModelRequest) -> AsyncGenerator[ModelEvent, None]:
        answer = _Answer()
        stream, opening = await self._open_stream(request)
        try:
            for held in opening:
                for text in answer.take(held):
                    yield TextDelta(text)
            while (chunk := await _next_chunk(stream)) is not None:
                for text in answer.take(chunk):
                    yield TextDelta(text)
            requested = answer.calls.finish()
            # Tool calls run whatever the reason given with them (some servers say `stop`).
            finished = Finished("stop" if requested else _map_finish(answer.finish, answer.refused))
        except _UNREADABLE as exc:
            raise _provider_error(exc) from exc
        finally:
            await stream.close()
        for call in requested:
            yield call
        if answer.usage is not None:
            yield UsageReport(answer.usage)
        yield finished

    async def summarise(self, conversation: Sequence[ConversationItem]) -> str:
        return await self._one_answer(SUMMARY_PROMPT, conversation, "summary")

    async def title(self, conversation: Sequence[ConversationItem]) -> str:
        return await self._one_answer(TITLE_PROMPT, conversation, "title")

    async def compact(self, summary: str | None, conversation: Sequence[ConversationItem]) -> str:
        return await self._one_answer(COMPACTION_PROMPT, compaction_input(summary, conversation), "summary")

    # ------------------------------------------------------------------ internals

    async def _open_stream(
        self, request: ModelRequest
    ) -> tuple[AsyncStream[ChatCompletionChunk], list[ChatCompletionChunk]]:
        """Open the stream and read it up to its first chunk that says something (text, a call, a
        finish), with retries: many servers send an empty first chunk before any failure shows."""
        self._require_configured()
        files = self._refused_files.withhold(request.files)
        messages = to_messages(request.conversation, self._config.system_prompt, files)
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
                        return stream, await _opening(stream)
                    except BaseException:
                        await stream.close()
                        raise
        except _UNREADABLE as exc:
            if isinstance(exc, openai.BadRequestError):
                self._refused_files.note(files)
            raise _provider_error(exc) from exc
        raise AssertionError("unreachable: tenacity re-raises the last failure")

    async def _one_answer(self, instruction: str, conversation: Sequence[ConversationItem], what: str) -> str:
        """One request, not streamed, about the conversation (a summary, a title, a compaction)."""
        self._require_configured()
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
            if not isinstance(response, ChatCompletion):
                raise ValueError("the answer is not a chat completion")
            choice = response.choices[0] if response.choices else None
            text = _THINKING.sub("", _text_of(choice.message.content) if choice is not None else "").strip()
        except _UNREADABLE as exc:
            raise _provider_error(exc) from exc
        if not text:
            reason = choice.finish_reason if choice is not None else None
            raise ProviderError(TurnErrorCode.PROVIDER_ERROR, f"the model gave no {what} ({reason or 'no text'})")
        return text

    def _require_configured(self) -> None:
        reason = self.not_ready_reason()
        if reason is not None:
            raise ProviderError(TurnErrorCode.PROVIDER_NOT_CONFIGURED, f"the model is not configured ({reason})")

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


def to_messages(
    conversation: Sequence[ConversationItem],
    system_prompt: str,
    files: Mapping[str, bytes | FileWithheld] | None = None,
) -> list[ChatCompletionMessageParam]:
    """Chat messages: the text and the tool calls of one model answer in one assistant message,
    then one `tool` message per result; a user message's files as content parts."""
    messages: list[ChatCompletionMessageParam] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    answer: ChatCompletionAssistantMessageParam | None = None  # the model's answer being built
    calls: list[ChatCompletionMessageFunctionToolCallParam] = []  # its tool calls
    for item in conversation:
        if isinstance(item, UserText | ToolResultItem):
            messages.append(
                _user_message(item, files or {})
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


def _user_message(item: UserText, files: Mapping[str, bytes | FileWithheld]) -> ChatCompletionUserMessageParam:
    if not item.files:
        return {"role": "user", "content": item.text}
    return {"role": "user", "content": [_content_part(part) for part in user_parts(item, files)]}


def _content_part(part: str | tuple[AttachmentRef, bytes]) -> ChatCompletionContentPartParam:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    file, data = part
    url = f"data:{file.mime_type};base64,{base64.b64encode(data).decode('ascii')}"
    if file.mime_type in IMAGE_TYPES:
        return {"type": "image_url", "image_url": {"url": url}}
    return {"type": "file", "file": {"filename": file.name, "file_data": url}}


def _call_param(call: ToolCallItem) -> ChatCompletionMessageFunctionToolCallParam:
    arguments = json.dumps(call.args, ensure_ascii=False)
    # A call stored under an earlier naming rule (`.` and `:` were kept) is replayed as OpenAI takes it.
    name = _NOT_IN_NAME.sub("_", call.name)[:64] or "_"
    return {"id": call.call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


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
        if name and name != call.name and not "".join(call.arguments):
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

# What an answer that cannot be read raises: the SDK builds chunks without validating them, so a
# server's odd JSON (a list, a number where text belongs) surfaces as these.
_UNREADABLE = (openai.OpenAIError, ValueError, TypeError, AttributeError)
_END = object()


async def _next_chunk(stream: AsyncStream[ChatCompletionChunk]) -> ChatCompletionChunk | None:
    """The stream's next chunk, None at its end (`data: null` is skipped, not taken for the end)."""
    while True:
        item: object = await anext(stream, _END)
        if item is _END:
            return None
        if isinstance(item, ChatCompletionChunk):
            return item
        if item is not None:
            raise ValueError(f"a streamed item is not a chunk ({type(item).__name__})")


async def _opening(stream: AsyncStream[ChatCompletionChunk]) -> list[ChatCompletionChunk]:
    """The chunks up to the first that says something; a reply that is no event stream (a proxy's
    login page, a server ignoring `stream`) is refused rather than read as an empty answer."""
    content_type = stream.response.headers.get("content-type", "")
    if not content_type.startswith("text/event-stream"):
        raise ValueError(f"the answer is not an event stream ({content_type or 'no content type'})")
    opening: list[ChatCompletionChunk] = []
    while (chunk := await _next_chunk(stream)) is not None:
        opening.append(chunk)
        if any(choice.finish_reason or _says_something(choice.delta) for choice in chunk.choices or ()):
            break
    return opening


def _says_something(delta: ChoiceDelta | None) -> bool:
    return delta is not None and bool(delta.content or delta.refusal or delta.tool_calls)


@dataclass
class _Answer:
    """What the chunks of one answer said so far, besides its text (streamed as it comes)."""

    calls: ToolCallAssembler = field(default_factory=ToolCallAssembler)
    finish: str | None = None
    refused: bool = False
    usage: Usage | None = None

    def take(self, chunk: ChatCompletionChunk) -> list[str]:
        """The chunk's text, in order; the rest noted."""
        texts: list[str] = []
        self.usage = _usage_of(chunk) or self.usage
        for choice in chunk.choices or ():
            if not isinstance(choice, Choice):
                raise ValueError(f"a choice is a {type(choice).__name__}")
            if choice.index not in (0, None):
                continue  # another candidate: only the first is asked for
            delta = choice.delta
            if delta is not None:
                texts.append(_text_of(delta.content))
                refusal = _text_of(delta.refusal)
                if refusal:
                    self.refused = True
                    texts.append(refusal)
                for piece in delta.tool_calls or ():
                    self.calls.add(piece)
            self.finish = choice.finish_reason or self.finish
        return [text for text in texts if text]


def _text_of(content: object) -> str:
    """Text, however a server sends it: a string, or a list of parts (Mistral's) whose text parts count."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        )
    raise ValueError(f"the answer's text is a {type(content).__name__}")


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
    return _FINISH.get(str(reason or "stop"), "stop")


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
