"""The one retry policy of the model providers: a request that failed for a passing reason (429,
5xx, no connection) is tried again with exponential backoff and jitter, honouring the wait a server
asks for, within a budget; each retry is counted."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, stop_before_delay
from tenacity.wait import wait_exponential_jitter

from server.core.ports import Metrics

# What a vendor said about a failure, kept for the log line, at most this long.
DETAIL_CHARS = 300


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    initial_seconds: float = 0.5
    max_wait_seconds: float = 8.0
    # No retry starts after this long; a server asking for a longer wait ends the retries early.
    budget_seconds: float = 20.0


def retrying(
    policy: RetryPolicy,
    *,
    transient: Callable[[BaseException], bool],
    wait_asked: Callable[[BaseException | None], float | None],
    describe: Callable[[BaseException | None], str],
    metrics: Metrics,
    log: logging.Logger,
) -> AsyncRetrying:
    """`wait_asked`: the seconds the failure's server asked to wait (Retry-After), if any."""
    backoff = wait_exponential_jitter(
        initial=policy.initial_seconds, max=policy.max_wait_seconds, jitter=policy.initial_seconds
    )

    def wait(state: RetryCallState) -> float:
        asked = wait_asked(state.outcome.exception() if state.outcome else None)
        return max(backoff(state), asked or 0.0)

    def before_retry(state: RetryCallState) -> None:
        metrics.provider_request("retried")
        exc = state.outcome.exception() if state.outcome else None
        # Not a failure yet (the metric counts it): a request that fails for good is the caller's one WARNING.
        log.info(
            "model request failed (%s); retry %d in %.2f s", describe(exc), state.attempt_number, state.upcoming_sleep
        )

    return AsyncRetrying(
        retry=retry_if_exception(transient),
        wait=wait,
        stop=stop_after_attempt(policy.attempts) | stop_before_delay(policy.budget_seconds),
        before_sleep=before_retry,
        reraise=True,
    )


def capped(detail: str | None) -> str | None:
    if detail is not None and len(detail) > DETAIL_CHARS:
        return detail[:DETAIL_CHARS] + "…"
    return detail


def retry_after_seconds(header: str | None) -> float | None:
    """A Retry-After header's seconds (an HTTP date is rare enough here to fall back on backoff)."""
    try:
        return float(header) if header else None
    except ValueError:
        return None
