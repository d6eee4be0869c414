"""Staged writes: a payload that streams in, and becomes uploadable only once verified."""

from __future__ import annotations

from collections.abc import Callable

from .buffer import as_byte_view, can_join
from .errors import WriterClosedError

__all__ = ["PendingWrite"]


class PendingWrite:
    """A staged write of ``[offset, offset + length)``: fed piece by piece, then committed.

    Fed views are held but not uploadable until :meth:`commit` (first copy wins there, as
    for :meth:`~reliablewriter.ReliableWriter.write_at`); :meth:`discard` drops them. Used
    as a context manager, it discards unless committed. Create it with
    :meth:`~reliablewriter.ReliableWriter.begin_write`, which hands it ``accept`` (insert
    views into the writer's buffer) and ``check_usable`` (raise if the writer has failed or
    closed).
    """

    def __init__(
        self,
        offset: int,
        length: int,
        *,
        accept: Callable[[int, list[memoryview], int | None], int],
        check_usable: Callable[[], None],
    ) -> None:
        self._accept = accept
        self._check_usable = check_usable
        self.offset = offset
        self.length = length
        self.fed = 0
        self._views: list[memoryview] = []
        self._open = True

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append the next bytes of the write (kept as a view, not copied).

        Small pieces (a payload trickling in a few bytes per receive) are joined by
        copying, as the buffer joins them, so a staged write holds few views however
        finely it arrives.
        """
        self._check_open()
        view = as_byte_view(data)
        if self.fed + len(view) > self.length:
            raise ValueError(f"feeding {len(view)} bytes overruns the staged length {self.length}")
        if self._views and can_join(len(self._views[-1]), len(view)):
            self._views[-1] = memoryview(b"".join((self._views[-1], view)))
        else:
            self._views.append(view)
        self.fed += len(view)

    def commit(self, crc32c: int | None = None) -> int:
        """Make the bytes uploadable; returns how many were new. Needs all ``length`` fed.

        ``crc32c`` is the caller's verified CRC32C of the whole payload (a frame's,
        checked on arrival), so the object's CRC32C is combined from it instead of reading
        the bytes again (see :meth:`~reliablewriter.ReliableWriter.write_at`).
        """
        self._check_open()
        if self.fed != self.length:
            raise ValueError(f"staged write has {self.fed} of {self.length} bytes")
        self._open = False
        views, self._views = self._views, []
        return self._accept(self.offset, views, crc32c)

    def discard(self) -> None:
        """Drop the fed bytes; nothing of them reaches GCS. Idempotent."""
        self._open = False
        self._views = []

    def _check_open(self) -> None:
        if not self._open:
            raise WriterClosedError("the staged write is already committed or discarded")
        self._check_usable()

    def __enter__(self) -> PendingWrite:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()
