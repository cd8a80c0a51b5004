"""The one retry policy for storage writes and reads (tenacity): transient failures are retried for
STORAGE_RETRY_SECONDS, then the operation counts as failed (StorageUnavailable)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_delay, wait_exponential_jitter

from server.core.ports import StorageUnavailable

log = logging.getLogger("server.storage")
T = TypeVar("T")
FIRST_WAIT_SECONDS = 0.05
# The longest pause between two attempts: storage that is back is used again within this.
MAX_WAIT_SECONDS = 2.0


def cause(exc: BaseException) -> str:
    """The failure as a log line may name it: its class and its code (SQLSTATE, PostgREST or SQLite
    code), never its message, which can quote a row or a URL."""
    code = getattr(exc, "sqlstate", None) or getattr(exc, "sqlite_errorname", None) or getattr(exc, "code", None)
    return f"{type(exc).__name__} {code}" if isinstance(code, str) and code else type(exc).__name__


async def with_retries(
    operation: Callable[[], Awaitable[T]],
    *,
    transient: Callable[[BaseException], bool],
    what: str,
    budget_seconds: float = 10.0,
) -> T:
    """Run `operation`, retrying transient failures with jittered backoff for `budget_seconds`.

    Only idempotent operations come here, so a retry after a lost answer is harmless.
    Past the budget a transient failure becomes `StorageUnavailable`; anything else is a bug
    and propagates as it is. One WARNING when it starts retrying and one when it gives up
    (INFO when it gets through), not one per attempt.
    """
    # The first attempt runs bare: building tenacity's retry state costs more than a SQLite write,
    # and almost every operation succeeds at once. Only a transient failure enters the retry loop.
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        return await operation()
    except Exception as exc:
        if not transient(exc):
            raise
        first_failure = exc
    deadline = started + budget_seconds
    if loop.time() >= deadline:
        raise StorageUnavailable(f"{what}: {cause(first_failure)}") from first_failure
    log.warning("%s failed (%s); retrying for up to %g s", what, cause(first_failure), budget_seconds)
    backoff = wait_exponential_jitter(initial=FIRST_WAIT_SECONDS, max=MAX_WAIT_SECONDS, jitter=0.1)

    def wait(state: RetryCallState) -> float:
        # The last pause ends at the deadline, so the last attempt is made when the budget is spent.
        return max(0.0, min(backoff(state), deadline - loop.time()))

    attempts = 1
    try:
        await asyncio.sleep(min(FIRST_WAIT_SECONDS, deadline - loop.time()))
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(transient),
            wait=wait,
            stop=stop_after_delay(max(0.0, deadline - loop.time())),
            reraise=True,
        ):
            with attempt:
                attempts += 1
                result = await operation()
    except Exception as exc:
        if not transient(exc):
            raise
        elapsed = loop.time() - started
        log.warning("%s gave up after %d attempts in %.1f s (%s)", what, attempts, elapsed, cause(exc))
        raise StorageUnavailable(f"{what}: {cause(exc)}") from exc
    log.info("%s got through at attempt %d after %.1f s", what, attempts, loop.time() - started)
    return result
