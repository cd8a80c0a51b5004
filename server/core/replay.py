"""A session's stored events replayed as what a model reads, and the JSON content of tool events."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime

from pydantic import ValidationError

from server.core.models import ErrorInfo, EventDraft, EventType, JSONValue, StoredEvent, iso
from server.core.ports import ConversationItem, ModelText, ToolCallItem, ToolResultItem, UserText
from server.core.snapshot import Snapshot


def tool_call_content(call: ToolCallItem, *, text_offset: int = 0, expires_at: datetime | None = None) -> str:
    """`text_offset`: how much of the turn's answer text the model had streamed before this call.
    `expires_at`: the call waits for a person's approval until then.

    The answer is stored once, as the turn's `ai_message`; the offset lets a rebuilt history put
    the text the model wrote before calling a tool back before the call, where the model wrote it.
    """
    body: dict[str, JSONValue] = {"call_id": call.call_id, "name": call.name, "args": call.args}
    if text_offset:
        body["text_offset"] = text_offset
    if call.provider_data:
        body["provider_data"] = call.provider_data
    if expires_at is not None:
        body["approval"] = "required"
        body["expires_at"] = iso(expires_at)
    return json.dumps(body, ensure_ascii=False)


def tool_result_content(result: ToolResultItem) -> str:
    body: dict[str, JSONValue] = {"call_id": result.call_id, "name": result.name}
    if result.error is not None:
        body["error"] = result.error.model_dump()
    else:
        body["result"] = result.result
    if result.approval is not None:
        body["approval"] = {"approved": result.approval.approved, "reason": result.approval.reason}
    return json.dumps(body, ensure_ascii=False)


def conversation_from_events(events: Iterable[StoredEvent | EventDraft]) -> list[ConversationItem]:
    builder = ConversationBuilder()
    builder.extend(events)
    return builder.items


class ConversationBuilder:
    """Stored events -> what a model reads, one event at a time, so a session's next turn can
    start from this one's result and convert only the events that are new."""

    def __init__(self) -> None:
        self.items: list[ConversationItem] = []
        # Per turn: (position in items, text offset) of each tool round that followed some answer text.
        self._rounds: dict[str, list[tuple[int, int]]] = {}
        self.consumed = 0  # events added so far
        self.last_key: str | None = None  # the event_key of the last one
        self._shared = 0  # items handed out in a snapshot: none of them may move

    def continues(self, events: Sequence[StoredEvent | EventDraft], end: int) -> bool:
        """Whether `events[:end]` starts with the events added here (event_keys are unique in a session)."""
        return 0 < self.consumed <= end and events[self.consumed - 1].event_key == self.last_key

    def snapshot(self) -> Snapshot[ConversationItem]:
        """The conversation so far, shared rather than copied: later events only add items after it."""
        self._shared = len(self.items)
        return Snapshot(self.items)

    def extend(self, events: Iterable[StoredEvent | EventDraft]) -> None:
        for event in events:
            self.add(event)

    def add(self, event: StoredEvent | EventDraft) -> None:
        items = self.items
        if event.event_type is EventType.USER_MESSAGE:
            items.append(UserText(event.content, files=tuple(event.attachments or ())))
        elif event.event_type is EventType.AI_MESSAGE:
            turn_rounds = self._rounds.pop(event.turn_id or "", [])
            if turn_rounds and turn_rounds[0][0] < self._shared:
                # The answer goes before items a snapshot holds: the snapshot keeps the old list.
                self.items = items = list(items)
                self._shared = 0
            _insert_answer(items, event.content, turn_rounds)
        elif event.event_type is EventType.TOOL_CALL:
            call = _tool_body(event.content)  # None: not written the way this service writes tool events
            if call is not None:
                self._add_tool_call(event.turn_id, *call)
        elif event.event_type is EventType.TOOL_RESULT:
            result = _tool_body(event.content)
            item = _result_item(*result) if result is not None else None
            if item is not None:
                items.append(item)
        self.consumed += 1
        self.last_key = event.event_key

    def _add_tool_call(self, turn_id: str | None, call_id: str, name: str, body: dict[str, JSONValue]) -> None:
        offset = body.get("text_offset")
        if turn_id and isinstance(offset, int) and offset > 0:
            turn_rounds = self._rounds.setdefault(turn_id, [])
            if not turn_rounds or turn_rounds[-1][1] < offset:
                turn_rounds.append((len(self.items), offset))
        args, provider_data = body.get("args"), body.get("provider_data")
        self.items.append(
            ToolCallItem(
                call_id=call_id,
                name=name,
                args=args if isinstance(args, dict) else {},
                provider_data=provider_data if isinstance(provider_data, dict) else None,
            )
        )


def _tool_body(content: str) -> tuple[str, str, dict[str, JSONValue]] | None:
    """A tool event's call_id, name and JSON content; None when it is not the shape this service stores."""
    try:
        body = json.loads(content)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    call_id, name = body.get("call_id"), body.get("name")
    if not isinstance(call_id, str) or not isinstance(name, str):
        return None
    return call_id, name, body


def _result_item(call_id: str, name: str, body: dict[str, JSONValue]) -> ToolResultItem | None:
    """None for an `error` that is not the shape this service stores."""
    error = body.get("error")
    if error is None:
        return ToolResultItem(call_id=call_id, name=name, result=body.get("result"))
    try:
        return ToolResultItem(call_id=call_id, name=name, error=ErrorInfo.model_validate(error))
    except ValidationError:
        return None


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
