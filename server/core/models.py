"""Records the core stores and the events it publishes. Field names are the wire names."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_serializer, field_validator

# Any value JSON can carry, recursively. pydantic's own alias: mypy reads it as the plain union, and
# pydantic builds it once (a recursive alias of our own would need typing_extensions on Python 3.11).
JSONValue: TypeAlias = JsonValue


def utc_now() -> datetime:
    return datetime.now(UTC)


class EventType(StrEnum):
    USER_MESSAGE = "user_message"
    AI_MESSAGE = "ai_message"
    TOOL_CALL = "tool_call"
    TOOL_RESULT = "tool_result"


def iso(moment: datetime) -> str:
    """Every timestamp on the wire: ISO 8601 with its offset, e.g. 2026-11-27T10:59:44.199352+00:00."""
    return moment.isoformat()


class Session(BaseModel):
    session_id: str
    user_id: str | None
    start_time: datetime
    end_time: datetime | None = None
    summary: str | None = None
    duration_seconds: int | None = None
    title: str | None = None
    # When it last changed: its creation, a stored event, a rename (not a generated title).
    updated_at: datetime | None = None
    # A deleted session keeps only its id, its user and this: never on the wire.
    deleted_at: datetime | None = Field(default=None, exclude=True)
    # The compaction summary of the oldest events, up to and including event `context_upto`: what
    # the model is sent in their place. Internal, never on the wire.
    context_summary: str | None = Field(default=None, exclude=True)
    context_upto: int | None = Field(default=None, exclude=True)

    @field_serializer("start_time", "end_time", "updated_at")
    def _iso(self, moment: datetime | None) -> str | None:
        return iso(moment) if moment is not None else None

    @property
    def deleted(self) -> bool:
        return self.deleted_at is not None


FinishReason = Literal["stop", "cancelled", "error", "max_tokens", "safety"]


class ErrorInfo(BaseModel):
    code: str
    message: str


class AttachmentRef(BaseModel):
    """A file as a message names it: what clients are shown of it (its bytes are read apart)."""

    attachment_id: str
    name: str
    mime_type: str
    size: int


def _error_from_storage(value: object) -> object:
    # Stored as JSON text (SQLite, asyncpg's jsonb) or as an object (PostgREST).
    return json.loads(value) if isinstance(value, str) else value


class EventDraft(BaseModel):
    """An event not yet stored. `event_key` makes its write idempotent within the session.

    `finish_reason` and `error`: how the turn ended, on its `ai_message` only (as its `done` said).
    """

    model_config = ConfigDict(frozen=True)

    session_id: str
    event_type: EventType
    content: str
    event_key: str
    turn_id: str | None = None
    timestamp: datetime
    finish_reason: FinishReason | None = None
    error: ErrorInfo | None = None
    attachments: tuple[AttachmentRef, ...] | None = None  # a user_message's files


class StoredEvent(BaseModel):
    event_id: int
    session_id: str
    event_type: EventType
    content: str
    timestamp: datetime
    turn_id: str | None = None
    # None only for rows written by others without one (the column's default gives them a key).
    event_key: str | None = None
    finish_reason: FinishReason | None = None
    error: ErrorInfo | None = None
    attachments: list[AttachmentRef] | None = None  # a user_message's files

    _parse_error = field_validator("error", "attachments", mode="before")(_error_from_storage)

    def public(self) -> dict[str, JSONValue]:
        """The shape of `history` items and of `GET /api/sessions/{id}/events`."""
        body: dict[str, JSONValue] = {
            "event_id": self.event_id,
            "event_type": self.event_type.value,
            "content": self.content,
            "timestamp": iso(self.timestamp),
        }
        if self.event_type is EventType.AI_MESSAGE:
            body["finish_reason"] = self.finish_reason
            body["error"] = self.error.model_dump() if self.error is not None else None
        elif self.event_type is EventType.USER_MESSAGE:
            body["attachments"] = [ref.model_dump() for ref in self.attachments or ()]
        return body


def error_json(error: ErrorInfo | None) -> str | None:
    """`error` as storage keeps it: JSON text."""
    return error.model_dump_json() if error is not None else None


def attachments_json(refs: tuple[AttachmentRef, ...] | None) -> str | None:
    """A user message's `attachments` as storage keeps them: JSON text (None without any)."""
    return json.dumps([ref.model_dump() for ref in refs]) if refs else None


class Usage(BaseModel):
    input_tokens: int = 0
    output_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
        )


# Server-to-client events (docs/protocol.md, Server to clients).


class WireEvent(BaseModel):
    """An event sent to a session's room."""

    def payload(self) -> dict[str, JSONValue]:
        """Its JSON object on the wire."""
        return self.model_dump(mode="json")


class UserMessageEvent(WireEvent):
    session_id: str
    turn_id: str
    event_id: int | None
    text: str
    client_message_id: str | None
    attachments: list[AttachmentRef] = Field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ChunkEvent:
    """A piece of the answer, sent once per delta: a plain dataclass, since a pydantic model was a
    measurable share of the server's time per chunk (docs/performance.md). Its fields come from
    the turn, never from a client; the wire tests check them against the contract."""

    session_id: str
    turn_id: str
    index: int
    text: str
    # Benchmark only (BENCH_CHUNK_TIMESTAMPS): CLOCK_MONOTONIC in ms when the provider yielded the text.
    ts: float | None = None

    def payload(self) -> dict[str, JSONValue]:
        body: dict[str, JSONValue] = {
            "session_id": self.session_id,
            "turn_id": self.turn_id,
            "index": self.index,
            "text": self.text,
        }
        if self.ts is not None:
            body["ts"] = self.ts
        return body


class ToolCallEvent(WireEvent):
    session_id: str
    turn_id: str
    call_id: str
    name: str
    args: dict[str, JSONValue]


class ToolResultEvent(WireEvent):
    session_id: str
    turn_id: str
    call_id: str
    name: str
    result: JSONValue = None
    error: ErrorInfo | None = None


class DoneEvent(WireEvent):
    session_id: str
    turn_id: str
    text: str
    finish_reason: FinishReason
    usage: Usage | None
    event_id: int | None
    error: ErrorInfo | None


class PresenceEvent(WireEvent):
    session_id: str
    clients: int


class SessionUpdatedEvent(WireEvent):
    session_id: str
    title: str | None
    updated_at: str | None


class SessionDeletedEvent(WireEvent):
    session_id: str


class ToolApprovalRequestEvent(WireEvent):
    session_id: str
    turn_id: str
    call_id: str
    name: str
    args: dict[str, JSONValue]
    expires_at: str


class ToolApprovalResultEvent(WireEvent):
    session_id: str
    turn_id: str
    call_id: str
    approved: bool
    reason: str | None


class PendingApproval(BaseModel):
    """A tool call of the running turn that waits for a person's decision."""

    call_id: str
    name: str
    args: dict[str, JSONValue]
    expires_at: str


class ActiveTurn(BaseModel):
    turn_id: str
    text: str
    # Added to the contract: chunks with index < next_index are already in `text`,
    # so a tab that joins mid-turn can drop the ones it also receives live.
    next_index: int
    pending_approvals: list[PendingApproval] = Field(default_factory=list)


TurnEvent = (
    UserMessageEvent
    | ChunkEvent
    | ToolCallEvent
    | ToolApprovalRequestEvent
    | ToolApprovalResultEvent
    | ToolResultEvent
    | DoneEvent
    | PresenceEvent
)
# What a session's room and every other connection of its user hear about the session itself.
SessionEvent = SessionUpdatedEvent | SessionDeletedEvent

EVENT_NAMES: dict[type[WireEvent | ChunkEvent], str] = {
    UserMessageEvent: "user_message",
    ChunkEvent: "chunk",
    ToolCallEvent: "tool_call",
    ToolApprovalRequestEvent: "tool_approval_request",
    ToolApprovalResultEvent: "tool_approval_result",
    ToolResultEvent: "tool_result",
    DoneEvent: "done",
    PresenceEvent: "presence",
    SessionUpdatedEvent: "session_updated",
    SessionDeletedEvent: "session_deleted",
}
