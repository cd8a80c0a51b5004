"""Every background task the service starts is tracked here, so shutdown can finish or cancel it,
and a task that fails is logged."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class TaskTracker:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        # Loops that run as long as their owner (heartbeats, listeners): shutdown's drain does not
        # wait for them; their owner cancels them when it closes, and `close` cancels what is left.
        self._loops: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str, *, awaited: bool = False) -> asyncio.Task[T]:
        """Work that finishes by itself (a turn, a write, a summary): shutdown waits for it.
        `awaited`: its owner reads how it ended and logs a failure as it deserves; not logged here."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished_awaited if awaited else self._finished)
        return task

    def spawn_loop(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """A loop that runs until its owner cancels it."""
        task = asyncio.create_task(coro, name=name)
        self._loops.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._loops.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    def _finished_awaited(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: an owner that stopped waiting (a cancel) had no use for it

    def __len__(self) -> int:
        return len(self._tasks)

    def __contains__(self, task: object) -> bool:
        return task in self._tasks or task in self._loops

    async def drain(self, grace_seconds: float) -> None:
        """Wait for the running tasks (and those they start) up to `grace_seconds`, then cancel the rest."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_seconds
        while self._tasks:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.wait(set(self._tasks), timeout=remaining)
        leftovers = set(self._tasks)
        for task in leftovers:
            log.warning("cancelling background task %s at shutdown", task.get_name())
        await cancel_and_wait(leftovers)

    async def close(self) -> None:
        """Last of all: cancel the loops whose owners did not (they should have)."""
        await cancel_and_wait(set(self._loops))


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], *, patience_seconds: float = 0.5) -> None:
    """Cancel the tasks and wait until they end, cancelling again those still going after
    `patience_seconds`: a library can turn a cancel that lands in the middle of its I/O into an
    error of its own (redis-py does), which a loop that outlives its errors would then outlive too."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=patience_seconds)
