"""Client-to-server payloads (docs/protocol.md, Client to server). Unknown fields are ignored."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from server.core.errors import ErrorCode, ServiceError


def _encodable(value: str) -> str:
    # Lone surrogates survive JSON decoding but cannot be stored or re-encoded.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return value


def _without_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL: such an id could never be stored, however often it is retried.
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


Text = Annotated[str, AfterValidator(_encodable)]
ShortText = Annotated[str, Field(max_length=256), AfterValidator(_encodable), AfterValidator(_without_nul)]
EventId = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
MAX_HISTORY_PAGE = 1000
MAX_REASON_CHARS = 1000  # why a person denied (or approved) a tool call
HistoryLimit = Annotated[int, Field(ge=1, le=MAX_HISTORY_PAGE)]
# W3C trace context headers a client may send (a value that is no valid one is ignored, not refused).
TraceHeader = Annotated[str, Field(max_length=1024)]


class _Payload(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class JoinPayload(_Payload):
    session_id: Text | None = None  # any string: one that is not a UUID is `invalid_session_id`
    user_id: ShortText | None = None
    after_event_id: EventId | None = None
    history_limit: HistoryLimit | None = None  # None: JOIN_HISTORY_LIMIT


class MessagePayload(_Payload):
    session_id: Text
    text: Text
    client_message_id: ShortText | None = None
    attachments: list[ShortText] = Field(default_factory=list, max_length=100)  # ids of this session's uploads
    traceparent: TraceHeader | None = None  # the client's trace this turn continues (docs/protocol.md, Traces)
    tracestate: TraceHeader | None = None


class ApprovePayload(_Payload):
    session_id: Text
    call_id: ShortText
    approved: bool
    reason: Annotated[str, Field(max_length=MAX_REASON_CHARS), AfterValidator(_encodable)] | None = None


class SessionPayload(_Payload):
    """`cancel` and `leave`."""

    session_id: Text


def invalid_payload(error: ValidationError) -> ServiceError:
    first = error.errors(include_input=False, include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "payload"
    return ServiceError(ErrorCode.INVALID_PAYLOAD, f"{where}: {first['msg']}")
