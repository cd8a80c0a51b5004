"""Message limits: a token bucket per key, refilled continuously, decided and counted in one step."""

from __future__ import annotations

import time
from dataclasses import dataclass

MAX_BUCKETS = 10_000


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """`limit` accepted messages per minute per key, in this process.

    `try_take` decides and counts with no await in between, so requests handled at once are
    counted as if they came one after another; `give_back` returns the token of a request that
    was refused later (busy, storage down), since refused messages do not count.
    """

    def __init__(self, per_minute: int) -> None:
        self._capacity = float(per_minute)
        self._refill_per_second = per_minute / 60.0
        self._buckets: dict[str, _Bucket] = {}

    def _bucket(self, key: str) -> _Bucket:
        now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._prune(now)
            bucket = self._buckets[key] = _Bucket(self._capacity, now)
        else:
            bucket.tokens = min(self._capacity, bucket.tokens + (now - bucket.updated) * self._refill_per_second)
            bucket.updated = now
        return bucket

    def try_take(self, key: str) -> bool:
        """Take one message's token if there is one; False (and nothing taken) when there is not."""
        bucket = self._bucket(key)
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def give_back(self, key: str) -> None:
        bucket = self._bucket(key)
        bucket.tokens = min(self._capacity, bucket.tokens + 1.0)

    def forget(self, key: str) -> None:
        self._buckets.pop(key, None)

    def _prune(self, now: float) -> None:
        """Drop the buckets that have refilled: forgetting them changes nothing."""
        full_after = self._capacity / self._refill_per_second
        for key in [k for k, b in self._buckets.items() if now - b.updated >= full_after]:
            del self._buckets[key]


class LocalQuota:
    """A user's message limit when this process is the only one: the same bucket, per user."""

    def __init__(self, per_minute: int) -> None:
        self._limiter = RateLimiter(per_minute)

    async def take(self, key: str) -> bool:
        return self._limiter.try_take(key)

    async def give_back(self, key: str) -> None:
        self._limiter.give_back(key)

    async def aclose(self) -> None:
        return None
