"""Stored events <-> what a model provider reads, and the JSON content of tool events."""

from __future__ import annotations

import json
from collections.abc import Iterable

from server.core.models import JSON, EventDraft, EventType, StoredEvent
from server.core.ports import ConversationItem, ModelText, ToolCallItem, ToolResultItem, UserText


def tool_call_content(call: ToolCallItem, *, text_offset: int = 0) -> str:
    """`text_offset`: how much of the turn's answer text the model had streamed before this call.

    The answer is stored once, as the turn's `ai_message`; the offset lets a rebuilt history put
    the text the model wrote before calling a tool back before the call, where the model wrote it.
    """
    body: dict[str, JSON] = {"call_id": call.call_id, "name": call.name, "args": call.args}
    if text_offset:
        body["text_offset"] = text_offset
    if call.provider_data:
        body["provider_data"] = call.provider_data
    return json.dumps(body, ensure_ascii=False)


def tool_result_content(result: ToolResultItem) -> str:
    body: dict[str, JSON] = {"call_id": result.call_id, "name": result.name}
    if result.error is not None:
        body["error"] = result.error
    else:
        body["result"] = result.result
    return json.dumps(body, ensure_ascii=False)


def conversation_from_events(events: Iterable[StoredEvent | EventDraft]) -> list[ConversationItem]:
    items: list[ConversationItem] = []
    # Per turn: (position in items, text offset) of each tool round that followed some answer text.
    rounds: dict[str, list[tuple[int, int]]] = {}
    for event in events:
        if event.event_type is EventType.USER_MESSAGE:
            items.append(UserText(event.content))
        elif event.event_type is EventType.AI_MESSAGE:
            _insert_answer(items, event.content, rounds.pop(event.turn_id or "", []))
        elif event.event_type is EventType.TOOL_CALL:
            body = json.loads(event.content)
            offset = body.get("text_offset")
            if event.turn_id and isinstance(offset, int) and offset > 0:
                turn_rounds = rounds.setdefault(event.turn_id, [])
                if not turn_rounds or turn_rounds[-1][1] < offset:
                    turn_rounds.append((len(items), offset))
            items.append(
                ToolCallItem(
                    call_id=body["call_id"],
                    name=body["name"],
                    args=body.get("args") or {},
                    provider_data=body.get("provider_data"),
                )
            )
        elif event.event_type is EventType.TOOL_RESULT:
            body = json.loads(event.content)
            items.append(
                ToolResultItem(
                    call_id=body["call_id"], name=body["name"], result=body.get("result"), error=body.get("error")
                )
            )
    return items


def _insert_answer(items: list[ConversationItem], text: str, turn_rounds: list[tuple[int, int]]) -> None:
    """Split a turn's answer around its tool rounds: each piece goes where the model wrote it."""
    pieces: list[tuple[int, str]] = []
    start = 0
    for position, offset in turn_rounds:
        end = min(offset, len(text))
        if end > start:
            pieces.append((position, text[start:end]))
            start = end
    for position, piece in reversed(pieces):
        items.insert(position, ModelText(piece))
    if text[start:]:
        items.append(ModelText(text[start:]))
