"""A model for the benchmark that streams like Gemini: the REST API's SSE, answered at a model's pace.

    PORT=8002 STUB_BURST_WORDS=6 STUB_BURST_MS=250 .venv/bin/python bench/model_stub.py

The service reaches it through the real google-genai SDK (LLM_PROVIDER=gemini, GEMINI_BASE_URL).
Every `streamGenerateContent` is answered with the offline script's answer to the last user text
(the same words the bare server sends), STUB_BURST_WORDS words per event, one event every
STUB_BURST_MS, the last with its finish reason and usage, as Gemini ends a stream. A
`generateContent` (a title, a session's summary) gets a one-line answer, and a compaction (its
instruction asks for a running summary) one of 400 words, what the prompt allows. The
usage counts the request's text at 4 characters a token, as the service's context budget
estimates it, so that its calibration by the provider's count stays near 1 as with a real model.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from common import chunks_of, compaction_summary, paced
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from server.providers.offline import echo_answer, words

BURST_WORDS = int(os.environ.get("STUB_BURST_WORDS", "6"))
BURST_SECONDS = float(os.environ.get("STUB_BURST_MS", "250")) / 1000


def response(text: str, finish: bool, count: int, prompt: int = 10) -> dict[str, object]:
    """One GenerateContentResponse: a streamed event, or a whole answer."""
    candidate: dict[str, object] = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
    body: dict[str, object] = {"candidates": [candidate], "modelVersion": "bench-stub", "responseId": "bench"}
    if finish:
        candidate["finishReason"] = "STOP"
        usage = {"promptTokenCount": prompt, "candidatesTokenCount": count, "totalTokenCount": prompt + count}
        body["usageMetadata"] = usage
    return body


def prompt_tokens(contents: list[dict[str, Any]]) -> int:
    """The contents at 4 characters a token (a part's JSON when it is not text)."""
    parts = [part for content in contents for part in content.get("parts", [])]
    return sum(len(p["text"]) if "text" in p else len(json.dumps(p)) for p in parts) // 4 + 1


def one_answer(body: dict[str, Any]) -> Response:
    instruction = json.dumps(body.get("systemInstruction") or body.get("system_instruction") or "")
    compaction = "running summary" in instruction
    text = compaction_summary() if compaction else "A summary from the benchmark's model stub."
    return JSONResponse(response(text, True, len(text.split()), prompt_tokens(body["contents"])))


async def answer(request: Request) -> Response:
    body = await request.json()
    if request.path_params["target"].endswith(":generateContent"):
        return one_answer(body)
    contents = body["contents"]
    prompt = prompt_tokens(contents)
    question = next(
        (p["text"] for c in reversed(contents) if c.get("role") == "user" for p in c["parts"] if "text" in p), ""
    )
    pieces = words(echo_answer(question))
    bursts = chunks_of(pieces, BURST_WORDS)

    async def body() -> AsyncIterator[bytes]:
        n = 0
        async for text in paced(bursts, BURST_SECONDS):
            n += 1
            yield f"data: {json.dumps(response(text, n == len(bursts), len(pieces), prompt))}\r\n\r\n".encode()

    return StreamingResponse(body(), media_type="text/event-stream")


app = Starlette(routes=[Route("/{version}/models/{target:path}", answer, methods=["POST"])])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ["PORT"]), log_level="warning", loop="uvloop")
