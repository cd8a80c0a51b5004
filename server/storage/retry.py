"""The one retry policy for storage writes and reads (tenacity)."""

from __future__ import annotations

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
    try:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(transient),
            wait=wait_exponential_jitter(initial=0.05, max=2.0, jitter=0.1),
            stop=stop_after_attempt(attempts) | stop_after_delay(budget_seconds),
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
