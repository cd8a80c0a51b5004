"""The session and turn a log line is about, carried by the task that logs it (and the tasks it starts)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

session_id_var: ContextVar[str | None] = ContextVar("session_id", default=None)
turn_id_var: ContextVar[str | None] = ContextVar("turn_id", default=None)


@contextmanager
def log_scope(session_id: str | None, turn_id: str | None = None) -> Iterator[None]:
    """Within it, log lines (and the tasks started) name this session and turn."""
    session_token = session_id_var.set(session_id)
    turn_token = turn_id_var.set(turn_id)
    try:
        yield
    finally:
        turn_id_var.reset(turn_token)
        session_id_var.reset(session_token)
