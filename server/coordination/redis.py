"""Coordination across processes on Redis: the turn lock, presence, the turns of dead processes,
summaries. The session rooms and the requests to a turn's process are coordination/redis_rooms.py.

Keys (under the `REDIS_CHANNEL` prefix):
- `turn:{session}` = "{turn_id} {process}": the one-turn lock, with an expiry its process renews;
  `ending:{session}` while its turn sends its `done`, and `released:{session}`, a list pushed when
  it is then released, which a `message` arriving meanwhile waits on (a blocking read);
- `turns:{process}`: hash session -> turn_id of the turns a process runs, and `procs`: the set of
  processes that may have some. A process whose heartbeat expired is dead: another one claims each
  of its turns (the lock becomes "{turn_id} recover:{claimer}", before it could expire), ends it as
  interrupted, and frees the lock, so the session takes messages again;
- `text:{session}:{turn}`: the text streamed so far of a turn whose session has a member on another
  process (kept by redis_rooms.py), for whoever ends it should its process die;
- `members:{session}`: hash connection -> process; `proc:{process}`: a heartbeat with an expiry (a
  third of the lock's, so a dead process is found while its locks still hold). A member whose
  process was found dead (and left `procs`) is counted out, so a crashed process leaves no ghosts;
- `summary:{session}:{emptied_at}`: set once, by the one process that summarises that emptying.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Coroutine
from datetime import datetime
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from server.coordination.local import ENDING_WAIT_SECONDS
from server.coordination.redis_rooms import RedisRooms
from server.core.approvals import approval_of, approval_wire
from server.core.models import ActiveTurn
from server.core.ports import Approval, CancelHandler, DecisionHandler, LostHandler, OrphanHandler, RunningTextHandler
from server.core.tasks import TaskTracker, cancel_and_wait
from server.rooms.hub import RoomHub

log = logging.getLogger(__name__)

SUMMARY_CLAIM_SECONDS = 600
MIN_BEAT_MS = 2000
# A dead process's turns end within ~1 s of this (the contract's bound is 20 s).
MAX_BEAT_MS = 15000
# How long who sent a turn's `done` is remembered: past any recovery attempt.
ENDED_MS = 600_000

# Count the session's members whose process lives, dropping the others: a process that left `procs`
# (found dead), or, when the caller trusts heartbeats (it has beaten for a heartbeat's time since
# Redis was last away: every live process has beaten again since), one whose heartbeat expired.
# ARGV: op, member, process, proc-key prefix, the `procs` set, trust ('1' or '0'). Answers the new
# count, or -1 when the member was already in (add) or not in (remove).
_MEMBERS = """
local key, op, member, process, beat, procs = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local changed = 1
if op == 'add' then
  changed = redis.call('HSETNX', key, member, process)
elseif op == 'remove' then
  changed = redis.call('HDEL', key, member)
end
local all = redis.call('HGETALL', key)
for i = 1, #all, 2 do
  local owner = all[i + 1]
  if redis.call('SISMEMBER', procs, owner) == 0 or (ARGV[6] == '1' and redis.call('EXISTS', beat .. owner) == 0) then
    redis.call('HDEL', key, all[i])
  end
end
if changed == 0 then return -1 end
return redis.call('HLEN', key)
"""
# KEYS: lock, the process's turns, the session's members. ARGV: holder, ttl ms, session, turn, this
# process. Answers 0 (held by another turn), 1 (taken), 2 (taken, and another process has a member).
_ACQUIRE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
for _, process in ipairs(redis.call('HVALS', KEYS[3])) do
  if process ~= ARGV[5] then
    return 2
  end
end
return 1
"""
# KEYS: lock, text, ending, the process's turns, released. ARGV: holder, session, turn. A `message`
# that came while the turn was ending waits on `released`.
_RELEASE = """
if redis.call('HGET', KEYS[4], ARGV[2]) == ARGV[3] then
  redis.call('HDEL', KEYS[4], ARGV[2])
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if redis.call('DEL', KEYS[3]) == 1 then
    redis.call('RPUSH', KEYS[5], '1')
    redis.call('PEXPIRE', KEYS[5], 2000)
  end
  return redis.call('DEL', KEYS[1], KEYS[2])
end
return 0
"""
# KEYS: lock, ended. ARGV: holder, ttl ms, this process. Answers 1 renewed, 0 lost, -1 ended
# elsewhere: this process was taken for dead, and another one ended the turn as interrupted.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
local ended = redis.call('GET', KEYS[2])
if ended and ended ~= ARGV[3] then
  return -1
end
return 0
"""
# Who sends a turn's `done`, once for the cluster: its own process, or the one that ends it after its
# death. KEYS: ended, ending. ARGV: this process, turn, ttl ms, ended ttl ms. Answers 1 when this
# process sends it, 0 when another one has ended the turn.
_ENDING = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[4]) and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
"""
# The same decision for a process ending a dead one's turn (it holds the claim, so an earlier
# "recover:" mark is a claimer's that failed). KEYS: ended. ARGV: mark, ended ttl ms.
_END_ORPHAN = """
local ended = redis.call('GET', KEYS[1])
if ended and string.sub(ended, 1, 8) ~= 'recover:' then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# A dead process's turn: claim its lock for ending it. KEYS: lock. ARGV: dead holder, new holder,
# ttl ms, turn. Answers 1 claimed, 0 another process is ending it, -1 the lock is another turn's
# (it expired first): the turn is ended without holding it.
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] or not holder then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
if string.sub(holder, 1, string.len(ARGV[4]) + 1) == ARGV[4] .. ' ' then
  return 0
end
return -1
"""

# A call's decision, claimed once: KEYS[1] the call's hash (process, turn, decision), KEYS[2] its
# session's turn lock, ARGV[1] the decision as JSON. Returns the process and the turn, or false when
# the call is not waiting (unknown, decided, or its turn holds the lock no more).
_DECIDE = """
local turn = redis.call('HGET', KEYS[1], 'turn')
if not turn or redis.call('HEXISTS', KEYS[1], 'decision') == 1 then
  return false
end
local holder = redis.call('GET', KEYS[2])
if not holder or string.sub(holder, 1, string.len(turn) + 1) ~= turn .. ' ' then
  return false
end
redis.call('HSET', KEYS[1], 'decision', ARGV[1])
return {redis.call('HGET', KEYS[1], 'process'), turn}
"""
# How long a decided call's record outlives its deadline (for a late `decision` read).
APPROVAL_KEPT_SECONDS = 600


class RedisCoordination:
    def __init__(self, redis: Redis, prefix: str, lock_seconds: float, tasks: TaskTracker) -> None:
        self._redis = redis
        self._tasks = tasks
        self._prefix = prefix
        self._lock_ms = max(1, round(lock_seconds * 1000))
        # A third of the lock's: a dead process is found, and its turns claimed, before a lock it
        # renewed just before dying expires (a lock is renewed every third of its expiry). Never
        # under 2 s, so a busy process is not taken for dead: a lock that short may lapse first.
        self._beat_ms = min(max(MIN_BEAT_MS, self._lock_ms // 3), MAX_BEAT_MS)
        self._process = uuid.uuid4().hex[:12]
        self.rooms = RedisRooms(redis, prefix, self._process, tasks)
        self._held: dict[str, tuple[str, asyncio.Task[None]]] = {}
        self._cancel_handlers: list[CancelHandler] = []
        self._lost_handlers: list[LostHandler] = []
        self._orphan_handlers: list[OrphanHandler] = []
        self._running_text: RunningTextHandler | None = None
        self._ending_orphans: set[tuple[str, str]] = set()
        self._leaving: set[tuple[str, str]] = set()
        self._releasing: dict[str, tuple[str, str]] = {}
        # Whether a missing heartbeat means a dead process (not right after Redis was away: see _MEMBERS).
        self._trusting = False
        self._background: set[asyncio.Task[None]] = set()
        self._members_script = redis.register_script(_MEMBERS)
        self._acquire_script = redis.register_script(_ACQUIRE)
        self._claim_script = redis.register_script(_CLAIM)
        self._ending_script = redis.register_script(_ENDING)
        self._end_orphan_script = redis.register_script(_END_ORPHAN)
        self._release_script = redis.register_script(_RELEASE)
        self._renew_script = redis.register_script(_RENEW)
        self._decide_script = redis.register_script(_DECIDE)
        self._decision_handlers: list[DecisionHandler] = []

    @classmethod
    async def open(cls, redis: Redis, prefix: str, lock_seconds: float, tasks: TaskTracker) -> RedisCoordination:
        """On the process's one Redis client (`redis_client`); fails the start when Redis cannot be reached."""
        coordination = cls(redis, prefix, lock_seconds, tasks)
        await coordination._beat()
        coordination._spawn(coordination._beat_forever(), "redis heartbeat")
        return coordination

    def _key(self, *parts: str) -> str:
        return ":".join((self._prefix, *parts))

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        # Through the service's tracker, which logs a loop that fails.
        task = self._tasks.spawn_loop(coro, name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ the turn lock

    async def _take(self, session_id: str, turn_id: str, holder: str) -> bool:
        """Take the lock; then a session with a member on another process has its chunks shared."""
        taken = await self._acquire_script(
            keys=[self._key("turn", session_id), self._key("turns", self._process), self._key("members", session_id)],
            args=[holder, self._lock_ms, session_id, turn_id, self._process],
        )
        if taken == 2:
            self.rooms.share(session_id)
        return bool(taken)

    async def acquire_turn(self, session_id: str, turn_id: str) -> bool:
        holder = f"{turn_id} {self._process}"
        taken = await self._take(session_id, turn_id, holder)
        if not taken:
            taken = await self._take_after_ending(session_id, turn_id, holder)
        if not taken:
            return False
        renewal = self._tasks.spawn_loop(self._renew_forever(session_id, turn_id, holder), f"turn lock {turn_id}")
        self._held[session_id] = (holder, renewal)
        return True

    async def _renew_forever(self, session_id: str, turn_id: str, holder: str) -> None:
        while True:
            await asyncio.sleep(self._lock_ms / 3000)
            try:
                renewed = await self._renew_script(
                    keys=[self._key("turn", session_id), self._key("ended", turn_id)],
                    args=[holder, self._lock_ms, self._process],
                )
            except RedisError as exc:
                # The turn goes on; the lock expires if Redis stays away longer than its TTL.
                log.warning("cannot renew the turn lock of session %s: %s", session_id, exc)
                continue
            if renewed != 1:
                # Expired (Redis was away past its TTL), so another process may run a turn now; or
                # this process was taken for dead and the turn ended elsewhere (logged by the core).
                if renewed == 0:
                    log.error("the turn lock of session %s was lost while turn %s ran", session_id, turn_id)
                for handler in self._lost_handlers:
                    await handler(session_id, turn_id, renewed == -1)
                return

    async def _take_after_ending(self, session_id: str, turn_id: str, holder: str) -> bool:
        """The lock, when its turn is sending its `done`: it is released a round trip later."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ENDING_WAIT_SECONDS
        while await self._redis.exists(self._key("ending", session_id)):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            # Under the connections' 2 s read timeout; a stale push only means one more look.
            await self._redis.blpop([self._key("released", session_id)], timeout=min(remaining, 1.5))
            if await self._take(session_id, turn_id, holder):
                return True
        return await self._take(session_id, turn_id, holder)

    async def turn_ending(self, session_id: str, turn_id: str) -> bool:
        held = self._held.get(session_id)
        if held is None or not held[0].startswith(turn_id):
            return True
        try:
            sends = await self._ending_script(
                keys=[self._key("ended", turn_id), self._key("ending", session_id)],
                args=[self._process, turn_id, self._lock_ms, ENDED_MS],
            )
        except RedisError as exc:  # a `busy` answered a little early; the turn's own `done` goes out
            log.warning("cannot mark the turn of session %s as ending: %s", session_id, exc)
            return True
        return bool(sends)

    async def release_turn(self, session_id: str, turn_id: str) -> None:
        held = self._held.get(session_id)
        if held is None or not held[0].startswith(turn_id):
            return
        holder, renewal = self._held.pop(session_id)
        renewal.cancel()
        if self.rooms.unshare(session_id):
            # Another process serves the session: the turn's `done` reaches Redis before the release
            # that lets the next turn start there.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ENDING_WAIT_SECONDS):
                    await self.rooms.sent()
        await self._release(session_id, turn_id, holder)

    async def _release(self, session_id: str, turn_id: str, holder: str) -> None:
        try:
            await self._release_script(
                keys=[
                    self._key("turn", session_id),
                    self._key("text", session_id, turn_id),
                    self._key("ending", session_id),
                    self._key("turns", self._process),
                    self._key("released", session_id),
                ],
                args=[holder, session_id, turn_id],
            )
        except RedisError as exc:
            log.warning("cannot release the turn lock of session %s now (retried): %s", session_id, exc)
            self._releasing[session_id] = (turn_id, holder)

    async def running_turn(self, session_id: str) -> str | None:
        holder = await self._redis.get(self._key("turn", session_id))
        return str(holder).split(" ")[0] if holder else None

    single_process = False

    # ------------------------------------------------------------------ the process running a turn

    async def _running_elsewhere(self, session_id: str) -> tuple[str, str] | None:
        """(turn, process) of the session's turn when a live process other than this one runs it."""
        holder = await self._redis.get(self._key("turn", session_id))
        if not holder:
            return None
        turn_id, _, process = str(holder).partition(" ")
        if process == self._process or process.startswith("recover:"):
            return None  # the core reads its own turns; a recovered one is being ended
        if not await self._redis.exists(self._key("proc", process)):
            return None  # its process died: the turn is being ended as interrupted
        return turn_id, process

    async def turn_snapshot(self, session_id: str) -> ActiveTurn | None:
        running = await self._running_elsewhere(session_id)
        if running is None:
            return None
        turn_id, process = running
        # This tab is in the room already, so the chunks its process sends from now on reach it.
        return await self.rooms.running_text(process, session_id, turn_id)

    async def request_cancel(self, session_id: str, turn_id: str) -> None:
        running = await self._running_elsewhere(session_id)
        if running is not None and running[0] == turn_id:
            await self.rooms.request_cancel(running[1], session_id, turn_id)
        elif running is None:
            await self._cancel(session_id, turn_id)  # this process's own

    def on_cancel(self, handler: CancelHandler) -> None:
        self._cancel_handlers.append(handler)

    def on_running_text(self, handler: RunningTextHandler) -> None:
        self._running_text = handler

    def on_turn_lost(self, handler: LostHandler) -> None:
        self._lost_handlers.append(handler)

    def on_turn_orphaned(self, handler: OrphanHandler) -> None:
        self._orphan_handlers.append(handler)

    async def _cancel(self, session_id: str, turn_id: str) -> None:
        for handler in self._cancel_handlers:
            await handler(session_id, turn_id)

    def running_text_here(self, session_id: str) -> ActiveTurn | None:
        return self._running_text(session_id) if self._running_text is not None else None

    async def serve_rooms(self, hub: RoomHub) -> None:
        """Fan the hub's rooms out over Redis; return once subscribed."""
        self.rooms.attach(hub, self._cancel, self.running_text_here, self._decided)
        await self.rooms.start()

    # ------------------------------------------------------------------ presence

    async def _members(self, op: str, session_id: str, member: str = "") -> int:
        trust = "1" if self._trusting else "0"
        count: int = await self._members_script(
            keys=[self._key("members", session_id)],
            args=[op, member, self._process, self._key("proc", ""), self._key("procs"), trust],
        )
        return count

    async def add_member(self, session_id: str, member: str) -> int | None:
        count = await self._members("add", session_id, member)
        return None if count < 0 else count

    async def remove_member(self, session_id: str, member: str) -> int | None:
        try:
            count = await self._members("remove", session_id, member)
        except RedisError:
            # Counted out later, by the heartbeat, so the member is no ghost once Redis is back.
            self._leaving.add((session_id, member))
            raise
        return None if count < 0 else count

    async def member_count(self, session_id: str) -> int:
        return await self._members("count", session_id)

    async def _beat(self) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self._key("proc", self._process), "1", px=self._beat_ms)
            pipe.sadd(self._key("procs"), self._process)  # again each time: a process taken for dead is back
            await pipe.execute()

    async def _beat_forever(self) -> None:
        loop = asyncio.get_running_loop()
        beating_since: float | None = loop.time()
        while True:
            await asyncio.sleep(min(self._beat_ms / 3000, 1.0))
            try:
                await self._beat()
                beating_since = beating_since or loop.time()
                # Right after Redis was away, every other process's heartbeat has lapsed too: they
                # are taken for dead only once they had a heartbeat's time to beat again.
                self._trusting = loop.time() - beating_since >= self._beat_ms / 1000
                if self._trusting:
                    await self._find_orphans()
                # What Redis missed while it was away: locks to free, members to count out.
                for session_id, (turn_id, holder) in list(self._releasing.items()):
                    del self._releasing[session_id]
                    await self._release(session_id, turn_id, holder)
                for session_id, member in list(self._leaving):
                    await self._members("remove", session_id, member)
                    self._leaving.discard((session_id, member))
            except RedisError as exc:
                beating_since, self._trusting = None, False
                log.warning("cannot reach Redis for the process heartbeat: %s", exc)
            except Exception:
                # Without its heartbeat this process's clients are counted out elsewhere: keep beating.
                log.exception("the Redis heartbeat failed; trying again")

    # ------------------------------------------------------------------ turns of dead processes

    async def alone(self) -> bool:
        others = [str(p) for p in await self._redis.smembers(self._key("procs")) if p != self._process]
        if not others:
            return True
        async with self._redis.pipeline(transaction=False) as pipe:
            for process in others:
                pipe.exists(self._key("proc", process))
            return not any(await pipe.execute())

    async def _find_orphans(self) -> None:
        """Hand over the turns of every process whose heartbeat expired, one task each."""
        # decode_responses: every member and field is a str.
        others = [str(p) for p in await self._redis.smembers(self._key("procs")) if p != self._process]
        if not others:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for process in others:
                pipe.exists(self._key("proc", process))
            alive = await pipe.execute()
        for process, beating in zip(others, alive, strict=True):
            if beating:
                continue
            turns = {str(s): str(t) for s, t in (await self._redis.hgetall(self._key("turns", process))).items()}
            if not turns:
                await self._redis.srem(self._key("procs"), process)
                continue
            for session_id, turn_id in turns.items():
                if (session_id, turn_id) not in self._ending_orphans:
                    self._ending_orphans.add((session_id, turn_id))
                    self._spawn(self._end_orphan(process, session_id, turn_id), f"end orphaned turn {turn_id}")

    async def _end_orphan(self, process: str, session_id: str, turn_id: str) -> None:
        """Claim the dead process's turn, end it (unless its process sent its `done` before dying),
        then free the session. On any failure, the claim lapses and a later beat tries again."""
        holder = f"{turn_id} recover:{self._process}"
        claimed = 0
        try:
            claimed = await self._claim_script(
                keys=[self._key("turn", session_id)], args=[f"{turn_id} {process}", holder, self._lock_ms, turn_id]
            )
            if claimed == 0:
                return  # another process is ending it
            if claimed == 1:
                renewal = self._tasks.spawn_loop(
                    self._renew_forever(session_id, turn_id, holder), f"turn lock {turn_id}"
                )
                self._held[session_id] = (holder, renewal)
            if await self._end_orphan_script(
                keys=[self._key("ended", turn_id)], args=[f"recover:{self._process}", ENDED_MS]
            ):
                text = str(await self._redis.get(self._key("text", session_id, turn_id)) or "")
                for handler in self._orphan_handlers:
                    await handler(session_id, turn_id, text)
            await self._redis.hdel(self._key("turns", process), session_id)
        except Exception as exc:
            log.warning("cannot end turn %s of a dead process yet (%s); trying again", turn_id, type(exc).__name__)
            held = self._held.get(session_id)
            if claimed == 1 and held is not None and held[0] == holder:
                self._held.pop(session_id)[1].cancel()  # the claim lapses
            return
        finally:
            self._ending_orphans.discard((session_id, turn_id))
        if claimed == 1:
            await self.release_turn(session_id, turn_id)

    # ------------------------------------------------------------------ summaries

    async def claim_summary(self, session_id: str, emptied_at: datetime) -> bool:
        # Expires: should the claiming process stop before summarising, another takes it over then.
        claimed = await self._redis.set(
            self._key("summary", session_id, emptied_at.isoformat()), self._process, nx=True, ex=SUMMARY_CLAIM_SECONDS
        )
        return bool(claimed)

    async def claim_job(self, job: str, session_id: str, seconds: float) -> bool:
        claimed = await self._redis.set(
            self._key("job", job, session_id), self._process, nx=True, px=int(seconds * 1000)
        )
        return bool(claimed)

    async def release_job(self, job: str, session_id: str) -> None:
        await self._redis.delete(self._key("job", job, session_id))

    # ------------------------------------------------------------------ tool approvals

    async def open_approval(self, session_id: str, turn_id: str, call_id: str, seconds: float) -> None:
        key = self._key("approval", session_id, call_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)  # an earlier turn's call with the same id (a model that sends no ids)
            pipe.hset(key, mapping={"process": self._process, "turn": turn_id})
            pipe.expire(key, round(seconds) + APPROVAL_KEPT_SECONDS)
            await pipe.execute()

    async def decide(self, session_id: str, call_id: str, approval: Approval) -> bool:
        claimed = await self._decide_script(
            keys=[self._key("approval", session_id, call_id), self._key("turn", session_id)],
            args=[json.dumps(approval_wire(approval))],
        )
        if not claimed:
            return False
        process, turn_id = (str(part) for part in claimed)
        if process == self._process:
            await self._decided(session_id, turn_id, call_id, approval)
            return True
        try:
            await self.rooms.send_decision(process, session_id, turn_id, call_id, approval)
        except RedisError as exc:
            # Claimed, so it counts: the waiting turn reads it from the shared state (RECHECK_SECONDS).
            log.warning("could not pass a decision to process %s (%s)", process, type(exc).__name__)
        return True

    async def decision(self, session_id: str, turn_id: str, call_id: str) -> Approval | None:
        turn, body = await self._redis.hmget(self._key("approval", session_id, call_id), ["turn", "decision"])
        return approval_of(json.loads(body)) if turn == turn_id and body is not None else None

    def on_decision(self, handler: DecisionHandler) -> None:
        self._decision_handlers.append(handler)

    async def _decided(self, session_id: str, turn_id: str, call_id: str, approval: Approval) -> None:
        for handler in self._decision_handlers:
            await handler(session_id, turn_id, call_id, approval)

    # ------------------------------------------------------------------ lifecycle

    async def ping(self) -> None:
        await self._redis.ping()

    async def aclose(self) -> None:
        self._lost_handlers.clear()
        self._orphan_handlers.clear()
        await self.rooms.aclose()
        await cancel_and_wait({*self._background, *(renewal for _, renewal in self._held.values())})
        with contextlib.suppress(RedisError):
            await self._redis.delete(self._key("proc", self._process))
            if not await self._redis.hlen(self._key("turns", self._process)):
                await self._redis.srem(self._key("procs"), self._process)
        self._cancel_handlers.clear()
        self._decision_handlers.clear()


def redis_client(url: str) -> Redis:
    """The process's one Redis client: its pool serves the coordination, the rooms and the quota."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=64,  # a bounded pool that waits: the default one fails past 100 at once
        timeout=2,
        decode_responses=True,
        socket_timeout=2,
        socket_connect_timeout=2,
        health_check_interval=10,
    )
    return Redis.from_pool(pool)
