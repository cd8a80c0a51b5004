"""A local stand-in for OpenAI's Chat Completions API, spoken by the real openai SDK in the tests.

It serves `POST /v1/chat/completions` (a client's base URL is `{fake.url}/v1`): a request with
`"stream": true` gets Server-Sent Events, one `data: <json>` event per chunk and `data: [DONE]` at
the end; any other gets one JSON body. It answers each request with the next scripted reply,
records every request, and notices when a client hangs up a stream before its end.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

COMPLETIONS_PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class Pause:
    seconds: float


HANG = Pause(3600)  # a stream that stalls until the client hangs up


@dataclass(frozen=True)
class Gate:
    """The stream waits here until the test opens it (what a client got before is then known)."""

    opened: asyncio.Event = field(default_factory=asyncio.Event)


Event = dict[str, Any] | Pause | Gate | str  # a chunk, a wait, or bytes sent as they are (a malformed line)


@dataclass
class Reply:
    status: int = 200
    events: list[Event] = field(default_factory=list)  # streamed replies; a pause also delays a body
    body: dict[str, Any] | None = None  # error bodies, non-streamed answers (to a streamed request too)
    headers: dict[str, str] = field(default_factory=dict)
    done: bool = True  # False: the stream ends without `data: [DONE]`, as a dropped connection does


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]  # names in lower case
    body: dict[str, Any]
    at: float  # time.monotonic() on arrival

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = self.body["messages"]
        return messages

    @property
    def tools(self) -> list[dict[str, Any]]:
        tools: list[dict[str, Any]] = self.body.get("tools") or []
        return tools

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


class FakeOpenAI:
    def __init__(self) -> None:
        self.url = ""  # set once it serves
        self.requests: list[Recorded] = []  # streamed requests: the turns
        self.stream_replies: deque[Reply] = deque()
        # Other non-streamed requests (summaries): answered "Summary." unless scripted.
        self.complete_requests: list[Recorded] = []
        self.complete_replies: deque[Reply] = deque()
        # Title requests (their own queue and record, so that a session's title does not take a
        # reply scripted for its summary): answered "A fake title" unless scripted.
        self.title_replies: deque[Reply] = deque()
        self.title_requests: list[Recorded] = []
        # Compaction requests, likewise: answered with a summary naming how many messages it read.
        self.compaction_replies: deque[Reply] = deque()
        self.compaction_requests: list[Recorded] = []
        # When set, a stream that asked for usage and has none scripted reports the tokens of what
        # it received (see prompt_tokens), as a real endpoint counts them.
        self.count_tokens = False
        # When set, a request with any part but text is refused 400, as a text-only model's server does.
        self.text_only = False
        self.hung_up = 0  # streams the client closed before their end
        self.hang_ups = asyncio.Event()
        self.app = Starlette(
            routes=[
                Route(COMPLETIONS_PATH, self._handle, methods=["POST"]),
                Route("/{path:path}", _not_found, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
            ]
        )

    def stream(self, *replies: Reply) -> None:
        self.stream_replies.extend(replies)

    def complete(self, *replies: Reply) -> None:
        self.complete_replies.extend(replies)

    async def _handle(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _error_response(400, "We could not parse the JSON body of your request.")
        recorded = Recorded(request.url.path, dict(request.headers), body, time.monotonic())
        streamed = body.get("stream") is True
        messages = body.get("messages") if isinstance(body.get("messages"), list) else []
        if streamed:
            self.requests.append(recorded)
            queue, default = self.stream_replies, self._default_stream(recorded)
        elif _instructed(messages, "short title"):
            self.title_requests.append(recorded)
            queue, default = self.title_replies, Reply(body=completion_body("A fake title"))
        elif _instructed(messages, "running summary"):
            self.compaction_requests.append(recorded)
            read = sum(1 for m in messages if isinstance(m, dict) and m.get("role") not in ("system", "developer"))
            queue, default = self.compaction_replies, Reply(body=completion_body(f"FAKE SUMMARY of {read} messages"))
        else:
            self.complete_requests.append(recorded)
            queue, default = self.complete_replies, Reply(body=completion_body("Summary."))
        problem = _invalid(body) or (_not_text(messages) if self.text_only else None)
        if problem:  # refused as OpenAI refuses it, without taking a scripted reply
            return _error_response(400, problem)
        reply = queue.popleft() if queue else default
        if not streamed or reply.status != 200 or reply.body is not None:  # a body: not an event stream
            return await _answered(reply, body["model"])
        events = reply.events
        if self.count_tokens and _wants_usage(body) and not any(_has_usage(event) for event in events):
            events = [*events, usage_chunk(prompt_tokens(messages), 1)]
        return StreamingResponse(
            self._sse(events, body["model"], reply.done), media_type="text/event-stream", headers=reply.headers
        )

    def _default_stream(self, recorded: Recorded) -> Reply:
        """ "Hi.", with usage (counted, under count_tokens) only when the request asks for it."""
        events: list[Event] = [event for event in text_reply("Hi.").events if not _has_usage(event)]
        if _wants_usage(recorded.body) and not self.count_tokens:
            events.append(usage_chunk(10, 3))
        return Reply(events=events)

    async def _sse(self, events: list[Event], model: str, done: bool) -> AsyncIterator[bytes]:
        finished = False
        try:
            for event in events:
                if isinstance(event, Pause):
                    await asyncio.sleep(event.seconds)
                elif isinstance(event, Gate):
                    await event.opened.wait()
                elif isinstance(event, str):
                    yield event.encode()
                else:
                    yield f"data: {_compact(_stamped(event, model))}\n\n".encode()
            if done:
                yield b"data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                self.hung_up += 1
                self.hang_ups.set()


async def _not_found(request: Request) -> Response:
    status = 405 if request.url.path == COMPLETIONS_PATH else 404
    return _error_response(status, f"Invalid URL ({request.method} {request.url.path})")


async def _answered(reply: Reply, model: str) -> Response:
    for event in reply.events:  # a scripted pause before the answer
        if isinstance(event, Pause):
            await asyncio.sleep(event.seconds)
    body = _stamped(reply.body, model) if reply.body is not None else None
    return JSONResponse(body, status_code=reply.status, headers=reply.headers)


def _stamped(event: dict[str, Any], model: str) -> dict[str, Any]:
    """A chunk or completion built here names the model the request asked for, as OpenAI's do."""
    if event.get("object") in ("chat.completion", "chat.completion.chunk") and "model" not in event:
        return {**event, "model": model}
    return event


def _compact(event: dict[str, Any]) -> str:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"))


def _wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _has_usage(event: Event) -> bool:
    return isinstance(event, dict) and bool(event.get("usage"))


def _instructed(messages: list[Any], words: str) -> bool:
    system = [m for m in messages if isinstance(m, dict) and m.get("role") in ("system", "developer")]
    return any(words in _text(message.get("content")) for message in system)


def _text(content: Any) -> str:
    """A message's text, whether its content is a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _invalid(body: dict[str, Any]) -> str | None:
    """Why OpenAI would refuse this request with a 400, for the mistakes a client can make."""
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "you must provide a model parameter"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return "Invalid 'messages': expected a non-empty array of objects."
    if "stream_options" in body and body.get("stream") is not True:
        return "The 'stream_options' parameter is only allowed when 'stream' is enabled."
    return _unanswered_calls(messages)


def _not_text(messages: list[Any]) -> str | None:
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") != "text" for p in content):
            return "This model does not support image or file inputs."
    return None


def _unanswered_calls(messages: list[dict[str, Any]]) -> str | None:
    """An assistant's tool calls must each be answered by a tool message, right after it."""
    pending: set[Any] = set()
    for message in messages:
        role = message.get("role")
        if role == "tool":
            if message.get("tool_call_id") not in pending:
                return (
                    "Invalid parameter: messages with role 'tool' must be a response to a preceeding "
                    "message with 'tool_calls'."
                )
            pending.discard(message.get("tool_call_id"))
            continue
        if pending:
            break
        if role == "assistant":
            pending = {call.get("id") for call in message.get("tool_calls") or [] if isinstance(call, dict)}
    if pending:
        return (
            "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
            "'tool_call_id'. The following tool_call_ids did not have response messages: "
            + ", ".join(sorted(map(str, pending)))
        )
    return None


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """The conversation's tokens at 4 characters each: every message's text (system and tool
    messages' included) and the JSON of the assistant's tool calls."""
    size = 0
    for message in messages:
        size += len(_text(message.get("content")))
        if message.get("tool_calls"):
            size += len(json.dumps(message["tool_calls"], ensure_ascii=False))
    return size // 4


# ---------------------------------------------------------------- replies, in OpenAI's wire format


class _NullIndex:
    def __repr__(self) -> str:
        return "NULL_INDEX"


# A tool-call piece whose index is JSON null, as Gemini's OpenAI-compatible endpoint sends it.
NULL_INDEX: Final = _NullIndex()


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None) -> dict[str, Any]:
    """One chunk of one choice; `usage` on it as some servers send it with the last choice. The
    fake adds the request's model."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {**_chunk_head(), "choices": [choice], "usage": usage}


def text_chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    return chunk({"content": text}, finish)


def role_chunk() -> dict[str, Any]:
    """The first chunk of OpenAI's answers."""
    return chunk({"role": "assistant", "content": "", "refusal": None})


def finish_chunk(reason: str) -> dict[str, Any]:
    return chunk({}, reason)


def usage_chunk(prompt: int, completion: int) -> dict[str, Any]:
    """The last chunk when the request asked for `stream_options.include_usage`: no choices."""
    return {**_chunk_head(), "choices": [], "usage": usage(prompt, completion)}


def call_delta(
    index: int | _NullIndex | None,
    id: str | None = None,
    name: str | None = None,
    arguments: str | None = None,
    type_: bool = True,
) -> dict[str, Any]:
    """One element of `delta.tool_calls`. Keys given None are left out; NULL_INDEX sends
    `"index": null`. The first piece (one with an id or a name) says `"type": "function"` unless
    `type_` is False, as some servers leave it out."""
    piece: dict[str, Any] = {}
    if index is NULL_INDEX:
        piece["index"] = None
    elif index is not None:
        piece["index"] = index
    if id is not None:
        piece["id"] = id
    if type_ and (id is not None or name is not None):
        piece["type"] = "function"
    function = {key: value for key, value in (("name", name), ("arguments", arguments)) if value is not None}
    if function:
        piece["function"] = function
    return piece


def tool_calls_chunk(*call_deltas: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return chunk({"tool_calls": list(call_deltas)}, finish)


def text_reply(text: str, finish: str = "stop", prompt: int = 10, completion: int = 3) -> Reply:
    """A streamed answer as OpenAI sends it: role, the text in a few pieces, finish, usage."""
    pieces = [text_chunk(piece) for piece in _pieces(text, 3)]
    return Reply(events=[role_chunk(), *pieces, finish_chunk(finish), usage_chunk(prompt, completion)])


def call_reply(*calls: tuple[str, str, dict[str, Any] | str], prompt: int = 10, completion: int = 3) -> Reply:
    """Streamed tool calls as OpenAI sends them: each (id, name, arguments) opens with its id and
    name, then its arguments' JSON in pieces; finish "tool_calls", usage."""
    events: list[Event] = [chunk({"role": "assistant", "content": None, "refusal": None})]
    for index, (call_id, name, arguments) in enumerate(calls):
        events.append(tool_calls_chunk(call_delta(index, call_id, name, "")))
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        events += [tool_calls_chunk(call_delta(index, arguments=piece)) for piece in _pieces(text, 2)]
    return Reply(events=[*events, finish_chunk("tool_calls"), usage_chunk(prompt, completion)])


def completion_body(text: str, finish: str = "stop") -> dict[str, Any]:
    """A non-streamed answer (the fake adds the request's model)."""
    message = {"role": "assistant", "content": text, "refusal": None}
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": usage(10, 3),
    }


def error_reply(
    status: int, code: str, message: str = "fake failure", type_: str | None = None, retry_after: str | None = None
) -> Reply:
    """An HTTP error; `type_` defaults to what OpenAI names errors of that status."""
    headers = {"retry-after": retry_after} if retry_after is not None else {}
    return Reply(status=status, body=_error(code, message, type_ or _error_type(status)), headers=headers)


def error_event(message: str = "fake failure", type_: str = "server_error", code: str | None = None) -> dict[str, Any]:
    """An error in the middle of a stream (the SDK raises APIError on it)."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _error_type(status: int) -> str:
    if status == 429:
        return "requests"
    return "server_error" if status >= 500 else "invalid_request_error"


def _error(code: str | None, message: str, type_: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _error_response(status: int, message: str) -> JSONResponse:
    """The fake's own refusals, with no code as OpenAI's."""
    return JSONResponse(_error(None, message, _error_type(status)), status_code=status)


def _chunk_head() -> dict[str, Any]:
    return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time())}


def _pieces(text: str, count: int) -> list[str]:
    """`text` cut into at most `count` pieces of nearly equal length, none empty."""
    size = max(1, -(-len(text) // count))
    return [text[start : start + size] for start in range(0, len(text), size)]
