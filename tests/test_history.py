"""The conversation a model reads, built from stored events: from scratch, and turn by turn."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from itertools import count
from pathlib import Path

import pytest

from server.core.context import SUMMARY_INTRO, ContextBudget, tokens_of
from server.core.errors import ToolErrorCode
from server.core.event_store import EventStore, HistoryEvent
from server.core.history import HistoryCache
from server.core.models import ErrorInfo, EventDraft, EventType, StoredEvent, utc_now
from server.core.ports import ConversationItem, ToolCallItem, ToolResultItem, UserText
from server.core.replay import conversation_from_events, tool_call_content, tool_result_content
from server.core.tasks import TaskTracker
from server.providers.offline import PromptWords
from server.storage.sqlite import SqliteRepository

CacheFactory = Callable[..., HistoryCache]

SESSION = "5f0c2b1e-8d4a-4c1e-9a57-3b0f6f2d9e10"
ids = count(1)


def event(event_type: EventType, content: str, key: str, turn_id: str) -> StoredEvent:
    return StoredEvent(
        event_id=next(ids),
        session_id=SESSION,
        event_type=event_type,
        content=content,
        event_key=key,
        turn_id=turn_id,
        timestamp=utc_now(),
    )


def question(text: str, turn_id: str) -> EventDraft:
    return EventDraft(
        session_id=SESSION,
        event_type=EventType.USER_MESSAGE,
        content=text,
        event_key=f"user:turn:{turn_id}",
        turn_id=turn_id,
        timestamp=utc_now(),
    )


def stored(draft: EventDraft) -> StoredEvent:
    return StoredEvent(event_id=next(ids), **draft.model_dump())


def sent(events: Sequence[HistoryEvent]) -> list[ConversationItem]:
    """What a turn would send of `events` with room for all of them (without its own question)."""
    window = ContextBudget(100_000).window(SESSION, events, question("", "next"), summary=None, upto=0)
    return window.conversation()[:-1]


@pytest.fixture
async def make_cache(tmp_path: Path) -> AsyncIterator[CacheFactory]:
    repo = await SqliteRepository.open(tmp_path / "history.db")
    yield lambda **bounds: HistoryCache(repo, EventStore(repo, TaskTracker()), **bounds)
    await repo.aclose()


def turn_with_a_tool(turn_id: str) -> list[StoredEvent]:
    """What a turn stores after its question: text, a tool round, more text."""
    call = {"call_id": "a", "name": "get_weather", "args": {"location": "Oslo"}, "text_offset": 5}
    result = {"call_id": "a", "name": "get_weather", "result": {"conditions": "snow"}}
    return [
        event(EventType.TOOL_CALL, json.dumps(call), f"tool_call:{turn_id}:a", turn_id),
        event(EventType.TOOL_RESULT, json.dumps(result), f"tool_result:{turn_id}:a", turn_id),
        event(EventType.AI_MESSAGE, "Look. It snows.", f"ai:{turn_id}", turn_id),
    ]


async def test_turn_by_turn_the_conversation_equals_one_built_from_scratch(make_cache: CacheFactory) -> None:
    cache = make_cache()
    history: list[StoredEvent] = []
    for n in range(4):
        asked = question(f"question {n}", f"t{n}")
        # The history is read while the question is written: some turns see it, some do not.
        read = [*history, stored(asked)] if n % 2 else list(history)
        cache.note(SESSION, read)
        window = ContextBudget(100_000).window(SESSION, read, asked, summary=None, upto=0)
        conversation = window.conversation()
        assert conversation == conversation_from_events([*history, asked])
        conversation.append(conversation[0])  # the turn's own list: changing it changes no later turn
        history += [stored(asked), *turn_with_a_tool(f"t{n}")]
    texts = [getattr(item, "text", None) for item in conversation_from_events(history)]
    assert texts[:6] == ["question 0", "Look.", None, None, " It snows.", "question 1"]


async def test_sessions_beyond_the_cap_are_forgotten_and_still_built_right(make_cache: CacheFactory) -> None:
    cache = make_cache(max_sessions=1)
    a = [stored(question("a", "ta"))]
    cache.note(SESSION, a)
    cache.note("another session", [])
    assert len(cache) == 1 and cache.events == 0  # the least recently used session made way


async def test_the_cache_is_bounded_by_events_as_well_as_sessions(make_cache: CacheFactory) -> None:
    cache = make_cache(max_events=5)
    long = [stored(question(f"q{n}", f"t{n}")) for n in range(4)]
    cache.note(SESSION, long)
    short = [stored(question("other", "tx")), stored(question("again", "ty"))]
    cache.note("another session", short)
    assert len(cache) == 1 and cache.events == 2  # the least recently used session made way
    cache.remember(stored(question("more", "tz")).model_copy(update={"session_id": "another session"}))
    assert cache.events == 3


async def test_a_turns_conversation_and_history_stay_as_read_while_the_session_goes_on(
    make_cache: CacheFactory,
) -> None:
    """Both are shared with the cache, not copied (O(new events) a turn): what comes later must not
    show in them, even an answer placed before items the earlier conversation holds."""
    cache = make_cache(sole_writer=True)
    first = stored(question("first", "t1"))
    tool_events = turn_with_a_tool("t1")
    cache.note(SESSION, [first, *tool_events[:2]])  # the answer's write not stored yet
    history = await cache.read(SESSION)
    earlier = sent(history)
    shown = list(earlier)
    assert [getattr(item, "name", None) for item in shown] == [None, "get_weather", "get_weather"]

    cache.remember(tool_events[2])  # the answer: its first piece goes before the tool call
    later = await cache.read(SESSION)
    assert len(history) == 3 and len(later) == 4
    assert sent(later) == conversation_from_events([first, *tool_events])
    assert earlier == shown


async def test_the_offline_word_count_follows_an_answer_placed_before_items_it_counted(
    make_cache: CacheFactory,
) -> None:
    """The offline script counts a conversation from the last item it knows; an answer inserted
    before counted items must still be counted (the items after it moved)."""
    cache = make_cache(sole_writer=True)
    first = stored(question("first question here", "t1"))
    tool_events = turn_with_a_tool("t1")
    cache.note(SESSION, [first, *tool_events[:2]])  # the answer's write not stored yet
    words = PromptWords()
    assert words.count(sent(await cache.read(SESSION))) == 3

    cache.remember(tool_events[2])  # "Look." goes before the tool call, "It snows." after it
    cache.remember(stored(question("second one", "t2")))
    conversation = sent(await cache.read(SESSION))
    assert words.count(conversation) == 3 + 3 + 2 == PromptWords().count(conversation)


def test_tool_events_read_back_as_written_and_ones_of_another_shape_are_left_out() -> None:
    call = ToolCallItem(call_id="a", name="get_weather", args={"location": "Oslo"}, provider_data={"part": {"x": 1}})
    failed = ToolResultItem(
        call_id="a", name="get_weather", error=ErrorInfo(code=ToolErrorCode.TOOL_TIMEOUT, message="too long")
    )
    answered = ToolResultItem(call_id="b", name="get_weather", result={"conditions": ["snow", None, 1.5]})
    written = [
        event(EventType.TOOL_CALL, tool_call_content(call), "tool_call:t1:a", "t1"),
        event(EventType.TOOL_RESULT, tool_result_content(failed), "tool_result:t1:a", "t1"),
        event(EventType.TOOL_RESULT, tool_result_content(answered), "tool_result:t1:b", "t1"),
    ]
    assert json.loads(written[1].content)["error"] == {"code": "tool_timeout", "message": "too long"}
    assert conversation_from_events(written) == [call, failed, answered]

    others = [
        {"call_id": "c", "name": "get_weather", "error": "not an object"},
        {"call_id": "c", "name": "get_weather", "error": {"code": 7, "message": "m"}},
        {"call_id": 3, "name": "get_weather", "result": 1},
        ["call_id", "name"],
    ]
    stored_others = [
        event(EventType.TOOL_RESULT, json.dumps(body), f"tool_result:t1:x{n}", "t1") for n, body in enumerate(others)
    ]
    assert conversation_from_events(stored_others) == []
    odd_call = {"call_id": "d", "name": "get_weather", "args": ["Oslo"], "provider_data": "sig"}
    read = conversation_from_events([event(EventType.TOOL_CALL, json.dumps(odd_call), "tool_call:t1:d", "t1")])
    assert read == [ToolCallItem(call_id="d", name="get_weather", args={}, provider_data=None)]


def a_session(turns: int) -> list[StoredEvent]:
    """`turns` stored turns, every third one with a tool round."""
    events: list[StoredEvent] = []
    for n in range(turns):
        events.append(stored(question(f"question {n} " + "x" * 40, f"t{n}")))
        if n % 3 == 1:
            events += turn_with_a_tool(f"t{n}")
        else:
            events.append(event(EventType.AI_MESSAGE, f"answer {n} " + "y" * 80, f"ai:t{n}", f"t{n}"))
    return events


def test_the_window_sends_the_newest_whole_turns_that_fit_after_the_summary() -> None:
    history = a_session(40)
    asked = question("the newest question " + "z" * 60, "now")
    budget = ContextBudget(300)
    window = budget.window(SESSION, history, asked, summary="what came before", upto=history[9].event_id)
    conversation = window.conversation()
    assert tokens_of(conversation) <= 300
    assert conversation[0] == UserText(SUMMARY_INTRO + "what came before")
    assert conversation[-1] == UserText(asked.content)  # the newest message, whole and last
    # Whole turns only: each kept turn starts with its question, and every call has its result.
    calls = [item.call_id for item in conversation if isinstance(item, ToolCallItem)]
    results = [item.call_id for item in conversation if isinstance(item, ToolResultItem)]
    assert calls == results
    questions = [item.text for item in conversation[1:-1] if isinstance(item, UserText)]
    kept = len(questions)
    assert 0 < kept < 30 and questions == [f"question {n} " + "x" * 40 for n in range(40 - kept, 40)]
    # Nothing summarised goes again, however much room there is.
    roomy = ContextBudget(100_000).window(SESSION, history, asked, summary="s", upto=history[-1].event_id)
    assert roomy.conversation() == [UserText(SUMMARY_INTRO + "s"), UserText(asked.content)]


def test_a_turns_tool_rounds_push_out_the_oldest_kept_turns_never_its_own() -> None:
    history = a_session(20)
    asked = question("now", "now")
    window = ContextBudget(200).window(SESSION, history, asked, summary=None, upto=0)
    window.conversation()
    kept = len(window.kept)
    window.current.append(ToolResultItem(call_id="big", name="get_weather", result={"text": "r" * 400}))
    after = window.conversation()
    assert after[-len(window.current) :] == window.current  # this turn's items, all of them, last
    assert tokens_of(after) <= 200 and len(window.kept) < kept


def test_the_providers_count_calibrates_the_estimate() -> None:
    history = a_session(40)
    asked = question("now", "now")
    budget = ContextBudget(400)
    plain = len(budget.window(SESSION, history, asked, summary=None, upto=0).conversation())
    budget.observe(SESSION, estimated=100, reported=200)  # the provider counts twice what was estimated
    halved = len(budget.window(SESSION, history, asked, summary=None, upto=0).conversation())
    assert halved < plain
