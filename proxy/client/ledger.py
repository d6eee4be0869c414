"""One upload's bookkeeping of bytes: what is left to send, what the proxy holds, the credit.

What is still to send is a :class:`~protocol.ranges.RangeSet`. A piece leaves it when a
connection takes it and goes back when the frame is lost (the connection dropped before the
``Ack``) or refused as corrupt (``BAD_CRC``). After a reconnect, :meth:`Ledger.resync` makes
the set exactly what the proxy does not hold and no connection is sending: that is what makes
a proxy restart harmless.

Every change wakes whoever waits in :meth:`Ledger.wait_changed`, so the connections, the
caller's ``write()`` and ``complete()`` never poll.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import trio

from protocol import ErrorCode, Status
from protocol.ranges import ByteRange, RangeSet
from proxy.client.sources import Source

__all__ = ["CONNECTION_LOST", "MIN_PIECE_LIMIT", "Ledger"]

#: the cause of frames lost with their connection (:meth:`Ledger.requeue`)
CONNECTION_LOST = "connection_lost"
#: how small :attr:`Ledger.piece_limit` may get after connections are cut mid-frame
MIN_PIECE_LIMIT = 256 * 1024


class Ledger:
    """The bytes of one upload: sent, acknowledged, committed, and still to send."""

    def __init__(self, frame_size: int, report: Callable[[], None]) -> None:
        self._report = report
        self._changed = trio.Event()
        self._frame_size = frame_size
        self._frame_size_agreed = False
        #: the largest piece taken now: the frame size, halved each time a connection is cut
        #: with frames in flight and doubled back as frames get through (see take)
        self._piece_limit = frame_size
        self._source: Source | None = None
        self._to_send = RangeSet()
        self._received = RangeSet()
        #: records of pieces acknowledged while a StatusQuery is in flight (see watch_acks)
        self._ack_watchers: list[RangeSet] = []
        self._committed = 0
        self._window_end = 0
        #: trio time of the last progress: the retry deadline counts from it
        self.last_progress = trio.current_time()
        self.bytes_sent = 0
        self.reconnects = 0
        #: times the upload started again from byte 0 (the proxy could not resume its token)
        self.restarts = 0
        self.resent_bytes_by_cause: dict[str, int] = {}
        self.errors_by_code: dict[str, int] = {}

    # -- reading ---------------------------------------------------------------------------

    @property
    def committed(self) -> int:
        """Bytes the proxy reports durable in GCS."""
        return self._committed

    @property
    def window_end(self) -> int:
        """The largest credit seen: pieces must end at or below it."""
        return self._window_end

    @property
    def frame_size(self) -> int:
        """Pieces are cut at multiples of this, for the whole upload."""
        return self._frame_size

    @property
    def piece_limit(self) -> int:
        """The largest piece :meth:`take` hands out now (at most :attr:`frame_size`)."""
        return self._piece_limit

    @property
    def received_total(self) -> int:
        return self._received.total

    @property
    def source(self) -> Source | None:
        return self._source

    def holds(self, end: int) -> bool:
        """Whether the proxy has acknowledged every byte of ``[0, end)``."""
        return self._received.contains(0, end)

    # -- change notification ---------------------------------------------------------------

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    # -- the data --------------------------------------------------------------------------

    def set_source(self, source: Source) -> None:
        """Give the upload its bytes; those below the committed offset are never sent."""
        if self._source is not None:
            raise RuntimeError("this upload already has data")
        self._source = source
        self.extend(0, source.available)

    def extend(self, start: int, end: int) -> None:
        """``[start, end)`` became readable from the source: what the proxy lacks of it is to
        be sent (a resumed upload's proxy may hold some already)."""
        for gap_start, gap_end in self._received.missing(max(start, self._committed), end):
            self._to_send.add(gap_start, gap_end)
        if self._source is not None and start < self._committed:
            # a resumed stream is given its bytes from 0 again: those GCS holds are dropped
            self._source.release(self._committed)
        self.notify()

    def received_ranges(self) -> list[ByteRange]:
        """What the proxy has acknowledged holding, lowest first."""
        return list(self._received)

    async def read(self, piece: ByteRange) -> tuple[bytes | memoryview, int | None]:
        assert self._source is not None
        return await self._source.read(*piece)

    # -- what the proxy says ---------------------------------------------------------------

    def count_error(self, code: ErrorCode) -> None:
        self.errors_by_code[code.name] = self.errors_by_code.get(code.name, 0) + 1

    def note_sent(self, length: int) -> None:
        self.bytes_sent += length
        self._report()

    def note_reconnect(self) -> None:
        self.reconnects += 1

    def mark_progress(self) -> None:
        """The upload moved forward (opened, bytes newly held, all sent): retries start anew."""
        self.last_progress = trio.current_time()

    def note_committed(self, committed: int) -> None:
        if committed > self._committed:
            self.mark_progress()
            self._committed = committed
            self._received.add(0, committed)
            if self._source is not None:
                self._source.release(committed)

    def note_credit(self, committed: int, window_end: int) -> None:
        self.note_committed(committed)
        # frames on different connections have no order: the largest credit is the current one
        self._window_end = max(self._window_end, window_end)
        self.notify()

    def note_attached(self, committed: int, *, resumed: bool, window_end: int | None) -> None:
        """An Open or Attach was answered with ``committed`` (and, in version 2, the window)."""
        if resumed:
            # a different proxy instance: its credit starts afresh from what GCS holds
            self._window_end = committed
        self.note_committed(committed)
        if window_end is not None:
            self._window_end = max(self._window_end, window_end)
            self.notify()

    def note_received(self, piece: ByteRange, committed: int) -> None:
        if piece[1] - piece[0] >= self._piece_limit:
            self._piece_limit = min(self._frame_size, 2 * self._piece_limit)
        if not self._received.contains(*piece):
            self.mark_progress()
        self._received.add(*piece)
        for watcher in self._ack_watchers:
            watcher.add(*piece)
        self.note_committed(committed)
        self.notify()
        self._report()

    def note_frame_size(self, agreed: int) -> None:
        """Pieces are cut at multiples of the first agreed frame size, for the whole upload."""
        if not self._frame_size_agreed:
            self._frame_size = min(self._frame_size, agreed)
            self._piece_limit = min(self._piece_limit, self._frame_size)
            self._frame_size_agreed = True

    # -- taking and returning pieces -------------------------------------------------------

    def take(self, max_data: int) -> ByteRange | None:
        """The lowest piece to send that fits the credit window and one frame, if any.

        Pieces are cut on the frame grid, and no larger than :attr:`piece_limit`: a link
        that cuts connections every few MiB would otherwise never get a whole large frame
        through (a frame cut short is sent again whole), where smaller ones make progress.
        """
        if not self._to_send:
            return None
        self._to_send.remove(0, self._committed)
        head = self._to_send.first()
        if head is None:
            return None
        alignment = self._frame_size - head[0] % self._frame_size
        return self._to_send.take(self._window_end, min(alignment, max_data, self._piece_limit))

    def hand_back(self, piece: ByteRange) -> None:
        """Return a piece that was taken but never sent."""
        self._to_send.add(*piece)
        self.notify()

    def requeue(self, pieces: Iterable[ByteRange], *, cause: str) -> None:
        """Frames that were sent and lost: what of them the proxy does not hold is resent.

        Frames lost with their connection halve :attr:`piece_limit` (down to
        :data:`MIN_PIECE_LIMIT`); a damaged frame says nothing about their size.
        """
        lost = 0
        for start, end in pieces:
            start = max(start, self._committed)
            for gap_start, gap_end in self._received.missing(start, end):
                self._to_send.add(gap_start, gap_end)
                self._count_resent(cause, gap_end - gap_start)
                lost += gap_end - gap_start
        if lost and cause == CONNECTION_LOST:
            floor = min(MIN_PIECE_LIMIT, self._frame_size)
            self._piece_limit = max(floor, self._piece_limit // 2)
        self.notify()

    def _count_resent(self, cause: str, length: int) -> None:
        self.resent_bytes_by_cause[cause] = self.resent_bytes_by_cause.get(cause, 0) + length

    def forget(self, missing: Iterable[ByteRange], in_flight: RangeSet) -> None:
        """The proxy reports ``missing`` (an ``Incomplete``) although it acknowledged some of
        it (it restarted): send those bytes again, but those a connection is sending now."""
        for start, end in missing:
            start = max(start, self._committed)
            if start >= end:
                continue
            lost = RangeSet([(start, end)])
            for held_start, held_end in in_flight:
                lost.remove(held_start, held_end)
            for lost_start, lost_end in lost:
                self._received.remove(lost_start, lost_end)
                for gap_start, gap_end in self._to_send.missing(lost_start, lost_end):
                    self._to_send.add(gap_start, gap_end)
                    self._count_resent("proxy_lost", gap_end - gap_start)
        self.notify()

    def restart(self) -> None:
        """Start again from byte 0 under a new upload: the proxy holds nothing of it.

        Only for a source that still holds every byte (:attr:`Source.holds_everything`).
        """
        assert self._source is None or self._source.holds_everything
        self._count_resent("restarted", self._received.total)
        self.restarts += 1
        self._received = RangeSet()
        self._to_send = RangeSet()
        self._committed = 0
        self._window_end = 0
        if self._source is not None:
            self._to_send.add(0, self._source.available)
        self.mark_progress()
        self.notify()

    @contextmanager
    def watch_acks(self) -> Iterator[RangeSet]:
        """Record the pieces acknowledged while in the block (a Status is on its way).

        A Status is a snapshot taken before those acknowledgements, so it cannot show them.
        """
        acked_meanwhile = RangeSet()
        self._ack_watchers.append(acked_meanwhile)
        try:
            yield acked_meanwhile
        finally:
            # by identity: RangeSets compare by content
            self._ack_watchers = [w for w in self._ack_watchers if w is not acked_meanwhile]

    def resync(self, status: Status, acked_meanwhile: RangeSet, in_flight: RangeSet) -> None:
        """Make the to-send set exactly what the proxy lacks and no connection is sending."""
        self.note_committed(status.committed_offset)
        # a Status from a slower connection may be older than a Credit already seen
        self._window_end = max(self._window_end, self._committed, status.window_end)
        received = RangeSet(status.received)
        received.add(0, self._committed)
        for start, end in acked_meanwhile:
            received.add(start, end)
        available = self._source.available if self._source is not None else 0
        needed = RangeSet([(self._committed, available)]) if self._source else RangeSet()
        for start, end in received:
            needed.remove(start, end)
        for start, end in in_flight:
            needed.remove(start, end)
        forgotten = needed.copy()
        for start, end in self._to_send:
            forgotten.remove(start, end)
        if forgotten:
            # the proxy acknowledged these once but no longer holds them: it restarted
            self._count_resent("proxy_lost", forgotten.total)
        self._to_send = needed
        self._received = received
        self.notify()
