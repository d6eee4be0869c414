"""ScatterBuffer: first copy wins, views not copies, and release frees memory."""

from __future__ import annotations

import itertools

import google_crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reliablewriter import ChecksumMode
from reliablewriter.buffer import ScatterBuffer
from reliablewriter.checksum import StreamChecksum, crc32c_to_b64


def joined(buffer: ScatterBuffer, start: int, end: int) -> bytes:
    return b"".join(bytes(view) for view in buffer.views(start, end))


def test_out_of_order_writes_become_contiguous_when_the_gap_fills() -> None:
    buffer = ScatterBuffer()
    assert buffer.insert(4, b"4567") == 4
    assert buffer.contiguous_end == 0
    assert buffer.missing(8) == [(0, 4)]
    assert buffer.insert(0, b"0123") == 4
    assert buffer.contiguous_end == 8
    assert list(buffer.ranges()) == [(0, 8)]
    assert joined(buffer, 0, 8) == b"01234567"


def test_first_copy_wins_on_overlap() -> None:
    buffer = ScatterBuffer()
    buffer.insert(2, b"AAAA")  # [2, 6)
    assert buffer.insert(0, b"bbbbbbbbbb") == 6  # only [0, 2) and [6, 10) are new
    assert joined(buffer, 0, 10) == b"bbAAAAbbbb"
    assert buffer.held_bytes == 10


def test_views_share_the_callers_memory() -> None:
    source = bytearray(b"abcdef")
    buffer = ScatterBuffer()
    buffer.insert(0, source)
    (view,) = buffer.views(1, 4)
    source[2] = ord("X")
    assert bytes(view) == b"bXd"


def test_release_drops_views_so_the_caller_can_resize_its_buffer() -> None:
    source = bytearray(b"abcdef")
    buffer = ScatterBuffer()
    buffer.insert(0, source)
    with pytest.raises(BufferError):
        source.extend(b"g")  # still exported: the buffer holds a view
    buffer.release(3)
    with pytest.raises(BufferError):
        source.extend(b"g")  # the tail [3, 6) is still held
    buffer.release(6)
    source.extend(b"g")
    assert buffer.held_bytes == 0
    assert buffer.base == 6


def test_bytes_below_base_are_ignored() -> None:
    buffer = ScatterBuffer()
    buffer.insert(0, b"0123")
    buffer.release(4)
    assert buffer.insert(0, b"zzzzzz") == 2
    assert joined(buffer, 4, 6) == b"zz"


def test_views_outside_the_contiguous_run_are_refused() -> None:
    buffer = ScatterBuffer()
    buffer.insert(0, b"01")
    buffer.insert(3, b"3")
    with pytest.raises(ValueError, match="not within the held run"):
        buffer.views(0, 4)


def test_multi_dimensional_buffers_are_flattened_without_copying() -> None:
    source = memoryview(bytearray(b"abcdef")).cast("B", (2, 3))
    buffer = ScatterBuffer()
    assert buffer.insert(0, source) == 6
    assert joined(buffer, 0, 6) == b"abcdef"


writes = st.lists(
    st.tuples(st.integers(0, 200), st.integers(0, 60), st.integers(0, 255)), max_size=40
)


@settings(deadline=None, max_examples=300)
@given(writes=writes, releases=st.lists(st.integers(0, 260), max_size=5))
def test_matches_a_byte_by_byte_model(
    writes: list[tuple[int, int, int]], releases: list[int]
) -> None:
    """Every write is a run of one distinct byte value, so the winner of each byte shows."""
    model: dict[int, int] = {}
    buffer = ScatterBuffer()
    base = 0
    release_points = iter(sorted(releases))
    for index, (offset, length, value) in enumerate(writes):
        new = buffer.insert(offset, bytes([value]) * length)
        expected_new = 0
        for position in range(max(offset, base), offset + length):
            if position not in model:
                model[position] = value
                expected_new += 1
        assert new == expected_new
        if index % 7 == 6:
            upto = min(next(release_points, base), buffer.contiguous_end)
            if upto > base:
                buffer.release(upto)
                for position in range(base, upto):
                    del model[position]
                base = upto
        held = sorted(model)
        assert buffer.held_bytes == len(held)
        contiguous = base
        while contiguous in model:
            contiguous += 1
        assert buffer.contiguous_end == contiguous
        assert joined(buffer, base, contiguous) == bytes(model[p] for p in range(base, contiguous))
        covered = {p for start, end in buffer.ranges() for p in range(start, end)}
        assert covered == set(held)


# Pieces too large to join (3 KiB units): each write is held as fragments of its own, so
# the run from the base grows only through fragments that touch it.
UNIT = 3 * 1024
unit_writes = st.lists(
    st.tuples(st.integers(0, 30), st.integers(1, 6), st.integers(0, 255)), max_size=30
)


@settings(deadline=None, max_examples=200)
@given(writes=unit_writes, release_unit=st.integers(0, 36))
def test_the_run_from_the_base_follows_fragments_too_large_to_join(
    writes: list[tuple[int, int, int]], release_unit: int
) -> None:
    model: dict[int, int] = {}  # unit -> the value of the write that won it
    buffer = ScatterBuffer()
    base = 0
    for index, (unit, units, value) in enumerate(writes):
        buffer.insert(unit * UNIT, bytes([value]) * (units * UNIT))
        for position in range(max(unit, base), unit + units):
            model.setdefault(position, value)
        if index == len(writes) // 2 and base < release_unit <= buffer.contiguous_end // UNIT:
            buffer.release(release_unit * UNIT)
            for position in range(base, release_unit):
                del model[position]
            base = release_unit
        contiguous = base
        while contiguous in model:
            contiguous += 1
        assert buffer.contiguous_end == contiguous * UNIT
        assert joined(buffer, base * UNIT, contiguous * UNIT) == b"".join(
            bytes([model[position]]) * UNIT for position in range(base, contiguous)
        )


# Pieces of larger buffers, staged writes of several views, and known CRC32Cs: the
# checksum pieces of the held head always add up to the head's CRC32C.
SOURCE = bytes(range(256)) * 64

shaped_writes = st.lists(
    st.tuples(
        st.integers(0, 3000),  # offset
        st.integers(0, 2500),  # length
        st.integers(0, len(SOURCE) - 2500),  # where in SOURCE the bytes come from
        st.integers(1, 3),  # views it arrives in
        st.booleans(),  # whether the caller gives its CRC32C
    ),
    max_size=25,
)


@settings(deadline=None, max_examples=200)
@given(writes=shaped_writes, release_at=st.integers(0, 6000))
def test_checksum_pieces_cover_the_head_whatever_shapes_the_writes_took(
    writes: list[tuple[int, int, int, int, bool]], release_at: int
) -> None:
    model: dict[int, int] = {}
    buffer = ScatterBuffer()
    for offset, length, source_at, parts, known in writes:
        data = memoryview(SOURCE)[source_at : source_at + length]
        cuts = sorted({0, length, *(length * k // parts for k in range(1, parts))})
        views = [data[a:b] for a, b in itertools.pairwise(cuts)]
        crc = google_crc32c.value(bytes(data)) if known else None
        buffer.insert_views(offset, views, crc)
        for position in range(offset, offset + length):
            model.setdefault(position, data[position - offset])
    head = 0
    while head in model:
        head += 1
    assert buffer.contiguous_end == head
    assert buffer.held_bytes == len(model)
    release = min(release_at, head)
    buffer.release(release)
    if release == head:
        return
    reached, pieces = buffer.checksum_pieces(release, head, use_known=True)
    checksum = StreamChecksum(ChecksumMode.CRC32C)
    checksum.extend(0, [memoryview(bytes(model[p] for p in range(release)))])
    checksum.extend(release, pieces)
    assert reached == head  # whole fragments: here, the whole head
    expected = google_crc32c.value(bytes(model[p] for p in range(head)))
    assert checksum.crc32c == crc32c_to_b64(expected)
    assert b"".join(buffer.views(release, head)) == bytes(model[p] for p in range(release, head))
