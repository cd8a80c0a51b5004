"""Chat over the plain WebSocket endpoint (`/ws/session/{id}`), with the `websockets` package.

    python client_examples/plain_ws_client.py                       # a new session
    python client_examples/plain_ws_client.py --session <uuid>      # one a Socket.IO tab is in, too
    python client_examples/plain_ws_client.py --url ws://host:8000  # or SERVER_URL=ws://host:8000

Each line you type is sent as it is (plain text is a message); `/cancel` stops the running answer.
Every frame the server sends is `{"event": ..., "data": ...}`. It shows the session's last messages
(--history, 50 by default) and, when there are earlier ones, a line saying where to read them
(`GET /api/sessions/<id>/events?before_event_id=`). Exit status: 0 when you end the chat (end of
input), 1 when the server refuses it or ends it (the session deleted: close 4404; a shutdown).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import threading
import uuid
from typing import Any
from urllib.parse import urlencode

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

HISTORY_PAGE = 50  # the last messages, as a chat shows them; a session may hold thousands


def show(event: str, data: Any) -> str | None:
    """A frame as a line (None: nothing to print); chunks print without a newline."""
    if event == "chunk":
        return str(data["text"])
    if event == "tool_call":
        return f"\n  -> tool call {data['name']}({data.get('args', {})})\n"
    if event == "tool_result":
        outcome = f"error {data['error']['code']}" if data.get("error") else f"result {data.get('result')}"
        return f"  <- tool {outcome}\n"
    if event == "done":
        return f"\n[done: {data['finish_reason']}]\n"
    if event == "session_updated":
        return f"[title: {data['title']}]\n"
    if event == "session_deleted":
        return f"\n[session {data['session_id']} was deleted; this chat is over]\n"
    if event == "ack" and not data["ok"]:
        return f"[{data['error']['code']}: {data['error']['message']}]\n"
    if event == "error":
        return f"refused: {data['code']}: {data['message']}\n"
    return None


def show_session(data: dict[str, Any], http_url: str) -> str:
    """The first frame: the session, a line about earlier messages if any, then its last page."""
    session_id = data["session"]["session_id"]
    lines = [f"session {session_id}\n"]
    if data["session"].get("title"):
        lines.append(f"[title: {data['session']['title']}]\n")
    if data.get("history_more"):
        first = data["history"][0]["event_id"]
        where = f"{http_url}/api/sessions/{session_id}/events?before_event_id={first}"
        lines.append(f"[earlier messages not shown: GET {where}]\n")
    lines.extend(history_line(event) for event in data["history"])
    return "".join(lines)


def history_line(event: dict[str, Any]) -> str:
    """A stored event, printed as the live one was."""
    kind, content = event["event_type"], event["content"]
    if kind in ("tool_call", "tool_result"):
        with contextlib.suppress(ValueError):
            body = json.loads(content)
            if isinstance(body, dict) and "name" in body:
                return (show(kind, body) or "").lstrip("\n")
    if kind == "ai_message":
        ending = event.get("finish_reason")
        return f"assistant: {content}" + (f" [{ending}]" if ending not in (None, "stop") else "") + "\n"
    return f"you: {content}\n" if kind == "user_message" else f"{kind}: {content}\n"


def stdin_lines() -> asyncio.Queue[str]:
    """The lines typed ('' at the end of input), read by a daemon thread: a chat the server ends
    exits at once rather than waiting for one more line (an executor's thread would hold the exit)."""
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()

    def read() -> None:
        while True:
            line = sys.stdin.readline()
            with contextlib.suppress(RuntimeError):  # the loop has closed: the chat is over
                loop.call_soon_threadsafe(lines.put_nowait, line)
            if not line:
                return

    threading.Thread(target=read, name="stdin", daemon=True).start()
    return lines


async def receive(ws: ClientConnection, turn_over: asyncio.Event) -> None:
    answering = False  # an answer is being printed: a title waits for its end
    title: str | None = None
    with contextlib.suppress(ConnectionClosed):
        async for raw in ws:
            frame = json.loads(raw)
            event = frame["event"]
            if event in ("user_message", "chunk", "tool_call", "tool_result"):
                answering = True
            if event == "session_updated" and answering:
                title = show(event, frame["data"])
                continue
            line = show(event, frame["data"]) or ""
            if event == "done":
                answering, line, title = False, line + (title or ""), None
            sys.stdout.write(line)
            sys.stdout.flush()
            if event == "done" or (event == "ack" and not frame["data"]["ok"]):
                turn_over.set()


async def chat(ws: ClientConnection, http_url: str) -> int:
    first = json.loads(await ws.recv())  # `session`, or `error` before the server closes
    if first["event"] == "error":
        sys.stdout.write(show("error", first["data"]) or "")
        return 1
    sys.stdout.write(show_session(first["data"], http_url))
    turn_over = asyncio.Event()
    reader = asyncio.create_task(receive(ws, turn_over))
    lines = stdin_lines()
    while not reader.done():
        typed = asyncio.create_task(lines.get())
        await asyncio.wait([reader, typed], return_when=asyncio.FIRST_COMPLETED)
        if not typed.done():  # the server ended the chat
            typed.cancel()
            break
        line = typed.result()
        if not line:
            await ws.close()
            await reader
            return 0
        if not line.strip():
            continue
        turn_over.clear()
        await ws.send(json.dumps({"event": "cancel"}) if line.strip() == "/cancel" else line.strip())
        answered = asyncio.create_task(turn_over.wait())
        await asyncio.wait([reader, answered], return_when=asyncio.FIRST_COMPLETED)
        answered.cancel()
    await reader
    return 1  # closed by the server: the session deleted (4404), a shutdown (1001), an expired token (4401)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--url",
        default=os.environ.get("SERVER_URL", "ws://127.0.0.1:8000"),
        help="the server (default: SERVER_URL, else ws://127.0.0.1:8000)",
    )
    parser.add_argument("--session", default=str(uuid.uuid4()), help="the session to join (default: a new one)")
    parser.add_argument("--token", default=os.environ.get("CHAT_TOKEN"), help="a JWT, when authentication is on")
    parser.add_argument("--history", type=int, default=HISTORY_PAGE, help=f"last events shown (default {HISTORY_PAGE})")
    args = parser.parse_args()
    base = args.url.replace("http://", "ws://").replace("https://", "wss://").rstrip("/")
    http_url = base.replace("ws://", "http://").replace("wss://", "https://")
    query = {"history_limit": args.history} | ({"token": args.token} if args.token else {})
    url = f"{base}/ws/session/{args.session}?{urlencode(query)}"
    try:
        # The websockets package refuses frames over 1 MiB by default; one event (an answer, a tool's
        # result, a row written by other SQL) has no bound in the contract: no limit here.
        async with connect(url, max_size=None) as ws:
            return await chat(ws, http_url)
    except (OSError, ConnectionClosed) as exc:
        print(f"cannot talk to {args.url} ({exc}); set the server with --url or SERVER_URL", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
