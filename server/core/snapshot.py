"""A list's items as they were, without copying them: a session's history and conversation, per turn."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar, overload

T = TypeVar("T")


class Snapshot(Sequence[T]):
    """The first items of a list that only grows at its end (those it had when taken), then items
    of its own. A turn reads a session's history and hands its model the conversation this way:
    O(new items) a turn, where a copy would be O(history)."""

    __slots__ = ("_base", "_length", "_tail")

    def __init__(self, base: Sequence[T], tail: Iterable[T] = ()) -> None:
        self._base = base
        self._length = len(base)
        self._tail = list(tail)

    def __len__(self) -> int:
        return self._length + len(self._tail)

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index: int | slice) -> T | list[T]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:  # the usual case (a turn's new events, a rebuilt history): at C speed
                return list(itertools.islice(iter(self), start, max(start, stop)))
            return [self[i] for i in range(start, stop, step)]
        position = index + len(self) if index < 0 else index
        if not 0 <= position < len(self):
            raise IndexError(index)
        return self._base[position] if position < self._length else self._tail[position - self._length]

    def __iter__(self) -> Iterator[T]:
        return itertools.chain(itertools.islice(self._base, self._length), self._tail)

    def __eq__(self, other: object) -> bool:
        """Equal to a list (or any sequence) of the same items, as the list it stands for would be."""
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]  # changes with append, as a list does

    def __repr__(self) -> str:
        return f"Snapshot({list(self)!r})"

    def append(self, item: T) -> None:
        self._tail.append(item)

    def extend(self, items: Iterable[T]) -> None:
        self._tail.extend(items)
