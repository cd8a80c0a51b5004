"""The conversation core on its own seams: scripted model providers, a recording emitter, real SQLite.

Provider failures cannot be provoked through the offline script, so these drive the real
ConversationService and TurnRunner with providers that implement the ModelProvider interface.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from server.coordination.local import LocalCoordination
from server.core.conversation import ConversationService
from server.core.errors import ErrorCode, ServiceError, TurnErrorCode
from server.core.limits import Limits
from server.core.models import (
    EVENT_NAMES,
    ActiveTurn,
    EventDraft,
    EventType,
    SessionEvent,
    TurnEvent,
    Usage,
    utc_now,
)
from server.core.ports import (
    ConversationItem,
    Finished,
    ModelEvent,
    ModelInfo,
    ModelRequest,
    ProviderError,
    StorageUnavailable,
    TextDelta,
    ToolCallRequest,
    ToolResultItem,
    UsageReport,
)
from server.core.tasks import TaskTracker
from server.core.tools import Tool, ToolRegistry
from server.storage.sqlite import SqliteRepository
from server.tools.weather import SPEC as WEATHER_SPEC

Script = Callable[[ModelRequest, int], AsyncGenerator[ModelEvent, None]]


class ScriptedProvider:
    name = "scripted"
    max_request_file_bytes: int | None = None
    takes_files = True
    info = ModelInfo(provider="scripted", operation="chat", model="scripted")

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[ModelRequest] = []

    def stream(self, request: ModelRequest) -> AsyncGenerator[ModelEvent, None]:
        self.requests.append(request)
        return self.script(request, len(self.requests))

    async def summarise(self, conversation: Sequence[ConversationItem]) -> str:
        return f"{len(conversation)} items"

    async def title(self, conversation: Sequence[ConversationItem]) -> str:
        return "A scripted title"

    async def compact(self, summary: str | None, conversation: Sequence[ConversationItem]) -> str:
        return f"{summary or ''} +{len(conversation)} items"

    def not_ready_reason(self) -> str | None:
        return None

    async def aclose(self) -> None:
        return None


class RecordingEmitter:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.announced: list[tuple[str, dict[str, Any]]] = []  # session events (a title)
        self.done = asyncio.Event()

    async def publish(self, session_id: str, event: TurnEvent) -> None:
        name = EVENT_NAMES[type(event)]
        self.events.append((name, event.payload()))
        if name == "done":
            self.done.set()

    async def add_member(
        self,
        member: str,
        session_id: str,
        *,
        history_end: int | None = None,
        stored_end: int | None = None,
        title: str | None = None,
    ) -> None:
        return None

    async def remove_member(self, member: str, session_id: str) -> None:
        return None

    async def follow_user(self, connection: str, user_id: str) -> None:
        return None

    async def announce(self, session_id: str, user_id: str | None, event: SessionEvent) -> None:
        self.announced.append((EVENT_NAMES[type(event)], event.payload()))


class Core:
    def __init__(self, service: ConversationService, emitter: RecordingEmitter, repo: SqliteRepository) -> None:
        self.service, self.emitter, self.repo = service, emitter, repo

    async def turn(self, text: str = "hi") -> tuple[list[tuple[str, dict[str, Any]]], list[Any]]:
        sid = (await self.service.join("member", None, None, None)).session.session_id
        self.emitter.done.clear()
        self.emitter.events.clear()
        await self.service.send_message("member", sid, text, None)
        await asyncio.wait_for(self.emitter.done.wait(), 10)
        await asyncio.sleep(0.05)  # let the ordered log store the AI message
        return self.emitter.events, await self.repo.list_events(sid)


class SharedCoordination(LocalCoordination):
    """Stands in for a cross-process backend: knows of a turn on another process."""

    single_process = False  # other processes may write the sessions' events

    def __init__(self) -> None:
        super().__init__()
        self.elsewhere: dict[str, ActiveTurn] = {}

    async def turn_snapshot(self, session_id: str) -> ActiveTurn | None:
        return self.elsewhere.get(session_id)


@pytest.fixture
async def make_core(tmp_path: Path) -> Any:
    made: list[tuple[ConversationService, TaskTracker, SqliteRepository]] = []

    async def make(
        script: Script,
        tools: list[Tool] | None = None,
        coordination: LocalCoordination | None = None,
        emitter: RecordingEmitter | None = None,
        **limits: Any,
    ) -> tuple[Core, ScriptedProvider]:
        provider = ScriptedProvider(script)
        repo = await SqliteRepository.open(tmp_path / f"core-{len(made)}.db")
        tasks = TaskTracker()
        emitter = emitter or RecordingEmitter()
        service = ConversationService(
            repo=repo,
            provider=provider,
            tools=ToolRegistry(tools or []),
            emitter=emitter,
            coordination=coordination or LocalCoordination(),
            tasks=tasks,
            limits=Limits(**limits),
            summary_delay_seconds=60,
        )
        service.start()
        made.append((service, tasks, repo))
        return Core(service, emitter, repo), provider

    yield make
    for service, tasks, repo in made:  # as the runtime stops it: turns end, then the background work
        await service.shutdown(grace_seconds=1)
        await service.close_storage()
        await tasks.drain(1)
        await repo.aclose()


async def test_a_provider_error_mid_stream_ends_the_turn_with_the_partial_text(make_core: Any) -> None:
    async def script(request: ModelRequest, n: int) -> AsyncGenerator[ModelEvent, None]:
        yield TextDelta("partial ")
        yield TextDelta("answer")
        raise ProviderError(TurnErrorCode.PROVIDER_UNAVAILABLE, "the model stream broke")

    core, _ = await make_core(script)
    events, stored = await core.turn()
    done = events[-1][1]
    assert [n for n, _ in events] == ["user_message", "chunk", "chunk", "done"]
    assert done["finish_reason"] == "error" and done["text"] == "partial answer"
    assert done["error"] == {"code": "provider_unavailable", "message": "the model stream broke"}
    assert [(e.event_type, e.content) for e in stored][-1] == ("ai_message", "partial answer")


async def test_an_unexpected_provider_crash_is_a_coded_error_without_details(make_core: Any) -> None:
    async def script(request: ModelRequest, n: int) -> AsyncGenerator[ModelEvent, None]:
        raise RuntimeError("secret internal detail")
        yield TextDelta("never")

    core, _ = await make_core(script)
    events, stored = await core.turn()
    done = events[-1][1]
    assert done["finish_reason"] == "error" and done["error"]["code"] == "provider_error"
    assert "secret" not in json.dumps(events)
    assert stored[-1].event_type == "ai_message" and stored[-1].content == ""


@pytest.mark.parametrize("reason", ["max_tokens", "safety"])
async def test_finish_reasons_pass_through(make_core: Any, reason: str) -> None:
    async def script(request: ModelRequest, n: int) -> AsyncGenerator[ModelEvent, None]:
        yield TextDelta("cut")
        yield Finished(reason)  # type: ignore[arg-type]

    core, _ = await make_core(script)
    events, _ = await core.turn()
    assert events[-1][1]["finish_reason"] == reason and events[-1][1]["error"] is None


async def test_usage_sums_every_request_and_parallel_tool_calls_run_in_one_round(make_core: Any) -> None:
    started: list[str] = []
    both_running = asyncio.Event()

    async def slow_echo(args: dict[str, Any]) -> Any:
        started.append(args["location"])
        if len(started) == 2:
            both_running.set()
        await asyncio.wait_for(both_running.wait(), 5)  # proves the two calls overlap
        return {"echo": args["location"]}

    async def script(request: ModelRequest, n: int) -> AsyncGenerator[ModelEvent, None]:
        yield UsageReport(Usage(input_tokens=10, output_tokens=2))
        if n == 1:
            yield ToolCallRequest(call_id="a", name="get_weather", args={"location": "Oslo"})
            yield ToolCallRequest(call_id="a", name="get_weather", args={"location": "Rome"})  # duplicate id
        else:
            results = [i for i in request.conversation if isinstance(i, ToolResultItem)]
            yield TextDelta(" & ".join(r.result["echo"] for r in results))
        yield Finished("stop")

    core, provider = await make_core(script, tools=[Tool(WEATHER_SPEC, slow_echo)])
    events, stored = await core.turn()
    names = [n for n, _ in events]
    assert names == ["user_message", "tool_call", "tool_call", "tool_result", "tool_result", "chunk", "done"]
    call_ids = [d["call_id"] for n, d in events if n == "tool_call"]
    assert len(set(call_ids)) == 2  # a repeated id is made unique within the turn
    assert [d["call_id"] for n, d in events if n == "tool_result"] == call_ids
    done = events[-1][1]
    assert done["text"] == "Oslo & Rome" and done["usage"] == {"input_tokens": 20, "output_tokens": 4}
    assert len(provider.requests) == 2 and provider.requests[0].tools[0].name == "get_weather"
    assert [e.event_type for e in stored] == [
        "user_message",
        "tool_call",
        "tool_call",
        "tool_result",
        "tool_result",
        "ai_message",
    ]


async def test_a_failing_tool_is_reported_and_the_turn_goes_on(make_core: Any) -> None:
    async def broken(args: dict[str, Any]) -> Any:
        raise KeyError("internal")

    async def script(request: ModelRequest, n: int) -> AsyncGenerator[ModelEvent, None]:
        if n == 1:
            yield ToolCallRequest(call_id="c1", name="get_weather", args={"location": "x"})
            yield ToolCallRequest(call_id="c2", name="no_such_tool", args={})
        else:
            errors = [i.error.code for i in request.conversation if isinstance(i, ToolResultItem) and i.error]
            yield TextDelta("tools failed: " + ",".join(errors))
        yield Finished("stop")

    core, _ = await make_core(script, tools=[Tool(WEATHER_SPEC, broken)])
    events, _ = await core.turn()
    results = [d["error"]["code"] for n, d in events if n == "tool_result"]
    assert results == ["tool_failed", "unknown_tool"]
    assert (
        events[-1][1]["finish_reason"] == "stop" and events[-1][1]["text"] == "tools failed: tool_failed,unknown_tool"
    )


async def test_no_tool_call_outlives_a_round_that_failed(make_core: Any) -> None:
    """A round that fails with something else than a cancel (here, delivering a tool_result)
    stops its other tool calls, and the turn still ends in one `done`."""
    slow_stopped = asyncio.Event()

    class FailingResults(RecordingEmitter):
        async def publish(self, session_id: str, event: TurnEvent) -> None:
            if EVENT_NAMES[type(event)] == "tool_result":
                raise ConnectionError("the room could not be reached")
            await super().publish(session_id, event)

    async def tool(args: dict[str, Any]) -> Any:
        if args["location"] == "fast":
            return "sunny"
        try:
            await asyncio.sleep(30)
        finally:
            slow_stopped.set()

    async def script(request: ModelRequest, n: int) -> AsyncGenerator[ModelEvent, None]:
        yield ToolCallRequest(call_id="fast", name="get_weather", args={"location": "fast"})
        yield ToolCallRequest(call_id="slow", name="get_weather", args={"location": "slow"})
        yield Finished("stop")

    core, _ = await make_core(script, tools=[Tool(WEATHER_SPEC, tool)], emitter=FailingResults())
    events, stored = await core.turn()
    assert events[-1][0] == "done" and events[-1][1]["finish_reason"] == "error"
    await asyncio.wait_for(slow_stopped.wait(), 1)  # cancelled with its round, not left running
    results = [json.loads(e.content) for e in stored if e.event_type == EventType.TOOL_RESULT]
    assert [(r["call_id"], r.get("error", {}).get("code")) for r in results] == [("fast", None), ("slow", "cancelled")]


async def test_a_model_that_never_stops_asking_for_tools_is_bounded(make_core: Any) -> None:
    async def echo(args: dict[str, Any]) -> Any:
        return "ok"

    async def script(request: ModelRequest, n: int) -> AsyncGenerator[ModelEvent, None]:
        yield ToolCallRequest(call_id=f"round-{n}", name="get_weather", args={"location": "loop"})
        yield Finished("stop")

    core, provider = await make_core(script, tools=[Tool(WEATHER_SPEC, echo)], max_tool_rounds=2)
    events, _ = await core.turn()
    done = events[-1][1]
    assert done["finish_reason"] == "error" and done["error"]["code"] == "tool_rounds_exceeded"
    assert len(provider.requests) == 3
    assert len([n for n, _ in events if n == "tool_call"]) == 2 == len([n for n, _ in events if n == "tool_result"])


async def test_history_given_to_the_provider_is_rebuilt_from_storage(make_core: Any) -> None:
    async def script(request: ModelRequest, n: int) -> AsyncGenerator[ModelEvent, None]:
        yield TextDelta(f"answer {n}")
        yield Finished("stop")

    core, provider = await make_core(script)
    sid = (await core.service.join("member", None, None, None)).session.session_id
    for text in ("one", "two"):
        core.emitter.done.clear()
        await core.service.send_message("member", sid, text, None)
        await asyncio.wait_for(core.emitter.done.wait(), 5)
    seen = [(type(i).__name__, getattr(i, "text", None)) for i in provider.requests[1].conversation]
    assert seen == [("UserText", "one"), ("ModelText", "answer 1"), ("UserText", "two")]


@pytest.mark.parametrize("single_process", [True, False])
async def test_each_turn_sees_the_whole_history_read_incrementally(make_core: Any, single_process: bool) -> None:
    async def script(request: ModelRequest, n: int) -> AsyncGenerator[ModelEvent, None]:
        yield TextDelta(f"answer {n}")
        yield Finished("stop")

    coordination = LocalCoordination() if single_process else SharedCoordination()
    core, provider = await make_core(script, coordination=coordination)
    sid = (await core.service.join("member", None, None, None)).session.session_id

    async def turn(text: str) -> None:
        core.emitter.done.clear()
        await core.service.send_message("member", sid, text, None)
        await asyncio.wait_for(core.emitter.done.wait(), 5)
        await core.service.wait_turn_end(sid)

    await turn("one")
    # Another process (when there are others) answers in the session meanwhile.
    elsewhere = EventDraft(
        session_id=sid,
        event_type=EventType.USER_MESSAGE,
        content="from another process",
        event_key="user:turn:elsewhere",
        turn_id="elsewhere",
        timestamp=utc_now(),
    )
    if not single_process:
        await core.repo.append_event(elsewhere)
    await turn("two")
    await turn("three")
    seen = [getattr(i, "text", None) for i in provider.requests[2].conversation]
    expected = ["one", "answer 1", *([] if single_process else ["from another process"]), "two", "answer 2", "three"]
    assert seen == expected
    stored = [e.content for e in await core.repo.list_events(sid)]
    assert stored == [*expected, "answer 3"]


async def test_text_written_between_tool_rounds_is_rebuilt_where_the_model_wrote_it(make_core: Any) -> None:
    async def script(request: ModelRequest, n: int) -> AsyncGenerator[ModelEvent, None]:
        if n == 1:
            yield TextDelta("Looking. ")
            yield ToolCallRequest(call_id="a", name="get_weather", args={"location": "Paris"})
        elif n == 2:
            yield ToolCallRequest(call_id="b", name="get_weather", args={"location": "Delhi"})
        elif n == 3:
            yield TextDelta("And ")
            yield TextDelta("now? ")
            yield ToolCallRequest(call_id="c", name="get_weather", args={"location": "Paris"})
        else:
            yield TextDelta("Done.")
        yield Finished("stop")

    core, provider = await make_core(script)
    sid = (await core.service.join("member", None, None, None)).session.session_id
    await core.service.send_message("member", sid, "weather", None)
    await asyncio.wait_for(core.emitter.done.wait(), 5)
    assert core.emitter.events[-1][1]["text"] == "Looking. And now? Done."

    def shape(conversation: Sequence[ConversationItem]) -> list[tuple[str, str | None]]:
        return [(type(i).__name__, getattr(i, "text", None) or getattr(i, "call_id", None)) for i in conversation]

    in_turn = shape(provider.requests[3].conversation)
    assert in_turn == [
        ("UserText", "weather"),
        ("ModelText", "Looking. "),
        ("ToolCallItem", "a"),
        ("ToolResultItem", "a"),
        ("ToolCallItem", "b"),
        ("ToolResultItem", "b"),
        ("ModelText", "And now? "),
        ("ToolCallItem", "c"),
        ("ToolResultItem", "c"),
    ]
    core.emitter.done.clear()
    await core.service.send_message("member", sid, "again", None)
    await asyncio.wait_for(core.emitter.done.wait(), 5)
    rebuilt = shape(provider.requests[4].conversation)
    assert rebuilt == [*in_turn, ("ModelText", "Done."), ("UserText", "again")]


async def test_an_unexpected_storage_failure_does_not_leave_the_session_busy(make_core: Any) -> None:
    async def script(request: ModelRequest, n: int) -> AsyncGenerator[ModelEvent, None]:
        yield TextDelta("fine")
        yield Finished("stop")

    core, _ = await make_core(script)
    real_append = core.repo.append_event
    failures = [RuntimeError("a bug in a storage backend")]

    async def append_event(draft: Any) -> Any:
        if failures:
            raise failures.pop()
        return await real_append(draft)

    core.repo.append_event = append_event  # type: ignore[method-assign]
    sid = (await core.service.join("member", None, None, None)).session.session_id
    with pytest.raises(RuntimeError):
        await core.service.send_message("member", sid, "first", None)
    assert await core.service._coordination.running_turn(sid) is None
    accepted = await core.service.send_message("member", sid, "second", None)
    await asyncio.wait_for(core.emitter.done.wait(), 5)
    assert accepted.event_id is not None and core.emitter.events[-1][1]["text"] == "fine"


async def test_joins_see_turns_running_elsewhere(make_core: Any) -> None:
    async def script(request: ModelRequest, n: int) -> AsyncGenerator[ModelEvent, None]:
        yield TextDelta("one")
        yield Finished("stop")

    shared = SharedCoordination()
    core, _ = await make_core(script, coordination=shared)
    sid = (await core.service.join("member", None, None, None)).session.session_id
    remote = ActiveTurn(turn_id="on-another-process", text="so far", next_index=2)
    shared.elsewhere[sid] = remote
    assert (await core.service.join("other", sid, None, None)).active_turn == remote


async def test_done_does_not_wait_long_for_storage_and_the_answer_is_still_stored(make_core: Any) -> None:
    async def script(request: ModelRequest, n: int) -> AsyncGenerator[ModelEvent, None]:
        yield TextDelta("slowly stored")
        yield Finished("stop")

    core, _ = await make_core(script, done_store_wait_seconds=0.1)
    real_append = core.repo.append_event
    release = asyncio.Event()

    async def slow_for_answers(draft: Any) -> Any:
        if draft.event_type == "ai_message":
            await release.wait()  # storage has not confirmed it yet
        return await real_append(draft)

    core.repo.append_event = slow_for_answers  # type: ignore[method-assign]
    sid = (await core.service.join("member", None, None, None)).session.session_id
    await core.service.send_message("member", sid, "hello", None)
    await asyncio.wait_for(core.emitter.done.wait(), 5)
    done = core.emitter.events[-1][1]
    assert done["event_id"] is None and done["text"] == "slowly stored"
    release.set()
    async with asyncio.timeout(5):
        while not [e for e in await core.repo.list_events(sid) if e.event_type == "ai_message"]:
            await asyncio.sleep(0.02)
    stored = await core.repo.list_events(sid)
    assert [(e.event_type, e.content) for e in stored][-1] == ("ai_message", "slowly stored")


async def test_coalescing_merges_deltas_of_a_window_and_keeps_order_around_tool_calls(make_core: Any) -> None:
    async def script(request: ModelRequest, n: int) -> AsyncGenerator[ModelEvent, None]:
        if n == 1:
            for word in ("Let ", "me ", "look. "):
                yield TextDelta(word)
            yield ToolCallRequest(call_id="a", name="get_weather", args={"location": "Paris"})
        else:
            for word in ("It ", "is ", "sunny."):
                yield TextDelta(word)
        yield Finished("stop")

    async def weather(args: dict[str, Any]) -> dict[str, Any]:
        return {"conditions": "sunny"}

    # A window far longer than the turn: only the tool call and the end of the turn send text.
    core, _ = await make_core(script, tools=[Tool(WEATHER_SPEC, weather)], chunk_coalesce_seconds=60)
    events, stored = await core.turn()
    assert [n for n, _ in events] == ["user_message", "chunk", "tool_call", "tool_result", "chunk", "done"]
    chunks = [d for n, d in events if n == "chunk"]
    assert [(c["index"], c["text"]) for c in chunks] == [(0, "Let me look. "), (1, "It is sunny.")]
    assert events[-1][1]["text"] == "Let me look. It is sunny." == stored[-1].content
    assert json.loads(stored[1].content)["text_offset"] == len("Let me look. ")


async def test_coalesced_text_goes_out_when_its_window_ends_even_if_the_model_pauses(make_core: Any) -> None:
    resume = asyncio.Event()

    async def script(request: ModelRequest, n: int) -> AsyncGenerator[ModelEvent, None]:
        yield TextDelta("held ")
        yield TextDelta("briefly")
        await resume.wait()  # the model stalls: the window's timer must send the held text
        yield TextDelta(" then more")
        yield Finished("stop")

    core, _ = await make_core(script, chunk_coalesce_seconds=0.02)
    sid = (await core.service.join("member", None, None, None)).session.session_id
    await core.service.send_message("member", sid, "hi", None)
    for _ in range(500):
        if any(n == "chunk" for n, _ in core.emitter.events):
            break
        await asyncio.sleep(0.01)
    assert [(n, d.get("text")) for n, d in core.emitter.events if n == "chunk"] == [("chunk", "held briefly")]
    resume.set()
    await asyncio.wait_for(core.emitter.done.wait(), 10)
    chunks = [d for n, d in core.emitter.events if n == "chunk"]
    assert [(c["index"], c["text"]) for c in chunks] == [(0, "held briefly"), (1, " then more")]


async def test_chunks_carry_a_timestamp_only_when_the_benchmark_asks(make_core: Any) -> None:
    async def script(request: ModelRequest, n: int) -> AsyncGenerator[ModelEvent, None]:
        yield TextDelta("timed")
        yield Finished("stop")

    plain, _ = await make_core(script)
    events, _ = await plain.turn()
    assert "ts" not in next(d for n, d in events if n == "chunk")
    timed, _ = await make_core(script, chunk_timestamps=True)
    before = time.monotonic() * 1000
    events, _ = await timed.turn()
    stamp = next(d for n, d in events if n == "chunk")["ts"]
    assert before <= stamp <= time.monotonic() * 1000


async def test_the_model_streams_while_the_message_is_written_and_its_output_waits_for_it(make_core: Any) -> None:
    streamed = asyncio.Event()

    async def script(request: ModelRequest, n: int) -> AsyncGenerator[ModelEvent, None]:
        if n == 1:
            yield TextDelta("Let ")
            yield TextDelta("me look. ")
            streamed.set()
            yield ToolCallRequest(call_id="a", name="get_weather", args={"location": "Paris"})
        else:
            yield TextDelta("Sunny.")
        yield Finished("stop")

    async def weather(args: dict[str, Any]) -> dict[str, Any]:
        return {"conditions": "sunny"}

    core, provider = await make_core(script, tools=[Tool(WEATHER_SPEC, weather)])
    real_append = core.repo.append_event
    write_may_finish = asyncio.Event()

    async def slow_user_messages(draft: Any) -> Any:
        if draft.event_type == "user_message":
            await write_may_finish.wait()
        return await real_append(draft)

    core.repo.append_event = slow_user_messages  # type: ignore[method-assign]
    sid = (await core.service.join("member", None, None, None)).session.session_id
    core.emitter.events.clear()
    sending = asyncio.create_task(core.service.send_message("member", sid, "weather in Paris?", None))
    await asyncio.wait_for(streamed.wait(), 5)
    # The model was asked and has answered, but nothing may reach a client before `user_message`.
    await asyncio.sleep(0.05)
    assert len(provider.requests) == 1 and core.emitter.events == [] and not sending.done()

    write_may_finish.set()
    accepted = await asyncio.wait_for(sending, 5)
    assert accepted.event_id is not None
    await asyncio.wait_for(core.emitter.done.wait(), 5)
    names = [n for n, _ in core.emitter.events]
    assert names == ["user_message", "chunk", "chunk", "tool_call", "tool_result", "chunk", "done"]
    chunks = [(d["index"], d["text"]) for n, d in core.emitter.events if n == "chunk"]
    assert chunks == [(0, "Let "), (1, "me look. "), (2, "Sunny.")]
    await asyncio.sleep(0.05)  # let the ordered log store the AI message
    stored = await core.repo.list_events(sid)
    assert [e.event_type for e in stored] == ["user_message", "tool_call", "tool_result", "ai_message"]
    assert stored[-1].content == "Let me look. Sunny."


async def test_when_the_message_cannot_be_stored_nothing_the_model_said_is_sent(make_core: Any) -> None:
    asked = asyncio.Event()
    stopped = asyncio.Event()

    async def script(request: ModelRequest, n: int) -> AsyncGenerator[ModelEvent, None]:
        try:
            yield TextDelta("never ")
            asked.set()
            await asyncio.sleep(60)
            yield TextDelta("seen")
        finally:
            stopped.set()

    core, _ = await make_core(script)
    real_append = core.repo.append_event
    failures = [StorageUnavailable("storage is down")]

    async def append_event(draft: Any) -> Any:
        await asyncio.wait_for(asked.wait(), 5)  # fails only once the model has streamed
        if failures:
            raise failures.pop()
        return await real_append(draft)

    core.repo.append_event = append_event  # type: ignore[method-assign]
    sid = (await core.service.join("member", None, None, None)).session.session_id
    core.emitter.events.clear()
    with pytest.raises(ServiceError) as refused:
        await core.service.send_message("member", sid, "first", None)
    assert refused.value.code is ErrorCode.UNAVAILABLE
    assert stopped.is_set()  # the model's stream was closed with the refusal
    await asyncio.sleep(0.05)
    assert core.emitter.events == [] and await core.repo.list_events(sid) == []
    assert await core.service._coordination.running_turn(sid) is None


async def test_a_finished_turn_is_freed_without_the_cyclic_garbage_collector(make_core: Any) -> None:
    # Under load, collecting one cycle per turn meant a 10-75 ms young collection every few seconds.
    async def script(request: ModelRequest, n: int) -> AsyncGenerator[ModelEvent, None]:
        yield TextDelta("freed ")
        yield TextDelta("at once")
        yield Finished("stop")

    core, _ = await make_core(script, chunk_coalesce_seconds=0.01)
    await core.turn()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        events, _ = await core.turn()
        await core.service.wait_turn_end(events[-1][1]["session_id"])  # its task ends after `done`
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if type(o).__name__ in {"Turn", "ChunkStream"}]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert events[-1][1]["text"] == "freed at once"
    assert left == []


async def test_a_stream_with_many_chunks_ready_lets_other_tasks_run_between_them(make_core: Any) -> None:
    go = asyncio.Event()

    async def script(request: ModelRequest, n: int) -> AsyncGenerator[ModelEvent, None]:
        await go.wait()
        for i in range(20):  # all ready at once, as from one network read
            yield TextDelta(f"{i} ")
        yield Finished("stop")

    core, _ = await make_core(script)
    sid = (await core.service.join("member", None, None, None)).session.session_id
    ticking = True

    async def other_session() -> None:
        while ticking:
            core.emitter.events.append(("tick", {}))
            await asyncio.sleep(0)

    ticker = asyncio.create_task(other_session())
    try:
        await core.service.send_message("member", sid, "hi", None)
        go.set()
        await asyncio.wait_for(core.emitter.done.wait(), 10)
    finally:
        ticking = False
        await ticker
    names = [name for name, _ in core.emitter.events if name in ("chunk", "tick")]
    first, last = names.index("chunk"), len(names) - 1 - names[::-1].index("chunk")
    between = names[first : last + 1]
    assert between.count("chunk") == 20
    assert ("chunk", "chunk") not in set(itertools.pairwise(between))
