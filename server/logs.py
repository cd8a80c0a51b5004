"""The log format: today's text lines, or with LOG_FORMAT=json one JSON object a line (time, level,
logger, message, and `session_id` / `turn_id` where the line is about one). Neither carries a
message's text or a secret: the service never logs them, and a token in a logged URL (the plain
WebSocket's `?token=`, in uvicorn's connection line) is redacted. Repeated warnings are rate-limited
(`RepeatLimit`), so that an outage or a noisy MCP server is a few lines, not one per event."""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any, Literal

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter
from uvicorn.config import LOGGING_CONFIG

from server.core.log_context import session_id_var, turn_id_var

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TOKEN_IN_URL = re.compile(r"([?&]token=)[^&\s\"']+")
REPEAT_SECONDS = 10.0
# A record may allow more of its kind per period (`extra={REPEAT_BURST: n}`): an MCP server's stderr.
REPEAT_BURST = "repeat_burst"
REPEAT_KINDS_KEPT = 1000


class SessionFilter(logging.Filter):
    """Adds the session and turn of the task that logs (server/core/log_context.py) to its records."""

    def filter(self, record: logging.LogRecord) -> bool:
        session_id, turn_id = session_id_var.get(), turn_id_var.get()
        if session_id is not None:
            record.session_id = session_id
        if turn_id is not None:
            record.turn_id = turn_id
        return True


class RedactTokens(logging.Filter):
    """Replaces the value of a `token=` query parameter in a line with `[redacted]`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message:
            record.msg, record.args = TOKEN_IN_URL.sub(r"\1[redacted]", message), None
            record.__dict__.pop("color_message", None)  # uvicorn's coloured copy holds it too
        return True


class RepeatLimit(logging.Filter):
    """WARNING and above: at most one record (or the record's `repeat_burst`) per logger and message
    template in `period_seconds`; the first let through after some were held back says how many."""

    def __init__(self, period_seconds: float) -> None:
        super().__init__()
        self.period_seconds = period_seconds
        self._lock = threading.Lock()  # records come from threads too (anyio's, the SDKs')
        # (logger, template) -> start of its period, records let through in it, records held back
        self._kinds: dict[tuple[str, str], tuple[float, int, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or self.period_seconds <= 0:
            return True
        key, now = (record.name, str(record.msg)), time.monotonic()
        burst = getattr(record, REPEAT_BURST, 1)
        with self._lock:
            started, shown, held = self._kinds.get(key, (now, 0, 0))
            if now - started >= self.period_seconds:
                started, shown = now, 0
            if shown >= burst:
                self._kinds[key] = (started, shown, held + 1)
                return False
            self._kinds[key] = (started, shown + 1, 0)
            if len(self._kinds) > REPEAT_KINDS_KEPT:
                self._forget(now)
        if held:
            record.msg, record.args = f"{record.getMessage()} ({held} similar suppressed)", None
        return True

    def _forget(self, now: float) -> None:
        """Templates built from varying text would otherwise grow the table without end."""
        for key, (started, _, held) in list(self._kinds.items()):
            if now - started >= self.period_seconds and not held:
                del self._kinds[key]


def json_formatter() -> JsonFormatter:
    return JsonFormatter(
        ["levelname", "name", "message"],
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",
        # uvicorn's coloured copy of its message, the task's name and the rate limit's hint are noise in JSON.
        reserved_attrs=[*RESERVED_ATTRS, "color_message", "taskName", REPEAT_BURST],
    )


def configure_logging(level: str, log_format: LogFormat, repeat_seconds: float = REPEAT_SECONDS) -> None:
    """The root handler (unless the host configured one) and LOG_LEVEL for the service's loggers."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(json_formatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
        handler.addFilter(SessionFilter())
        handler.addFilter(RedactTokens())
        handler.addFilter(RepeatLimit(repeat_seconds))
        root.addHandler(handler)
    logging.getLogger("server").setLevel(level.upper())
    # On the loggers uvicorn logs URLs with, however uvicorn was started (its config keeps them).
    for name in ("uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())


def uvicorn_log_config(log_format: LogFormat) -> dict[str, Any]:
    """uvicorn's own logging: its default for text; for JSON, its loggers on the same JSON lines."""
    if log_format == "text":
        return LOGGING_CONFIG
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": json_formatter}},
        "handlers": {"json": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "loggers": {
            "uvicorn": {"handlers": ["json"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["json"], "level": "INFO", "propagate": False},
        },
    }
