"""Stored events <-> what a model provider reads, and the JSON content of tool events."""

from __future__ import annotations

import json
from collections.abc import Iterable

from server.core.models import JSON, EventType, StoredEvent
from server.core.ports import ConversationItem, ModelText, ToolCallItem, ToolResultItem, UserText


def tool_call_content(call: ToolCallItem) -> str:
    body: dict[str, JSON] = {"call_id": call.call_id, "name": call.name, "args": call.args}
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


def conversation_from_events(events: Iterable[StoredEvent]) -> list[ConversationItem]:
    items: list[ConversationItem] = []
    for event in events:
        if event.event_type is EventType.USER_MESSAGE:
            items.append(UserText(event.content))
        elif event.event_type is EventType.AI_MESSAGE:
            if event.content:
                items.append(ModelText(event.content))
        elif event.event_type is EventType.TOOL_CALL:
            body = json.loads(event.content)
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
