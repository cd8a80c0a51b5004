"""A mapping that keeps only its newest entries: what a process remembers about many sessions
(known titles, deletions, summaries, calibrations) stays bounded however many it serves."""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Recent(OrderedDict[K, V]):
    """At most `limit` entries; `remember` makes an entry the newest, and the oldest go first."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def remember(self, key: K, value: V) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)
