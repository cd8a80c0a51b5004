"""A local stand-in for the Gemini REST API, spoken by the real google-genai SDK in the tests.

It serves `POST /{v1|v1beta}/models/{model}:streamGenerateContent?alt=sse` (Server-Sent Events,
one `data: <json>` line per chunk, no end marker) and `:generateContent` (one JSON body), answers
each request with the next scripted reply, records every request, and notices when a client hangs
up a stream before its end.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass(frozen=True)
class Pause:
    seconds: float


HANG = Pause(3600)  # a stream that stalls until the client hangs up


@dataclass
class Reply:
    status: int = 200
    events: list[dict[str, Any] | Pause] = field(default_factory=list)  # streamed replies
    body: dict[str, Any] | None = None  # error bodies and generateContent answers
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Recorded:
    method: str  # streamGenerateContent or generateContent
    version: str
    model: str
    query: dict[str, str]
    headers: dict[str, str]
    body: dict[str, Any]
    at: float  # time.monotonic() on arrival

    @property
    def contents(self) -> list[dict[str, Any]]:
        contents: list[dict[str, Any]] = self.body["contents"]
        return contents


class FakeGemini:
    def __init__(self) -> None:
        self.url = ""  # set once it serves
        self.requests: list[Recorded] = []
        self.stream_replies: deque[Reply] = deque()
        self.generate_replies: deque[Reply] = deque()
        # Title requests (their own queue and record, so that a session's title does not take a
        # reply scripted for its summary): answered "A fake title" unless scripted.
        self.title_replies: deque[Reply] = deque()
        self.title_requests: list[Recorded] = []
        # Compaction requests, likewise: answered with a summary naming how many contents it read.
        self.compaction_replies: deque[Reply] = deque()
        self.compaction_requests: list[Recorded] = []
        # When set, a streamed answer without usage reports the tokens of what it received (the
        # contents' text and JSON at 4 characters a token), as a real endpoint counts them.
        self.count_tokens = False
        self.hung_up = 0  # streams the client closed before their end
        self.hang_ups = asyncio.Event()
        self.app = Starlette(routes=[Route("/{version}/models/{target:path}", self._handle, methods=["POST"])])

    def stream(self, *replies: Reply) -> None:
        self.stream_replies.extend(replies)

    def generate(self, *replies: Reply) -> None:
        self.generate_replies.extend(replies)

    def calls(self, method: str = "streamGenerateContent") -> list[Recorded]:
        return [r for r in self.requests if r.method == method]

    async def _handle(self, request: Request) -> Response:
        model, _, method = request.path_params["target"].rpartition(":")
        version = request.path_params["version"]
        if version not in ("v1", "v1beta") or method not in ("streamGenerateContent", "generateContent"):
            return JSONResponse(_error(404, "NOT_FOUND", f"no route {request.url.path}"), status_code=404)
        recorded = Recorded(
            method,
            version,
            model,
            dict(request.query_params),
            dict(request.headers),
            await request.json(),
            time.monotonic(),
        )
        if method == "generateContent" and _instructed(recorded.body, "short title"):
            self.title_requests.append(recorded)
            reply = self.title_replies.popleft() if self.title_replies else Reply(body=text_response("A fake title"))
            return await _answered(reply)
        if method == "generateContent" and _instructed(recorded.body, "running summary"):
            self.compaction_requests.append(recorded)
            default = Reply(body=text_response(f"FAKE SUMMARY of {len(recorded.contents)} contents"))
            return await _answered(self.compaction_replies.popleft() if self.compaction_replies else default)
        self.requests.append(recorded)
        if method == "generateContent":
            reply = self.generate_replies.popleft() if self.generate_replies else Reply(body=text_response("Summary."))
            return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)
        if request.query_params.get("alt") != "sse":
            return JSONResponse(_error(400, "INVALID_ARGUMENT", "this fake streams only with alt=sse"), 400)
        reply = self.stream_replies.popleft() if self.stream_replies else Reply(events=[text_chunk("Hi.", "STOP")])
        if reply.status != 200:
            return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)
        events = reply.events
        if self.count_tokens and events and not any(isinstance(e, dict) and "usageMetadata" in e for e in events):
            last = events[-1]
            if isinstance(last, dict):
                events = [*events[:-1], {**last, "usageMetadata": usage(prompt_tokens(recorded.contents), 1)}]
        return StreamingResponse(self._sse(events), media_type="text/event-stream", headers=reply.headers)

    async def _sse(self, events: list[dict[str, Any] | Pause]) -> AsyncIterator[bytes]:
        finished = False
        try:
            for event in events:
                if isinstance(event, Pause):
                    await asyncio.sleep(event.seconds)
                else:
                    yield f"data: {json.dumps(event)}\r\n\r\n".encode()
            finished = True
        finally:
            if not finished:
                self.hung_up += 1
                self.hang_ups.set()


def _instructed(body: dict[str, Any], words: str) -> bool:
    parts = (body.get("systemInstruction") or {}).get("parts") or []
    return any(words in str(part.get("text", "")) for part in parts)


async def _answered(reply: Reply) -> Response:
    for event in reply.events:  # a scripted pause before the answer
        if isinstance(event, Pause):
            await asyncio.sleep(event.seconds)
    return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)


def prompt_tokens(contents: list[dict[str, Any]]) -> int:
    """The conversation's tokens at 4 characters each: texts, and calls' and results' JSON."""
    size = 0
    for content in contents:
        for part in content.get("parts", []):
            if "text" in part:
                size += len(part["text"])
            for key in ("functionCall", "functionResponse"):
                if key in part:
                    size += len(json.dumps(part[key], ensure_ascii=False))
    return size // 4


# ---------------------------------------------------------------- replies, in Gemini's wire format


def usage(prompt: int, candidates: int, thoughts: int = 0) -> dict[str, int]:
    meta = {"promptTokenCount": prompt, "candidatesTokenCount": candidates, "totalTokenCount": prompt + candidates}
    if thoughts:
        meta["thoughtsTokenCount"] = thoughts
        meta["totalTokenCount"] += thoughts
    return meta


def chunk(parts: list[dict[str, Any]], finish: str | None = None, meta: dict[str, int] | None = None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    event: dict[str, Any] = {"candidates": [candidate], "modelVersion": "fake-gemini", "responseId": "fake"}
    if meta:
        event["usageMetadata"] = meta
    return event


def text_chunk(text: str, finish: str | None = None, meta: dict[str, int] | None = None) -> dict[str, Any]:
    return chunk([{"text": text}], finish, meta)


def call_part(
    name: str, args: dict[str, Any], call_id: str | None = None, signature: str | None = None
) -> dict[str, Any]:
    call: dict[str, Any] = {"name": name, "args": args}
    if call_id:
        call["id"] = call_id
    part: dict[str, Any] = {"functionCall": call}
    if signature:
        part["thoughtSignature"] = signature
    return part


def text_response(text: str, finish: str = "STOP") -> dict[str, Any]:
    return text_chunk(text, finish, usage(10, 3))


def error_reply(status: int, code: str, message: str = "fake failure", retry_delay: str | None = None) -> Reply:
    body = _error(status, code, message)
    if retry_delay:
        body["error"]["details"] = [
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay},
        ]
    return Reply(status=status, body=body)


def _error(status: int, code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": status, "message": message, "status": code}}


def signature_bytes(value: str) -> bytes:
    """A thought signature's bytes, whichever base64 alphabet carries it (the SDK sends URL-safe)."""
    return base64.urlsafe_b64decode(value.replace("+", "-").replace("/", "_"))
