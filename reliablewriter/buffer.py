"""The scatter-gather buffer: received bytes held as memoryviews, keyed by object offset.

Sans-IO and synchronous. The buffer never copies payload bytes: it stores views of what
the caller handed in and gives back views (or slices of them) to send. Where writes
overlap, the bytes received first win and the rest of the later write is dropped, so a
byte, once held, never changes.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

__all__ = ["ScatterBuffer", "as_byte_view"]


def as_byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A flat, one-byte-per-item view of ``data``, without copying."""
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1 or view.format not in ("B", "b", "c"):
        view = view.cast("B")
    return view


class ScatterBuffer:
    """Bytes held from offset :attr:`base` on, as sorted, non-overlapping views.

    ``base`` is the first byte still held or expected: everything below it has been
    released (acknowledged by GCS). Holes above it are bytes not received yet.
    """

    def __init__(self, base: int = 0) -> None:
        self._base = base
        self._starts: list[int] = []
        self._views: list[memoryview] = []
        self._held = 0
        # Cache of how far the bytes from ``base`` on are contiguous.
        self._contiguous_end = base

    @property
    def base(self) -> int:
        """First offset not yet released."""
        return self._base

    @property
    def held_bytes(self) -> int:
        """Total bytes currently held."""
        return self._held

    @property
    def contiguous_end(self) -> int:
        """End of the gap-free run of held bytes that starts at :attr:`base`."""
        return self._contiguous_end

    @property
    def end(self) -> int:
        """End of the highest held byte, or :attr:`base` when nothing is held."""
        if not self._starts:
            return self._base
        return self._starts[-1] + len(self._views[-1])

    def insert(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Hold ``data`` as the bytes from ``offset`` on; return how many bytes were new.

        Bytes below :attr:`base` and bytes already held are skipped: the first copy wins.
        """
        if offset < 0:
            raise ValueError(f"offset must not be negative, got {offset}")
        view = as_byte_view(data)
        start, end = offset, offset + len(view)
        if start < self._base:
            view = view[self._base - start :]
            start = self._base
        if start >= end:
            return 0
        added = 0
        cursor = start
        # ``index`` is the last segment starting at or before ``start``; skip its tail.
        index = bisect.bisect_right(self._starts, start) - 1
        if index >= 0:
            cursor = max(cursor, self._segment_end(index))
        index += 1
        while cursor < end:
            has_next = index < len(self._starts) and self._starts[index] < end
            gap_end = self._starts[index] if has_next else end
            if gap_end > cursor:
                self._starts.insert(index, cursor)
                self._views.insert(index, view[cursor - start : gap_end - start])
                added += gap_end - cursor
                index += 1
            if not has_next:
                break
            cursor = self._segment_end(index)
            index += 1
        self._held += added
        self._extend_contiguous()
        return added

    def _segment_end(self, index: int) -> int:
        return self._starts[index] + len(self._views[index])

    def _extend_contiguous(self) -> None:
        index = bisect.bisect_right(self._starts, self._contiguous_end) - 1
        index = max(index, 0)
        while index < len(self._starts) and self._starts[index] <= self._contiguous_end:
            self._contiguous_end = max(
                self._contiguous_end, self._starts[index] + len(self._views[index])
            )
            index += 1

    def views(self, start: int, end: int) -> list[memoryview]:
        """Views covering exactly ``[start, end)``, which must be held and contiguous."""
        if not self._base <= start <= end <= self._contiguous_end:
            held = f"[{self._base}, {self._contiguous_end})"
            raise ValueError(f"[{start}, {end}) is not within the held run {held}")
        result: list[memoryview] = []
        index = max(bisect.bisect_right(self._starts, start) - 1, 0)
        while start < end:
            seg_start = self._starts[index]
            view = self._views[index]
            seg_end = seg_start + len(view)
            if seg_end > start:
                result.append(view[start - seg_start : min(end, seg_end) - seg_start])
                start = min(end, seg_end)
            index += 1
        return result

    def release(self, upto: int) -> None:
        """Drop every byte below ``upto`` (GCS has them) and move :attr:`base` there."""
        if upto <= self._base:
            return
        drop = bisect.bisect_right(self._starts, upto) - 1
        # Segments wholly below ``upto`` go; one straddling it keeps its tail.
        cut = 0
        released = 0
        for index in range(drop + 1):
            seg_start, view = self._starts[index], self._views[index]
            seg_end = seg_start + len(view)
            if seg_end <= upto:
                released += len(view)
                cut = index + 1
            else:
                released += upto - seg_start
                self._starts[index] = upto
                self._views[index] = view[upto - seg_start :]
                cut = index
                break
        del self._starts[:cut]
        del self._views[:cut]
        self._held -= released
        self._base = upto
        self._contiguous_end = max(self._contiguous_end, upto)
        self._extend_contiguous()

    def clear(self) -> None:
        """Drop every held view (the upload is over, one way or another)."""
        self._starts.clear()
        self._views.clear()
        self._held = 0
        self._contiguous_end = self._base

    def ranges(self) -> Iterator[tuple[int, int]]:
        """Held ranges, merged where they touch, in order."""
        run_start: int | None = None
        run_end = 0
        for start, view in zip(self._starts, self._views, strict=True):
            if run_start is not None and start == run_end:
                run_end += len(view)
                continue
            if run_start is not None:
                yield run_start, run_end
            run_start, run_end = start, start + len(view)
        if run_start is not None:
            yield run_start, run_end

    def missing(self, end: int) -> list[tuple[int, int]]:
        """Ranges within ``[base, end)`` that are not held."""
        gaps: list[tuple[int, int]] = []
        cursor = self._base
        for start, stop in self.ranges():
            if start >= end:
                break
            if start > cursor:
                gaps.append((cursor, start))
            cursor = max(cursor, stop)
        if cursor < end:
            gaps.append((cursor, end))
        return gaps
