"""Chat over the plain WebSocket endpoint (`/ws/session/{id}`), with the `websockets` package.

    python client_examples/plain_ws_client.py                       # a new session
    python client_examples/plain_ws_client.py --session <uuid>      # one a Socket.IO tab is in, too
    python client_examples/plain_ws_client.py --url ws://host:8000  # or SERVER_URL=ws://host:8000

Each line you type is sent as it is (plain text is a message); `/cancel` stops the running answer.
Every frame the server sends is `{"event": ..., "data": ...}`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import uuid
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed


def show(event: str, data: Any) -> str | None:
    """A frame as a line (None: nothing to print); chunks print without a newline."""
    if event == "session":
        return f"session {data['session']['session_id']} ({len(data['history'])} events before)\n"
    if event == "chunk":
        return str(data["text"])
    if event == "tool_call":
        return f"\n  -> tool call {data['name']}({data['args']})\n"
    if event == "tool_result":
        outcome = f"error {data['error']['code']}" if data["error"] else f"result {data['result']}"
        return f"  <- tool {outcome}\n"
    if event == "done":
        return f"\n[done: {data['finish_reason']}]\n"
    if event == "ack" and not data["ok"]:
        return f"[{data['error']['code']}: {data['error']['message']}]\n"
    if event == "error":
        return f"refused: {data['code']}: {data['message']}\n"
    return None


async def receive(ws: ClientConnection, turn_over: asyncio.Event) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for raw in ws:
            frame = json.loads(raw)
            line = show(frame["event"], frame["data"])
            if line:
                sys.stdout.write(line)
                sys.stdout.flush()
            if frame["event"] == "done" or (frame["event"] == "ack" and not frame["data"]["ok"]):
                turn_over.set()


async def chat(ws: ClientConnection) -> int:
    first = json.loads(await ws.recv())  # `session`, or `error` before the server closes
    sys.stdout.write(show(first["event"], first["data"]) or "")
    if first["event"] == "error":
        return 1
    turn_over = asyncio.Event()
    reader = asyncio.create_task(receive(ws, turn_over))
    while (line := await asyncio.to_thread(sys.stdin.readline)) and not reader.done():
        if not line.strip():
            continue
        turn_over.clear()
        await ws.send(json.dumps({"event": "cancel"}) if line.strip() == "/cancel" else line.strip())
        answered = asyncio.create_task(turn_over.wait())
        await asyncio.wait([reader, answered], return_when=asyncio.FIRST_COMPLETED)
        answered.cancel()
    await ws.close()
    await reader
    return 0


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--url",
        default=os.environ.get("SERVER_URL", "ws://127.0.0.1:8000"),
        help="the server (default: SERVER_URL, else ws://127.0.0.1:8000)",
    )
    parser.add_argument("--session", default=str(uuid.uuid4()), help="the session to join (default: a new one)")
    parser.add_argument("--token", default=os.environ.get("CHAT_TOKEN"), help="a JWT, when authentication is on")
    args = parser.parse_args()
    url = args.url.replace("http://", "ws://").replace("https://", "wss://").rstrip("/")
    url += f"/ws/session/{args.session}" + (f"?token={args.token}" if args.token else "")
    try:
        async with connect(url) as ws:
            return await chat(ws)
    except (OSError, ConnectionClosed) as exc:
        print(f"cannot talk to {args.url} ({exc}); set the server with --url or SERVER_URL", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
