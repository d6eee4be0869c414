"""Issue 11, finding 1: many tiny out-of-order writes cost bounded memory and CPU.

The attack: a client writes single bytes at odd offsets, so no two touch. Each piece held
costs far more than its byte; the buffer charges that overhead (measured here with
tracemalloc), caps the pieces per writer, and refuses the write that would exceed the cap
with TooFragmentedError. Inserts stay O(log n) in any order.
"""

from __future__ import annotations

import dataclasses
import gc
import time
import tracemalloc
from collections.abc import Callable

import google_crc32c
import pytest

from reliablewriter import TooFragmentedError, WriterSettings, open_writer
from reliablewriter.buffer import FRAGMENT_OVERHEAD, JOIN_LIMIT, SMALL_PIECE, ScatterBuffer

from .conftest import KiB, Target, payload

# A stand-in for the proxy's receive buffers: frames' payload arrives as slices of these.
_RECEIVED = bytes(range(256)) * 1024


def _traced_growth(action: Callable[[], object]) -> int:
    """Bytes still allocated after ``action`` that were not before (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = action()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del kept
    return after - before


@pytest.mark.parametrize(
    ("make", "length"),
    [
        (lambda i: memoryview(_RECEIVED)[i : i + 1], 1),  # copied: a byte of a receive buffer
        (lambda i: memoryview(_RECEIVED)[i : i + 3], 3),
        (lambda i: bytes([i % 256, 1]), 2),  # the caller's own small bytes, kept as they are
        (lambda i: bytearray(b"ab"), 2),  # a mutable buffer: kept as a view (the worst case)
    ],
    ids=["byte-of-a-receive-buffer", "3-bytes-of-a-receive-buffer", "own-bytes", "bytearray"],
)
def test_the_per_fragment_overhead_is_what_tracemalloc_sees(
    make: Callable[[int], bytes | bytearray | memoryview], length: int
) -> None:
    count = 5_000
    pieces = [make(i) for i in range(count)]  # the caller's memory, allocated beforehand
    buffer = ScatterBuffer()

    def hold_them() -> None:
        for index, piece in enumerate(pieces):
            buffer.insert(index * (length + 1), piece)  # never touching: no joins

    per_fragment = _traced_growth(hold_them) / count
    assert buffer.fragment_count == count
    assert per_fragment <= FRAGMENT_OVERHEAD
    assert buffer.cost == count * (length + FRAGMENT_OVERHEAD)


def test_the_overhead_constant_is_not_inflated() -> None:
    # The worst case (a view kept of a caller's mutable buffer) comes close to the constant.
    pieces = [bytearray(b"ab") for _ in range(5_000)]
    buffer = ScatterBuffer()
    growth = _traced_growth(lambda: [buffer.insert(i * 3, p) for i, p in enumerate(pieces)])
    assert growth / len(pieces) > 0.75 * FRAGMENT_OVERHEAD


def test_descending_inserts_do_not_slow_down_as_the_buffer_grows() -> None:
    """400k one-byte inserts in descending order, none touching: O(log n) each.

    With a flat sorted list each insert shifts every entry (66 s for 400k on main). The
    last 20k inserts, into a buffer of 380k fragments, must cost about what the first 20k
    did; a linear insert would make them tens of times slower.
    """
    count = 400_000
    buffer = ScatterBuffer()
    view = memoryview(_RECEIVED)
    timings = []
    started = time.perf_counter()
    for batch_end in range(count, 0, -20_000):
        batch_started = time.perf_counter()
        for offset in range(batch_end, batch_end - 20_000, -1):
            buffer.insert(2 * offset, view[offset % 1000 : offset % 1000 + 1])
        timings.append(time.perf_counter() - batch_started)
    elapsed = time.perf_counter() - started
    assert buffer.fragment_count == count
    assert buffer.missing(2 * count + 1)[:2] == [(0, 2), (3, 4)]
    assert timings[-1] < 5 * timings[0]
    assert elapsed < 30  # about 3 s on the shared 2-core machine; main took 66 s


def test_tiny_touching_writes_are_joined_into_few_fragments() -> None:
    count = 100_000
    data = payload(count)
    buffer = ScatterBuffer()
    for offset in range(count - 1, -1, -1):  # descending, each touching the last
        buffer.insert(offset, memoryview(data)[offset : offset + 1])
    assert buffer.fragment_count <= count // (JOIN_LIMIT - SMALL_PIECE) + 2
    assert b"".join(buffer.views(0, count)) == data


def test_a_small_slice_does_not_pin_its_receive_buffer() -> None:
    received = bytearray(256 * KiB)
    buffer = ScatterBuffer()
    buffer.insert(10, memoryview(received)[10:11])  # copied: the buffer is free to change
    received.extend(b"x")
    big_part = bytearray(256 * KiB)
    buffer.insert(100, memoryview(big_part)[: 200 * KiB])  # most of it: kept as a view
    with pytest.raises(BufferError):
        big_part.extend(b"x")


def test_the_cap_refuses_the_piece_beyond_it_and_a_write_filling_the_holes_is_taken() -> None:
    buffer = ScatterBuffer(max_fragments=10)
    for index in range(10):
        buffer.insert(2 * index + 1, b"o")
    with pytest.raises(TooFragmentedError, match="10 separate pieces held") as refused:
        buffer.insert(41, b"x")
    assert (refused.value.fragments, refused.value.adding, refused.value.limit) == (10, 1, 10)
    assert buffer.held_bytes == 10
    assert list(buffer.ranges())[-1] == (19, 20)
    # Filling every hole joins the pieces: fewer fragments, never refused.
    assert buffer.insert(0, b"e" * 21) == 11
    assert buffer.fragment_count == 1
    assert b"".join(buffer.views(0, 21)) == b"eo" * 10 + b"e"


def test_at_the_cap_a_write_extending_the_sendable_run_is_still_taken() -> None:
    """Refusing the bytes at the head would leave a capped upload stuck for good: they are
    what lets the writer send a chunk, and sending frees fragments."""
    big = bytes(JOIN_LIMIT + 1)  # too big to join anything
    buffer = ScatterBuffer(max_fragments=3)
    for offset in (100 * KiB, 200 * KiB, 300 * KiB):
        buffer.insert(offset, big)
    with pytest.raises(TooFragmentedError):
        buffer.insert(400 * KiB, big)
    assert buffer.insert(0, big) == len(big)  # the head: taken beyond the cap
    assert buffer.insert(len(big), big) == len(big)
    assert buffer.fragment_count == 5
    assert buffer.contiguous_end == 2 * len(big)
    with pytest.raises(TooFragmentedError):
        buffer.insert(400 * KiB, big)
    buffer.release(2 * len(big))  # sent: the head's fragments are freed
    assert buffer.fragment_count == 3


async def test_a_fragmentation_attack_stays_bounded_and_is_refused_at_the_cap(
    target: Target, settings: WriterSettings
) -> None:
    """100,000 one-byte writes at odd offsets, each staged as the proxy stages a frame (a
    piece of a receive buffer), through a real writer.

    Memory stays within FRAGMENT_OVERHEAD per write: tracemalloc watches the last 25,000
    (it slows every allocation several-fold, and the cost per fragment does not change with
    the count; buffered_cost, which charges it, covers all 100,000). The next write is
    refused with TooFragmentedError naming the upload, and the upload is not harmed: a
    whole write fills the holes and it completes."""
    count, traced = 100_000, 25_000
    data = payload(2 * count + 2)
    received = memoryview(data)
    settings = dataclasses.replace(settings, max_fragments=count)
    assert 2 * count + 2 <= settings.buffer_limit  # every write lies inside the window
    async with open_writer(target.bucket, "attacked", settings) as writer:
        secret = writer.session_uri.rsplit("upload_id=", 1)[1]

        def stage(offset: int) -> None:
            with writer.begin_write(offset, 1) as staged:
                staged.feed(received[offset : offset + 1])
                staged.commit()

        def attack(writes: range) -> None:
            for index in writes:
                stage(2 * index + 1)

        attack(range(count - traced))
        grown = _traced_growth(lambda: attack(range(count - traced, count)))
        assert grown < traced * FRAGMENT_OVERHEAD
        assert writer.stats.fragments == writer.fragment_count == count
        assert writer.buffered_cost == count * (1 + FRAGMENT_OVERHEAD)
        assert writer.buffered_cost <= settings.max_buffered_cost
        with pytest.raises(TooFragmentedError, match="object 'attacked'") as refused:
            stage(2 * count + 1)
        assert secret not in str(refused.value)
        assert writer.stats.fragments == count
        # The writer carries on: a whole write fills the holes and the upload completes.
        await writer.write_at(0, data)
        await writer.complete(crc32c=google_crc32c.value(data))
    assert target.read("attacked") == data
