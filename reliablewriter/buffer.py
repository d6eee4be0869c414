"""The scatter-gather buffer: received bytes held as memoryviews, keyed by object offset.

Sans-IO and synchronous. Where writes overlap, the bytes received first win and the rest
of the later write is dropped, so a byte, once held, never changes.

Payload is held as views of what the caller handed in, not copied, with two exceptions
that keep memory honest when a caller writes many small pieces (issue 11, finding 1):

* A piece that views only part of a larger object (a slice of a receive buffer) and is
  shorter than :data:`PIN_COPY_LIMIT`, while using less than half of that object, is
  copied: a one-byte view must not keep a 256 KiB receive buffer alive. Pieces of at
  least half their object pin at most twice their size.
* Touching fragments are joined (by copying) while the result stays within
  :data:`JOIN_LIMIT` and one of them is shorter than :data:`SMALL_PIECE`, so tiny
  in-order writes do not pile up as tiny fragments. A join copies at most
  :data:`JOIN_LIMIT` bytes.

Every fragment costs memory beyond its payload (a memoryview, its entry, the sorted
structure's slot); :data:`FRAGMENT_OVERHEAD` is that cost, measured, and
:attr:`ScatterBuffer.cost` charges it per view held. ``max_fragments`` caps the views held:
an insert whose next piece would exceed it raises :class:`~reliablewriter.TooFragmentedError`,
unless the piece extends the gap-free run from the base (what can be sent next).

Fragments live in a sorted list of blocks of at most ``2 * _BLOCK`` entries (in the manner
of sortedcontainers): an insert bisects twice and shifts at most one block, so inserts
in any order, descending included, cost O(log n) plus a bounded shift.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import Final

import google_crc32c

from .errors import TooFragmentedError

__all__ = [
    "FRAGMENT_OVERHEAD",
    "JOIN_LIMIT",
    "PIN_COPY_LIMIT",
    "SMALL_PIECE",
    "KnownCrc",
    "ScatterBuffer",
    "as_byte_view",
    "can_join",
    "stable_view",
]

#: Bytes of memory one held view costs beyond its payload: the memoryview (184 B), its
#: fragment entry and views tuple, two offsets, a slot in the sorted structure, and for a
#: copied piece its ``bytes`` header. Measured with tracemalloc on CPython 3.11 at 375-400
#: bytes per one-byte fragment (``test_the_per_fragment_overhead_is_what_tracemalloc_sees``),
#: rounded up.
FRAGMENT_OVERHEAD: Final = 512

#: Pieces shorter than this join a touching neighbour when the result fits JOIN_LIMIT.
SMALL_PIECE: Final = 2 * 1024
#: The largest fragment a join makes, so a join never copies more than this.
JOIN_LIMIT: Final = 8 * 1024
#: Partial views shorter than this that use less than half their object are copied. It is
#: half the proxy's receive size, so no piece of a receive buffer pins more than twice its size.
PIN_COPY_LIMIT: Final = 128 * 1024

# Fragments per block of the sorted structure: a block splits at twice this.
_BLOCK: Final = 256


def as_byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A flat, one-byte-per-item view of ``data``, without copying."""
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1 or view.format not in ("B", "b", "c"):
        view = view.cast("B")
    return view


def stable_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A flat view of ``data`` that nothing can change later: file semantics for writes.

    ``bytes`` cannot change, so they are viewed, not copied. Anything else (a
    ``bytearray``, a ``memoryview`` of one, an ``array``, an ``mmap``) may be reused by the
    caller as soon as ``write`` returns, as :mod:`io` promises, so it is copied once into
    ``bytes``. Measured by ``bench/bench_open_blob.py``: one copy per mutable byte.
    """
    view = as_byte_view(data)
    if isinstance(view.obj, bytes):
        return view
    return memoryview(view.tobytes())


class KnownCrc:
    """``length`` bytes whose CRC32C the caller already verified: no need to read them."""

    __slots__ = ("crc32c", "length")

    def __init__(self, crc32c: int, length: int) -> None:
        self.crc32c = crc32c
        self.length = length


# A held piece: a ``bytes`` that is all ours or wholly the caller's (no view needed, which
# saves a 200-byte memoryview per small piece), or a view of part of a caller's buffer.
_Piece = bytes | memoryview


class _Fragment:
    """Held bytes ``[start, end)``: one piece, or a tuple of pieces (a staged write's).

    ``crc32c``, when known, is the caller's CRC32C of all of them.
    """

    __slots__ = ("crc32c", "end", "parts", "start")

    def __init__(self, start: int, parts: _Piece | tuple[_Piece, ...], crc32c: int | None) -> None:
        self.start = start
        self.end = start + (
            sum(len(part) for part in parts) if isinstance(parts, tuple) else len(parts)
        )
        self.parts = parts
        self.crc32c = crc32c

    def pieces(self) -> tuple[_Piece, ...]:
        parts = self.parts
        return parts if isinstance(parts, tuple) else (parts,)

    def piece_count(self) -> int:
        return len(self.parts) if isinstance(self.parts, tuple) else 1


class _SortedFragments:
    """Non-overlapping fragments sorted by start, in blocks; each block keeps its starts.

    One bisect over the blocks' first starts finds a block, one over its starts finds the
    place: an insert or removal shifts at most ``2 * _BLOCK`` entries, whatever the order.
    """

    def __init__(self) -> None:
        self._blocks: list[list[_Fragment]] = []
        self._starts: list[list[int]] = []
        self._firsts: list[int] = []

    def floor(self, offset: int) -> _Fragment | None:
        """The last fragment starting at or before ``offset``."""
        return self.neighbours(offset)[0]

    def neighbours(self, offset: int) -> tuple[_Fragment | None, _Fragment | None]:
        """The last fragment starting at or before ``offset``, and the first after it."""
        firsts = self._firsts
        block_index = bisect.bisect_right(firsts, offset) - 1
        if block_index < 0:
            return None, (self._blocks[0][0] if self._blocks else None)
        block = self._blocks[block_index]
        index = bisect.bisect_right(self._starts[block_index], offset)
        if index < len(block):
            return block[index - 1], block[index]
        if block_index + 1 < len(firsts):
            return block[index - 1], self._blocks[block_index + 1][0]
        return block[index - 1], None

    def first(self) -> _Fragment | None:
        return self._blocks[0][0] if self._blocks else None

    def last(self) -> _Fragment | None:
        return self._blocks[-1][-1] if self._blocks else None

    def iter_from(self, offset: int) -> Iterator[_Fragment]:
        """Fragments in order from the one holding (or the first after) ``offset``.

        The structure must not change while this is iterated.
        """
        block_index = max(bisect.bisect_right(self._firsts, offset) - 1, 0)
        if block_index >= len(self._blocks):
            return
        index = max(bisect.bisect_right(self._starts[block_index], offset) - 1, 0)
        for block in self._blocks[block_index:]:
            yield from block[index:] if index else block
            index = 0

    def add(self, fragment: _Fragment) -> None:
        start = fragment.start
        if not self._blocks:
            self._blocks.append([fragment])
            self._starts.append([start])
            self._firsts.append(start)
            return
        block_index = bisect.bisect_right(self._firsts, start) - 1
        if block_index < 0:
            block_index = 0
        block, starts = self._blocks[block_index], self._starts[block_index]
        index = bisect.bisect_right(starts, start)
        block.insert(index, fragment)
        starts.insert(index, start)
        if index == 0:
            self._firsts[block_index] = start
        if len(block) > 2 * _BLOCK:
            self._blocks.insert(block_index + 1, block[_BLOCK:])
            self._starts.insert(block_index + 1, starts[_BLOCK:])
            self._firsts.insert(block_index + 1, starts[_BLOCK])
            del block[_BLOCK:], starts[_BLOCK:]

    def remove(self, fragment: _Fragment) -> None:
        block_index = bisect.bisect_right(self._firsts, fragment.start) - 1
        block, starts = self._blocks[block_index], self._starts[block_index]
        index = bisect.bisect_left(starts, fragment.start)
        if block[index] is not fragment:
            raise ValueError(f"no fragment held at {fragment.start}")
        del block[index], starts[index]
        if not block:
            del self._blocks[block_index], self._starts[block_index], self._firsts[block_index]
        elif index == 0:
            self._firsts[block_index] = starts[0]

    def clear(self) -> None:
        self._blocks.clear()
        self._starts.clear()
        self._firsts.clear()


def _slice_pieces(pieces: Sequence[_Piece], begin: int, end: int) -> list[memoryview]:
    """Views covering ``[begin, end)`` of the concatenation of ``pieces``, without copying."""
    result: list[memoryview] = []
    position = 0
    for piece in pieces:
        piece_end = position + len(piece)
        if piece_end > begin and position < end:
            view = piece if isinstance(piece, memoryview) else memoryview(piece)
            result.append(view[max(begin - position, 0) : min(end, piece_end) - position])
        position = piece_end
        if position >= end:
            break
    return result


def _object_size(view: memoryview) -> int:
    exporter = view.obj
    if isinstance(exporter, bytes | bytearray):
        return len(exporter)
    try:
        with memoryview(exporter) as whole:
            return whole.nbytes
    except TypeError:
        return view.nbytes


def _detach(view: memoryview) -> _Piece:
    """What to hold for ``view``: itself, its whole ``bytes``, or a copy if it pins much more."""
    size = len(view)
    exporter = view.obj
    whole = len(exporter) if type(exporter) is bytes else _object_size(view)
    if size == whole:
        # Immutable and wholly ours to keep: the bytes object itself, without a view.
        return exporter if type(exporter) is bytes else view
    if size < PIN_COPY_LIMIT and (size < SMALL_PIECE or 2 * size < whole):
        return view.tobytes()
    return view


def _held_parts(views: Sequence[memoryview]) -> _Piece | tuple[_Piece, ...]:
    if len(views) == 1:
        return _detach(views[0])
    return tuple(_detach(view) for view in views)


def can_join(left_size: int, right_size: int) -> bool:
    """Whether touching pieces of these sizes are joined (by copying) into one."""
    return left_size + right_size <= JOIN_LIMIT and min(left_size, right_size) < SMALL_PIECE


def _join(left: _Fragment, right: _Fragment) -> _Fragment:
    data = b"".join((*left.pieces(), *right.pieces()))
    # Both known: the joined CRC32C costs one pass over at most JOIN_LIMIT bytes.
    known = left.crc32c is not None and right.crc32c is not None
    return _Fragment(left.start, data, google_crc32c.value(data) if known else None)


class ScatterBuffer:
    """Bytes held from offset :attr:`base` on, as sorted, non-overlapping fragments.

    ``base`` is the first byte still held or expected: everything below it has been
    released (acknowledged by GCS). Holes above it are bytes not received yet.
    ``max_fragments`` (None: no cap) bounds the views held.
    """

    def __init__(self, base: int = 0, *, max_fragments: int | None = None) -> None:
        self._base = base
        self._fragments = _SortedFragments()
        self._held = 0
        self._pieces = 0
        self._max_fragments = max_fragments
        self._end_limit: int | None = None
        # Cache of how far the bytes from ``base`` on are contiguous.
        self._contiguous_end = base

    @property
    def base(self) -> int:
        """First offset not yet released."""
        return self._base

    @property
    def held_bytes(self) -> int:
        """Total payload bytes currently held."""
        return self._held

    @property
    def fragment_count(self) -> int:
        """Views currently held (each costs :data:`FRAGMENT_OVERHEAD` beyond its payload)."""
        return self._pieces

    @property
    def cost(self) -> int:
        """Memory charged for what is held: payload plus the overhead of every view."""
        return self._held + self._pieces * FRAGMENT_OVERHEAD

    @property
    def contiguous_end(self) -> int:
        """End of the gap-free run of held bytes that starts at :attr:`base`."""
        return self._contiguous_end

    @property
    def end(self) -> int:
        """End of the highest held byte, or :attr:`base` when nothing is held."""
        last = self._fragments.last()
        return self._base if last is None else last.end

    def insert(
        self, offset: int, data: bytes | bytearray | memoryview, crc32c: int | None = None
    ) -> int:
        """Hold ``data`` as the bytes from ``offset`` on; return how many bytes were new.

        Bytes below :attr:`base` and bytes already held are skipped: the first copy wins.
        ``crc32c``, if given, is the caller's verified CRC32C of ``data``.
        """
        return self.insert_views(offset, [as_byte_view(data)], crc32c)

    def insert_views(
        self, offset: int, views: Sequence[memoryview], crc32c: int | None = None
    ) -> int:
        """Hold the concatenation of ``views`` from ``offset`` on; like :meth:`insert`.

        ``crc32c`` covers the whole concatenation; it is kept only if every byte is new
        (else the new parts are checksummed when sent). Raises
        :class:`~reliablewriter.TooFragmentedError` if a new piece would take the views
        held past ``max_fragments``; the pieces before it stay held (held bytes are
        correct bytes, so sending the write again is safe).
        """
        if offset < 0:
            raise ValueError(f"offset must not be negative, got {offset}")
        start = offset
        end = offset + (len(views[0]) if len(views) == 1 else sum(len(view) for view in views))
        if self._end_limit is not None and end > self._end_limit:
            views = _slice_pieces(views, 0, max(self._end_limit - start, 0))
            end, crc32c = max(self._end_limit, start), None
        if start < self._base:
            views = _slice_pieces(views, self._base - start, end - start)
            start, crc32c = self._base, None
        if start >= end:
            return 0
        left, right = self._fragments.neighbours(start)
        if (left is None or left.end <= start) and (right is None or right.start >= end):
            # The common case: the write falls into one hole, whose neighbours are known.
            self._add(_Fragment(start, _held_parts(views), crc32c), left, right)
            self._held += end - start
            if start <= self._contiguous_end:
                # The run now reaches ``end``; only a fragment touching it takes it further
                # (most writes extend the run, and nothing lies beyond them yet).
                self._contiguous_end = max(self._contiguous_end, end)
                if right is not None and right.start == end:
                    self._extend_contiguous()
            return end - start
        added = 0
        try:
            for gap_start, gap_end in self._gaps(start, end):
                piece = _slice_pieces(views, gap_start - start, gap_end - start)
                gap_left, gap_right = self._fragments.neighbours(gap_start)
                self._add(_Fragment(gap_start, _held_parts(piece), None), gap_left, gap_right)
                added += gap_end - gap_start
                if gap_start <= self._contiguous_end:
                    self._extend_contiguous()
        finally:
            self._held += added
            self._extend_contiguous()
        return added

    def limit_end(self, end: int) -> None:
        """Drop bytes at or past ``end`` from later inserts (the object ends there)."""
        if end < self.end:
            raise ValueError(f"bytes up to {self.end} are held already, past {end}")
        self._end_limit = end

    def _gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` not held, in order."""
        gaps: list[tuple[int, int]] = []
        cursor = start
        for fragment in self._fragments.iter_from(start):
            if fragment.start >= end:
                break
            if fragment.start > cursor:
                gaps.append((cursor, fragment.start))
            cursor = max(cursor, fragment.end)
            if cursor >= end:
                break
        if cursor < end:
            gaps.append((cursor, end))
        return gaps

    def _add(self, fragment: _Fragment, left: _Fragment | None, right: _Fragment | None) -> None:
        """Add a fragment that fills a gap between ``left`` and ``right`` (its neighbours),
        joined with them where that is cheap.

        The cap is checked on the count after the joins: a piece that fills a hole between
        small fragments lowers the count, and is never refused. Nor is a piece that
        starts within the gap-free run from :attr:`base`: it extends what can be sent,
        and sending frees fragments, so a buffer at its cap can always make progress.
        (Such pieces are at least SMALL_PIECE long or joined, so the run holds at most
        about one per KiB beyond the cap.)
        """
        size = fragment.end - fragment.start
        if left is not None and not (
            left.end == fragment.start and can_join(left.end - left.start, size)
        ):
            left = None
        if left is not None:
            size += left.end - left.start
        if right is not None and not (
            right.start == fragment.end and can_join(size, right.end - right.start)
        ):
            right = None
        if left is None and right is None:
            # The common case (pieces too large to join): the fragment goes in as it is.
            count = self._pieces + fragment.piece_count()
            self._check_cap(count, fragment.start)
            self._fragments.add(fragment)
            self._pieces = count
            return
        joined = [neighbour for neighbour in (left, right) if neighbour is not None]
        released = sum(neighbour.piece_count() for neighbour in joined)
        count = self._pieces - released + (1 if joined else fragment.piece_count())
        self._check_cap(count, fragment.start)
        for neighbour in joined:
            self._fragments.remove(neighbour)
        if left is not None:
            fragment = _join(left, fragment)
        if right is not None:
            fragment = _join(fragment, right)
        self._fragments.add(fragment)
        self._pieces = count

    def _check_cap(self, count: int, start: int) -> None:
        """Refuse a piece at ``start`` that would leave ``count`` views held, past the cap."""
        limit = self._max_fragments
        if limit is not None and count > limit and start > self._contiguous_end:
            raise TooFragmentedError(
                fragments=self._pieces, adding=count - self._pieces, limit=limit
            )

    def _extend_contiguous(self) -> None:
        for fragment in self._fragments.iter_from(self._contiguous_end):
            if fragment.start > self._contiguous_end:
                break
            self._contiguous_end = max(self._contiguous_end, fragment.end)

    def views(self, start: int, end: int) -> list[memoryview]:
        """Views covering exactly ``[start, end)``, which must be held and contiguous."""
        self._check_held(start, end)
        result: list[memoryview] = []
        for fragment in self._fragments.iter_from(start):
            if fragment.start >= end:
                break
            result.extend(
                _slice_pieces(fragment.pieces(), start - fragment.start, end - fragment.start)
            )
        return result

    def checksum_pieces(
        self, start: int, end: int, *, use_known: bool
    ) -> tuple[int, list[memoryview | KnownCrc]]:
        """What a checksum needs to cover ``[start, end)``: views, and known CRC32Cs.

        Whole fragments are covered, so the pieces may reach past ``end``; the first
        value returned is where they end. With ``use_known``, a fragment whose CRC32C the
        caller gave comes as a :class:`KnownCrc` instead of its views.
        """
        self._check_held(start, end)
        pieces: list[memoryview | KnownCrc] = []
        reached = start
        for fragment in self._fragments.iter_from(start):
            if fragment.start >= end:
                break
            if use_known and fragment.crc32c is not None and fragment.start == reached:
                pieces.append(KnownCrc(fragment.crc32c, fragment.end - fragment.start))
            else:
                pieces.extend(
                    _slice_pieces(
                        fragment.pieces(), reached - fragment.start, fragment.end - fragment.start
                    )
                )
            reached = fragment.end
        return reached, pieces

    def _check_held(self, start: int, end: int) -> None:
        if not self._base <= start <= end <= self._contiguous_end:
            held = f"[{self._base}, {self._contiguous_end})"
            raise ValueError(f"[{start}, {end}) is not within the held run {held}")

    def release(self, upto: int) -> None:
        """Drop every byte below ``upto`` (GCS has them) and move :attr:`base` there."""
        if upto <= self._base:
            return
        fragments = self._fragments
        while (first := fragments.first()) is not None and first.start < upto:
            fragments.remove(first)
            self._pieces -= first.piece_count()
            if first.end <= upto:
                self._held -= first.end - first.start
                continue
            # The fragment straddling ``upto`` keeps its tail (its CRC32C no longer applies).
            self._held -= upto - first.start
            kept = _slice_pieces(first.pieces(), upto - first.start, first.end - first.start)
            tail = _Fragment(upto, kept[0] if len(kept) == 1 else tuple(kept), None)
            fragments.add(tail)
            self._pieces += tail.piece_count()
            break
        self._base = upto
        self._contiguous_end = max(self._contiguous_end, upto)
        self._extend_contiguous()

    def clear(self) -> None:
        """Drop every held view (the upload is over, one way or another)."""
        self._fragments.clear()
        self._held = 0
        self._pieces = 0
        self._contiguous_end = self._base

    def ranges(self) -> Iterator[tuple[int, int]]:
        """Held ranges, merged where they touch, in order."""
        run_start: int | None = None
        run_end = 0
        for fragment in self._fragments.iter_from(self._base):
            if run_start is not None and fragment.start == run_end:
                run_end = fragment.end
                continue
            if run_start is not None:
                yield run_start, run_end
            run_start, run_end = fragment.start, fragment.end
        if run_start is not None:
            yield run_start, run_end

    def missing(self, end: int) -> list[tuple[int, int]]:
        """Ranges within ``[base, end)`` that are not held."""
        if end <= self._base:
            return []
        return self._gaps(self._base, end)
