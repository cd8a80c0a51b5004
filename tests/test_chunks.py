"""A turn's chunk stream: chunks held while the user message is stored keep their place ahead of
those made while they go out, and a flush returns only once what it covers has left."""

from __future__ import annotations

import asyncio
import random

from server.core.chunks import ChunkStream
from server.core.tasks import TaskTracker


def recorder(sent: list[str], pause: float = 0.0):  # type: ignore[no-untyped-def]
    async def send(text: str, stamp: float | None) -> None:
        await asyncio.sleep(pause)  # a real publish yields: the model makes more meanwhile
        sent.append(text)

    return send


async def test_chunks_made_while_the_held_ones_go_out_follow_them_in_order() -> None:
    """Whatever the interleaving (each trial its own), every chunk is sent once, held ones first."""
    shuffle = random.Random(7)
    for trial in range(100):
        sent: list[str] = []
        stream = ChunkStream(recorder(sent), 0, TaskTracker())
        held = [f"held {n}" for n in range(shuffle.randint(0, 3))]
        for text in held:
            await stream.add(text, None)
        assert sent == [] and not stream.is_open
        live = [f"live {n}" for n in range(10)]
        pauses = [shuffle.randint(0, 3) for _ in live]

        producer = asyncio.create_task(generate(stream, live, pauses))
        for _ in range(shuffle.randint(0, 3)):
            await asyncio.sleep(0)  # the model is streaming when the stream opens
        await stream.open()
        await producer
        await stream.flush()
        assert sent == [*held, *live], f"trial {trial}"


async def generate(stream: ChunkStream, texts: list[str], pauses: list[int]) -> None:
    """The model: a delta, then a few turns of the loop (another session's work), and so on."""
    for text, pause in zip(texts, pauses, strict=True):
        await stream.add(text, None)
        for _ in range(pause):
            await asyncio.sleep(0)


async def test_a_flush_waits_for_the_window_send_in_progress() -> None:
    sent: list[str] = []
    tasks = TaskTracker()
    stream = ChunkStream(recorder(sent, pause=0.05), 0.01, tasks)
    await stream.open()
    await stream.add("a", None)
    await stream.add("b", None)
    await asyncio.sleep(0.03)  # the window's timer is sending "ab" now
    await stream.add("c", None)
    await stream.flush()  # what `done` waits for: nothing added before it is still on its way
    assert sent == ["ab", "c"]
    await tasks.drain(1)


async def test_a_closed_stream_sends_nothing() -> None:
    sent: list[str] = []
    stream = ChunkStream(recorder(sent), 0, TaskTracker())
    await stream.open()
    await stream.add("before", None)
    stream.close()
    await stream.add("after", None)
    assert sent == ["before"]
