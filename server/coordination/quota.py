"""A user's message limit shared by every process, counted in Redis by the `limits` library.

A sliding-window counter (`limits`' SlidingWindowCounterRateLimiter): each hit is one Lua script
that checks and counts atomically, so messages sent at once to several processes are counted as
if sent one after another. Giving a message back is a hit of cost -1 on the same counter.
"""

from __future__ import annotations

from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from redis.asyncio import BlockingConnectionPool


class RedisQuota:
    def __init__(self, url: str, prefix: str, per_minute: int) -> None:
        self._pool = BlockingConnectionPool.from_url(
            url, max_connections=16, timeout=2, socket_timeout=2, socket_connect_timeout=2
        )
        storage = RedisStorage(
            "async+" + url if not url.startswith("async+") else url,
            implementation="redispy",
            key_prefix=f"{prefix}:quota",
            connection_pool=self._pool,  # type: ignore[arg-type]
        )
        self._limiter = SlidingWindowCounterRateLimiter(storage)
        self._item = RateLimitItemPerMinute(per_minute)

    async def take(self, key: str) -> bool:
        return await self._limiter.hit(self._item, key)

    async def give_back(self, key: str) -> None:
        await self._limiter.hit(self._item, key, cost=-1)

    async def aclose(self) -> None:
        await self._pool.aclose()
