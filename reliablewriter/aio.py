"""``AsyncWriter``: :class:`~reliablewriter.ReliableWriter` for asyncio services.

How: each writer's trio event loop runs in a thread of its own, and every call is
started there as a trio task whose outcome settles an asyncio future on the caller's
loop. The asyncio side awaits that future, so the loop never blocks.

Why a thread rather than trio's guest mode or anyio:

* Guest mode (``trio.lowlevel.start_guest_run``) allows one trio run per thread, so all
  writers on a loop would have to share one guest run whose life is tied to the loop's;
  ``asyncio.run`` closes its loop after cancelling tasks, and a guest run still winding
  down (a worker waiting out an HTTP timeout) would then be cut off mid-request. A
  thread's trio run ends on its own terms whatever the host loop does.
* anyio would mean rewriting the writer (it uses trio's events, cancel scopes, capacity
  limiters and ``MockClock`` in its tests); the thread reuses it unchanged, so
  semantics, errors and counters are those of the trio writer by construction: the same
  object does the work.
* The cost is one thread hop per call (tens of microseconds), small against the HTTP
  the writer does in worker threads anyway.

Cancellation: cancelling an asyncio task that awaits a call cancels the trio task that
runs it, waits (briefly: trio delivers cancellation at its next checkpoint) until it has
ended, then raises :class:`asyncio.CancelledError`. So the writer is left exactly as a
cancelled trio caller leaves it: ``write_at`` may have taken a prefix of the data
(writing it all again is safe); ``complete`` keeps finalizing in the writer's worker,
and a later ``complete()`` returns its result; ``abort`` still marks the writer aborted
and stops its worker, only the DELETE may not have been sent. Leaving the
``async with`` block without ``complete`` or ``abort`` (an exception included) keeps the
GCS session resumable, as :func:`~reliablewriter.open_writer` does;
:attr:`AsyncWriter.resume_handle` says how to continue it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Generic, TypeVar

import trio
from google.cloud import storage  # type: ignore[import-untyped]

from .buffer import as_byte_view
from .errors import WriterClosedError
from .handle import ResumeHandle
from .results import ObjectInfo, WriterStats
from .settings import WriterSettings
from .writer import ReliableWriter, open_writer

__all__ = ["AsyncWriter", "open_async_writer"]

_T = TypeVar("_T")


class _Outcome(Generic[_T]):
    """What a trio-side call ended with: a value, an exception, or cancellation."""

    __slots__ = ("cancelled", "error", "value")

    def __init__(self) -> None:
        self.value: _T | None = None
        self.error: BaseException | None = None
        self.cancelled = False


class AsyncWriter:
    """One upload, awaited from asyncio. Create it with :func:`open_async_writer`.

    Members mirror :class:`~reliablewriter.ReliableWriter`; :meth:`write` appends at
    :attr:`position` for sequential callers. Like the trio writer, writes keep a view of
    the caller's data: a mutable buffer must not change until it is committed (``bytes``
    are always safe).
    """

    def __init__(
        self,
        writer: ReliableWriter,
        host: _TrioHost,
        token: trio.lowlevel.TrioToken,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._writer = writer
        self._host = host
        self._token = token
        self._loop = loop
        self.position = 0

    # --- what callers can read (the writer's own values) ---------------------------

    @property
    def name(self) -> str:
        return self._writer.name

    @property
    def session_uri(self) -> str:
        """The session's URI. A secret: whoever has it can write the object."""
        return self._writer.session_uri

    @property
    def committed_offset(self) -> int:
        return self._writer.committed_offset

    @property
    def window_end(self) -> int:
        return self._writer.window_end

    @property
    def result(self) -> ObjectInfo | None:
        return self._writer.result

    @property
    def stats(self) -> WriterStats:
        """The trio writer's counters, read on its own thread while it runs."""
        if self._host.final_stats is not None:
            return self._host.final_stats
        try:
            return trio.from_thread.run_sync(lambda: self._writer.stats, trio_token=self._token)
        except trio.RunFinishedError:  # the run is over: nothing changes the counters now
            return self._writer.stats

    @property
    def resume_handle(self) -> ResumeHandle:
        """How another process continues this upload (see :class:`ResumeHandle`)."""
        return ResumeHandle.of(self._host.bucket_name, self._writer)

    # --- calls ------------------------------------------------------------------------

    async def write_at(
        self, offset: int, data: bytes | bytearray | memoryview, crc32c: int | None = None
    ) -> None:
        """:meth:`ReliableWriter.write_at`: hold ``data`` as the bytes at ``offset``."""
        await self._call(self._writer.write_at, offset, data, crc32c)

    async def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append ``data`` at :attr:`position`; returns the byte count.

        If cancelled, :attr:`position` does not move: writing the same data again is safe
        (bytes already taken are skipped).
        """
        view = as_byte_view(data)
        await self._call(self._writer.write_at, self.position, view, None)
        self.position += len(view)
        return len(view)

    async def wait_committed(self, offset: int) -> None:
        """:meth:`ReliableWriter.wait_committed`."""
        await self._call(self._writer.wait_committed, offset)

    async def complete(
        self, total_size: int | None = None, crc32c: int | str | None = None
    ) -> ObjectInfo:
        """:meth:`ReliableWriter.complete`: finalize the object; idempotent."""
        return await self._call(self._writer.complete, total_size, crc32c)

    async def abort(self) -> None:
        """:meth:`ReliableWriter.abort`: cancel the session and release every buffer."""
        await self._call(self._writer.abort)

    async def _call(self, function: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        if self._host.stopping:
            raise WriterClosedError("the writer is closed", name=self.name)
        settled: asyncio.Future[None] = self._loop.create_future()
        outcome: _Outcome[_T] = _Outcome()
        scope = trio.CancelScope()

        async def run() -> None:
            with scope:
                try:
                    outcome.value = await function(*args)
                except trio.Cancelled:
                    outcome.cancelled = True
                    raise
                except BaseException as exc:  # handed to the asyncio caller
                    outcome.error = exc
            if scope.cancelled_caught:
                outcome.cancelled = True
            _settle_soon(self._loop, settled)

        try:
            self._token.run_sync_soon(trio.lowlevel.spawn_system_task, run)
        except trio.RunFinishedError:
            raise WriterClosedError("the writer is closed", name=self.name) from None
        try:
            await asyncio.shield(settled)
        except asyncio.CancelledError:
            # Cancel the trio task and wait until it has ended, so the writer's state is
            # that of a cancelled trio caller before the asyncio caller sees the cancel.
            self._token.run_sync_soon(scope.cancel)
            await _wait_out(settled)
            raise
        if outcome.error is not None:
            raise outcome.error
        return outcome.value  # type: ignore[return-value]


def _settle_soon(loop: asyncio.AbstractEventLoop, settled: asyncio.Future[None]) -> None:
    """From the trio thread: mark ``settled`` done on its loop, if the loop still runs."""

    def settle() -> None:
        if not settled.done():
            settled.set_result(None)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
        loop.call_soon_threadsafe(settle)


async def _wait_out(settled: asyncio.Future[None]) -> None:
    """Await ``settled`` through further cancellations (trio ends the call promptly)."""
    for _ in range(1000):
        try:
            await asyncio.shield(settled)
            return
        except asyncio.CancelledError:
            if settled.done():
                return


@contextlib.asynccontextmanager
async def open_async_writer(
    bucket: storage.Bucket,
    name: str,
    settings: WriterSettings | None = None,
    **options: Any,
) -> AsyncIterator[AsyncWriter]:
    """:func:`~reliablewriter.open_writer` for asyncio; keyword options are the same.

    The session exists when this yields. Leaving the block without ``complete`` or
    ``abort`` stops the writer and keeps the session resumable (see
    :attr:`AsyncWriter.resume_handle`).
    """
    loop = asyncio.get_running_loop()
    started: asyncio.Future[AsyncWriter] = loop.create_future()
    ended: asyncio.Future[None] = loop.create_future()
    host = _TrioHost(bucket, name, settings, options, loop, started, ended)
    thread = threading.Thread(target=host.run, name=f"reliablewriter {name}", daemon=True)
    thread.start()
    try:
        writer = await asyncio.shield(started)
    except BaseException:
        # The open failed, or the opener was cancelled: end the run before going on.
        host.stop()
        await _wait_out(ended)
        thread.join()
        raise
    try:
        yield writer
    finally:
        host.stop()
        await _wait_out(ended)
        thread.join()


class _TrioHost:
    """The writer's thread: a trio run holding :func:`open_writer` open until stopped."""

    def __init__(
        self,
        bucket: storage.Bucket,
        name: str,
        settings: WriterSettings | None,
        options: Mapping[str, Any],
        loop: asyncio.AbstractEventLoop,
        started: asyncio.Future[AsyncWriter],
        ended: asyncio.Future[None],
    ) -> None:
        self._bucket = bucket
        self._name = name
        self._settings = settings
        self._options = options
        self._loop = loop
        self._started = started
        self._ended = ended
        self._lock = threading.Lock()
        #: Set once the writer is being closed: no call is started after it.
        self.stopping = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._done: trio.Event | None = None
        #: The writer's last counters, set once its run has closed it.
        self.final_stats: WriterStats | None = None

    @property
    def bucket_name(self) -> str:
        return str(self._bucket.name)

    def run(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # an open that failed; reported to the opener
            self._report(self._started, exc)
        finally:
            self._report(self._ended, None)

    def stop(self) -> None:
        """From any thread: end the trio run (the writer closes as open_writer's block)."""
        with self._lock:
            self.stopping = True
            token, done = self._token, self._done
        if token is not None and done is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

    async def _serve(self) -> None:
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()
        with self._lock:
            self._token = token
            self._done = done
            if self.stopping:
                return
        opened: list[ReliableWriter] = []
        try:
            async with open_writer(
                self._bucket, self._name, self._settings, **self._options
            ) as writer:
                opened.append(writer)
                self._report(self._started, AsyncWriter(writer, self, token, self._loop))
                await done.wait()
        finally:
            if opened:
                self.final_stats = opened[0].stats

    def _report(self, future: asyncio.Future[Any], outcome: object) -> None:
        def settle() -> None:
            if future.done():
                return
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(settle)
