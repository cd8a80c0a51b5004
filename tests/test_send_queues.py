"""A client that stops reading (docs/protocol.md, Errors): past SEND_QUEUE_LIMIT_BYTES
waiting for it, it is disconnected, the server's memory stays flat, the other tab of its session gets
every chunk, and the stalled client catches up once it reconnects. Over a raw WebSocket (Socket.IO
frames by hand, a 4 KiB receive buffer), the plain WebSocket endpoint, and long-polling."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerFactory, TabFactory
from tests.fake_gemini import FakeGemini, Reply, text_chunk
from tests.harness import Tab, logged_server
from tests.stalled_clients import RawWebSocket, stalled_plain, stalled_polling, stalled_socketio

LIMIT = 256 * 1024
CHUNKS = 8000  # one-letter chunks: about 1 MB of `chunk` events a turn, 8 KB of stored text
TURNS = 5


def one_letter_chunks(n: int = CHUNKS) -> Reply:
    return Reply(events=[text_chunk("a") for _ in range(n - 1)] + [text_chunk("a", "STOP")])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@contextlib.asynccontextmanager
async def streaming_server(tmp_path: Path, fake: FakeGemini) -> AsyncIterator[tuple[int, str, Path]]:
    async with logged_server(
        tmp_path,
        LLM_PROVIDER="gemini",
        GEMINI_API_KEY="test-key",
        GEMINI_BASE_URL=fake.url,
        SEND_QUEUE_LIMIT_BYTES=str(LIMIT),
        MESSAGE_RATE_LIMIT="1000",
    ) as (process, url, log_path):
        yield process.pid, url, log_path


async def stream_turns(tab: Tab, fake: FakeGemini, session_id: str, turns: int, after_each: Any = None) -> None:
    """`turns` answers of CHUNKS chunks each, every one of which the tab gets, in order."""
    for n in range(turns):
        fake.stream(one_letter_chunks())
        start = len(tab.events)
        ack = await tab.call("message", {"session_id": session_id, "text": f"turn {n}"})
        assert ack["ok"], ack
        events = await turn_from(tab, start, ack["turn_id"])
        chunks = [data["index"] for name, data in events if name == "chunk"]
        assert chunks == list(range(CHUNKS)) and events[-1][1]["text"] == "a" * CHUNKS
        if after_each is not None:
            after_each(n)


async def turn_from(tab: Tab, start: int, turn_id: str) -> list[tuple[str, dict[str, Any]]]:
    """The turn's events once its `done` is in, scanning each event once (Tab.turn rescans them all)."""
    seen = start
    async with asyncio.timeout(60):
        while True:
            for name, data in tab.events[seen:]:
                if name == "done" and data["turn_id"] == turn_id:
                    return [(n, d) for n, d in tab.events[start:] if d.get("turn_id") == turn_id]
            seen = len(tab.events)
            tab._changed.clear()
            await tab._changed.wait()


Stall = Callable[[int, str, str], Awaitable[Any]]
STALLS: dict[str, Stall] = {
    "socketio-websocket": lambda port, url, sid: stalled_socketio(port, sid),
    "plain-websocket": lambda port, url, sid: stalled_plain(port, sid),
    "socketio-polling": lambda port, url, sid: stalled_polling(url, sid),
}
DROPPED = {
    "socketio-websocket": "disconnecting Engine.IO connection",
    "plain-websocket": "disconnecting plain WebSocket",
    "socketio-polling": "disconnecting Engine.IO connection",
}


@pytest.mark.parametrize("kind", list(STALLS))
async def test_a_client_that_stops_reading_is_dropped_and_the_server_stays_flat(
    kind: str, tmp_path: Path, fake_gemini: FakeGemini, tabs: list[Tab]
) -> None:
    async with streaming_server(tmp_path, fake_gemini) as (pid, url, log_path):
        streamer = await Tab(url).connect()
        tabs.append(streamer)
        sid = (await streamer.join())["session"]["session_id"]
        stalled = await STALLS[kind](int(url.rsplit(":", 1)[1]), url, sid)
        try:
            await streamer.wait_for(lambda ev: any(n == "presence" and d["clients"] == 2 for n, d in ev))
            rss: list[int] = []
            await stream_turns(streamer, fake_gemini, sid, TURNS, lambda n: rss.append(rss_bytes(pid)))
            # About 1 MB of events a turn was meant for the stalled client: none of it stays.
            growth = rss[-1] - rss[1]
            assert growth < 3 * 1024 * 1024, [f"{r / 2**20:.1f} MiB" for r in rss]
            # Dropped: the session counts the streaming tab alone again, and the log says why, once.
            presence = [d["clients"] for n, d in streamer.events if n == "presence"]
            assert presence[-1] == 1 and 2 in presence, presence
            assert log_path.read_text().count(DROPPED[kind]) == 1, log_path.read_text()[-2000:]
            if isinstance(stalled, RawWebSocket):
                # Reading again, it gets what its buffers held, then the end of the connection (not
                # after the ping timeout, 45 s): far less than the 5 MB of events it missed.
                assert await asyncio.to_thread(stalled.read_to_the_end) < 4 * 1024 * 1024
        finally:
            await _close(stalled)
        # It reconnects and catches up: everything after what it had seen (nothing) is there.
        again = await Tab(url).connect()
        tabs.append(again)
        history = (await again.join(sid, after_event_id=0))["history"]
        answers = [item["content"] for item in history if item["event_type"] == "ai_message"]
        assert answers == ["a" * CHUNKS] * TURNS
        assert "Traceback" not in log_path.read_text()


async def _close(stalled: Any) -> None:
    if hasattr(stalled, "aclose"):
        await stalled.aclose()
    else:
        stalled.close()


async def test_one_answer_larger_than_the_limit_still_goes_out(
    start_server: ServerFactory, connect: TabFactory
) -> None:
    # A `join` answer holds the whole history: larger than the limit, it is sent all the same.
    limit = 64 * 1024
    server = await start_server(send_queue_limit_bytes=limit, offline_chunk_delay_ms=0, message_rate_limit=100)
    writer = await connect(server)
    sid = (await writer.join())["session"]["session_id"]
    for n in range(10):
        ack = await writer.call("message", {"session_id": sid, "text": f"{n} " + "x" * 7900})
        await writer.turn(ack["turn_id"])
    for transport in ("websocket", "polling"):
        reader = await connect(server, transport)
        history = (await reader.join(sid))["history"]
        assert len(history) >= 20 and sum(len(item["content"]) for item in history) > limit
        ack = await reader.call("message", {"session_id": sid, "text": "still here?"})
        events = await reader.turn(ack["turn_id"])
        assert events[-1][0] == "done" and reader.client.connected
