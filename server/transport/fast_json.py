"""orjson for the packets the server sends; the standard parser for what clients send.

python-socketio and python-engineio take any module with `dumps` and `loads`. Encoding is the hot
path (every chunk to every tab), and orjson does it several times faster. It refuses a few values
the standard module writes (lone surrogates, non-string keys): those packets take the standard
path. Decoding stays with engineio's own module: orjson would quietly turn a huge integer into a
float, where engineio refuses it, and client packets are few.
"""

from __future__ import annotations

from typing import Any

import orjson
from engineio import json as standard_json

loads = standard_json.loads


def dumps(obj: Any, **_options: Any) -> str:
    # The packet encoders ask for compact separators, which is all orjson writes.
    try:
        encoded: str = orjson.dumps(obj).decode()
        return encoded
    except TypeError:  # orjson.JSONEncodeError
        encoded = standard_json.dumps(obj, separators=(",", ":"))
        return encoded
