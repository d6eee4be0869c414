"""Sets of byte ranges: what the client still has to send, and what the proxy holds.

Every range is half-open, ``(start, end)`` with ``start < end``. A :class:`RangeSet` keeps
its ranges sorted, disjoint and coalesced, so "what is missing" and "take the lowest piece"
are cheap and exact. Lowest-first matters: the proxy's credit window starts at the committed
offset, so the client must always be able to send the head of what is missing.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

__all__ = ["ByteRange", "RangeSet", "format_ranges"]

ByteRange = tuple[int, int]


class RangeSet:
    """A mutable set of integers stored as sorted, disjoint, non-adjacent half-open ranges."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, ranges: Iterable[ByteRange] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in ranges:
            self.add(start, end)

    def __iter__(self) -> Iterator[ByteRange]:
        return zip(self._starts, self._ends, strict=True)

    def __len__(self) -> int:
        """The number of disjoint ranges (not the number of bytes; see :attr:`total`)."""
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RangeSet):
            return NotImplemented
        return self._starts == other._starts and self._ends == other._ends

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"RangeSet({list(self)!r})"

    def copy(self) -> RangeSet:
        clone = RangeSet()
        clone._starts = self._starts.copy()
        clone._ends = self._ends.copy()
        return clone

    @property
    def total(self) -> int:
        """How many integers (bytes) the set covers."""
        return sum(end - start for start, end in self)

    def add(self, start: int, end: int) -> None:
        """Add ``[start, end)``, merging with whatever it overlaps or touches."""
        if start >= end:
            return
        # every range whose end >= start and whose start <= end merges with the new one
        lo = bisect.bisect_left(self._ends, start)
        hi = bisect.bisect_right(self._starts, end)
        if lo < hi:
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]

    def remove(self, start: int, end: int) -> None:
        """Remove ``[start, end)``; parts of it that are not in the set are ignored."""
        if start >= end:
            return
        lo = bisect.bisect_right(self._ends, start)
        hi = bisect.bisect_left(self._starts, end)
        if lo >= hi:
            return
        new_starts: list[int] = []
        new_ends: list[int] = []
        if self._starts[lo] < start:
            new_starts.append(self._starts[lo])
            new_ends.append(start)
        if self._ends[hi - 1] > end:
            new_starts.append(end)
            new_ends.append(self._ends[hi - 1])
        self._starts[lo:hi] = new_starts
        self._ends[lo:hi] = new_ends

    def contains(self, start: int, end: int) -> bool:
        """Whether all of ``[start, end)`` is in the set (an empty range always is)."""
        if start >= end:
            return True
        index = bisect.bisect_right(self._starts, start) - 1
        return index >= 0 and self._ends[index] >= end

    def missing(self, start: int, end: int) -> list[ByteRange]:
        """The parts of ``[start, end)`` that are not in the set, lowest first."""
        gaps: list[ByteRange] = []
        cursor = start
        for range_start, range_end in self.overlapping(start, end):
            if range_start > cursor:
                gaps.append((cursor, range_start))
            cursor = max(cursor, range_end)
        if cursor < end:
            gaps.append((cursor, end))
        return gaps

    def overlapping(self, start: int, end: int) -> list[ByteRange]:
        """The ranges of the set that overlap ``[start, end)``, unclipped."""
        lo = bisect.bisect_right(self._ends, start)
        hi = bisect.bisect_left(self._starts, end)
        return list(zip(self._starts[lo:hi], self._ends[lo:hi], strict=True))

    def first(self) -> ByteRange | None:
        """The lowest range, or None when the set is empty."""
        return (self._starts[0], self._ends[0]) if self._starts else None

    def take(self, limit: int, max_length: int) -> ByteRange | None:
        """Remove and return the lowest piece below ``limit``, at most ``max_length`` long."""
        if not self._starts or self._starts[0] >= limit or max_length <= 0:
            return None
        start = self._starts[0]
        end = min(self._ends[0], limit, start + max_length)
        self.remove(start, end)
        return (start, end)


def format_ranges(ranges: Iterable[ByteRange], *, limit: int = 8) -> str:
    """A short human form such as ``[0, 1048576) [2097152, 3145728)``, elided past ``limit``."""
    items = list(ranges)
    text = " ".join(f"[{start}, {end})" for start, end in items[:limit])
    if len(items) > limit:
        text += f" and {len(items) - limit} more"
    return text or "none"
