"""The bare limit of the stack: python-socketio on the service's uvicorn settings, no logic, no storage.

    PORT=8001 BARE_CHUNK_DELAY_MS=0 .venv/bin/python bench/bare_server.py

It answers `join` (enters a room) and `message` (acks, then emits to the room what the service
emits for the same message: `user_message`, the offline script's answer a word at a time as
`chunk` events with `ts`, then `done`). Stock python-socketio: its own JSON, no coalescing.
BARE_CHUNK_DELAY_MS pauses before each chunk, as OFFLINE_CHUNK_DELAY_MS does in the service;
BARE_WORDS_PER_CHUNK sends that many words a chunk (bench/model_stub.py's bursts).
To measure one of the service's own settings on the bare stack (`bench/run.py --variant`):
BARE_FAST_JSON=1 encodes packets with orjson, BARE_TUNED=1 applies the service's interpreter tuning.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

import socketio
import uvicorn
from common import chunks_of, paced

from server.config import Settings
from server.providers.offline import echo_answer, words
from server.serve import tune_interpreter, uvicorn_config
from server.transport import fast_json

sio = socketio.AsyncServer(
    async_mode="asgi",
    cors_allowed_origins="*",
    logger=False,
    engineio_logger=False,
    **({"json": fast_json} if os.environ.get("BARE_FAST_JSON") else {}),
)
app = socketio.ASGIApp(sio, on_startup=tune_interpreter if os.environ.get("BARE_TUNED") else None)
delay = float(os.environ.get("BARE_CHUNK_DELAY_MS", "0")) / 1000
words_per_chunk = int(os.environ.get("BARE_WORDS_PER_CHUNK", "1"))
streams: set[asyncio.Task[None]] = set()
stored = 0


@sio.on("join")  # type: ignore[misc]
async def join(sid: str, data: dict[str, Any]) -> dict[str, Any]:
    session_id = data.get("session_id") or str(uuid.uuid4())
    await sio.enter_room(sid, session_id)
    return {"ok": True, "session": {"session_id": session_id}, "history": [], "active_turn": None}


@sio.on("message")  # type: ignore[misc]
async def message(sid: str, data: dict[str, Any]) -> dict[str, Any]:
    global stored
    stored += 1
    turn_id = uuid.uuid4().hex
    task = asyncio.create_task(stream(data["session_id"], turn_id, data["text"], stored))
    streams.add(task)
    task.add_done_callback(streams.discard)
    return {"ok": True, "turn_id": turn_id, "event_id": stored}


async def stream(session_id: str, turn_id: str, text: str, event_id: int) -> None:
    ids = {"session_id": session_id, "turn_id": turn_id}
    await sio.emit(
        "user_message", {**ids, "event_id": event_id, "text": text, "client_message_id": None}, room=session_id
    )
    answer = echo_answer(text)
    index = 0
    async for piece in paced(chunks_of(words(answer), words_per_chunk), delay):
        chunk = {**ids, "index": index, "text": piece, "ts": time.monotonic() * 1000}
        index += 1
        await sio.emit("chunk", chunk, room=session_id)
    done = {**ids, "text": answer, "finish_reason": "stop", "usage": None, "event_id": event_id, "error": None}
    await sio.emit("done", done, room=session_id)


if __name__ == "__main__":
    uvicorn.Server(uvicorn_config(Settings(), app)).run()
