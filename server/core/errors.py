"""Coded errors that clients see (PROTOCOL.md, Errors)."""

from __future__ import annotations

import logging
from enum import StrEnum

log = logging.getLogger(__name__)


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


def storage_unavailable() -> ServiceError:
    return ServiceError(ErrorCode.UNAVAILABLE, "storage is unreachable; retrying is safe")


def shared_state_unavailable(cause: Exception) -> ServiceError:
    """Refused rather than served without the shared state (another process might do the same)."""
    log.warning("shared state unreachable: %r", cause)
    return ServiceError(ErrorCode.UNAVAILABLE, "the server's shared state is unreachable; retrying is safe")
