"""Terminal chat with the realtime backend, using the python-socketio AsyncClient.

    python client_examples/python_client.py                     # a new session
    python client_examples/python_client.py --session <uuid>    # rejoin one (from another tab, too)
    python client_examples/python_client.py --url http://host:8000   # or SERVER_URL=http://host:8000

Type a message and press Enter; the answer streams in as it is generated. `/cancel` stops the
running answer, `/quit` leaves. Every tab of the same session sees the same stream.

Rejoining shows the session's last messages (--history, 50 by default) and, when there are earlier
ones, a line saying where to read them (`GET /api/sessions/<id>/events?before_event_id=`). A new
title of the session is shown as it comes. Exit status: 0 when you end the chat (`/quit`, end of
input), 1 when the server refuses it or ends it (the session was deleted).
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
from collections.abc import Awaitable
from typing import Any, TypeVar

import engineio.payload
import socketio

# With --transport polling, python-engineio refuses a response that bundles more than 16 packets
# (python-engineio#142), and a streamed answer easily queues more between two polls.
engineio.payload.Payload.max_decode_packets = 10_000

HISTORY_PAGE = 50  # the last messages, as a chat shows them; a session may hold thousands
T = TypeVar("T")


class Chat:
    def __init__(self, url: str, transport: str, auth: dict[str, str], history: int = HISTORY_PAGE) -> None:
        self.url = url
        self.transport = transport
        self.auth = auth
        self.history = history
        self.refusal: str | None = None
        # aiohttp closes a WebSocket message over 4 MiB, and one event (an answer, a tool's result,
        # a row written by other SQL) has no bound in the contract: no limit here.
        self.sio = socketio.AsyncClient(reconnection=True, websocket_extra_options={"max_msg_size": 0})
        self.sio.on("connect_error", self.on_connect_error)
        self.session_id: str | None = None
        self.turn_done = asyncio.Event()
        self.turn_done.set()
        self.deleted = asyncio.Event()  # the session was deleted: the chat is over
        self.answering = False  # an answer is being printed: a title waits for its end
        self.title: str | None = None  # a title to show once the answer ends
        self.sent_ids: set[str] = set()
        for name in ("user_message", "chunk", "tool_call", "tool_result", "done", "presence"):
            self.sio.on(name, getattr(self, f"on_{name}"))
        self.sio.on("session_updated", self.on_session_updated)
        self.sio.on("session_deleted", self.on_session_deleted)

    async def on_connect_error(self, data: Any) -> None:
        # The server's refusal is an object ({"message": "unauthorized"}); a network failure is not.
        if isinstance(data, dict):
            self.refusal = str(data.get("message"))

    @staticmethod
    def say(text: str, end: str = "\n") -> None:
        sys.stdout.write(text + end)
        sys.stdout.flush()

    async def on_user_message(self, data: dict[str, Any]) -> None:
        if data["client_message_id"] not in self.sent_ids:  # sent from another tab
            self.say(f"\n[other tab] you: {data['text']}")
        self.turn_done.clear()
        self.answering = True
        self.say("assistant: ", end="")

    async def on_chunk(self, data: dict[str, Any]) -> None:
        self.say(data["text"], end="")

    async def on_tool_call(self, data: dict[str, Any]) -> None:
        self.say("\n" + tool_call_line(data))

    async def on_tool_result(self, data: dict[str, Any]) -> None:
        self.say(tool_result_line(data))
        self.say("assistant: ", end="")

    async def on_done(self, data: dict[str, Any]) -> None:
        note = data["finish_reason"]
        if data["error"]:
            note += f" ({data['error']['code']}: {data['error']['message']})"
        if data["usage"]:
            note += f", tokens in/out {data['usage']['input_tokens']}/{data['usage']['output_tokens']}"
        self.say(f"\n[done: {note}]")
        self.answering = False
        if self.title is not None:
            self.say(f"[title: {self.title}]")
            self.title = None
        self.turn_done.set()

    async def on_presence(self, data: dict[str, Any]) -> None:
        self.say(f"[{data['clients']} tab(s) in this session]")

    async def on_session_updated(self, data: dict[str, Any]) -> None:
        # With authentication on, the user's other sessions are announced too: only this one is shown.
        if data["session_id"] != self.session_id:
            return
        if self.answering:
            self.title = data["title"]
        else:
            self.say(f"[title: {data['title']}]")

    async def on_session_deleted(self, data: dict[str, Any]) -> None:
        if data["session_id"] == self.session_id:
            self.end_deleted()

    def end_deleted(self) -> None:
        if not self.deleted.is_set():
            self.say(f"\n[session {self.session_id} was deleted; this chat is over]")
            self.deleted.set()

    async def start(self, session_id: str | None) -> None:
        try:
            await self.sio.connect(self.url, transports=[self.transport], wait_timeout=10, auth=self.auth)
        except socketio.exceptions.ConnectionError as exc:
            if self.refusal:
                raise Refused(f"connection refused by {self.url}: {self.refusal}") from None
            raise Refused(f"cannot connect to {self.url} ({exc}); set the server with --url or SERVER_URL") from None
        request: dict[str, Any] = {"history_limit": self.history}
        if session_id:
            request["session_id"] = session_id
        ack = await self.sio.call("join", request)
        if not ack["ok"]:
            raise Refused(f"join refused: {ack['error']['code']}: {ack['error']['message']}")
        self.show_joined(ack)

    def show_joined(self, ack: dict[str, Any]) -> None:
        session = ack["session"]
        self.session_id = session["session_id"]
        self.say(f"session {self.session_id}  (rejoin with --session {self.session_id})")
        if session.get("title"):
            self.say(f"[title: {session['title']}]")
        if ack.get("history_more"):
            first = ack["history"][0]["event_id"]
            self.say(f"[earlier messages not shown: GET {earlier_url(self.url, self.session_id, first)}]")
        for event in ack["history"]:
            self.say(history_line(event))
        if ack["active_turn"]:
            self.turn_done.clear()
            self.answering = True
            self.say(f"assistant (answer in progress): {ack['active_turn']['text']}", end="")

    async def send(self, line: str) -> None:
        if line == "/cancel":
            ack = await self.sio.call("cancel", {"session_id": self.session_id})
            if not ack["ok"]:
                self.say(f"[{ack['error']['code']}: {ack['error']['message']}]")
            return
        self.turn_done.clear()
        # Our own id: recognises our message when it comes back, and makes a resend safe.
        message_id = str(uuid.uuid4())
        self.sent_ids.add(message_id)
        ack = await self.sio.call(
            "message", {"session_id": self.session_id, "text": line, "client_message_id": message_id}
        )
        if not ack["ok"]:
            self.turn_done.set()
            if ack["error"]["code"] == "session_deleted":  # deleted before its event reached us
                self.end_deleted()
            else:
                self.say(f"[{ack['error']['code']}: {ack['error']['message']}]")

    async def run(self) -> int:
        """Until /quit or the end of input (0), or the session's deletion (1)."""
        lines = stdin_lines()
        interactive = sys.stdin.isatty()
        while True:
            if not interactive and not await self.unless_deleted(self.turn_done.wait()):
                break  # piped input: one message after another
            line = await self.unless_deleted(lines.get())
            if not line or line.strip() == "/quit":
                break
            if line.strip():
                await self.send(line.strip())
        if not interactive:
            await self.unless_deleted(self.turn_done.wait())
        return 1 if self.deleted.is_set() else 0

    async def unless_deleted(self, awaitable: Awaitable[T]) -> T | None:
        """What `awaitable` gives, or None once the session is deleted."""
        wanted = asyncio.ensure_future(awaitable)
        deleted = asyncio.ensure_future(self.deleted.wait())
        await asyncio.wait([wanted, deleted], return_when=asyncio.FIRST_COMPLETED)
        for task in (wanted, deleted):
            task.cancel()
        return None if self.deleted.is_set() or not wanted.done() else wanted.result()

    async def close(self) -> None:
        await self.sio.disconnect()
        http = self.sio.eio.http  # left open by a connection that was refused
        if http is not None and not http.closed:
            await http.close()


class Refused(Exception):
    """The server refused the connection or the join: said in one line, then the client exits."""


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


def earlier_url(url: str, session_id: str, first_event_id: int) -> str:
    return f"{url.rstrip('/')}/api/sessions/{session_id}/events?before_event_id={first_event_id}"


def tool_call_line(call: dict[str, Any]) -> str:
    return f"  -> tool call {call['name']}({call.get('args', {})})"


def tool_result_line(result: dict[str, Any]) -> str:
    if result.get("error"):
        return f"  <- tool error {result['error']['code']}: {result['error']['message']}"
    return f"  <- tool result {result.get('result')}"


def history_line(event: dict[str, Any]) -> str:
    """A stored event, printed as the live one was."""
    kind, content = event["event_type"], event["content"]
    if kind in ("tool_call", "tool_result"):
        try:
            body = json.loads(content)
        except ValueError:
            body = None
        if isinstance(body, dict) and "name" in body:
            return tool_call_line(body) if kind == "tool_call" else tool_result_line(body)
    if kind == "user_message":
        return f"you: {content}"
    if kind == "ai_message":
        ending = event.get("finish_reason")
        note = f" [{ending}]" if ending not in (None, "stop") else ""
        return f"assistant: {content}{note}"
    return f"{kind}: {content}"


def history_size(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError("1 to 1000")
    return value


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--url",
        default=os.environ.get("SERVER_URL", "http://127.0.0.1:8000"),
        help="the server (default: SERVER_URL, else http://127.0.0.1:8000)",
    )
    parser.add_argument("--session", help="a session id to rejoin")
    parser.add_argument("--transport", choices=["websocket", "polling"], default="websocket")
    parser.add_argument("--token", default=os.environ.get("CHAT_TOKEN"), help="a JWT, when authentication is on")
    parser.add_argument(
        "--history", type=history_size, default=HISTORY_PAGE, help=f"last events shown (default {HISTORY_PAGE})"
    )
    args = parser.parse_args()
    chat = Chat(args.url, args.transport, {"token": args.token} if args.token else {}, args.history)
    try:
        await chat.start(args.session)
        return await chat.run()
    except Refused as refusal:
        print(refusal, file=sys.stderr)
        return 1
    finally:
        await chat.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
