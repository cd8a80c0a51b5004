"""A user's message limit shared by every process, counted in Redis by the `limits` library.

A sliding-window counter (`limits`' SlidingWindowCounterRateLimiter): each hit is one Lua script
that checks and counts atomically, so messages sent at once to several processes are counted as
if sent one after another. Giving a message back is a hit of cost -1 on the same counter.
"""

from __future__ import annotations

from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from redis.asyncio import Redis


class RedisQuota:
    def __init__(self, url: str, redis: Redis, prefix: str, per_minute: int) -> None:
        """On the process's one Redis client (its pool); the URL only names the storage for `limits`."""
        storage = RedisStorage(
            "async+" + url if not url.startswith("async+") else url,
            implementation="redispy",
            key_prefix=f"{prefix}:quota",
            connection_pool=redis.connection_pool,  # type: ignore[arg-type]
        )
        self._limiter = SlidingWindowCounterRateLimiter(storage)
        self._item = RateLimitItemPerMinute(per_minute)

    async def take(self, key: str) -> bool:
        return await self._limiter.hit(self._item, key)

    async def give_back(self, key: str) -> None:
        await self._limiter.hit(self._item, key, cost=-1)

    async def aclose(self) -> None:
        return None  # the pool is the process's, closed with its client
