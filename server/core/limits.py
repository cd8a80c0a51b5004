"""What a client, a user and a turn may do: the service's limits, as settings give them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_message_chars: int = 8000
    messages_per_minute: int = 30
    max_tool_rounds: int = 5
    max_sessions_per_member: int = 20
    tool_timeout_seconds: float = 30.0
    # How long `done` waits for storage to confirm the AI message before sending event_id null.
    done_store_wait_seconds: float = 2.0
    # Text deltas arriving within this window go out as one chunk (0: every delta is a chunk).
    chunk_coalesce_seconds: float = 0.0
    chunk_timestamps: bool = False
    # Events in a `join` answer when the client names no `history_limit`.
    join_history_limit: int = 1000
    # What one model request may carry of the conversation (docs/protocol.md, Long conversations).
    context_max_tokens: int = 32_000
    # Files one message may name (Attachments).
    attachments_per_message: int = 5
