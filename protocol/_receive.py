"""The receive buffer: bytes given to `receive_data` and not yet decoded."""

from __future__ import annotations

from collections import deque

__all__ = ["ReceiveBuffer"]


class ReceiveBuffer:
    """Keeps the caller's buffers as they are, so payload can be handed out without copying.

    Headers and control bodies (small, bounded by the frame size limit) are copied out with
    `take`; WriteAt data leaves through `take_piece`, which never copies.
    """

    __slots__ = ("_chunks", "_size", "_start")

    def __init__(self) -> None:
        self._chunks: deque[bytes | memoryview] = deque()
        self._start = 0  # how much of _chunks[0] is already consumed
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, data: bytes | memoryview) -> None:
        self._chunks.append(data)
        self._size += len(data)

    def take(self, size: int) -> bytes:
        """Remove and return exactly `size` bytes as one bytes object (caller checked len)."""
        if not size:
            return b""
        chunks = self._chunks
        first = chunks[0]
        start = self._start
        end = start + size
        if end < len(first):
            self._start = end
            self._size -= size
            return bytes(first[start:end])
        parts = []
        while size:
            first = chunks[0]
            end = min(len(first), start + size)
            parts.append(first[start:end])
            size -= end - start
            self._size -= end - start
            if end == len(first):
                chunks.popleft()
                start = 0
            else:
                start = end
        self._start = start
        return b"".join(parts)

    def take_piece(self, limit: int) -> bytes | memoryview | None:
        """Remove and return up to `limit` bytes from the oldest buffer, without copying.

        A whole buffer comes back as the object that was appended; part of one as a memoryview.
        Returns None when the buffer is empty.
        """
        if not self._size:
            return None
        first = self._chunks[0]
        start = self._start
        available = len(first) - start
        if start == 0 and available <= limit:
            self._chunks.popleft()
            self._size -= available
            return first
        size = min(available, limit)
        piece = memoryview(first)[start : start + size]
        self._size -= size
        if size == available:
            self._chunks.popleft()
            self._start = 0
        else:
            self._start = start + size
        return piece
