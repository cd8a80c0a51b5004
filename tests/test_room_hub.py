"""The service's room hub (server/rooms/hub.py) on its own: members of two kinds, a fan-out that
reports missed events, and the catch-up from storage that follows."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from server.core.models import (
    DoneEvent,
    PresenceEvent,
    Session,
    SessionUpdatedEvent,
    ToolCallEvent,
    UserMessageEvent,
)
from server.core.redelivery import Missed, event_key
from server.core.tasks import TaskTracker
from server.rooms.hub import Outgoing, RoomHub, RoomMessage

SID = "11111111-1111-1111-1111-111111111111"
encodings: list[str] = []


def tagged(name: str, data: Any) -> str:
    encodings.append(name)
    return f"{name}:{data.get('turn_id', data.get('clients'))}"


class Recorder:
    def __init__(self, connection_id: str, failing: bool = False) -> None:
        self.connection_id = connection_id
        self.failing = failing
        self.got: list[str] = []

    async def send(self, event: Outgoing) -> None:
        if self.failing:
            raise RuntimeError("this socket is gone")
        self.got.append(event.encoded(tagged))


class Fanout:
    def __init__(self) -> None:
        self.published: list[RoomMessage] = []
        self.watched: set[str] = set()

    def publish(self, session_id: str, message: RoomMessage) -> None:
        self.published.append(message)

    async def watch(self, session_id: str) -> None:
        self.watched.add(session_id)

    def unwatch(self, session_id: str) -> None:
        self.watched.discard(session_id)

    def publish_to_user(self, user_id: str, session_id: str, message: RoomMessage) -> None:
        self.published.append(message)

    async def watch_user(self, user_id: str) -> None:
        self.watched.add(f"user:{user_id}")

    def unwatch_user(self, user_id: str) -> None:
        self.watched.discard(f"user:{user_id}")


class Storage:
    def __init__(self) -> None:
        self.rows: list[Missed] = []
        self.asked: list[int] = []
        self.session: Session | None = None  # as storage has it now (None: nothing to catch up on)

    async def missed_events(self, session_id: str, after_event_id: int) -> list[Missed]:
        self.asked.append(after_event_id)
        return [row for row in self.rows if row.event_id > after_event_id]

    async def presence(self, session_id: str) -> PresenceEvent:
        return PresenceEvent(session_id=SID, clients=2)

    async def session_state(self, session_id: str) -> Session | None:
        return self.session


def turn(n: int, first_id: int) -> list[Missed]:
    """A stored turn: its user message, a tool call, its answer, with consecutive ids."""
    events = [
        UserMessageEvent(session_id=SID, turn_id=f"t{n}", event_id=first_id, text="hi", client_message_id=None),
        ToolCallEvent(session_id=SID, turn_id=f"t{n}", call_id="c1", name="get_weather", args={}),
        DoneEvent(
            session_id=SID,
            turn_id=f"t{n}",
            text="ok",
            finish_reason="stop",
            usage=None,
            event_id=first_id + 2,
            error=None,
        ),
    ]
    return [Missed(key=str(event_key(e)), event_id=first_id + i, event=e) for i, e in enumerate(events)]


def as_message(missed: Missed) -> RoomMessage:
    data = missed.event.payload()
    name = {UserMessageEvent: "user_message", ToolCallEvent: "tool_call", DoneEvent: "done"}[type(missed.event)]
    return RoomMessage(name, data, missed.key, missed.event_id if name == "done" else None)


async def test_every_member_gets_each_event_in_order_encoded_once_per_kind_and_one_failure_is_skipped() -> None:
    hub = RoomHub(TaskTracker())
    members = [Recorder("a"), Recorder("b", failing=True), Recorder("c")]
    for member in members:
        hub.connect(member)
        await hub.add_member(member.connection_id, SID)
    encodings.clear()
    await hub.publish(SID, PresenceEvent(session_id=SID, clients=3))
    await hub.publish(SID, turn(1, 1)[0].event)
    assert members[0].got == members[2].got == ["presence:3", "user_message:t1"]
    assert encodings == ["presence", "user_message"]  # once each, for both members
    hub.disconnect(members[0])
    await hub.publish(SID, turn(1, 1)[2].event)
    assert members[0].got == ["presence:3", "user_message:t1"] and members[2].got[-1] == "done:t1"


async def test_a_room_that_missed_events_gets_them_from_storage_once_in_order_then_presence() -> None:
    fanout, storage = Fanout(), Storage()
    hub = RoomHub(TaskTracker(), fanout)
    hub.catch_up_from(storage)
    tab = Recorder("tab")
    hub.connect(tab)
    await hub.add_member("tab", SID, history_end=0)
    assert fanout.watched == {SID}
    first, second = turn(1, 1), turn(2, 4)
    storage.rows = [*first, *second]
    # Turn 1 arrives whole, then the link breaks: turn 2's user message arrives, the rest is lost.
    for missed in first:
        await hub.receive(SID, as_message(missed))
    hub.link_lost()
    await hub.receive(SID, as_message(second[0]))
    hub.missed()
    async with asyncio.timeout(2):
        while not tab.got or tab.got[-1] != "presence:2":
            await asyncio.sleep(0.01)
    assert tab.got == [
        "user_message:t1",
        "tool_call:t1",
        "done:t1",
        "user_message:t2",
        "tool_call:t2",
        "done:t2",
        "presence:2",
    ]
    assert storage.asked == [3]  # from the last `done` it delivered while the link held
    # Reported again: nothing is sent twice.
    hub.missed([SID])
    async with asyncio.timeout(2):
        while tab.got.count("presence:2") < 2:
            await asyncio.sleep(0.01)
    assert tab.got[-1] == "presence:2" and len(tab.got) == 8
    hub.disconnect(tab)
    assert fanout.watched == set()
    await hub.close()


async def test_live_events_wait_for_the_catch_up_and_a_member_gets_nothing_its_join_gave_it() -> None:
    storage = Storage()
    hub = RoomHub(TaskTracker(), Fanout())
    release = asyncio.Event()

    class SlowStorage(Storage):
        async def missed_events(self, session_id: str, after_event_id: int) -> list[Missed]:
            await release.wait()
            return await storage.missed_events(session_id, after_event_id)

    hub.catch_up_from(SlowStorage())
    early, late = Recorder("early"), Recorder("late")
    for member, end in ((early, 0), (late, 3)):
        hub.connect(member)
        await hub.add_member(member.connection_id, SID, history_end=end)
    first, second = turn(1, 1), turn(2, 4)
    storage.rows = [*first, *second]
    hub.missed()
    await asyncio.sleep(0.05)
    for missed in second:  # live, while storage is read: held, then sent after the catch-up
        await hub.receive(SID, as_message(missed))
    assert early.got == late.got == []
    release.set()
    async with asyncio.timeout(2):
        while not early.got or early.got[-1] != "presence:2":
            await asyncio.sleep(0.01)
    t2 = ["user_message:t2", "tool_call:t2", "done:t2"]
    assert early.got == ["user_message:t1", "tool_call:t1", "done:t1", *t2, "presence:2"]
    assert late.got == [*t2, "presence:2"]  # turn 1 was in its join's history
    await hub.close()


async def test_a_clients_after_event_id_does_not_become_the_rooms_floor() -> None:
    """A tab joining with an `after_event_id` past every stored event gets an empty history: that
    claim is its own, and the room's other members still get every event."""
    hub = RoomHub(TaskTracker(), Fanout())
    claims, other = Recorder("claims"), Recorder("other")
    for member in (claims, other):
        hub.connect(member)
    await hub.add_member("claims", SID, history_end=2**62, stored_end=None)
    await hub.add_member("other", SID, history_end=None, stored_end=None)
    for missed in turn(1, 1):
        await hub.receive(SID, as_message(missed))
    assert other.got == ["user_message:t1", "tool_call:t1", "done:t1"]
    await hub.close()


async def test_a_member_that_leaves_while_its_room_subscribes_is_not_left_in_it() -> None:
    subscribed = asyncio.Event()

    class SlowFanout(Fanout):
        async def watch(self, session_id: str) -> None:
            await subscribed.wait()
            await super().watch(session_id)

    fanout = SlowFanout()
    hub = RoomHub(TaskTracker(), fanout)
    leaving, staying = Recorder("leaving"), Recorder("staying")
    for member in (leaving, staying):
        hub.connect(member)
    joins = [asyncio.create_task(hub.add_member(m.connection_id, SID)) for m in (leaving, staying)]
    await asyncio.sleep(0.01)
    hub.disconnect(leaving)  # while the room subscribes
    subscribed.set()
    results = await asyncio.gather(*joins, return_exceptions=True)
    assert isinstance(results[0], ConnectionError) and results[1] is None
    await hub.publish(SID, PresenceEvent(session_id=SID, clients=1))
    assert staying.got == ["presence:1"] and leaving.got == []
    hub.disconnect(staying)
    assert fanout.watched == set()
    await hub.close()


def stored_session(**fields: Any) -> Session:
    return Session(session_id=SID, user_id="u", start_time=datetime.now(UTC), **fields)


async def caught_up(hub: RoomHub, member: Recorder, last: str) -> None:
    hub.missed()
    async with asyncio.timeout(2):
        while last not in member.got:
            await asyncio.sleep(0.01)


async def test_a_catch_up_that_finds_the_session_deleted_empties_the_room_and_tells_the_core() -> None:
    storage = Storage()
    hub = RoomHub(TaskTracker(), Fanout())
    hub.catch_up_from(storage)
    finished = asyncio.Event()

    async def forget(session_id: str) -> None:
        await asyncio.sleep(0.01)  # the core's cleanup awaits: it must not be cut short
        finished.set()

    hub.on_session_deleted(forget)
    tab = Recorder("tab")
    hub.connect(tab)
    await hub.add_member("tab", SID, history_end=0)
    storage.session = stored_session(deleted_at=datetime.now(UTC))
    hub.missed()
    async with asyncio.timeout(2):
        await finished.wait()
    assert tab.got == ["session_deleted:None"]
    await hub.publish(SID, PresenceEvent(session_id=SID, clients=1))
    assert tab.got == ["session_deleted:None"]  # out of the room


async def test_a_catch_up_sends_the_title_only_when_it_changed_while_away() -> None:
    storage = Storage()
    hub = RoomHub(TaskTracker(), Fanout())
    hub.catch_up_from(storage)
    tab = Recorder("tab")
    hub.connect(tab)
    await hub.add_member("tab", SID, history_end=0, title="Lisbon")
    storage.session = stored_session(title="Lisbon", updated_at=datetime.now(UTC))
    await caught_up(hub, tab, "presence:2")
    assert tab.got == ["presence:2"]  # the title the join gave: nothing to send
    storage.session = stored_session(title="Porto", updated_at=datetime.now(UTC))
    tab.got.clear()
    await caught_up(hub, tab, "presence:2")
    assert tab.got == ["session_updated:None", "presence:2"]
    tab.got.clear()
    await caught_up(hub, tab, "presence:2")
    assert tab.got == ["presence:2"]


async def test_a_session_event_reaches_room_and_followers_once_whichever_channel_brings_it_first() -> None:
    hub = RoomHub(TaskTracker(), Fanout())
    in_room, follower, both, stranger = Recorder("in_room"), Recorder("follower"), Recorder("both"), Recorder("x")
    for member in (in_room, follower, both, stranger):
        hub.connect(member)
    await hub.add_member("in_room", SID)
    await hub.add_member("both", SID)
    await hub.follow_user("follower", "u")
    await hub.follow_user("both", "u")
    await hub.follow_user("x", "someone else")
    update = SessionUpdatedEvent(session_id=SID, title="T", updated_at=None).payload()
    message = RoomMessage("session_updated", update, "session_updated:1", user_id="u")
    await hub.receive(SID, message)  # the room's channel
    await hub.receive(SID, message)  # the user's channel: the same event again
    for member in (in_room, follower, both):
        assert member.got == ["session_updated:None"], member.connection_id
    assert stranger.got == []
    deleted = RoomMessage("session_deleted", {"session_id": SID}, "session_deleted:2", user_id="u")
    await hub.receive(SID, deleted)
    late_title = RoomMessage("session_updated", update, "session_updated:3", user_id="u")
    await hub.receive(SID, late_title)  # made elsewhere as it was deleted: not sent
    for member in (in_room, follower, both):
        assert member.got == ["session_updated:None", "session_deleted:None"], member.connection_id
