"""RangeSet against a plain set of integers as the model."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.ranges import RangeSet, format_ranges

_span = st.tuples(st.integers(0, 200), st.integers(0, 40)).map(lambda p: (p[0], p[0] + p[1]))
_operation = st.tuples(st.sampled_from(["add", "remove"]), _span)


def _as_ints(ranges: RangeSet) -> set[int]:
    return {i for start, end in ranges for i in range(start, end)}


@settings(max_examples=300, deadline=None)
@given(st.lists(_operation, max_size=30), _span)
def test_matches_a_set_of_integers(
    operations: list[tuple[str, tuple[int, int]]], probe: tuple[int, int]
) -> None:
    ranges = RangeSet()
    model: set[int] = set()
    for op, (start, end) in operations:
        if op == "add":
            ranges.add(start, end)
            model |= set(range(start, end))
        else:
            ranges.remove(start, end)
            model -= set(range(start, end))
    assert _as_ints(ranges) == model
    assert ranges.total == len(model)
    pairs = list(ranges)
    # sorted, disjoint, and never touching (touching ranges are merged)
    assert all(s < e for s, e in pairs)
    assert all(e1 < s2 for (_, e1), (s2, _) in itertools.pairwise(pairs))
    start, end = probe
    missing = {i for s, e in ranges.missing(start, end) for i in range(s, e)}
    assert missing == set(range(start, end)) - model
    assert ranges.contains(start, end) == (set(range(start, end)) <= model)


def test_take_returns_the_lowest_piece_within_limit_and_length() -> None:
    ranges = RangeSet([(10, 20), (30, 100)])
    assert ranges.take(limit=15, max_length=100) == (10, 15)
    assert ranges.take(limit=100, max_length=3) == (15, 18)
    assert ranges.take(limit=100, max_length=100) == (18, 20)
    assert ranges.take(limit=30, max_length=100) is None
    assert list(ranges) == [(30, 100)]


def test_format_ranges_elides_long_lists() -> None:
    assert format_ranges([]) == "none"
    assert format_ranges([(0, 1), (2, 3)]) == "[0, 1) [2, 3)"
    assert (
        format_ranges([(i, i + 1) for i in range(0, 20, 2)], limit=2) == "[0, 1) [2, 3) and 8 more"
    )
