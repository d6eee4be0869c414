"""Where an upload's bytes come from: a file read piece by piece, or a stream's uncommitted tail.

Both give the same three things to the upload: :meth:`read` a piece with its CRC32C,
:meth:`release` what the proxy committed (never read again), and :meth:`crc32c` of the whole
object once every byte was sent. Neither keeps more than it must: a file is read again for
a resend, a stream keeps only what the proxy has not committed.
"""

from __future__ import annotations

import os
from typing import Final, Protocol

import google_crc32c
import trio

from protocol import crc32c_combine, crc32c_of_suffix
from proxy.client.errors import UploadError
from proxy.client.settings import MiB

__all__ = ["FileSource", "Source", "StreamSource", "file_crc32c", "file_version"]

#: bytes a file source reads in one worker-thread call (the piece asked for and the next ones)
_READ_AHEAD: Final = 8 * MiB


class Source(Protocol):
    """The bytes of one upload, as the upload reads them."""

    #: the object's size, once known (a stream's when it is finished)
    total: int | None

    @property
    def available(self) -> int:
        """Bytes that can be read now: ``[0, available)``."""

    async def read(self, start: int, end: int) -> tuple[bytes | memoryview, int | None]:
        """The bytes of ``[start, end)`` and their CRC32C if it is known without a pass."""

    @property
    def holds_everything(self) -> bool:
        """Whether every byte can still be read, so the upload could start again from 0."""

    def release(self, committed: int) -> None:
        """Bytes below ``committed`` are in GCS and are never read again."""

    def close(self) -> None:
        """Free what the source holds (a file descriptor, buffered blocks)."""

    async def crc32c(self) -> int:
        """The whole object's CRC32C, once every byte has been read."""


class FileSource:
    """Random access to a file: each piece is read when it is sent (and again if resent).

    Reads go to a worker thread several frames at a time: the piece asked for and the
    frames after it, each as a ``bytes`` of its own with its CRC32C. Slots take the lowest
    pieces in turn, so the next ones are usually those; one thread round trip per frame
    cost more CPU than the read itself. At most :data:`_READ_AHEAD` bytes wait, and a new
    batch replaces what the last one left.

    Each byte is checksummed once: the piece's CRC32C goes into its frame header, and the
    whole file's CRC32C is combined from those of the pieces as they were last sent
    (:func:`protocol.crc32c_combine`), folded in order below the committed offset. If the
    pieces do not tile the file (the upload resumed bytes sent by someone else), the file is
    read again to checksum it. A file whose size or modification time changed during the
    upload fails it: the bytes sent may come from different versions of the file.

    A source may be a slice of the file: ``size`` bytes from ``base`` on (a segment of a
    composite upload), and its offsets count from ``base``.
    """

    def __init__(self, fd: int, size: int, frame_size: int, *, base: int = 0) -> None:
        self._fd = fd
        self._base = base
        self.size = size
        self.total: int | None = size
        self._frame_size = frame_size
        self._version = file_version(fd)
        self._ahead: dict[int, tuple[bytes | memoryview, int]] = {}
        #: the batch being read: its first and end offsets, and when it is in
        self._loading: tuple[int, int, trio.Event] | None = None
        #: pieces read and not folded yet: start -> (end, CRC32C)
        self._crcs: dict[int, tuple[int, int]] = {}
        #: the CRC32C of [0, _folded)
        self._folded = 0
        self._folded_crc = 0

    @property
    def available(self) -> int:
        return self.size

    @property
    def holds_everything(self) -> bool:
        return True  # a file is read again for any piece

    async def read(self, start: int, end: int) -> tuple[bytes | memoryview, int | None]:
        """The bytes of ``[start, end)`` and their CRC32C."""
        while True:
            ahead = self._ahead.pop(start, None)
            if ahead is not None and len(ahead[0]) > end - start:
                ahead = self._split_ahead(start, end, *ahead)
            if ahead is not None and len(ahead[0]) == end - start:
                self._crcs[start] = (end, ahead[1])
                return ahead
            loading = self._loading
            if loading is None or not loading[0] <= start < loading[1]:
                break
            await loading[2].wait()  # the batch in flight holds this piece, or shows it does not
        pieces = [(start, end)]
        limit = min(self.size, start + _READ_AHEAD)
        while pieces[-1][1] < limit:
            begin = pieces[-1][1]
            pieces.append((begin, min(begin + self._frame_size - begin % self._frame_size, limit)))
        loading = (start, pieces[-1][1], trio.Event())
        self._loading = loading
        try:
            batch = await trio.to_thread.run_sync(self._read_all, pieces)
        finally:
            if self._loading is loading:
                self._loading = None
            loading[2].set()
        self._ahead = dict(zip((begin for begin, _ in pieces[1:]), batch[1:], strict=True))
        self._crcs[start] = (end, batch[0][1])
        return batch[0]

    def _split_ahead(
        self, start: int, end: int, data: bytes | memoryview, crc: int
    ) -> tuple[bytes, int]:
        """A piece smaller than the frame read ahead for it (pieces shrink on a link that
        cuts connections): its bytes and CRC32C, and the rest kept, uncopied, for the next
        piece, so the file is not read again for each one. Only the piece is checksummed:
        the rest's CRC32C is the whole one with the piece's taken out (CRC32C is linear)."""
        view = memoryview(data)
        head, rest = bytes(view[: end - start]), view[end - start :]
        head_crc = google_crc32c.value(head)
        self._ahead[end] = (rest, crc32c_of_suffix(crc, head_crc, len(rest)))
        return head, head_crc

    def _read_all(self, pieces: list[tuple[int, int]]) -> list[tuple[bytes, int]]:
        """In a worker thread: each piece read into a bytes object of its own, with its CRC."""
        batch = []
        for start, end in pieces:
            data = os.pread(self._fd, end - start, self._base + start)
            if len(data) != end - start:
                raise UploadError(
                    None,
                    f"file shrank while uploading: short read at offset {self._base + start}",
                )
            batch.append((data, google_crc32c.value(data)))
        return batch

    def release(self, committed: int) -> None:
        """Bytes below ``committed`` are in GCS and never sent again: fold their CRCs."""
        self._fold(committed)

    def _fold(self, limit: int) -> None:
        crcs = self._crcs
        while (entry := crcs.get(self._folded)) is not None and entry[0] <= limit:
            del crcs[self._folded]
            end, crc = entry
            self._folded_crc = crc32c_combine(self._folded_crc, crc, end - self._folded)
            self._folded = end
        for start in [start for start in crcs if start < self._folded]:
            del crcs[start]  # superseded: those bytes were resent in other pieces

    def close(self) -> None:
        os.close(self._fd)

    async def crc32c(self) -> int:
        """The file's CRC32C, once every byte has been sent; UploadError if it changed."""
        if file_version(self._fd) != self._version:
            raise UploadError(None, "the file changed while it was being uploaded")
        self._fold(self.size)
        if self._folded == self.size:
            return self._folded_crc

        return await trio.to_thread.run_sync(file_crc32c, self._fd, self._base, self.size)


def file_crc32c(fd: int, start: int, size: int) -> int:
    """The CRC32C of ``size`` bytes of the file at ``start`` (blocking: a worker thread's
    job); UploadError if the file ends before them."""
    crc, offset = 0, 0
    while offset < size:
        at = start + offset
        block = os.pread(fd, min(_READ_AHEAD, size - offset), at)
        if not block:
            raise UploadError(None, f"file shrank while uploading: EOF at offset {at}")
        crc = google_crc32c.extend(crc, block)
        offset += len(block)
    return crc


def file_version(fd: int) -> tuple[int, int]:
    status = os.fstat(fd)
    return status.st_size, status.st_mtime_ns


class StreamSource:
    """The uncommitted tail of a stream, in frame-aligned blocks.

    Incoming chunks are coalesced into blocks of exactly ``block_size`` bytes, so a frame is
    a view of one block (no copy) and a resend after a fault finds its bytes again. Blocks
    are dropped as soon as the proxy reports them committed.
    """

    def __init__(self, block_size: int) -> None:
        self._block_size = block_size
        #: start -> (block, its CRC32C)
        self._blocks: dict[int, tuple[bytes, int]] = {}
        self._pending = bytearray()
        #: the CRC32C of the blocks so far, combined from theirs (each byte is read once)
        self._crc = 0
        self.written = 0
        #: bytes that are in blocks, hence sendable
        self.available = 0
        self.total: int | None = None
        #: blocks below this were dropped (committed): a restart from 0 cannot send them
        self._released_below = 0

    @property
    def holds_everything(self) -> bool:
        return self._released_below == 0

    def append(self, data: bytes) -> None:
        self.written += len(data)
        size = self._block_size
        if len(data) == size and not self._pending and type(data) is bytes:
            self._emit(data)  # immutable and exactly one block: kept as it is, no copy
            return
        view = memoryview(data)
        if self._pending:
            room = size - len(self._pending)
            self._pending += view[:room]
            view = view[room:]
            if len(self._pending) < size:
                return
            self._emit(bytes(self._pending))
            self._pending.clear()
        while len(view) >= size:  # one copy per byte: the caller may reuse its buffer
            self._emit(bytes(view[:size]))
            view = view[size:]
        self._pending += view

    def finish(self) -> None:
        if self._pending:
            self._emit(bytes(self._pending))
            self._pending.clear()
        self.total = self.written

    def _emit(self, block: bytes) -> None:
        crc = google_crc32c.value(block)
        self._crc = crc32c_combine(self._crc, crc, len(block))
        self._blocks[self.available] = (block, crc)
        self.available += len(block)

    async def read(self, start: int, end: int) -> tuple[bytes | memoryview, int | None]:
        """The bytes of ``[start, end)``, with their CRC32C if they are a whole block."""
        base = start - start % self._block_size
        entry = self._blocks.get(base)
        if entry is None or end > base + len(entry[0]):
            # pieces are cut on block boundaries, so this is a bookkeeping bug, not bad input
            raise AssertionError(f"bytes [{start}, {end}) are no longer buffered")
        block, crc = entry
        if start == base and end == base + len(block):
            return block, crc
        return memoryview(block)[start - base : end - base], None

    def release(self, committed: int) -> None:
        for base in [b for b, (block, _) in self._blocks.items() if b + len(block) <= committed]:
            del self._blocks[base]
            self._released_below = max(self._released_below, base + self._block_size)

    def close(self) -> None:
        self._blocks.clear()

    async def crc32c(self) -> int:
        return self._crc
