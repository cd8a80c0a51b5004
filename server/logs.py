"""The log format: today's text lines, or with LOG_FORMAT=json one JSON object a line (time, level,
logger, message, and `session_id` / `turn_id` where the line is about one). Neither carries a
message's text or a secret, at any LOG_LEVEL: the service never logs them, and `RedactSecrets`
takes them out of what the libraries log (URLs, the WebSocket frames and headers that uvicorn's
protocol logs at debug, the ASGI scopes it logs at trace). Repeated warnings are rate-limited
(`RepeatLimit`), so that an outage or a noisy MCP server is a few lines, not one per event."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import unquote_plus

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter
from uvicorn.config import LOGGING_CONFIG
from uvicorn.logging import TRACE_LOG_LEVEL
from websockets.frames import Frame

from server.core.log_context import session_id_var, turn_id_var

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REPEAT_SECONDS = 10.0
# A record may allow more of its kind per period (`extra={REPEAT_BURST: n}`): an MCP server's stderr.
REPEAT_BURST = "repeat_burst"
REPEAT_KINDS_KEPT = 1000
REDACTED = "[redacted]"
# A query parameter, wherever a URL or a query string is printed (a request line, an ASGI scope's
# `b'...'`); its key is compared once percent-decoded, as the server reads it.
QUERY_PARAMETER = re.compile(r"(?<=[?&'\"])([^=&?\s'\"#]{1,64})=([^&\s'\"#]*)")
TOKEN_KEY = "token"
BEARER = re.compile(r"(?i)\b(bearer)\s+[^\s'\",;]+")
# A JWT anywhere (`eyJ` is `{"` in base64url): its header, payload and signature.
JWT = re.compile(r"\beyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*")
# Headers the WebSocket protocol logs at debug whose values are credentials.
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})
# The libraries' loggers that log URLs, headers or frames (filters on a logger hold for every handler).
LIBRARY_LOGGERS = ("uvicorn.error", "uvicorn.access", "uvicorn.asgi")
# python-engineio and python-socketio log each packet's data at INFO: never below ERROR here (their
# own default with logging off), set before the servers exist so they add no handler of their own.
PACKET_LOGGERS = ("engineio.server", "socketio.server")


def redact(text: str) -> str:
    """`text` without tokens: `token` query parameters in any spelling (`%74oken`, `TOKEN`: what the
    server reads and its case variants), Bearer credentials, and anything shaped like a JWT."""
    text = QUERY_PARAMETER.sub(_redact_token_parameter, text)
    text = BEARER.sub(rf"\1 {REDACTED}", text)
    return JWT.sub(REDACTED, text)


def _redact_token_parameter(match: re.Match[str]) -> str:
    key = match.group(1)
    return f"{key}={REDACTED}" if unquote_plus(key).strip().casefold() == TOKEN_KEY else match.group(0)


def _redact_argument(argument: object) -> object:
    if isinstance(argument, Frame):
        return f"{argument.opcode.name} [{len(argument.data)} bytes]"  # never its content
    if isinstance(argument, str):
        return redact(argument)
    if isinstance(argument, int | float | bool) or argument is None:
        return argument
    try:
        shown = str(argument)  # a scope, a bytes query string: redacted as it would print
    except Exception:
        return argument  # the formatter will say so; a filter must not raise into the caller
    redacted = redact(shown)
    return argument if redacted == shown else redacted


# The current span's trace and span ids, set when tracing is on (server/tracing.py).
trace_ids: Callable[[], tuple[str, str] | None] | None = None


class SessionFilter(logging.Filter):
    """Adds the session and turn of the task that logs (server/core/log_context.py), and the span it
    logs within when tracing is on, to its records."""

    def filter(self, record: logging.LogRecord) -> bool:
        session_id, turn_id = session_id_var.get(), turn_id_var.get()
        if session_id is not None:
            record.session_id = session_id
        if turn_id is not None:
            record.turn_id = turn_id
        if trace_ids is not None and (ids := trace_ids()) is not None:
            record.trace_id, record.span_id = ids
        return True


class RedactSecrets(logging.Filter):
    """Takes tokens and message texts out of a record before any handler formats it. The arguments
    are redacted one by one, so formatters that read them (uvicorn's access line) still can; a
    WebSocket frame becomes its type and size; a credential header's value is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and args:
            if len(args) == 2 and isinstance(args[0], str) and args[0].casefold() in SECRET_HEADERS:
                record.args = (args[0], REDACTED)  # websockets' `< %s: %s` handshake lines
            else:
                record.args = tuple(_redact_argument(argument) for argument in args)
        elif isinstance(args, dict) and args:
            record.args = {key: _redact_argument(value) for key, value in args.items()}
        if isinstance(record.msg, str):
            message = redact(record.msg)
            if message != record.msg:
                record.msg = message
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
        handler.addFilter(RedactSecrets())  # before the repeat count, which may format the message
        handler.addFilter(RepeatLimit(repeat_seconds))
        root.addHandler(handler)
    for each in root.handlers:  # the host's too: whatever reaches the root is redacted
        if not any(isinstance(f, RedactSecrets) for f in each.filters):
            each.addFilter(RedactSecrets())
    logging.addLevelName(TRACE_LOG_LEVEL, "TRACE")  # uvicorn names it only when it configures logging itself
    logging.getLogger("server").setLevel(level.upper())
    # On the loggers uvicorn logs URLs, frames and scopes with, however uvicorn was started (its
    # config replaces their handlers, never their filters).
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())
    for name in PACKET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


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
