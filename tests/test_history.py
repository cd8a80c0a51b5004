"""The conversation a model reads, built from stored events: from scratch, and turn by turn."""

from __future__ import annotations

import json
from itertools import count

from server.core.history import ConversationCache, conversation_from_events
from server.core.models import EventDraft, EventType, StoredEvent, utc_now

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


def turn_with_a_tool(turn_id: str) -> list[StoredEvent]:
    """What a turn stores after its question: text, a tool round, more text."""
    call = {"call_id": "a", "name": "get_weather", "args": {"location": "Oslo"}, "text_offset": 5}
    result = {"call_id": "a", "name": "get_weather", "result": {"conditions": "snow"}}
    return [
        event(EventType.TOOL_CALL, json.dumps(call), f"tool_call:{turn_id}:a", turn_id),
        event(EventType.TOOL_RESULT, json.dumps(result), f"tool_result:{turn_id}:a", turn_id),
        event(EventType.AI_MESSAGE, "Look. It snows.", f"ai:{turn_id}", turn_id),
    ]


def test_turn_by_turn_the_conversation_equals_one_built_from_scratch() -> None:
    cache = ConversationCache()
    history: list[StoredEvent] = []
    for n in range(4):
        asked = question(f"question {n}", f"t{n}")
        # The history is read while the question is written: some turns see it, some do not.
        read = [*history, stored(asked)] if n % 2 else list(history)
        conversation = cache.conversation(SESSION, read, asked)
        assert conversation == conversation_from_events([*history, asked])
        conversation.append(conversation[0])  # the turn's own list: changing it changes no later turn
        history += [stored(asked), *turn_with_a_tool(f"t{n}")]
    texts = [getattr(item, "text", None) for item in conversation_from_events(history)]
    assert texts[:6] == ["question 0", "Look.", None, None, " It snows.", "question 1"]


def test_a_history_that_is_not_the_one_built_on_is_built_again() -> None:
    cache = ConversationCache()
    first = question("first", "t1")
    cache.conversation(SESSION, [], first)
    # The first question's write failed: the next turn's history holds another question instead.
    other = [stored(question("retried elsewhere", "t9")), event(EventType.AI_MESSAGE, "ok", "ai:t9", "t9")]
    then = question("then", "t2")
    conversation = cache.conversation(SESSION, other, then)
    assert [item.text for item in conversation] == ["retried elsewhere", "ok", "then"]  # type: ignore[union-attr]


def test_sessions_beyond_the_cap_are_forgotten_and_still_built_right() -> None:
    cache = ConversationCache(max_sessions=1)
    a = [stored(question("a", "ta"))]
    cache.conversation(SESSION, a)
    cache.conversation("another session", [])
    assert len(cache) == 1
    assert cache.conversation(SESSION, a) == conversation_from_events(a)
