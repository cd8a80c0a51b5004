"""orjson for the packets the server sends; the standard parser for what clients send.

python-socketio and python-engineio take any module with `dumps` and `loads`. Encoding is the hot
path (every chunk to every tab), and orjson does it several times faster. It refuses a few values
the standard module writes (lone surrogates, non-string keys): those packets take the standard
path. Decoding stays with the standard parser, refusing an integer of more than 100 digits as
python-engineio's own module does: orjson would quietly turn a huge integer into a float, and client
packets are few. The plain WebSocket reads its frames with it too: nothing here is Socket.IO's.
"""

from __future__ import annotations

import json as standard_json
from typing import Any

import orjson

MAX_INT_DIGITS = 100


def _bounded_int(digits: str) -> int:
    if len(digits) > MAX_INT_DIGITS:
        raise ValueError("Integer is too large")
    return int(digits)


def loads(text: str | bytes, **options: Any) -> Any:
    options.setdefault("parse_int", _bounded_int)
    return standard_json.loads(text, **options)


def dumps(obj: Any, **_options: Any) -> str:
    # The packet encoders ask for compact separators, which is all orjson writes.
    try:
        encoded: str = orjson.dumps(obj).decode()
        return encoded
    except TypeError:  # orjson.JSONEncodeError
        encoded = standard_json.dumps(obj, separators=(",", ":"))
        return encoded
