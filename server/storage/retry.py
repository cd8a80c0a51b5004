"""The one retry policy for storage writes and reads (tenacity)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from server.core.ports import StorageUnavailable

log = logging.getLogger("server.storage")
T = TypeVar("T")
FIRST_WAIT_SECONDS = 0.05


async def with_retries(
    operation: Callable[[], Awaitable[T]],
    *,
    transient: Callable[[BaseException], bool],
    what: str,
    attempts: int = 6,
    budget_seconds: float = 10.0,
) -> T:
    """Run `operation`, retrying transient failures with jittered backoff.

    Only idempotent operations come here, so a retry after a lost answer is harmless.
    Past the budget a transient failure becomes `StorageUnavailable`; anything else is a bug
    and propagates as it is.
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
    remaining = budget_seconds - (loop.time() - started)
    if attempts <= 1 or remaining <= 0:
        raise StorageUnavailable(f"{what}: {first_failure}") from first_failure
    log.warning("%s failed (%r); retrying", what, first_failure)
    await asyncio.sleep(min(FIRST_WAIT_SECONDS, remaining))
    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(transient),
            wait=wait_exponential_jitter(initial=FIRST_WAIT_SECONDS, max=2.0, jitter=0.1),
            stop=stop_after_attempt(attempts - 1) | stop_after_delay(remaining),
            before_sleep=before_sleep_log(log, logging.WARNING),
            reraise=True,
        ):
            with attempt:
                return await operation()
    except Exception as exc:
        if transient(exc):
            raise StorageUnavailable(f"{what}: {exc}") from exc
        raise
    raise AssertionError("unreachable")  # pragma: no cover
