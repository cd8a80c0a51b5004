"""CORS_ORIGINS patterns (`*` wildcards) as one matcher for Socket.IO and HTTP alike."""

from __future__ import annotations

import fnmatch
import re


def origin_regex(patterns: list[str]) -> str | None:
    """A regex matching any allowed origin, or None when every origin is allowed."""
    if "*" in patterns:
        return None
    return "|".join(fnmatch.translate(p.rstrip("/")) for p in patterns) or "(?!)"


def origin_matcher(patterns: list[str]) -> str | object:
    """The value for python-socketio's `cors_allowed_origins`."""
    regex = origin_regex(patterns)
    if regex is None:
        return "*"
    compiled = re.compile(regex)
    return lambda origin, _environ=None: bool(origin) and compiled.fullmatch(origin) is not None
