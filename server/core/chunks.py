"""A turn's chunks, in order: held while its user message is stored, then sent as they come."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from server.core.tasks import TaskTracker

Send = Callable[[str, float | None], Awaitable[None]]


class ChunkStream:
    """Chunks made before `open` are held; `open` sends them, and later ones go out as they come.
    With a window, the text deltas arriving within it go out as one chunk.

    Every chunk leaves under one lock, and `open` marks the stream open, inside that lock, before
    it sends what was held: a chunk made meanwhile queues behind the held ones instead of joining
    a list being emptied, so the order does not rest on where an await sits. A window starts with
    its first delta and ends on a timer, so held text never waits for the next delta.
    """

    def __init__(self, send: Send, window_seconds: float, tasks: TaskTracker) -> None:
        self._send = send
        self._window = window_seconds
        self._tasks = tasks
        self._lock = asyncio.Lock()
        self._opened = asyncio.Event()
        self._held: list[tuple[str, float | None]] = []  # chunks made before `open`
        self._window_text: list[str] = []
        self._window_stamp: float | None = None
        self._timer: asyncio.Task[None] | None = None

    @property
    def is_open(self) -> bool:
        return self._opened.is_set()

    async def wait_open(self) -> None:
        await self._opened.wait()

    async def open(self) -> None:
        async with self._lock:
            self._opened.set()
            held, self._held = self._held, []
            for text, stamp in held:
                await self._send(text, stamp)

    async def add(self, text: str, stamp: float | None) -> None:
        if self._window <= 0:
            await self._deliver(text, stamp)
            return
        self._window_text.append(text)
        if self._window_stamp is None:
            self._window_stamp = stamp
        if self._timer is None:
            self._timer = self._tasks.spawn(self._flush_later(), name="chunk window")

    async def flush(self) -> None:
        """Send the window's text now; on return every chunk added before has left (or is held)."""
        if self._timer is not None:  # a flush before the window's end ends the window
            self._timer.cancel()
            self._timer = None
        text, stamp = "".join(self._window_text), self._window_stamp
        self._window_text, self._window_stamp = [], None
        await self._deliver(text, stamp)  # also waits out a timer's send in progress

    def close(self) -> None:
        """Let go of `send`, which refers to the turn that refers to this stream: without the cycle
        a finished turn is freed at once, not by the cyclic garbage collector (docs/performance.md)."""
        self._send = _nowhere

    async def _flush_later(self) -> None:
        await asyncio.sleep(self._window)
        self._timer = None
        await self.flush()

    async def _deliver(self, text: str, stamp: float | None) -> None:
        async with self._lock:
            if not text:
                return
            if self._opened.is_set():
                await self._send(text, stamp)
            else:
                self._held.append((text, stamp))


async def _nowhere(text: str, stamp: float | None) -> None:
    """Where a closed stream sends: nowhere (its turn has ended)."""
