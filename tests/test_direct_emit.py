"""The room emit that queues packets in the calling task (server/transport/socketio_app.py)."""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
import socketio
from engineio import packet as eio_packet

from server.upstream.socketio import DirectEmitManager


class RecordingServer:
    """What the manager needs of python-socketio's server: ids, the packet class and the send."""

    packet_class = socketio.packet.Packet

    def __init__(self, failing: set[str]) -> None:
        self.eio = SimpleNamespace(generate_id=lambda: uuid.uuid4().hex)
        self.failing = failing
        self.sent: list[tuple[str, Any]] = []

    async def _send_eio_packet(self, eio_sid: str, pkt: eio_packet.Packet) -> None:
        if eio_sid in self.failing:
            raise RuntimeError("this socket is gone")
        self.sent.append((eio_sid, json.loads(pkt.data[1:])))


async def test_every_member_of_the_room_gets_the_event_in_order_even_when_one_send_fails() -> None:
    server = RecordingServer(failing={"eio-b"})
    manager = DirectEmitManager()
    manager.set_server(server)
    manager.initialize()
    sids = {eio: await manager.connect(eio, "/") for eio in ("eio-a", "eio-b", "eio-c", "eio-d")}
    for eio in ("eio-a", "eio-b", "eio-c"):
        await manager.enter_room(sids[eio], "/", "session:1", eio_sid=eio)

    # Queued in the calling task: the emit completes without giving the loop a turn (the library's
    # own emit starts a task per recipient and waits for them).
    emit = manager.emit("chunk", {"index": 0, "text": "one"}, "/", room="session:1")
    with pytest.raises(StopIteration):
        emit.send(None)
    await manager.emit("chunk", {"index": 1, "text": "two"}, "/", room="session:1", skip_sid=sids["eio-c"])

    assert server.sent == [
        ("eio-a", ["chunk", {"index": 0, "text": "one"}]),
        ("eio-c", ["chunk", {"index": 0, "text": "one"}]),
        ("eio-a", ["chunk", {"index": 1, "text": "two"}]),
    ]  # eio-b failed and was skipped; eio-d is not in the room
