"""The session rooms of this process: who is in each, and every event of a session to each of them.

One hub serves every transport. A connected client is a `Member` (a Socket.IO socket, a plain
WebSocket; a third transport is a third kind of member); the hub puts each event of a session on
the queue of every member in its room, encoded once per kind of member. Across processes the hub
hands each event to a `Fanout` (Redis: coordination/redis_rooms.py) and takes the other processes'
events from it, the shape of Django Channels' `group_send` over a channel layer.

No silent loss across processes: an event of a session that is stored (all but `chunk` and
`presence`) carries its storage key. Each room remembers the keys it delivered since its `floor`
(every stored event up to the floor has reached its members). When the fanout says events may
have been missed (its subscription broke, or a process could not publish), the room catches up
from storage: the events after its floor that it did not deliver, in order, then a current
`presence`; live events wait meanwhile (chunks are dropped: `done.text` holds the whole answer).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.core.models import (
    EVENT_NAMES,
    DoneEvent,
    PresenceEvent,
    Session,
    SessionDeletedEvent,
    SessionEvent,
    SessionUpdatedEvent,
    TurnEvent,
    UserMessageEvent,
    iso,
)
from server.core.recent import Recent
from server.core.redelivery import Missed, event_key
from server.core.tasks import TaskTracker

log = logging.getLogger(__name__)

CATCH_UP_AT_ONCE = 8  # rooms catching up from storage at the same time
CATCH_UP_FIRST_RETRY_SECONDS = 0.1
CATCH_UP_RETRY_SECONDS = 2.0
# How long live events wait for a catch-up that cannot read storage, before they go on without it.
CATCH_UP_HOLD_SECONDS = 5.0
# Session events heard lately (each arrives twice across processes: on its room's channel and its
# user's), with the connections each went to.
RECENT_SESSION_EVENTS = 1024
SESSION_EVENT_NAMES = frozenset({EVENT_NAMES[SessionUpdatedEvent], EVENT_NAMES[SessionDeletedEvent]})
DeletedHandler = Callable[[str], Awaitable[None]]

Encoder = Callable[[str, Any], Any]


class Outgoing:
    """One event on its way to a room's members: encoded once per kind of member, however many."""

    __slots__ = ("_encoded", "data", "name")

    def __init__(self, name: str, data: Any) -> None:
        self.name = name
        self.data = data
        self._encoded: dict[Encoder, Any] = {}

    def encoded(self, encoder: Encoder) -> Any:
        try:
            return self._encoded[encoder]
        except KeyError:
            value = self._encoded[encoder] = encoder(self.name, self.data)
            return value


class Member(Protocol):
    """A connected client, as the hub reaches it."""

    @property
    def connection_id(self) -> str:
        """The core's name for the connection (unique in the process)."""
        ...

    async def send(self, event: Outgoing) -> None:
        """Queue the event for the client (never waiting for the client itself)."""
        ...


@dataclass(frozen=True, slots=True)
class RoomMessage:
    """An event of a session between processes: `key` its storage key (None: not stored), or the
    id of a session event; `user_id`: the session's user, for a session event."""

    name: str
    data: Any
    key: str | None
    event_id: int | None = None
    user_id: str | None = None


class Fanout(Protocol):
    """A session's events to and from the other processes (a channel layer)."""

    def publish(self, session_id: str, message: RoomMessage) -> None:
        """Send the event to the other processes' members of the session, in order; never waits.
        One that cannot be sent is reported to them as missed when it can."""
        ...

    async def watch(self, session_id: str) -> None:
        """Receive the session's events from the other processes: from when this returns on."""
        ...

    def unwatch(self, session_id: str) -> None: ...

    def publish_to_user(self, user_id: str, session_id: str, message: RoomMessage) -> None:
        """A session event to the other processes' connections that follow the user (never waits)."""
        ...

    async def watch_user(self, user_id: str) -> None:
        """Receive the session events of the user's sessions from the other processes."""
        ...

    def unwatch_user(self, user_id: str) -> None: ...


class Backlog(Protocol):
    """Where a room catches up from: the session's stored events, its presence now, and the session
    itself (deleted, or renamed, meanwhile)."""

    async def missed_events(self, session_id: str, after_event_id: int) -> list[Missed]: ...

    async def presence(self, session_id: str) -> PresenceEvent: ...

    async def session_state(self, session_id: str) -> Session | None: ...


@dataclass(eq=False)
class Room:
    members: dict[str, tuple[Member, int]] = field(default_factory=dict)  # connection -> (member, its history's end)
    floor: int = 0  # every stored event up to this id has reached the members
    delivered: set[str] = field(default_factory=set)  # keys delivered since the floor
    stale: bool = False  # events may have been missed: the floor waits for a catch-up
    again: bool = False  # reported missing events since its catch-up began: one more pass
    held: list[RoomMessage] | None = None  # while catching up: live events, in order
    watching: asyncio.Task[None] | None = None  # subscribing to the other processes' events
    title: str | None = None  # the session's title as its members know it (a catch-up sends a newer one)


class RoomHub:
    """Every session room of this process (the core's `Emitter`)."""

    def __init__(self, tasks: TaskTracker, fanout: Fanout | None = None) -> None:
        self._tasks = tasks
        self._fanout = fanout
        self._members: dict[str, Member] = {}
        self._rooms: dict[str, Room] = {}
        self._backlog: Backlog | None = None
        self._catching_up: dict[str, asyncio.Task[None]] = {}
        self._at_once = asyncio.Semaphore(CATCH_UP_AT_ONCE)
        self._followers: dict[str, set[str]] = {}  # user -> connections here that follow it
        self._following: dict[str, set[str]] = {}  # connection -> the users it follows
        self._heard: Recent[str, set[str]] = Recent(RECENT_SESSION_EVENTS)  # event key -> connections sent to
        self._deleted: Recent[str, None] = Recent(RECENT_SESSION_EVENTS)  # sessions whose deletion was heard here
        self._on_deleted: DeletedHandler | None = None

    def catch_up_from(self, backlog: Backlog) -> None:
        self._backlog = backlog

    def on_session_deleted(self, handler: DeletedHandler) -> None:
        """Called once per deleted session on each process that hears it, after its room is emptied."""
        self._on_deleted = handler

    # ------------------------------------------------------------------ members

    def connect(self, member: Member) -> None:
        self._members[member.connection_id] = member

    def disconnect(self, member: Member) -> None:
        """Forget the member, and take it out of every room (its sessions' presence is the core's)."""
        if self._members.get(member.connection_id) is member:
            del self._members[member.connection_id]
        for session_id in [s for s, room in self._rooms.items() if member.connection_id in room.members]:
            self._leave(member.connection_id, session_id)
        for user_id in self._following.pop(member.connection_id, ()):
            followers = self._followers.get(user_id)
            if followers is not None:
                followers.discard(member.connection_id)
                if not followers:
                    del self._followers[user_id]
                    if self._fanout is not None:
                        self._fanout.unwatch_user(user_id)

    async def follow_user(self, connection_id: str, user_id: str) -> None:
        """The connection hears the session events of every session of the user, joined or not."""
        if connection_id not in self._members or user_id in self._following.get(connection_id, ()):
            return
        self._following.setdefault(connection_id, set()).add(user_id)
        followers = self._followers.get(user_id)
        if followers is not None:
            followers.add(connection_id)
            return
        self._followers[user_id] = {connection_id}
        if self._fanout is not None:
            try:
                await self._fanout.watch_user(user_id)
            except Exception as exc:  # its joined sessions' rooms still bring it their events
                log.warning("cannot follow a user's sessions on other processes now: %r", exc)

    async def add_member(
        self,
        connection_id: str,
        session_id: str,
        *,
        history_end: int | None = None,
        stored_end: int | None = None,
        title: str | None = None,
    ) -> None:
        """`history_end`: the last stored event the member has from its join (it is not sent those
        again); `stored_end`: the last stored event its join read, where a new room's floor starts;
        `title`: the session's title its join read. Raises when the room cannot receive the other
        processes' events, or the member left meanwhile."""
        client = self._members.get(connection_id)
        if client is None:
            raise ConnectionError("the connection has closed")
        room = self._rooms.get(session_id)
        if room is None:
            room = self._rooms[session_id] = Room(floor=stored_end or 0, title=title)
            if self._fanout is not None:
                room.watching = self._tasks.spawn(self._watch(session_id, room), f"watch {session_id}", awaited=True)
        if room.watching is not None:
            await asyncio.shield(room.watching)  # every joiner waits until the room hears other processes
        if self._members.get(connection_id) is not client or self._rooms.get(session_id) is not room:
            raise ConnectionError("the connection has closed")
        room.members[connection_id] = (client, history_end or 0)

    async def _watch(self, session_id: str, room: Room) -> None:
        assert self._fanout is not None
        try:
            await self._fanout.watch(session_id)
        except BaseException:
            if self._rooms.get(session_id) is room and not room.members:
                del self._rooms[session_id]
            raise

    async def remove_member(self, connection_id: str, session_id: str) -> None:
        self._leave(connection_id, session_id)

    def _leave(self, connection_id: str, session_id: str) -> None:
        room = self._rooms.get(session_id)
        if room is None or room.members.pop(connection_id, None) is None or room.members:
            return
        self._drop_room(session_id)

    def _drop_room(self, session_id: str) -> None:
        if self._rooms.pop(session_id, None) is None:
            return
        catching_up = self._catching_up.pop(session_id, None)
        if catching_up is not None and catching_up is not asyncio.current_task():
            catching_up.cancel()  # (a catch-up that found the session deleted ends by itself)
        if self._fanout is not None:
            self._fanout.unwatch(session_id)

    # ------------------------------------------------------------------ events

    async def publish(self, session_id: str, event: TurnEvent) -> None:
        """The core's events: to the members here, then to the other processes'."""
        message = RoomMessage(EVENT_NAMES[type(event)], event.payload(), event_key(event), _event_id(event))
        room = self._rooms.get(session_id)
        if room is not None:
            await self._deliver(room, message)
        if self._fanout is not None:
            self._fanout.publish(session_id, message)

    async def receive(self, session_id: str, message: RoomMessage) -> None:
        """Another process's event of the session (from the fanout)."""
        if message.name in SESSION_EVENT_NAMES:
            await self._hear(session_id, message)
            return
        room = self._rooms.get(session_id)
        if room is not None:
            await self._deliver(room, message)

    # ------------------------------------------------------------------ session events

    async def announce(self, session_id: str, user_id: str | None, event: SessionEvent) -> None:
        """To the session's room and the user's followers: here, then on the other processes."""
        name = EVENT_NAMES[type(event)]
        message = RoomMessage(name, event.payload(), f"{name}:{uuid.uuid4().hex}", user_id=user_id)
        await self._hear(session_id, message)
        if self._fanout is not None:
            self._fanout.publish(session_id, message)
            if user_id is not None:
                self._fanout.publish_to_user(user_id, session_id, message)

    async def _hear(self, session_id: str, message: RoomMessage) -> None:
        """Each connection here in the room or following the user gets a session event once,
        whichever channel brought it first."""
        assert message.key is not None
        deleted = message.name == EVENT_NAMES[SessionDeletedEvent]
        if not deleted and session_id in self._deleted:
            return  # a title made elsewhere as it was deleted: it must not bring it back to a list
        sent = self._heard.get(message.key)
        first = sent is None
        if sent is None:
            sent = set()
            self._heard.remember(message.key, sent)
        room = self._rooms.get(session_id)
        if room is not None and deleted and room.held is not None:
            await self._release_held(room)  # what the room holds (the cancelled turn's `done`) goes first
        recipients = dict(room.members) if room is not None else {}
        for connection_id in self._followers.get(message.user_id or "", ()):
            member = self._members.get(connection_id)
            if member is not None:
                recipients.setdefault(connection_id, (member, 0))
        if room is not None and message.name == EVENT_NAMES[SessionUpdatedEvent]:
            room.title = message.data.get("title")
        outgoing = Outgoing(message.name, message.data)
        for connection_id, (member, _) in recipients.items():
            if connection_id not in sent:
                sent.add(connection_id)
                await _send(member, outgoing)
        if deleted and first:
            self._deleted.remember(session_id, None)
            self._drop_room(session_id)
            if self._on_deleted is not None:
                await self._on_deleted(session_id)

    async def _deliver(self, room: Room, message: RoomMessage) -> None:
        if room.held is not None:
            if message.key is not None:
                room.held.append(message)  # after what the catch-up sends
            return  # a chunk while catching up: `done.text` has it
        if message.key is not None and self._fanout is not None:
            if message.key in room.delivered or (message.event_id is not None and message.event_id <= room.floor):
                return  # sent already (live, or by a catch-up)
            room.delivered.add(message.key)
            if message.name == "done" and message.event_id is not None and not room.stale:
                room.floor, room.delivered = max(room.floor, message.event_id), set()
        outgoing = Outgoing(message.name, message.data)
        for member, _ in list(room.members.values()):
            await _send(member, outgoing)

    # ------------------------------------------------------------------ catching up

    def link_lost(self) -> None:
        """The fanout's subscription broke: what arrives meanwhile cannot be trusted to be whole."""
        for room in self._rooms.values():
            room.stale = True

    def missed(self, sessions: Iterable[str] | None = None) -> None:
        """Events of these sessions (None: of every room here) may have been missed: catch up."""
        for session_id in self._rooms if sessions is None else sessions:
            room = self._rooms.get(session_id)
            if room is None:
                continue
            room.stale = room.again = True
            if room.held is None:
                room.held = []  # from now: what arrives live follows what the catch-up sends
            running = self._catching_up.get(session_id)
            if running is None or running.done():
                self._catching_up[session_id] = self._tasks.spawn(
                    self._catch_up(session_id), name=f"catch up {session_id}"
                )

    async def _catch_up(self, session_id: str) -> None:
        loop = asyncio.get_running_loop()
        reported = loop.time()
        pause = CATCH_UP_FIRST_RETRY_SECONDS
        while (room := self._rooms.get(session_id)) is not None and self._backlog is not None:
            room.again = False
            room.stale = False  # a gap reported from now on catches up again
            try:
                async with self._at_once:
                    missed = await self._backlog.missed_events(session_id, room.floor)
                    presence = await self._backlog.presence(session_id)
                    session = await self._backlog.session_state(session_id)
            except Exception as exc:
                room.stale = room.again = True
                if room.held is not None and loop.time() - reported > CATCH_UP_HOLD_SECONDS:
                    # Storage or shared state stays away: live events go on, out of order with the
                    # missed ones that follow once it is back, rather than not at all meanwhile.
                    log.warning("cannot catch session %s up yet (%s); retried", session_id, type(exc).__name__)
                    await self._release_held(room)
                await asyncio.sleep(pause)
                pause = min(pause * 2, CATCH_UP_RETRY_SECONDS)
                continue
            await self._resend(room, missed)
            await self._release_held(room)
            if await self._session_caught_up(session_id, room, session):
                break  # deleted meanwhile: the room is gone
            await self._deliver(room, RoomMessage("presence", presence.payload(), None))
            if not room.again:
                break
            room.held = []  # reported again while it ran: the next pass holds what arrives, as the first
            reported, pause = loop.time(), CATCH_UP_FIRST_RETRY_SECONDS
        self._catching_up.pop(session_id, None)

    async def _session_caught_up(self, session_id: str, room: Room, session: Session | None) -> bool:
        """What the room may have missed of the session itself: its deletion (True: the room is gone),
        or a new title (sent again when the room heard none, or another)."""
        if session is None:
            return False
        if session.deleted:
            event: SessionEvent = SessionDeletedEvent(session_id=session_id)
        else:
            if session.title is None or session.title == room.title:
                return False
            updated_at = iso(session.updated_at) if session.updated_at is not None else None
            event = SessionUpdatedEvent(session_id=session_id, title=session.title, updated_at=updated_at)
        name = EVENT_NAMES[type(event)]
        await self._hear(session_id, RoomMessage(name, event.payload(), f"{name}:{uuid.uuid4().hex}"))
        return session.deleted

    async def _resend(self, room: Room, missed: list[Missed]) -> None:
        for event in missed:
            if event.key in room.delivered:
                continue
            outgoing = Outgoing(EVENT_NAMES[type(event.event)], event.event.payload())
            for member, history_end in list(room.members.values()):
                if event.event_id > history_end:
                    await _send(member, outgoing)
        if missed:
            room.floor = max(room.floor, missed[-1].event_id)
        # Kept until a `done` moves the floor: a live copy may still be on its way.
        room.delivered |= {m.key for m in missed}

    async def _release_held(self, room: Room) -> None:
        """Send what waited, but what the catch-up sent (its keys are in `delivered`)."""
        held, room.held = room.held or [], None
        for message in held:
            await self._deliver(room, message)

    async def close(self) -> None:
        for task in list(self._catching_up.values()):
            task.cancel()
        if self._catching_up:
            await asyncio.wait(list(self._catching_up.values()))
        self._catching_up.clear()


def _event_id(event: TurnEvent) -> int | None:
    return event.event_id if isinstance(event, DoneEvent | UserMessageEvent) else None


async def _send(member: Member, outgoing: Outgoing) -> None:
    try:
        await member.send(outgoing)
    except Exception as exc:  # one member's failure is not the others'
        log.debug("could not send %s to %s: %r", outgoing.name, member.connection_id, exc)
