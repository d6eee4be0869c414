"""``ReliableWriter``: writes at any offset in, one byte-exact GCS object out.

Callers hand in bytes-like objects at offsets, in any order and with overlaps; the
writer keeps them as views in a :class:`~reliablewriter.buffer.ScatterBuffer` and one
worker task (started by :func:`open_writer`) streams the gap-free head of that buffer
into a resumable session, chunk by chunk, retrying under its
:class:`~reliablewriter.RetryPolicy`. Blocking HTTP runs in worker threads; the protocol
decisions live in :mod:`reliablewriter.resumable`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from functools import partial
from typing import Any, TypeVar

import trio
from google.cloud import storage  # type: ignore[import-untyped]

from .buffer import KnownCrc, ScatterBuffer, as_byte_view
from .checksum import StreamChecksum, crc32c_from_b64, normalize_crc32c
from .errors import (
    ChecksumMismatchError,
    IncompleteObjectError,
    NonRetryableHTTPError,
    RetriesExhaustedError,
    SessionLostError,
    TooFragmentedError,
    UnexpectedResponseError,
    WindowExceededError,
    WriterAbortedError,
    WriterClosedError,
    WriterError,
)
from .http_posts import WholeObjectPoster
from .one_request import ObjectRequest, upload_in_one_request
from .results import ObjectInfo, WriterStats
from .resumable import (
    ChunkPlan,
    Finished,
    HttpResponse,
    Outcome,
    Persisted,
    ResumableState,
    RetryLater,
    SessionGone,
    plan_chunk,
)
from .settings import ChecksumMode, WriterSettings
from .staged import PendingWrite
from .transport import ChunkBody, GcsTransport, SessionOptions, TransportFailure

__all__ = ["ReliableWriter", "open_writer"]

logger = logging.getLogger("reliablewriter")

_T = TypeVar("_T")

_STATUS_QUERY = {"Content-Range": "bytes */*"}


class ReliableWriter:
    """One object being uploaded. Create it with :func:`open_writer`.

    Offsets are absolute object offsets. ``window_end`` (``committed_offset +
    buffer_limit``) is how far writes may reach without waiting; the window always begins
    at the committed offset, so a writer that fills it from there can never deadlock.
    """

    def __init__(
        self,
        blob: storage.Blob,
        settings: WriterSettings,
        *,
        options: SessionOptions,
        session_uri: str | None,
        progress: Callable[[WriterStats], None] | None,
        restart_if_nothing_committed: bool = False,
        defer_session: bool = False,
        maybe_stored_before: bool = False,
        poster: WholeObjectPoster | None = None,
    ) -> None:
        self._blob = blob
        self._maybe_stored_before = maybe_stored_before
        self._poster = poster
        # A session is started only when a chunk is due before the object is complete; an
        # object whose expected size is below the smallest chunk never needs one.
        self._deferred = (
            defer_session
            and session_uri is None
            and options.expected_size is not None
            and options.expected_size < settings.min_chunk_size
        )
        self._restart_if_nothing_committed = restart_if_nothing_committed
        self._settings = settings
        self._options = options
        self._session_uri = session_uri
        self._progress = progress
        self._transport = GcsTransport(
            blob,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.progress_timeout,
        )
        self._state = ResumableState(
            name=blob.name, policy=settings.retry, resumed=session_uri is not None
        )
        self._buffer = ScatterBuffer(max_fragments=settings.fragment_limit)
        self._checksum = StreamChecksum(settings.checksum)
        self._rng = random.Random()
        # Set from the trio side, read by the worker thread between body slices.
        self._stop_sending = threading.Event()
        self._thread_limiter = trio.CapacityLimiter(1)
        self._changed = trio.Event()
        # What the worker waits on: every change, and new bytes that may make a chunk (only
        # the worker cares for those, so the other waiters do not wake for each write).
        self._sendable = trio.Event()
        self._worker_scope = trio.CancelScope()
        self._worker_done = trio.Event()
        self._closed = trio.Event()
        self._total: int | None = None
        self._expected_crc32c: str | None = None
        self._result: ObjectInfo | None = None
        self._failure: WriterError | None = None
        self._bytes_sent = 0
        self._chunks = 0
        self._retries: Counter[str] = Counter()
        self._restarts = 0
        # Whether a final chunk went out: a lost session may then have left the object.
        self._final_sent = False
        # Failed attempts and the time of the last progress, for the retry policy.
        self._attempts = 0
        self._last_progress = trio.current_time()

    # --- what callers can read ------------------------------------------------------

    @property
    def name(self) -> str:
        return str(self._blob.name)

    @property
    def session_uri(self) -> str:
        """The resumable session's URI. A secret: whoever has it can write the object."""
        if self._session_uri is None:
            raise WriterClosedError("no session yet", name=self.name)
        return self._session_uri

    @property
    def committed_offset(self) -> int:
        """Bytes GCS has acknowledged; they are durable and released from memory."""
        return self._state.committed

    @property
    def window_end(self) -> int:
        """Writes ending at or before this offset are taken without waiting."""
        return self._state.committed + self._settings.buffer_limit

    @property
    def result(self) -> ObjectInfo | None:
        """The finished object's metadata, once the upload is complete (else None)."""
        return self._result

    @property
    def buffered_cost(self) -> int:
        """Memory the buffer is charged for now: payload held plus each piece's overhead.

        At most :attr:`WriterSettings.max_buffered_cost`; what a caller sharing one memory
        budget between writers charges this one (it changes with every write and release).
        """
        return self._buffer.cost

    @property
    def fragment_count(self) -> int:
        """Separate pieces (views) the buffer holds now: ``stats.fragments``, without the
        rest of the stats (a caller checking its pieces' overhead on every write)."""
        return self._buffer.fragment_count

    @property
    def stats(self) -> WriterStats:
        return WriterStats(
            bytes_sent=self._bytes_sent,
            bytes_acked=self._state.committed,
            chunks=self._chunks,
            retries=sum(self._retries.values()),
            retries_by_cause=dict(self._retries),
            session_restarts=self._restarts,
            held_bytes=self._buffer.held_bytes,
            fragments=self._buffer.fragment_count,
            buffered_cost=self._buffer.cost,
            bytes_checksummed=self._checksum.bytes_read,
        )

    def received_ranges(self) -> tuple[tuple[int, int], ...]:
        """Half-open byte ranges held or committed, merged, in order."""
        ranges: list[tuple[int, int]] = []
        if self._state.committed:
            ranges.append((0, self._state.committed))
        for start, end in self._buffer.ranges():
            # Held bytes may reach below the committed offset while a chunk's release is
            # pending, so merge overlaps as well as neighbours.
            if ranges and start <= ranges[-1][1]:
                ranges[-1] = (ranges[-1][0], max(ranges[-1][1], end))
            else:
                ranges.append((start, end))
        return tuple(ranges)

    # --- writing --------------------------------------------------------------------

    async def write_at(
        self, offset: int, data: bytes | bytearray | memoryview, crc32c: int | None = None
    ) -> None:
        """Hold ``data`` as the bytes at ``offset``; a view is kept, nothing is copied.

        Waits while the range reaches beyond :attr:`window_end`, taking the part within
        the window at once. Bytes already held or committed are skipped (the first copy
        wins). The caller must not modify ``data`` until GCS has acknowledged it (see
        :meth:`wait_committed`). If cancelled while waiting, a prefix of ``data`` may
        have been taken; sending the whole write again is always safe.

        ``crc32c`` is the caller's CRC32C of ``data``, already verified (a frame checked
        on arrival): the object's CRC32C is then combined from it instead of reading the
        bytes again. A wrong one cannot make a wrong object: GCS checks the final CRC32C
        and refuses the upload. It is used only if ``data`` is taken whole and all new
        (not split by the window, not overlapping held bytes), and only in
        ``ChecksumMode.CRC32C``; otherwise the bytes are checksummed as before.
        """
        if offset < 0:
            raise ValueError(f"offset must not be negative, got {offset}")
        await trio.lowlevel.checkpoint()
        view = as_byte_view(data)
        while True:
            self._check_usable()
            window_end = self.window_end
            if offset < window_end:
                taken = min(len(view), window_end - offset)
                whole = taken == len(view)
                self._accept(
                    offset, [view[:taken] if not whole else view], crc32c if whole else None
                )
                view, offset = view[taken:], offset + taken
                crc32c = None
            if not view:
                return
            await self._wait_for_change()

    def begin_write(self, offset: int, length: int) -> PendingWrite:
        """Stage a write of ``length`` bytes at ``offset`` whose payload is still arriving.

        The range must lie within the window now (see :meth:`wait_for_window`); raises
        :class:`~reliablewriter.WindowExceededError` otherwise.
        """
        if offset < 0 or length < 0:
            raise ValueError("offset and length must not be negative")
        self._check_usable()
        if offset + length > self.window_end:
            raise WindowExceededError(
                f"write [{offset}, {offset + length}) reaches past the window end "
                f"{self.window_end}",
                name=self.name,
                offset=self.committed_offset,
            )
        return PendingWrite(offset, length, accept=self._accept, check_usable=self._check_usable)

    async def wait_for_window(self, end: int) -> None:
        """Wait until :attr:`window_end` reaches ``end``."""
        await trio.lowlevel.checkpoint()
        while self.window_end < end:
            self._check_usable()
            await self._wait_for_change()

    async def wait_committed(self, offset: int) -> None:
        """Wait until GCS has acknowledged every byte below ``offset``.

        Raises the writer's failure if it fails first; once the object is complete and
        ``offset`` lies beyond it, waits until the writer is closed and raises
        :class:`~reliablewriter.WriterClosedError`.
        """
        await trio.lowlevel.checkpoint()
        while self._state.committed < offset:
            if self._failure is not None:
                raise self._failure
            if self._result is not None:
                await self._closed.wait()
                raise WriterClosedError(
                    f"the object is complete at {self._state.committed} bytes", name=self.name
                )
            if self._closed.is_set():
                raise WriterClosedError("the writer is closed", name=self.name)
            await self._wait_for_change()

    # --- finishing ------------------------------------------------------------------

    async def complete(
        self, total_size: int | None = None, crc32c: int | str | None = None
    ) -> ObjectInfo:
        """Finalize the object once everything is in GCS; return its metadata.

        ``total_size`` defaults to the end of the highest byte held. Every byte below it
        must have been written (else :class:`~reliablewriter.IncompleteObjectError`, and
        the writer carries on). ``crc32c`` (an int, or GCS's base64 form) is the caller's
        expectation of the whole object: a mismatch fails the upload before it is
        finalized. Idempotent: a repeated call returns the same result. Cancelling the
        caller does not stop the finalization; a later call picks up its result.
        """
        await trio.lowlevel.checkpoint()
        if self._result is not None:
            return self._check_result(self._result, total_size, crc32c)
        self._check_usable()
        total = self._buffer.end if total_size is None else total_size
        if total < self._state.committed or self._buffer.end > total:
            raise ValueError(
                f"total size {total} disagrees with the bytes received "
                f"(committed {self._state.committed}, held up to {self._buffer.end})"
            )
        if self._options.expected_size is not None and total != self._options.expected_size:
            raise ValueError(
                f"total size {total} is not the expected {self._options.expected_size}"
            )
        if self._total is not None and self._total != total:
            raise ValueError(f"already completing with total size {self._total}, not {total}")
        missing = self._buffer.missing(total)
        if missing:
            raise IncompleteObjectError(
                missing=tuple(missing), name=self.name, offset=self._state.committed
            )
        self._total = total
        # Bytes written past the total from now on can never be the object's: not held.
        self._buffer.limit_end(total)
        if crc32c is not None:
            self._expected_crc32c = normalize_crc32c(crc32c)
        self._notify()
        return await self._wait_for_result()

    def _check_result(
        self, info: ObjectInfo, total_size: int | None, crc32c: int | str | None
    ) -> ObjectInfo:
        """A repeated ``complete()`` must describe the object that was finalized."""
        if total_size is not None and total_size != info.size:
            raise ValueError(f"the object is complete with {info.size} bytes, not {total_size}")
        if crc32c is not None and info.crc32c is not None:
            expected = normalize_crc32c(crc32c)
            if expected != info.crc32c:
                raise ChecksumMismatchError(
                    "the finished object does not match the caller's CRC32C",
                    expected=expected,
                    actual=info.crc32c,
                    name=self.name,
                    offset=self._state.committed,
                )
        return info

    async def _wait_for_result(self) -> ObjectInfo:
        while True:
            if self._result is not None:
                return self._result
            if self._failure is not None:
                raise self._failure
            if self._worker_done.is_set():
                raise WriterClosedError("the writer closed before completing", name=self.name)
            await self._wait_for_change()

    async def abort(self) -> None:
        """Cancel the upload: stop the worker, DELETE the session, release every buffer.

        Returns only after the worker task (and any thread it was waiting on) has exited
        and no view of caller data is held any more. A completed object is left alone.
        If the caller is cancelled partway, the writer is still marked aborted and its
        worker still stopped; only the DELETE may not have been sent.
        """
        if self._result is not None:
            await trio.lowlevel.checkpoint()
            return
        self._fail(WriterAbortedError("the upload was aborted", name=self.name))
        await self._stop_worker()
        if self._session_uri is not None:
            with contextlib.suppress(TransportFailure):
                await self._in_thread(self._transport.delete, self._session_uri)

    async def check_precondition(self) -> None:
        """Check ``if_generation_match`` against the live object with one metadata request.

        For an upload that is doomed, fail before its bytes are sent: GCS (and servers
        such as storage-testbench that check preconditions only at finalization) would
        otherwise take every byte and refuse the object at the end. The check at
        finalization stays; this one only answers earlier. Raises
        :class:`~reliablewriter.NonRetryableHTTPError` with status 412 when the live
        generation (0: no object) is not the pinned one; does nothing without a pin.
        Transient failures of the request are retried under the writer's policy.
        """
        expected = self._options.if_generation_match
        if expected is None:
            await trio.lowlevel.checkpoint()
            return
        found = await self._retrying(self._find_live_object)
        live = (
            ObjectInfo.from_resource(found.resource).generation
            if isinstance(found, Finished)
            else 0
        )
        if live != expected:
            raise NonRetryableHTTPError(
                "the upload cannot succeed",
                status=412,
                reason=f"the object's live generation is {live}, not {expected} "
                "(ifGenerationMatch)",
                name=self.name,
                offset=self._state.committed,
            )

    # --- internals: shared state ----------------------------------------------------

    def _accept(self, offset: int, views: list[memoryview], crc32c: int | None = None) -> int:
        self._check_usable()
        try:
            added = self._buffer.insert_views(offset, views, crc32c)
        except TooFragmentedError as exc:
            self._notify()  # what came before the refused piece is held
            raise TooFragmentedError(
                fragments=exc.fragments,
                adding=exc.adding,
                limit=exc.limit,
                name=self.name,
                offset=self._state.committed,
            ) from None
        if added and (
            self._total is not None
            or self._buffer.contiguous_end - self._state.committed >= self._settings.min_chunk_size
        ):
            # Fewer bytes than the smallest chunk cannot be sent yet: no need to wake anyone.
            self._notify_worker()
        return added

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._result is not None:
            raise WriterClosedError("the object is already complete", name=self.name)
        if self._closed.is_set():
            raise WriterClosedError("the writer is closed", name=self.name)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        self._notify_worker()

    def _notify_worker(self) -> None:
        self._sendable.set()
        self._sendable = trio.Event()

    async def _wait_for_change(self) -> None:
        await self._changed.wait()

    def _fail(self, error: WriterError) -> None:
        if self._failure is None and self._result is None:
            self._failure = error
            self._stop_sending.set()
            self._buffer.clear()
        self._notify()

    async def _stop_worker(self) -> None:
        self._stop_sending.set()
        self._worker_scope.cancel()
        await self._worker_done.wait()

    async def _in_thread(self, function: Callable[..., _T], *args: Any) -> _T:
        """Run blocking HTTP in a worker thread, one at a time for this writer.

        The writer's own limiter (instead of trio's shared default of 40 threads) keeps
        uploads independent: writers stuck in stalled connections cannot starve others.
        """
        return await trio.to_thread.run_sync(function, *args, limiter=self._thread_limiter)

    def _report_progress(self) -> None:
        if self._progress is not None:
            self._progress(self.stats)

    # --- internals: the worker ------------------------------------------------------

    async def _run(self) -> None:
        """The worker: upload until the object is complete, the writer fails or is closed.

        Failures of the upload are stored for callers, not raised; anything else is a bug
        and is raised into the nursery after being stored as well.
        """
        try:
            with self._worker_scope:
                try:
                    if self._result is None:
                        await self._upload()
                except WriterError as exc:
                    self._fail(exc)
                except Exception as exc:
                    # A bug (ours, or a progress callback that raised). It still crashes
                    # the nursery, but callers in other tasks must hear why rather than
                    # "the writer is closed". Only the type: messages may hold the URL.
                    self._fail(
                        WriterError(
                            f"the upload worker crashed: {type(exc).__name__}",
                            name=self.name,
                            offset=self._state.committed,
                        )
                    )
                    raise
        finally:
            self._buffer.clear()
            self._worker_done.set()
            self._notify()

    async def _open_session(self) -> None:
        if self._session_uri is None:
            await self._retrying(self._create_session)
            return
        outcome = await self._retrying(self._query_status)
        if isinstance(outcome, SessionGone):
            # Never silently: the session may have been aborted or finished elsewhere.
            await self._replace_lost_session(outcome.status, lost_range=None)
        elif isinstance(outcome, Persisted):
            self._state.resumed_at(outcome.offset)
            self._buffer = ScatterBuffer(
                outcome.offset, max_fragments=self._settings.fragment_limit
            )
            self._checksum = StreamChecksum(self._settings.checksum, start=outcome.offset)
        elif isinstance(outcome, Finished):
            # None of the object's bytes passed through this writer, so there is no CRC32C
            # of ours to hold GCS's against (unless the object is empty); the caller's
            # expectation is still checked by complete().
            size = ObjectInfo.from_resource(outcome.resource).size
            self._checksum = StreamChecksum(self._settings.checksum, start=size)
            self._finish(outcome.resource)

    async def _upload(self) -> None:
        while self._result is None:
            plan = await self._next_plan()
            if self._deferred:
                # The first chunk due is the whole object: one request, no session.
                assert plan.final, "a deferred object is one chunk"
                self._finish(await self._store_whole(plan))
                return
            try:
                outcome = await self._retrying(
                    partial(self._send_chunk, plan), then=self._query_status
                )
            except RetriesExhaustedError:
                # GCS may have stored the final chunk while every answer since was lost;
                # then the object is the last witness. One look: if it is not ours (or
                # cannot be seen), giving up stands, and no object is left unreported.
                found = await self._last_look() if self._final_sent else None
                if found is None:
                    raise
                outcome = found
            if isinstance(outcome, SessionGone) and self._final_sent:
                # The final chunk may have been stored before the session went away with
                # its answer; then the object is there, and it is ours if it matches.
                looked = await self._retrying(self._look_up_object)
                outcome = looked if isinstance(looked, Finished) else outcome
            if isinstance(outcome, Finished):
                self._finish(outcome.resource)
            elif isinstance(outcome, SessionGone):
                released = self._buffer.base
                await self._replace_lost_session(
                    outcome.status, lost_range=(0, released) if released else None
                )

    async def _next_plan(self) -> ChunkPlan:
        settings = self._settings
        while True:
            plan = plan_chunk(
                committed=self._state.committed,
                available_end=self._buffer.contiguous_end,
                total=self._total,
                min_size=settings.min_chunk_size,
                max_size=settings.max_chunk_size,
            )
            if plan is not None:
                return plan
            await self._sendable.wait()

    async def _retrying(
        self,
        operation: Callable[[], Awaitable[Outcome]],
        *,
        then: Callable[[], Awaitable[Outcome]] | None = None,
    ) -> Outcome:
        """Run ``operation`` until it gets a definite answer, or give up.

        After a failed attempt the writer backs off and tries again, with ``then`` if
        given: after a chunk, that is a status query rather than the chunk again, since
        GCS may have kept part of it. Attempts and the deadline count from the last
        progress, across chunks; time spent idle (waiting for data) does not count.
        """
        if self._attempts == 0:
            self._last_progress = trio.current_time()
        while True:
            try:
                outcome = await operation()
            except TransportFailure as failure:
                outcome = RetryLater(failure.cause)
            if not isinstance(outcome, RetryLater):
                return outcome
            self._attempts += 1
            self._retries[outcome.cause] += 1
            policy = self._settings.retry
            if policy.gives_up(self._attempts, trio.current_time() - self._last_progress):
                raise RetriesExhaustedError(
                    "giving up",
                    attempts=self._attempts,
                    cause=outcome.cause,
                    name=self.name,
                    offset=self._state.committed,
                )
            logger.info(
                "retrying %r at offset %d: attempt %d, cause %s",
                self.name,
                self._state.committed,
                self._attempts,
                outcome.cause,
            )
            await trio.sleep(policy.next_delay(self._attempts, self._rng))
            operation = then or operation

    async def _create_session(self) -> Outcome:
        created = await self._in_thread(self._transport.create_session, self._options)
        if isinstance(created, HttpResponse):
            if created.status == 404:
                # On initiation a 404 is a missing bucket, not a lost session.
                raise NonRetryableHTTPError(
                    "cannot start the upload",
                    status=404,
                    reason=f"bucket {self._blob.bucket.name!r} not found",
                    name=self.name,
                )
            if created.status == 410:
                # No session to lose yet: a 410 here is a failed attempt (seen when a
                # scripted fault meant for a session met the initiation), so try again.
                return RetryLater("http-410")
            # Retryable statuses come back as RetryLater; anything else raises.
            return self._state.receive(created, None)
        self._session_uri = created
        self._last_progress = trio.current_time()
        self._attempts = 0
        return Persisted(0)

    async def _replace_lost_session(
        self, status: int, *, lost_range: tuple[int, int] | None
    ) -> None:
        """The session is gone (404/410): start a new one only if nothing can be undone.

        A session URI travels (in tokens), so the session may have been cancelled or
        finished elsewhere; a new session would then write the object after an abort, or
        over a completed upload. So a new one starts only if the caller allowed it, no
        byte was committed (every byte still held here), and one metadata request finds
        no live object.
        """
        released = self._buffer.base
        if released > 0:
            raise SessionLostError(
                f"GCS lost the upload session (HTTP {status})",
                lost_range=(0, released),
                status=status,
                name=self.name,
                offset=self._state.committed,
            )
        if not self._restart_if_nothing_committed:
            raise SessionLostError(
                f"GCS no longer knows the upload session (HTTP {status}): it was cancelled, "
                "expired, or finished elsewhere, so no new session is started",
                lost_range=lost_range,
                status=status,
                name=self.name,
            )
        existing = await self._retrying(self._find_live_object)
        if isinstance(existing, Finished):
            generation = ObjectInfo.from_resource(existing.resource).generation
            raise SessionLostError(
                f"GCS no longer knows the upload session (HTTP {status}) and the object "
                f"exists (generation {generation}): the upload may have finished already, "
                "so no new session is started",
                lost_range=lost_range,
                status=status,
                name=self.name,
            )
        logger.warning("GCS lost the session of %r; starting a new one from byte 0", self.name)
        self._restarts += 1
        self._session_uri = None
        self._state.resumed_at(0)
        await self._retrying(self._create_session)

    async def _find_live_object(self) -> Outcome:
        """One metadata request: ``Finished`` with the live object, ``SessionGone(404)`` if
        there is none; a refusal (403, ...) raises :class:`NonRetryableHTTPError`."""
        found = await self._in_thread(self._transport.lookup_object)
        if isinstance(found, int):
            if found == 404:
                return SessionGone(404)
            raise NonRetryableHTTPError(
                "cannot look the object up",
                status=found,
                reason="refused the metadata request",
                name=self.name,
                offset=self._state.committed,
            )
        return Finished(found)

    async def _look_up_object(self) -> Outcome:
        """Finished if the live object is this upload's, by size and CRC32C; else gone."""
        resource = await self._in_thread(self._transport.get_object)
        expected = self._checksum.crc32c or self._expected_crc32c
        if resource is not None and expected is not None:
            info = ObjectInfo.from_resource(resource)
            if info.size == self._total and info.crc32c == expected:
                logger.info("the session of %r is gone, but its object is complete", self.name)
                return Finished(resource)
        return SessionGone(404)

    async def _last_look(self) -> Finished | None:
        """The finished object, if a single lookup finds it to be ours; else None."""
        try:
            outcome = await self._look_up_object()
        except TransportFailure:
            return None
        return outcome if isinstance(outcome, Finished) else None

    async def _query_status(self) -> Outcome:
        outcome = await self._in_thread(self._exchange, None, None)
        if isinstance(outcome, Persisted):
            self._acknowledge()
        return outcome

    async def _send_chunk(self, plan: ChunkPlan) -> Outcome:
        before = self._state.committed
        self._state.sending(plan)
        self._final_sent = self._final_sent or plan.final
        # Only the body holds the chunk's views, and it lets go of them when the request
        # ends however it ends: frames kept alive by a traceback must not pin caller data.
        body = ChunkBody(
            self._buffer.views(plan.start, plan.end),
            slice_size=self._settings.send_slice,
            stop=self._stop_sending,
            on_sent=self._count_sent,
        )
        checksum_pieces = self._checksum_pieces(plan)
        try:
            outcome = await self._in_thread(self._exchange, plan, body, checksum_pieces)
        finally:
            body.release()
            checksum_pieces.clear()
        if isinstance(outcome, Persisted):
            self._chunks += 1
            self._acknowledge()
            if outcome.offset == before:
                # A 308 that stored nothing (no Range at all, typically): back off.
                return RetryLater("no-progress")
        elif isinstance(outcome, Finished):
            self._chunks += 1
        return outcome

    async def _store_whole(self, plan: ChunkPlan) -> Mapping[str, Any]:
        """The whole object in one multipart request (:mod:`reliablewriter.one_request`):
        its CRC32C (built from what the buffer knows, checked against the caller's) is sent
        for GCS to verify, and a lost answer is settled by reading the object back."""
        self._state.sending(plan)
        self._checksum.extend(self._checksum.offset, self._checksum_pieces(plan))
        self._final_hash_headers()  # raises if the bytes are not the caller's
        computed = self._checksum.crc32c  # from the bytes, or their verified frames' CRC32Cs
        crc32c = computed or self._expected_crc32c
        # The views themselves: the multipart body is the one copy of the bytes.
        data = tuple(self._buffer.views(plan.start, plan.end))
        options = self._options
        request = ObjectRequest(
            name=self.name,
            data=data,
            content_type=options.content_type,
            metadata=options.metadata,
            if_generation_match=options.if_generation_match,
            crc32c=None if crc32c is None else crc32c_from_b64(crc32c),
            # the bytes need not be read a second time for it; GCS checks them against it
            verified_crc32c=None if computed is None else crc32c_from_b64(computed),
            maybe_stored_before=self._maybe_stored_before,
        )
        info = await upload_in_one_request(
            self._blob.bucket,
            request,
            policy=self._settings.retry,
            connect_timeout=self._settings.connect_timeout,
            read_timeout=self._settings.progress_timeout,
            poster=self._poster,
        )
        self._count_sent(request.size)
        self._chunks += 1
        return info.resource

    @property
    def in_one_request(self) -> bool:
        """Whether the object is stored by one request at :meth:`complete`, with no session
        ever (``defer_session``, for an object smaller than the smallest chunk)."""
        return self._deferred

    def _checksum_pieces(self, plan: ChunkPlan) -> list[memoryview | KnownCrc]:
        """What the object's checksum still needs to cover ``plan``, taken on the trio side.

        Whole fragments from the checksum's offset on, so it may run ahead of the chunk;
        fragments whose CRC32C the caller gave come as :class:`KnownCrc` (CRC32C-only
        mode: MD5 must read every byte).
        """
        mode = self._settings.checksum
        start = self._checksum.offset
        if mode is ChecksumMode.NONE or start >= plan.end:
            return []
        _, pieces = self._buffer.checksum_pieces(start, plan.end, use_known=not mode.md5)
        return pieces

    def _exchange(
        self,
        plan: ChunkPlan | None,
        body: ChunkBody | None,
        checksum_pieces: list[memoryview | KnownCrc] | None = None,
    ) -> Outcome:
        """In a worker thread: send ``plan`` (or a status query) and interpret the answer."""
        if plan is None or body is None:
            response = self._transport.put(self.session_uri, _STATUS_QUERY, None)
            return self._state.receive(response, None)
        headers = {"Content-Range": plan.content_range()}
        try:
            self._checksum.extend(self._checksum.offset, checksum_pieces or [])
            if plan.final:
                headers.update(self._final_hash_headers())
        except BaseException:
            body.release()
            raise
        response = self._transport.put(self.session_uri, headers, body)
        return self._state.receive(response, plan)

    def _count_sent(self, nbytes: int) -> None:
        # Runs in the worker thread; a plain int add under the GIL is all it needs.
        self._bytes_sent += nbytes

    def _final_hash_headers(self) -> dict[str, str]:
        """``x-goog-hash`` for the final chunk, after checking the caller's expectation."""
        ours = self._checksum.crc32c
        expected = self._expected_crc32c
        if ours is not None and expected is not None and ours != expected:
            raise ChecksumMismatchError(
                "the bytes received do not match the caller's CRC32C",
                expected=expected,
                actual=ours,
                name=self.name,
                offset=self._state.committed,
            )
        parts = []
        crc32c = ours or expected
        if crc32c is not None:
            parts.append(f"crc32c={crc32c}")
        if self._checksum.md5 is not None:
            parts.append(f"md5={self._checksum.md5}")
        return {"x-goog-hash": ",".join(parts)} if parts else {}

    def _acknowledge(self) -> None:
        committed = self._state.committed
        if committed <= self._buffer.base:
            return
        self._buffer.release(committed)
        self._last_progress = trio.current_time()
        self._attempts = 0
        self._notify()
        self._report_progress()

    def _finish(self, resource: Mapping[str, Any]) -> None:
        """Check the finished object against what was sent, then publish it."""
        info = ObjectInfo.from_resource(resource)
        if self._total is not None and info.size != self._total:
            raise UnexpectedResponseError(
                f"GCS finalized {info.size} bytes instead of {self._total}",
                name=self.name,
                offset=self._state.committed,
            )
        for expected, what in (
            (self._checksum.crc32c, "our CRC32C of the bytes sent"),
            (self._expected_crc32c, "the caller's CRC32C"),
        ):
            if expected is not None and info.crc32c is not None and info.crc32c != expected:
                raise ChecksumMismatchError(
                    f"GCS's object does not match {what}",
                    expected=expected,
                    actual=info.crc32c,
                    name=self.name,
                    offset=self._state.committed,
                )
        md5 = self._checksum.md5
        if md5 is not None and info.md5_hash is not None and info.md5_hash != md5:
            raise ChecksumMismatchError(
                "GCS's object does not match our MD5 of the bytes sent",
                expected=md5,
                actual=info.md5_hash,
                name=self.name,
                offset=self._state.committed,
            )
        self._state.resumed_at(info.size)
        self._result = info
        self._buffer.clear()
        self._notify()
        self._report_progress()


@contextlib.asynccontextmanager
async def open_writer(
    bucket: storage.Bucket,
    name: str,
    settings: WriterSettings | None = None,
    *,
    content_type: str = "application/octet-stream",
    metadata: Mapping[str, str] | None = None,
    if_generation_match: int | None = None,
    expected_size: int | None = None,
    session_uri: str | None = None,
    restart_if_nothing_committed: bool = False,
    check_generation_first: bool = False,
    defer_session: bool = False,
    maybe_stored_before: bool = False,
    poster: WholeObjectPoster | None = None,
    progress: Callable[[WriterStats], None] | None = None,
) -> AsyncIterator[ReliableWriter]:
    """Open (or, with ``session_uri``, resume) an upload of ``bucket/name``.

    The session exists when this yields. With ``session_uri`` the writer asks GCS for
    the committed offset and starts there: the caller resends from
    :attr:`ReliableWriter.committed_offset`.

    A session GCS no longer knows (404/410), on resuming or later, raises
    :class:`~reliablewriter.SessionLostError`: it may have been aborted or finished
    elsewhere, and a new session would write the object again. The one exception is
    ``restart_if_nothing_committed=True``, the caller's word that no byte of the session
    was ever committed: then, if no byte was acknowledged here either and one metadata
    request finds no live object, a new session starts from byte 0 (``committed_offset``
    0, ``stats.session_restarts`` counts it, and :attr:`ReliableWriter.session_uri`
    changes). ``if_generation_match`` applies at initiation and finalization of every
    session the writer starts, which makes both safe to retry, and makes GCS itself refuse
    a second write once the object exists (pin 0, or the generation being replaced).
    ``check_generation_first=True`` adds one metadata request before any byte is sent
    (:meth:`ReliableWriter.check_precondition`), so a doomed upload is refused (412) from
    the ``async with`` line even where the server checks only at finalization.

    ``defer_session=True`` starts no session for an object whose ``expected_size`` is below
    ``settings.min_chunk_size``: no chunk can be due before :meth:`~ReliableWriter.complete`,
    which then stores it in one multipart request (:attr:`ReliableWriter.in_one_request`).
    Such an upload cannot be resumed elsewhere; nothing of it is durable before it is
    complete. ``maybe_stored_before=True`` says an earlier attempt (another process that
    held the same upload) may have stored it already: a refused precondition is then read
    back, and an object of the same size and CRC32C counts as this upload's. ``poster``
    (:func:`~reliablewriter.http_posts.post_pool_for`) sends that one request straight from
    trio instead of through ``bucket``'s session in a worker thread.

    ``progress`` is called (on the trio thread, so it must not block
    or raise) each time GCS acknowledges more bytes and when the object is complete.

    Leaving the block without :meth:`~ReliableWriter.complete` or
    :meth:`~ReliableWriter.abort` stops the worker but keeps the GCS session: the upload
    stays resumable from its committed offset by whoever holds the session URI. That is
    what a graceful shutdown relies on. A worker blocked in HTTP is waited for, which
    takes at most ``progress_timeout``.
    """
    blob = bucket.blob(name)
    blob.content_type = content_type
    options = SessionOptions(
        content_type=content_type,
        metadata=metadata,
        if_generation_match=if_generation_match,
        expected_size=expected_size,
    )
    writer = ReliableWriter(
        blob,
        settings or WriterSettings(),
        options=options,
        session_uri=session_uri,
        progress=progress,
        restart_if_nothing_committed=restart_if_nothing_committed,
        defer_session=defer_session,
        maybe_stored_before=maybe_stored_before,
        poster=poster,
    )
    # Outside the nursery, so that a refusal surfaces as itself, not in an ExceptionGroup.
    if check_generation_first and session_uri is None:
        await writer.check_precondition()  # before a session is even started
    if not writer.in_one_request:
        await writer._open_session()
    if check_generation_first and session_uri is not None and writer.result is None:
        # After the status query: a session that already finished made the object itself.
        await writer.check_precondition()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer._run)
            try:
                yield writer
            finally:
                writer._closed.set()
                writer._notify()
                await writer._stop_worker()
    except BaseExceptionGroup as group:
        # The worker raises only for a bug (upload failures are stored and re-raised to
        # callers), so a group here wraps one exception, usually the caller's own: give
        # it back unwrapped.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
