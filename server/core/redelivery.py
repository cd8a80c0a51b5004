"""A session's stored events as the live events a client missed, and the key that names each.

Every event the service publishes about a turn, but `chunk` and `presence`, is stored with an
idempotency key (its `event_key`). The same key names the live event, so whoever delivers a
session's events can tell an event it has delivered from one it missed, and send the missed ones
again from storage, each once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from server.core.approvals import approval_of
from server.core.models import (
    ChunkEvent,
    DoneEvent,
    ErrorInfo,
    EventType,
    PresenceEvent,
    StoredEvent,
    ToolApprovalRequestEvent,
    ToolApprovalResultEvent,
    ToolCallEvent,
    ToolResultEvent,
    TurnEvent,
    UserMessageEvent,
)

CMID_PREFIX = "user:cmid:"


def user_message_key(turn_id: str, client_message_id: str | None) -> str:
    """A user message is stored once per client_message_id when it has one (a retry is the same message)."""
    return f"{CMID_PREFIX}{client_message_id}" if client_message_id is not None else f"user:turn:{turn_id}"


def answer_key(turn_id: str) -> str:
    return f"ai:{turn_id}"


def tool_call_key(turn_id: str, call_id: str) -> str:
    return f"tool_call:{turn_id}:{call_id}"


def tool_result_key(turn_id: str, call_id: str) -> str:
    return f"tool_result:{turn_id}:{call_id}"


def approval_request_key(turn_id: str, call_id: str) -> str:
    return f"approval_request:{turn_id}:{call_id}"


def approval_result_key(turn_id: str, call_id: str) -> str:
    return f"approval_result:{turn_id}:{call_id}"


def event_key(event: TurnEvent) -> str | None:
    """The key naming the event: its row's storage key; for an approval's request and result, which
    are stored inside their call's `tool_call` and `tool_result` rows, a key of their own. None for
    what is not stored (`chunk`, `presence`)."""
    if isinstance(event, ChunkEvent | PresenceEvent):
        return None
    if isinstance(event, ToolApprovalRequestEvent):
        return approval_request_key(event.turn_id, event.call_id)
    if isinstance(event, ToolApprovalResultEvent):
        return approval_result_key(event.turn_id, event.call_id)
    if isinstance(event, UserMessageEvent):
        return user_message_key(event.turn_id, event.client_message_id)
    if isinstance(event, ToolCallEvent):
        return tool_call_key(event.turn_id, event.call_id)
    if isinstance(event, ToolResultEvent):
        return tool_result_key(event.turn_id, event.call_id)
    return answer_key(event.turn_id)


@dataclass(frozen=True, slots=True)
class Missed:
    """A stored event, as the live event it was: `key` its storage key, `event_id` its row."""

    key: str
    event_id: int
    event: TurnEvent


def as_live(row: StoredEvent) -> list[Missed]:
    """The live events a stored row was sent as (a call waiting for approval: its `tool_call`, then
    its `tool_approval_request`; a decided one's result: its `tool_approval_result`, then its
    `tool_result`); none for a row this service did not write."""
    if row.event_key is None or row.turn_id is None:
        return []
    try:
        events = _live(row, row.turn_id)
    except (ValueError, TypeError, KeyError):
        return []  # tool content not written by this service
    return [Missed(key=event_key(event) or row.event_key, event_id=row.event_id, event=event) for event in events]


def _live(row: StoredEvent, turn_id: str) -> list[TurnEvent]:
    session_id = row.session_id
    if row.event_type is EventType.USER_MESSAGE:
        key = row.event_key or ""
        cmid = key[len(CMID_PREFIX) :] if key.startswith(CMID_PREFIX) else None
        return [
            UserMessageEvent(
                session_id=session_id,
                turn_id=turn_id,
                event_id=row.event_id,
                text=row.content,
                client_message_id=cmid,
                attachments=list(row.attachments or ()),
            )
        ]
    if row.event_type is EventType.AI_MESSAGE:
        done = DoneEvent(
            session_id=session_id,
            turn_id=turn_id,
            text=row.content,
            finish_reason=row.finish_reason or "stop",
            usage=None,
            event_id=row.event_id,
            error=row.error,
        )
        return [done]
    body = json.loads(row.content)
    call_id, name = str(body["call_id"]), str(body["name"])
    if row.event_type is EventType.TOOL_CALL:
        call = ToolCallEvent(session_id=session_id, turn_id=turn_id, call_id=call_id, name=name, args=body["args"])
        if body.get("approval") != "required":
            return [call]
        request = ToolApprovalRequestEvent(
            session_id=session_id, turn_id=turn_id, call_id=call_id, name=name, args=body["args"],
            expires_at=str(body["expires_at"]),
        )  # fmt: skip
        return [call, request]
    error = body.get("error")
    result = ToolResultEvent(
        session_id=session_id,
        turn_id=turn_id,
        call_id=call_id,
        name=name,
        result=body.get("result"),
        error=ErrorInfo(**error) if error is not None else None,
    )
    approval = approval_of(body.get("approval"))
    # A wait the turn's end cut short told the room nothing of it (its result: `cancelled`).
    waited_in_vain = approval is not None and not approval.approved and error and error.get("code") == "cancelled"
    if approval is None or waited_in_vain:
        return [result]
    decided = ToolApprovalResultEvent(
        session_id=session_id, turn_id=turn_id, call_id=call_id, approved=approval.approved, reason=approval.reason
    )
    return [decided, result]
