"""Session rooms across processes on Redis pub/sub: the hub's `Fanout`, and requests to the process
running a turn (cancel it, send its running text).

Channels (under the `REDIS_CHANNEL` prefix):
- `room:{session}`: the session's events, subscribed to by every process with a member in it (so a
  process receives only the sessions it serves). Each message names its process, which skips it.
- `to:{process}`: requests for that process: `cancel` a turn, `share` a turn's running text.
- `user:{user}`: the user's session events (`session_updated`, `session_deleted`), subscribed to by
  every process with a connection that follows the user (they go to its room's channel too).

Publishing never waits on Redis: events go on one ordered queue, and a writer task sends what
queued as one pipeline (one round trip however many). Chunks are published only while another
process has a member in the session (asked of `members:{session}` when a turn starts, or told by a
`share` request when a tab joins elsewhere mid-turn); then the running text is also appended to
`text:{session}:{turn}`, for whoever ends the turn should its process die. An event that cannot
be published (Redis away) is not retried: once Redis answers again, a `missed` message on the
session's channel sends its members' processes to storage for it (rooms/hub.py).

Subscribing: one pub/sub connection. A PING every second; no answer for `STALE_SECONDS` (a
blackhole), or an error (a reset), and it is dropped, made again within a second of Redis
answering, and every room here catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from server.core.approvals import approval_of, approval_wire
from server.core.models import ActiveTurn
from server.core.ports import Approval, DecisionHandler
from server.core.tasks import TaskTracker, cancel_and_wait
from server.rooms.hub import RoomHub, RoomMessage

log = logging.getLogger(__name__)

PING_SECONDS = 1.0
STALE_SECONDS = 3.0
REPLY_SECONDS = 1.0  # how long a joining tab waits for the running text of another process's turn
RUNNING_TEXT_SECONDS = 600
MAX_QUEUED = 50_000  # events waiting for Redis past which they are dropped (and caught up later)

CancelHandler = Callable[[str, str], Awaitable[None]]
SnapshotHandler = Callable[[str], ActiveTurn | None]


class RedisRooms:
    def __init__(self, redis: Redis, prefix: str, process: str, tasks: TaskTracker) -> None:
        self._redis = redis
        self._prefix = prefix
        self._process = process
        self._tasks = tasks
        self._hub: RoomHub | None = None
        self._queue: list[tuple[str, bytes, RunningText | None]] = []
        self._queued = asyncio.Event()
        # Events queued so far, and how many of them the writer has sent (or given up on).
        self._enqueued = 0
        self._settled = 0
        self._progress = asyncio.Condition()
        self._shared: set[str] = set()  # sessions with a member elsewhere during this turn
        self._unsent: set[str] = set()  # sessions with an event Redis did not take
        self._watched: set[str] = set()
        self._pubsub: PubSub | None = None
        self._confirming: dict[str, asyncio.Future[None]] = {}
        self._replies: dict[str, asyncio.Future[ActiveTurn | None]] = {}
        self._on_cancel: CancelHandler | None = None
        self._on_share: SnapshotHandler | None = None
        self._on_decision: DecisionHandler | None = None
        self._loops: set[asyncio.Task[None]] = set()
        self._linked = asyncio.Event()  # subscribed now

    def attach(
        self, hub: RoomHub, on_cancel: CancelHandler, on_share: SnapshotHandler, on_decision: DecisionHandler
    ) -> None:
        self._hub, self._on_cancel, self._on_share, self._on_decision = hub, on_cancel, on_share, on_decision

    async def start(self) -> None:
        """Start publishing and subscribing; return once subscribed (TimeoutError if Redis is away)."""
        self._loops = {
            self._tasks.spawn_loop(self._write_forever(), "redis rooms writer"),
            self._tasks.spawn_loop(self._listen_forever(), "redis rooms listener"),
        }
        async with asyncio.timeout(5):
            await self._linked.wait()

    def _channel(self, *parts: str) -> str:
        return ":".join((self._prefix, *parts))

    # ------------------------------------------------------------------ publishing

    def publish(self, session_id: str, message: RoomMessage) -> None:
        chunk = message.name == "chunk"
        if chunk and session_id not in self._shared:
            return
        body = _body(self._process, message)
        text = None
        if chunk:
            data = message.data
            text = RunningText(self._channel("text", session_id, data["turn_id"]), data["text"], append=True)
        self._enqueue(self._channel("room", session_id), orjson.dumps(body), text)

    def publish_to_user(self, user_id: str, session_id: str, message: RoomMessage) -> None:
        self._enqueue(self._channel("user", user_id), orjson.dumps({**_body(self._process, message), "s": session_id}))

    def _enqueue(self, channel: str, body: bytes, text: RunningText | None = None) -> None:
        if len(self._queue) >= MAX_QUEUED:
            self._drop_queue()
        self._queue.append((channel, body, text))
        self._enqueued += 1
        self._queued.set()

    def share(self, session_id: str) -> None:
        """Another process has a member in the session: publish the chunks of its turn running here."""
        self._shared.add(session_id)

    def unshare(self, session_id: str) -> bool:
        """The session's turn here ended; whether another process had a member in it."""
        shared = session_id in self._shared
        self._shared.discard(session_id)
        return shared

    async def _write_forever(self) -> None:
        while True:
            if self._unsent:
                with contextlib.suppress(TimeoutError):  # tell the others what they missed once Redis takes it
                    await asyncio.wait_for(self._queued.wait(), 0.5)
            else:
                await self._queued.wait()
            self._queued.clear()
            batch, self._queue = self._queue, []
            upto = self._enqueued
            missed = sorted(self._unsent)
            try:
                await self._send(missed, batch)
            except (RedisError, OSError) as exc:
                if not self._unsent:
                    log.warning("cannot publish to Redis (%s): other processes catch up once it is back", exc)
                self._unsent.update(self._rooms_of(channel for channel, _, _ in batch))
            else:
                if missed:
                    log.warning("publishing to Redis again: %d sessions told to catch up", len(missed))
                    self._unsent.difference_update(missed)
            await self._settle(upto)

    async def _settle(self, upto: int) -> None:
        async with self._progress:
            self._settled = max(self._settled, upto)
            self._progress.notify_all()

    async def sent(self) -> None:
        """Return once every event queued before the call is sent to Redis (or given up on)."""
        target = self._enqueued
        async with self._progress:
            await self._progress.wait_for(lambda: self._settled >= target)

    async def _send(self, missed: list[str], batch: list[tuple[str, bytes, RunningText | None]]) -> None:
        if not missed and not batch:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for session_id in missed:
                pipe.publish(self._channel("room", session_id), orjson.dumps({"o": self._process, "missed": True}))
            for channel, body, text in batch:
                pipe.publish(channel, body)
                if text is not None:
                    if text.append:
                        pipe.append(text.key, text.text)
                        pipe.expire(text.key, RUNNING_TEXT_SECONDS)
                    else:
                        pipe.set(text.key, text.text, ex=RUNNING_TEXT_SECONDS)
            await pipe.execute()

    def _rooms_of(self, channels: Iterable[str]) -> set[str]:
        """The sessions whose room channels are among `channels` (a user's channel is no room's)."""
        room = self._channel("room", "")
        return {channel.removeprefix(room) for channel in channels if channel.startswith(room)}

    def _drop_queue(self) -> None:
        log.warning("%d events waited for Redis: dropped; other processes catch up from storage", len(self._queue))
        self._unsent.update(self._rooms_of(channel for channel, _, _ in self._queue))
        self._queue = []
        self._settled = self._enqueued  # given up on: none of them waits any more

    # ------------------------------------------------------------------ requests to a turn's process

    async def request_cancel(self, process: str, session_id: str, turn_id: str) -> None:
        body = json.dumps({"cancel": session_id, "turn_id": turn_id})
        await self._redis.publish(self._channel("to", process), body)

    async def send_decision(
        self, process: str, session_id: str, turn_id: str, call_id: str, approval: Approval
    ) -> None:
        """A call's decision, claimed here, to the process whose turn waits for it."""
        body = json.dumps({"decision": session_id, "turn_id": turn_id, "call_id": call_id, **approval_wire(approval)})
        await self._redis.publish(self._channel("to", process), body)

    async def running_text(self, process: str, session_id: str, turn_id: str) -> ActiveTurn:
        """The text so far of a turn another process runs; from then on its chunks come here too.
        This process must watch the session already (its member is in the room)."""
        request = uuid.uuid4().hex
        reply = self._replies[request] = asyncio.get_running_loop().create_future()
        try:
            body = json.dumps({"share": session_id, "request": request})
            await self._redis.publish(self._channel("to", process), body)
            async with asyncio.timeout(REPLY_SECONDS):
                answer = await reply
        except TimeoutError:
            log.warning("the process running session %s's turn did not send its text", session_id)
            answer = None
        finally:
            self._replies.pop(request, None)
        return answer if answer is not None else ActiveTurn(turn_id=turn_id, text="", next_index=0)

    async def _share(self, session_id: str, request: str) -> None:
        """Another process's tab joined mid-turn: publish this turn's chunks from now on, and send it
        (after every chunk queued before, on the session's channel) the text so far."""
        assert self._on_share is not None
        self._shared.add(session_id)  # first: every chunk from now on is published
        snapshot = self._on_share(session_id)  # then, with no await between: the text before them
        if snapshot is None:
            self._shared.discard(session_id)  # no turn of it runs here (any more)
        body = {"o": self._process, "reply": request, "turn": snapshot.model_dump() if snapshot else None}
        # The whole text so far, for whoever ends the turn should this process die; it is written
        # after every chunk queued before it (which the text holds), and before those after it.
        text = RunningText(self._channel("text", session_id, snapshot.turn_id), snapshot.text) if snapshot else None
        self._enqueue(self._channel("room", session_id), orjson.dumps(body), text)

    # ------------------------------------------------------------------ subscribing

    async def watch(self, session_id: str) -> None:
        await self._subscribe(self._channel("room", session_id))

    def unwatch(self, session_id: str) -> None:
        self._unsubscribe_soon(self._channel("room", session_id))

    async def watch_user(self, user_id: str) -> None:
        # Kept even when this fails (Redis away): the subscription made again on reconnect has it.
        await self._subscribe(self._channel("user", user_id), keep=True)

    def unwatch_user(self, user_id: str) -> None:
        self._unsubscribe_soon(self._channel("user", user_id))

    async def _subscribe(self, channel: str, *, keep: bool = False) -> None:
        """Return once Redis confirms the subscription (kept, and made again after a reconnect;
        `keep`: kept for the reconnect even when this attempt fails)."""
        if keep:
            self._watched.add(channel)
        if self._pubsub is None:
            raise ConnectionError("not subscribed to Redis now")
        self._watched.add(channel)
        try:
            confirmed = self._confirming.setdefault(channel, asyncio.get_running_loop().create_future())
            await self._pubsub.subscribe(channel)
            async with asyncio.timeout(2):
                await asyncio.shield(confirmed)
        except BaseException:
            if not keep:
                self._watched.discard(channel)
            raise

    def _unsubscribe_soon(self, channel: str) -> None:
        self._watched.discard(channel)
        if self._pubsub is not None:
            self._tasks.spawn(self._unsubscribe(channel), name="redis unsubscribe")

    async def _unsubscribe(self, channel: str) -> None:
        pubsub = self._pubsub
        if pubsub is not None and channel not in self._watched:
            with contextlib.suppress(RedisError, OSError):  # the connection is made again without it
                await pubsub.unsubscribe(channel)

    async def _listen_forever(self) -> None:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type((RedisError, OSError, TimeoutError)),
            wait=wait_exponential(multiplier=0.25, max=1.0),
            before_sleep=self._lost,
        )
        async for attempt in retrying:
            with attempt:
                await self._listen()

    def _lost(self, state: Any) -> None:
        if self._linked.is_set():
            log.warning("Redis subscription lost (%r): made again when Redis answers", state.outcome.exception())
            self._linked.clear()
        self._pubsub = None
        assert self._hub is not None
        self._hub.link_lost()

    async def _listen(self) -> None:
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(self._channel("to", self._process), *self._watched)
            await self._read(pubsub, resubscribed=bool(self._watched))
        finally:
            if self._pubsub is pubsub:
                self._pubsub = None
            for future in self._confirming.values():
                if not future.done():
                    future.set_exception(ConnectionError("the Redis subscription was lost"))
                    future.exception()
            self._confirming.clear()
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _read(self, pubsub: PubSub, resubscribed: bool) -> None:
        loop = asyncio.get_running_loop()
        heard = next_ping = loop.time()
        first = True
        while True:
            message = await pubsub.get_message(timeout=PING_SECONDS)
            now = loop.time()
            if message is not None:
                heard = now
                if first and message["type"] == "subscribe":
                    first = False
                    self._pubsub = pubsub
                    self._linked.set()
                    if resubscribed:
                        assert self._hub is not None
                        log.info("Redis subscription made again: %d rooms catch up", len(self._watched))
                        self._hub.missed()
                await self._handle(message)
            elif now - heard > STALE_SECONDS:
                raise TimeoutError(f"no answer from Redis in {STALE_SECONDS:g} s")
            if now >= next_ping:
                await pubsub.ping()
                next_ping = now + PING_SECONDS

    async def _handle(self, message: dict[str, Any]) -> None:
        kind, channel = message["type"], _text(message.get("channel"))
        if kind == "subscribe":
            future = self._confirming.pop(channel, None)
            if future is not None and not future.done():
                future.set_result(None)
            return
        if kind != "message":
            return
        try:
            body = json.loads(message["data"])
            if channel.startswith(self._channel("to", "")):
                await self._request(body)
            elif channel.startswith(self._channel("user", "")):
                await self._room_message(str(body["s"]), body)
            else:
                await self._room_message(channel.removeprefix(self._channel("room", "")), body)
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed message on %s", channel)

    async def _request(self, body: dict[str, Any]) -> None:
        if "cancel" in body:
            assert self._on_cancel is not None
            await self._on_cancel(str(body["cancel"]), str(body["turn_id"]))
        elif "share" in body:
            await self._share(str(body["share"]), str(body["request"]))
        elif "decision" in body:
            approval = approval_of(body)
            if approval is not None and self._on_decision is not None:
                await self._on_decision(str(body["decision"]), str(body["turn_id"]), str(body["call_id"]), approval)

    async def _room_message(self, session_id: str, body: dict[str, Any]) -> None:
        if body.get("o") == self._process:
            return
        assert self._hub is not None
        if "reply" in body:
            reply = self._replies.get(str(body["reply"]))
            if reply is not None and not reply.done():
                turn = body.get("turn")
                reply.set_result(ActiveTurn.model_validate(turn) if turn is not None else None)
        elif body.get("missed"):
            self._hub.missed([session_id])
        else:
            message = RoomMessage(str(body["e"]), body["d"], body.get("k"), body.get("i"), body.get("u"))
            await self._hub.receive(session_id, message)

    async def aclose(self) -> None:
        with contextlib.suppress(TimeoutError):  # the last events (shutdown's `done`s) go out first
            async with asyncio.timeout(1):
                await self.sent()
        await cancel_and_wait(self._loops)


@dataclass(frozen=True, slots=True)
class RunningText:
    """Written with an event: a chunk's text appended to its turn's, or the whole text so far set."""

    key: str
    text: str
    append: bool = False


def _body(process: str, message: RoomMessage) -> dict[str, Any]:
    body = {"o": process, "e": message.name, "d": message.data, "k": message.key, "i": message.event_id}
    if message.user_id is not None:
        body["u"] = message.user_id
    return body


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
