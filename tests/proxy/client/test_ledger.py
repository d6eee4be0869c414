"""The ledger's credit rules: the window is the largest any connection reported."""

from __future__ import annotations

import trio

from protocol import Status
from protocol.ranges import RangeSet
from proxy.client.ledger import CONNECTION_LOST, MIN_PIECE_LIMIT, Ledger

FRAME = 64 * 1024


async def test_a_stale_status_does_not_shrink_the_window() -> None:
    ledger = Ledger(FRAME, lambda: None)
    ledger.extend(0, 0)
    ledger.note_credit(0, 8 * FRAME)
    # a Status from a slower connection, taken before that Credit was sent
    ledger.resync(Status(1, 0, (), 2 * FRAME), RangeSet(), RangeSet())
    assert ledger.window_end == 8 * FRAME
    ledger.note_credit(0, 3 * FRAME)  # and a stale Credit after it
    ledger.note_attached(0, resumed=False, window_end=FRAME)  # and a stale attach
    assert ledger.window_end == 8 * FRAME
    await trio.lowlevel.checkpoint()


async def test_an_incomplete_reply_queues_exactly_the_lost_bytes() -> None:
    ledger = Ledger(FRAME, lambda: None)
    ledger.note_credit(0, 16 * FRAME)
    for start in range(0, 8 * FRAME, FRAME):
        ledger.note_received((start, start + FRAME), 0)
    in_flight = RangeSet([(6 * FRAME, 7 * FRAME)])  # being resent by another connection
    ledger.forget([(2 * FRAME, 4 * FRAME), (6 * FRAME, 8 * FRAME)], in_flight)
    assert ledger.take(FRAME) == (2 * FRAME, 3 * FRAME)
    assert ledger.take(FRAME) == (3 * FRAME, 4 * FRAME)
    assert ledger.take(FRAME) == (7 * FRAME, 8 * FRAME)
    assert ledger.take(FRAME) is None
    assert ledger.resent_bytes_by_cause == {"proxy_lost": 3 * FRAME}
    assert not ledger.holds(8 * FRAME)
    await trio.lowlevel.checkpoint()


async def test_frames_lost_with_their_connection_shrink_pieces_until_frames_get_through() -> None:
    frame = 4 * MIN_PIECE_LIMIT
    ledger = Ledger(frame, lambda: None)
    ledger.note_credit(0, 64 * frame)
    ledger.extend(0, 64 * frame)
    assert ledger.take(frame) == (0, frame)
    ledger.requeue([(0, frame)], cause=CONNECTION_LOST)  # cut partway through
    assert ledger.piece_limit == frame // 2
    assert ledger.take(frame) == (0, frame // 2)  # still on the frame grid
    assert ledger.take(frame) == (frame // 2, frame)
    for _ in range(3):  # down to the floor, and no lower
        piece = ledger.take(frame)
        assert piece is not None
        ledger.requeue([piece], cause=CONNECTION_LOST)
    assert ledger.piece_limit == MIN_PIECE_LIMIT
    piece = ledger.take(frame)
    assert piece is not None
    assert piece[1] - piece[0] == MIN_PIECE_LIMIT
    ledger.requeue([piece], cause="bad_crc")  # a damaged frame says nothing of size
    assert ledger.piece_limit == MIN_PIECE_LIMIT
    # each piece acknowledged whole doubles it, back up to the frame size
    ledger.note_received((0, frame // 2), 0)
    assert ledger.piece_limit == 2 * MIN_PIECE_LIMIT
    ledger.requeue([(0, frame // 2)], cause=CONNECTION_LOST)  # nothing of it was lost
    assert ledger.piece_limit == 2 * MIN_PIECE_LIMIT
    for _ in range(4):
        piece = ledger.take(frame)
        assert piece is not None
        ledger.note_received(piece, 0)
    assert ledger.piece_limit == frame
    await trio.lowlevel.checkpoint()
