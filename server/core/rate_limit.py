"""Token buckets: `limit` accepted messages per minute per key, refilled continuously."""

from __future__ import annotations

import time
from dataclasses import dataclass

MAX_BUCKETS = 10_000


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
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

    def allows(self, key: str) -> bool:
        """Whether one more message would be accepted now (takes nothing)."""
        return self._bucket(key).tokens >= 1.0

    def take(self, key: str) -> None:
        bucket = self._bucket(key)
        bucket.tokens = max(0.0, bucket.tokens - 1.0)

    def forget(self, key: str) -> None:
        self._buckets.pop(key, None)

    def _prune(self, now: float) -> None:
        """Drop the buckets that have refilled: forgetting them changes nothing."""
        full_after = self._capacity / self._refill_per_second
        for key in [k for k, b in self._buckets.items() if now - b.updated >= full_after]:
            del self._buckets[key]
