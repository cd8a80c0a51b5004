"""Coded errors that clients see (docs/protocol.md, Errors)."""

from __future__ import annotations

import logging
from enum import StrEnum

log = logging.getLogger(__name__)


class ErrorCode(StrEnum):
    UNAUTHORIZED = "unauthorized"
    INVALID_PAYLOAD = "invalid_payload"
    INVALID_SESSION_ID = "invalid_session_id"
    FORBIDDEN = "forbidden"
    SESSION_DELETED = "session_deleted"
    NOT_JOINED = "not_joined"
    EMPTY_MESSAGE = "empty_message"
    MESSAGE_TOO_LONG = "message_too_long"
    RATE_LIMITED = "rate_limited"
    BUSY = "busy"
    NO_ACTIVE_TURN = "no_active_turn"
    NO_PENDING_APPROVAL = "no_pending_approval"
    UNAVAILABLE = "unavailable"
    NOT_FOUND = "not_found"  # HTTP only: no such session
    TOO_LARGE = "too_large"  # HTTP only: an upload over ATTACHMENT_MAX_BYTES
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # HTTP only: an upload of a type not taken


class TurnErrorCode(StrEnum):
    """Why a turn ended in error: `done.error.code`, and the stored answer's `error`."""

    SHUTDOWN = "shutdown"
    TURN_LOCK_LOST = "turn_lock_lost"
    INTERRUPTED = "interrupted"  # the process running the turn died
    UNAVAILABLE = "unavailable"  # storage could not give the conversation
    TOOL_ROUNDS_EXCEEDED = "tool_rounds_exceeded"
    PROVIDER_NOT_CONFIGURED = "provider_not_configured"
    PROVIDER_REJECTED = "provider_rejected"
    PROVIDER_RATE_LIMITED = "provider_rate_limited"
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    PROVIDER_TIMEOUT = "provider_timeout"
    PROVIDER_ERROR = "provider_error"


class ToolErrorCode(StrEnum):
    """Why a tool call gave no result: `tool_result.error.code`."""

    TOOL_ERROR = "tool_error"  # what an MCP server's tool, or the call to it, reported
    TOOL_FAILED = "tool_failed"  # a tool raised something unexpected
    TOOL_TIMEOUT = "tool_timeout"
    UNKNOWN_TOOL = "unknown_tool"
    INVALID_ARGUMENTS = "invalid_arguments"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    TOOL_DENIED = "tool_denied"  # a person denied the call
    APPROVAL_TIMEOUT = "approval_timeout"  # nobody decided in time
    # get_weather's own codes
    WEATHER_UNAVAILABLE = "weather_unavailable"
    UNKNOWN_LOCATION = "unknown_location"


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


def storage_refused(cause: Exception, what: str) -> ServiceError:
    """Storage answers but refuses (e.g. a migration not applied): the operator's to fix, so one
    WARNING saying what to change, and the client is answered as for storage away."""
    log.warning("storage refuses to %s: %s", what, cause)
    return ServiceError(ErrorCode.UNAVAILABLE, f"storage cannot {what} now; nothing was stored")


def session_deleted() -> ServiceError:
    return ServiceError(ErrorCode.SESSION_DELETED, "this session was deleted")


def shared_state_unavailable(cause: Exception) -> ServiceError:
    """Refused rather than served without the shared state (another process might do the same)."""
    log.warning("shared state unreachable: %r", cause)
    return ServiceError(ErrorCode.UNAVAILABLE, "the server's shared state is unreachable; retrying is safe")
