"""A blocking, file-like facade over :class:`~reliablewriter.ReliableWriter`.

For code that is not async: a dedicated thread runs a trio event loop that owns the
writer, and each call hops over with :func:`trio.from_thread.run`. Writes have file
semantics: ``bytes`` are held without copying, and a mutable buffer (a reused
``bytearray``) is copied once, so the caller may reuse it as soon as ``write`` returns.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import trio
from google.cloud import storage  # type: ignore[import-untyped]

from .buffer import stable_view
from .errors import WriterClosedError
from .results import ObjectInfo, WriterStats
from .settings import WriterSettings
from .writer import ReliableWriter, open_writer

__all__ = ["BlockingWriter", "open_blocking_writer"]

_T = TypeVar("_T")


class BlockingWriter:
    """Sequential writes to one object; :meth:`close` finalizes it.

    Leaving a ``with`` block because of an exception does not finalize the object; like
    the async writer, the session stays resumable unless :meth:`abort` is called.
    """

    def __init__(
        self,
        bucket: storage.Bucket,
        name: str,
        settings: WriterSettings | None = None,
        **options: Any,
    ) -> None:
        self.position = 0
        self.result: ObjectInfo | None = None
        self._writer: ReliableWriter | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._done: trio.Event | None = None
        ready: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=trio.run,
            args=(self._serve, bucket, name, settings, options, ready),
            name=f"reliablewriter {name}",
            daemon=True,
        )
        self._thread.start()
        error = ready.get()
        if error is not None:
            self._thread.join()
            raise error

    async def _serve(
        self,
        bucket: storage.Bucket,
        name: str,
        settings: WriterSettings | None,
        options: Mapping[str, Any],
        ready: queue.SimpleQueue[BaseException | None],
    ) -> None:
        started = False
        try:
            async with open_writer(bucket, name, settings, **options) as writer:
                self._writer = writer
                self._token = trio.lowlevel.current_trio_token()
                self._done = trio.Event()
                started = True
                ready.put(None)
                await self._done.wait()
        except BaseException as exc:
            if started:
                raise
            ready.put(exc)

    def _call(self, function: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        if self._token is None or self._done is None or self._done.is_set():
            raise WriterClosedError("the writer is closed")
        return trio.from_thread.run(function, *args, trio_token=self._token)

    @property
    def writer(self) -> ReliableWriter:
        if self._writer is None:
            raise WriterClosedError("the writer is closed")
        return self._writer

    @property
    def stats(self) -> WriterStats:
        return self.writer.stats

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append ``data``; blocks while the buffer is full. Returns the byte count.

        ``bytes`` are held as they are; anything mutable is copied first (see
        :func:`~reliablewriter.buffer.stable_view`).
        """
        view = stable_view(data)
        self._call(self.writer.write_at, self.position, view)
        self.position += len(view)
        return len(view)

    def write_many(self, pieces: Sequence[bytes | bytearray | memoryview]) -> int:
        """Append ``pieces`` in order with one hop to the writer's thread (for small writes).

        Each piece is held or copied as by :meth:`write`. Returns the byte count.
        """
        views = [stable_view(piece) for piece in pieces]
        return self._call(self._write_views, views)

    async def _write_views(self, views: list[memoryview]) -> int:
        writer = self.writer
        total = sum(len(view) for view in views)
        if total <= writer.window_end - writer.committed_offset:
            # Within one window: one staged write, so the pieces are one fragment and one
            # wake-up of the worker instead of one each.
            end = self.position + total
            await writer.wait_for_window(end)
            staged = writer.begin_write(self.position, total)
            for view in views:
                staged.feed(view)
            staged.commit()
            self.position = end
            return total
        for view in views:
            await writer.write_at(self.position, view)
            # Moved per piece, so a failure midway leaves position after what was taken.
            self.position += len(view)
        return total

    def close(self, crc32c: int | str | None = None) -> ObjectInfo:
        """Finalize the object at the current position; idempotent.

        If finalizing fails, the writer stops anyway (its session stays resumable) and the
        error is raised.
        """
        if self.result is None:
            try:
                self.result = self._call(self.writer.complete, self.position, crc32c)
            finally:
                self._shut_down()
        return self.result

    def abort(self) -> None:
        """Cancel the upload session and stop."""
        if self.result is None and self._thread.is_alive():
            try:
                self._call(self.writer.abort)
            finally:
                self._shut_down()

    def detach(self) -> None:
        """Stop without finalizing or cancelling: the session stays resumable."""
        if self._thread.is_alive():
            self._shut_down()

    def _shut_down(self) -> None:
        if self._done is not None and self._token is not None and not self._done.is_set():
            trio.from_thread.run_sync(self._done.set, trio_token=self._token)
        self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.detach()


def open_blocking_writer(
    bucket: storage.Bucket,
    name: str,
    settings: WriterSettings | None = None,
    **options: Any,
) -> BlockingWriter:
    """:func:`~reliablewriter.open_writer` for blocking code; keyword options are the same."""
    return BlockingWriter(bucket, name, settings, **options)
