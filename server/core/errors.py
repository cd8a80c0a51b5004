"""Coded errors that clients see (PROTOCOL.md, Errors)."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    UNAUTHORIZED = "unauthorized"
    INVALID_PAYLOAD = "invalid_payload"
    INVALID_SESSION_ID = "invalid_session_id"
    FORBIDDEN = "forbidden"
    NOT_JOINED = "not_joined"
    EMPTY_MESSAGE = "empty_message"
    MESSAGE_TOO_LONG = "message_too_long"
    RATE_LIMITED = "rate_limited"
    BUSY = "busy"
    NO_ACTIVE_TURN = "no_active_turn"
    UNAVAILABLE = "unavailable"


class ServiceError(Exception):
    """A refused request: nothing was changed, and the client is told why."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}
