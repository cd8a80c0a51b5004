"""Google Gemini behind the provider interface, through the maintained SDK `google-genai`.

Three traps of the SDK shape this module:
- the stream is lazy: HTTP errors surface on the first read, so a retry wraps "open and read the
  first chunk", and nothing is retried once a chunk has been handed on;
- the SDK switches to aiohttp whenever it is importable, so the transport is pinned to an httpx2
  client of our own, and tests and production run the same code;
- it has no timeout unless one is set (in milliseconds).
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal, cast

import httpx2
from google import genai
from google.genai import errors, types
from tenacity import AsyncRetrying

from server.core.errors import TurnErrorCode
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

# Key under which a tool call's Gemini part is stored verbatim (thought signature included).
PART_KEY = "gemini_part"
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})

_SAFETY_REASONS = frozenset(
    {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT"}
)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")


@dataclass(frozen=True)
class GeminiConfig:
    api_key: str | None
    model: str
    base_url: str | None = None
    api_version: str = "v1beta"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    timeout_seconds: float = 60.0
    max_output_tokens: int | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)


DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
# Gemini takes at most 20 MB of request inline; base64 makes files a third larger.
MAX_INLINE_FILE_BYTES = 14_000_000


class GeminiProvider:
    name = "gemini"
    max_request_file_bytes: int | None = MAX_INLINE_FILE_BYTES
    takes_files = True

    def __init__(self, config: GeminiConfig, metrics: Metrics | None = None) -> None:
        self._config = config
        self._metrics = metrics or NoMetrics()
        self._refused_files = RefusedFiles()
        endpoint = httpx2.URL(config.base_url or DEFAULT_BASE_URL)
        self.info = ModelInfo("gcp.gemini", "generate_content", config.model, endpoint.host, endpoint.port or 443)
        self._http: httpx2.AsyncClient | None = None
        self._client: genai.Client | None = None
        if config.api_key:
            self._http = httpx2.AsyncClient(
                # Every running turn holds one streaming connection: no pool cap to queue turns behind.
                limits=httpx2.Limits(max_connections=None, max_keepalive_connections=50),
                event_hooks={"response": [_note_response]},
            )
            self._client = genai.Client(
                api_key=config.api_key,
                http_options=types.HttpOptions(
                    base_url=config.base_url,
                    api_version=config.api_version,
                    timeout=round(config.timeout_seconds * 1000),
                    # tenacity below is the one retry policy.
                    retry_options=types.HttpRetryOptions(attempts=1),
                    httpx_async_client=self._http,
                ),
            )

    def not_ready_reason(self) -> str | None:
        return None if self._client is not None else "GEMINI_API_KEY is not set"

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aio.aclose()
        if self._http is not None:
            await self._http.aclose()

    async def stream(self, request: ModelRequest) -> AsyncGenerator[ModelEvent, None]:
        client = self._require_client()
        files = self._refused_files.withhold(request.files)
        contents = to_contents(request.conversation, files)
        config = types.GenerateContentConfig(
            system_instruction=self._config.system_prompt or None,
            tools=[types.Tool(function_declarations=[_declaration(t) for t in request.tools])]
            if request.tools
            else None,
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
            max_output_tokens=self._config.max_output_tokens,
        )
        opened: list[httpx2.Response] = []
        try:
            stream, first = await self._open_stream(client, contents, config, opened)
            finish: str | None = None
            usage: Usage | None = None
            chunk: types.GenerateContentResponse | None = first
            while chunk is not None:
                for event in _events_of(chunk):
                    yield event
                usage = _usage_of(chunk) or usage
                finish = _finish_of(chunk) or finish
                chunk = await anext(stream, None)
        except (errors.APIError, httpx2.TransportError) as exc:
            if isinstance(exc, errors.ClientError) and exc.code == 400:
                self._refused_files.note(files)
            raise _provider_error(exc) from exc
        finally:
            # The SDK closes its response only when the stream is read to the end; after an error,
            # a cancel or an early exit it would wait for garbage collection. Close it now.
            for response in opened:
                await response.aclose()
        if usage is not None:
            yield UsageReport(usage)
        yield Finished(_map_finish(finish))

    async def summarise(self, conversation: Sequence[ConversationItem]) -> str:
        return await self._one_answer(SUMMARY_PROMPT, conversation, "summary", self._config.max_output_tokens)

    async def title(self, conversation: Sequence[ConversationItem]) -> str:
        # Not capped lower than an answer: a thinking model's thoughts count against the cap, and a
        # small one leaves no room for the title itself.
        return await self._one_answer(TITLE_PROMPT, conversation, "title", self._config.max_output_tokens)

    async def compact(self, summary: str | None, conversation: Sequence[ConversationItem]) -> str:
        return await self._one_answer(
            COMPACTION_PROMPT, compaction_input(summary, conversation), "summary", self._config.max_output_tokens
        )

    async def _one_answer(
        self, instruction: str, conversation: Sequence[ConversationItem], what: str, max_output_tokens: int | None
    ) -> str:
        """One request, not streamed, about the conversation (a summary, a title)."""
        client = self._require_client()
        config = types.GenerateContentConfig(system_instruction=instruction, max_output_tokens=max_output_tokens)
        try:
            async for attempt in self._retrying():
                with attempt:
                    response = await client.aio.models.generate_content(
                        model=self._config.model, contents=transcript(conversation), config=config
                    )
        except (errors.APIError, httpx2.TransportError) as exc:
            raise _provider_error(exc) from exc
        text = (response.text or "").strip()
        if not text:
            raise ProviderError(
                TurnErrorCode.PROVIDER_ERROR, f"the model gave no {what} ({_finish_of(response) or 'no text'})"
            )
        return text

    # ------------------------------------------------------------------ internals

    def _require_client(self) -> genai.Client:
        if self._client is None:
            raise ProviderError(
                TurnErrorCode.PROVIDER_NOT_CONFIGURED, "the model is not configured (GEMINI_API_KEY is not set)"
            )
        return self._client

    def _retrying(self) -> AsyncRetrying:
        return retrying(
            self._config.retry,
            transient=is_transient,
            wait_asked=_retry_delay_asked,
            describe=_describe,
            metrics=self._metrics,
            log=log,
        )

    async def _open_stream(
        self,
        client: genai.Client,
        contents: list[types.ContentDict],
        config: types.GenerateContentConfig,
        opened: list[httpx2.Response],
    ) -> tuple[AsyncIterator[types.GenerateContentResponse], types.GenerateContentResponse | None]:
        """Open the stream and read its first chunk (where HTTP errors surface), with retries."""
        async for attempt in self._retrying():
            with attempt:
                token = _responses.set(opened)
                try:
                    stream = await client.aio.models.generate_content_stream(
                        model=self._config.model, contents=contents, config=config
                    )
                    return stream, await anext(stream, None)
                finally:
                    _responses.reset(token)
        raise AssertionError("unreachable: tenacity re-raises the last failure")


# The HTTP responses a stream opened, noted by the client's response hook while the stream opens.
_responses: ContextVar[list[httpx2.Response] | None] = ContextVar("gemini_responses", default=None)


async def _note_response(response: httpx2.Response) -> None:
    opened = _responses.get()
    if opened is not None:
        opened.append(response)


# ---------------------------------------------------------------------- conversation -> Gemini


def to_contents(
    conversation: Sequence[ConversationItem], files: Mapping[str, bytes | FileWithheld] | None = None
) -> list[types.ContentDict]:
    """Contents for a request, consecutive items of one role merged (parallel calls in one turn);
    a user message's images and PDFs as `inline_data` parts.

    Plain dicts, not `types.Content`: the SDK validates the whole conversation on every request, and
    it validates dicts several times faster than models (docs/performance.md)."""
    contents: list[types.ContentDict] = []
    gemini_ids: dict[str, str | None] = {}
    for item in conversation:
        role: Literal["user", "model"]
        new_parts: list[types.PartDict]
        if isinstance(item, UserText):
            role, new_parts = "user", [_user_part(part) for part in user_parts(item, files or {})]
        elif isinstance(item, ModelText):
            role, new_parts = "model", [{"text": item.text}]
        elif isinstance(item, ToolCallItem):
            call_part = _call_part(item)
            role, new_parts = "model", [call_part]
            gemini_ids[item.call_id] = (call_part.get("function_call") or {}).get("id")
        else:
            role, new_parts = "user", [_response_part(item, gemini_ids.get(item.call_id))]
        parts = contents[-1].get("parts") if contents and contents[-1].get("role") == role else None
        if parts is not None:
            parts.extend(new_parts)
        else:
            contents.append({"role": role, "parts": new_parts})
    return contents


def _user_part(part: str | tuple[AttachmentRef, bytes]) -> types.PartDict:
    if isinstance(part, str):
        return {"text": part}
    file, data = part
    return {"inline_data": {"mime_type": file.mime_type, "data": data}}


def _call_part(call: ToolCallItem) -> types.PartDict:
    stored = (call.provider_data or {}).get(PART_KEY)
    if isinstance(stored, dict):
        # Verbatim, so the thought signature goes back exactly as the model sent it (read as JSON,
        # where the SDK decodes its base64; python-mode dumping keeps it as bytes).
        part = types.Part.model_validate_json(json.dumps(stored))
        return cast(types.PartDict, part.model_dump(exclude_none=True))
    return {"function_call": {"name": call.name, "args": call.args}}


def _response_part(result: ToolResultItem, gemini_id: str | None) -> types.PartDict:
    # Gemini's documented keys: "output" for a result, "error" for a failure.
    response: dict[str, JSONValue] = (
        {"error": result.error.model_dump()} if result.error is not None else {"output": result.result}
    )
    function_response: types.FunctionResponseDict = {"name": result.name, "response": response}
    if gemini_id is not None:
        function_response["id"] = gemini_id
    return {"function_response": function_response}


def _declaration(tool: ToolSpec) -> types.FunctionDeclaration:
    return types.FunctionDeclaration(
        name=tool.name, description=tool.description, parameters_json_schema=tool.parameters
    )


# ---------------------------------------------------------------------- Gemini -> model events


def _events_of(chunk: types.GenerateContentResponse) -> list[ModelEvent]:
    candidate = chunk.candidates[0] if chunk.candidates else None
    parts = candidate.content.parts if candidate and candidate.content and candidate.content.parts else []
    events: list[ModelEvent] = []
    for part in parts:
        if part.thought:
            continue  # a thought summary is not part of the answer
        if part.function_call is not None:
            call = part.function_call
            events.append(
                ToolCallRequest(
                    call_id=call.id or "",
                    name=call.name or "",
                    args=dict(call.args or {}),
                    provider_data={PART_KEY: _stored_part(part)},
                )
            )
        elif part.text:
            events.append(TextDelta(part.text))
    return events


def _stored_part(part: types.Part) -> dict[str, JSONValue]:
    stored: dict[str, JSONValue] = part.model_dump(mode="json", by_alias=True, exclude_none=True)
    if part.thought_signature is not None:
        # Standard base64, as Gemini sends it (pydantic would write the URL-safe alphabet).
        stored["thoughtSignature"] = base64.b64encode(part.thought_signature).decode("ascii")
    return stored


def _usage_of(chunk: types.GenerateContentResponse) -> Usage | None:
    meta = chunk.usage_metadata
    if meta is None or (meta.prompt_token_count is None and meta.candidates_token_count is None):
        return None
    # Thinking tokens are billed as output, so they count as output here.
    output = (meta.candidates_token_count or 0) + (meta.thoughts_token_count or 0)
    return Usage(input_tokens=meta.prompt_token_count or 0, output_tokens=output)


def _finish_of(chunk: types.GenerateContentResponse) -> str | None:
    if chunk.prompt_feedback is not None and chunk.prompt_feedback.block_reason is not None:
        return "SAFETY"  # the prompt itself was blocked: there are no candidates
    candidate = chunk.candidates[0] if chunk.candidates else None
    reason = candidate.finish_reason if candidate else None
    if reason is None:
        return None
    return str(getattr(reason, "value", reason))


def _map_finish(reason: str | None) -> Literal["stop", "max_tokens", "safety"]:
    if reason in (None, "STOP", "FINISH_REASON_UNSPECIFIED"):
        return "stop"
    if reason == "MAX_TOKENS":
        return "max_tokens"
    if reason in _SAFETY_REASONS:
        return "safety"
    raise ProviderError(TurnErrorCode.PROVIDER_ERROR, f"the model stopped with {reason}")


# ---------------------------------------------------------------------- failures


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, errors.APIError):
        return exc.code in RETRYABLE_STATUS
    return isinstance(exc, httpx2.TransportError)


def _retry_delay_asked(exc: BaseException | None) -> float | None:
    """The wait a 429/503 asks for: google.rpc.RetryInfo's retryDelay, or a Retry-After header."""
    if not isinstance(exc, errors.APIError):
        return None
    body = exc.details if isinstance(exc.details, dict) else {}
    error = body.get("error", body)
    for detail in (error.get("details") if isinstance(error, dict) else None) or []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("RetryInfo"):
            match = _DURATION.match(str(detail.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return retry_after_seconds(exc.response.headers.get("retry-after") if exc.response is not None else None)


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, errors.APIError):
        return f"HTTP {exc.code} {exc.status or ''}".strip()
    return type(exc).__name__


def _provider_error(exc: BaseException) -> ProviderError:
    """A coded error for clients; Google's message goes only to the log, in the caller's one line
    about the failure (it can name internals)."""
    said = str(getattr(exc, "message", None) or exc)
    detail = capped(f"{_describe(exc)}: {said}" if isinstance(exc, errors.APIError) else said or None)
    if isinstance(exc, httpx2.TimeoutException):
        return ProviderError(TurnErrorCode.PROVIDER_TIMEOUT, "the model did not answer in time", detail)
    if isinstance(exc, httpx2.TransportError):
        return ProviderError(TurnErrorCode.PROVIDER_UNAVAILABLE, "the model could not be reached", detail)
    assert isinstance(exc, errors.APIError)
    if exc.code == 429:
        return ProviderError(TurnErrorCode.PROVIDER_RATE_LIMITED, "the model is rate limited; try again later", detail)
    if exc.code in RETRYABLE_STATUS:
        return ProviderError(TurnErrorCode.PROVIDER_UNAVAILABLE, f"the model is unavailable (HTTP {exc.code})", detail)
    return ProviderError(
        TurnErrorCode.PROVIDER_REJECTED,
        f"the model refused the request (HTTP {exc.code} {exc.status or ''})".strip(),
        detail,
    )
