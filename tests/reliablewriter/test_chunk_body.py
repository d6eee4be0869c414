"""ChunkBody: the bytes of a chunk, in few sends: small views coalesced, large ones uncopied."""

from __future__ import annotations

import os
import threading

import pytest

from reliablewriter.transport import COALESCE_FRACTION, ChunkBody, UploadInterrupted

SLICE = 64 * 1024
SMALL = SLICE // COALESCE_FRACTION


def body_of(views: list[memoryview], sent: list[int] | None = None) -> ChunkBody:
    return ChunkBody(
        views,
        slice_size=SLICE,
        stop=threading.Event(),
        on_sent=(sent if sent is not None else []).append,
    )


def sent_pieces(body: ChunkBody) -> list[bytes]:
    # Each piece is valid only until the next is asked for, as a socket send uses it.
    return [bytes(piece) for piece in body]


def test_small_views_leave_in_slice_sized_sends_with_their_bytes_in_order() -> None:
    data = os.urandom(100 * 1000)
    views = [memoryview(data)[begin : begin + 1000] for begin in range(0, len(data), 1000)]
    sent: list[int] = []
    pieces = sent_pieces(body_of(views, sent))
    assert b"".join(pieces) == data
    assert [len(piece) for piece in pieces] == [SLICE, len(data) - SLICE]
    assert sent == [len(piece) for piece in pieces]


def test_large_views_are_sent_from_where_they_are_in_slices() -> None:
    large = bytes(os.urandom(SMALL + 1))
    body = body_of([memoryview(large)])
    seen = []
    for piece in body:
        assert piece.obj is large  # a view of the caller's bytes, not a copy
        seen.append(bytes(piece))
    assert b"".join(seen) == large


def test_a_mix_keeps_order_and_flushes_small_bytes_before_a_large_view() -> None:
    small_a, large, small_b = os.urandom(100), os.urandom(3 * SLICE + 5), os.urandom(SMALL)
    views = [memoryview(part) for part in (small_a, large, small_b)]
    pieces = sent_pieces(body_of(views))
    assert b"".join(pieces) == small_a + large + small_b
    assert [len(piece) for piece in pieces] == [100, SLICE, SLICE, SLICE, 5, SMALL]


def test_it_can_be_sent_again_with_the_same_bytes() -> None:
    data = os.urandom(5 * SLICE)
    views = [memoryview(data)[begin : begin + 3000] for begin in range(0, len(data), 3000)]
    body = body_of(views)
    assert sent_pieces(body) == sent_pieces(body)
    assert len(body) == len(data)


def test_a_stop_request_ends_the_body_between_sends() -> None:
    stop = threading.Event()
    data = os.urandom(4 * SLICE)
    body = ChunkBody(
        [memoryview(data)[begin : begin + 500] for begin in range(0, len(data), 500)],
        slice_size=SLICE,
        stop=stop,
        on_sent=lambda _: stop.set(),
    )
    pieces = iter(body)
    assert len(next(pieces)) == SLICE
    with pytest.raises(UploadInterrupted):
        next(pieces)
