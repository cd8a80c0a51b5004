"""Snapshot reads as the list it stands for: the base as it was when taken, then its own items."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from server.core.snapshot import Snapshot

items = st.lists(st.integers(), max_size=12)
bounds = st.one_of(st.none(), st.integers(-15, 15))


@given(items, items, items, bounds, bounds, st.sampled_from([None, 1, 2, -1, -3]))
def test_a_snapshot_reads_as_the_list_it_stands_for(
    base: list[int], tail: list[int], later: list[int], start: int | None, stop: int | None, step: int | None
) -> None:
    original = list(base)
    taken = Snapshot(base, tail)
    expected = [*base, *tail]
    base.extend(later)  # the session's list goes on growing: none of it shows in the snapshot
    assert len(taken) == len(expected) and list(taken) == expected and taken == expected
    assert list(reversed(taken)) == expected[::-1]
    assert taken[start:stop:step] == expected[start:stop:step]
    for index in range(-len(expected), len(expected)):
        assert taken[index] == expected[index]
    taken.append(7)  # its own items: the base it shares is not touched
    assert taken == [*expected, 7] and base == [*original, *later]
