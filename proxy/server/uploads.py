"""Uploads in one proxy process: their writers, credit, completion, abort and release.

An :class:`Upload` outlives the connection that opened it. Its writer runs in a nursery of
its own, started by the :class:`UploadRegistry` inside the server's nursery, so connections
can come and go (attach, drop, re-attach) while the bytes keep flowing to GCS. An upload
ends in one of four ways:

* completed: the object exists; the result is kept for ``result_retention`` so a repeated
  Complete gets the same answer, and a frame resent from within the object (a client may
  still have one in flight when Complete succeeds on another connection) is acknowledged
  and dropped, as the bytes it carries are already in the object;
* aborted: the GCS session is cancelled;
* failed: the writer gave up (the error says why);
* released: nobody was attached and nothing happened for ``upload_idle_timeout``, or the
  server shut down. The GCS session is left alone, so the upload stays resumable through
  its token, on this instance or any other sharing the token key.

Credit: each upload gets a window (its buffer limit) carved from the server's shared
:class:`BufferBudget` when it opens, and grants clients ``[committed, committed + window)``.
The window only ever moves forward, so a write within any credit once announced is within
the current one, and every attached connection hears of each move (one Credit per chunk
GCS acknowledges).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import secrets
from collections import Counter as TallyCounter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from protocol import ErrorCode
from proxy.server.backend import Backend
from proxy.server.logging import get_logger, log_event
from proxy.server.metrics import ServerMetrics
from proxy.server.settings import ServerSettings
from proxy.server.tokens import BadTokenError, TokenCodec, UploadTicket
from reliablewriter import (
    CHUNK_QUANTUM,
    ChecksumMismatchError,
    NonRetryableHTTPError,
    ObjectInfo,
    PendingWrite,
    ReliableWriter,
    WriterAbortedError,
    WriterClosedError,
    WriterError,
    WriterSettings,
    WriterStats,
    open_writer,
)

__all__ = [
    "BufferBudget",
    "OpenRequest",
    "StagedWrite",
    "Upload",
    "UploadError",
    "UploadListener",
    "UploadRegistry",
    "UploadState",
    "missing_ranges",
]

logger = get_logger(__name__)


class UploadError(Exception):
    """A request about an upload that cannot be served, with the code the client gets."""

    def __init__(self, code: ErrorCode, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


class UploadState(enum.Enum):
    ACTIVE = "active"
    COMPLETED = "completed"
    ABORTED = "aborted"
    FAILED = "failed"
    RELEASED = "released"


@dataclass(frozen=True)
class OpenRequest:
    """What a client asks for when it opens a new upload."""

    bucket: str
    name: str
    content_type: str = "application/octet-stream"
    metadata: tuple[tuple[str, str], ...] = ()
    expected_size: int | None = None
    if_generation_match: int | None = None


class UploadListener(Protocol):
    """Something attached to an upload: hears when its window moves and when it fails.

    Connections implement these; they must not block (the upload calls them for every
    attached connection in turn, and one slow client must not hold up the others).
    """

    def offer_credit(self, upload: Upload, committed_offset: int, window_end: int) -> None: ...

    def upload_failed(self, upload: Upload, error: UploadError) -> None: ...


def missing_ranges(
    received: tuple[tuple[int, int], ...], total: int
) -> tuple[tuple[int, int], ...]:
    """The half-open gaps in ``[0, total)`` not covered by the sorted ``received`` ranges."""
    gaps: list[tuple[int, int]] = []
    position = 0
    for start, end in received:
        if start > position:
            gaps.append((position, min(start, total)))
        position = max(position, end)
        if position >= total:
            break
    if position < total:
        gaps.append((position, total))
    return tuple((start, end) for start, end in gaps if start < end)


def _describe_ranges(ranges: tuple[tuple[int, int], ...], limit: int = 8) -> str:
    shown = ", ".join(f"[{start}, {end})" for start, end in ranges[:limit])
    more = f" and {len(ranges) - limit} more" if len(ranges) > limit else ""
    return shown + more


class BufferBudget:
    """The shared pool of buffer bytes that upload windows are carved from."""

    def __init__(self, total: int, metrics: ServerMetrics) -> None:
        self._total = total
        self._reserved = 0
        self._metrics = metrics
        self._returned = trio.lowlevel.ParkingLot()

    @property
    def available(self) -> int:
        return self._total - self._reserved

    def reserve(self, preferred: int, minimum: int) -> int | None:
        """A window of ``minimum`` to ``preferred`` bytes, or ``None`` if even that is gone.

        Once the pool runs low, each new upload gets at most a quarter of what is left, so
        a burst of uploads shares the pool with shrinking windows instead of the first few
        taking it all and the rest being turned away.
        """
        if self.available < minimum:
            return None
        fair_share = max(minimum, self.available // 4)
        granted = max(minimum, min(preferred, fair_share) // CHUNK_QUANTUM * CHUNK_QUANTUM)
        self._reserved += granted
        self._metrics.buffer_bytes.set(self._reserved)
        return granted

    async def acquire(self, preferred: int, minimum: int, *, patience: float) -> int:
        """Like :meth:`reserve`, but wait up to ``patience`` seconds for windows to come back.

        Waiting cannot deadlock: uploads that hold windows never need more to finish, so
        they always give theirs back. Raises a retryable TOO_BUSY if none came back in time.
        """
        with trio.move_on_after(patience):
            while (granted := self.reserve(preferred, minimum)) is None:
                await self._returned.park()
            return granted
        raise UploadError(
            ErrorCode.TOO_BUSY,
            "the proxy's buffer budget stayed exhausted; retry later",
            retryable=True,
        )

    def release(self, amount: int) -> None:
        self._reserved -= amount
        self._metrics.buffer_bytes.set(self._reserved)
        self._returned.unpark_all()


#: chunks are at most this fraction of the window, so while one chunk is on its way to GCS
#: the client can already send the bytes of the next ones
_CHUNKS_PER_WINDOW = 4


def _writer_settings_for(template: WriterSettings, window: int) -> WriterSettings:
    """``template`` with chunks that leave room in a window of ``window`` bytes.

    A chunk as large as the window would stall the client for the whole time GCS takes
    to acknowledge it: nothing new fits until the committed offset moves.
    """
    share = max(CHUNK_QUANTUM, window // _CHUNKS_PER_WINDOW // CHUNK_QUANTUM * CHUNK_QUANTUM)
    max_chunk = min(template.max_chunk_size, share)
    min_chunk = min(template.min_chunk_size, max_chunk)
    return dataclasses.replace(
        template, buffer_limit=window, max_chunk_size=max_chunk, min_chunk_size=min_chunk
    )


def _error_from_writer(exc: WriterError) -> UploadError:
    """The client-facing form of a writer failure (its message holds no secrets)."""
    if isinstance(exc, NonRetryableHTTPError) and exc.status == 412:
        return UploadError(ErrorCode.PRECONDITION_FAILED, str(exc))
    if isinstance(exc, NonRetryableHTTPError) and exc.status in (401, 403):
        return UploadError(ErrorCode.FORBIDDEN, str(exc))
    if isinstance(exc, ChecksumMismatchError):
        return UploadError(ErrorCode.CHECKSUM_MISMATCH, str(exc))
    if isinstance(exc, WriterAbortedError):
        return UploadError(ErrorCode.ABORTED, str(exc))
    return UploadError(ErrorCode.GCS_ERROR, str(exc))


class StagedWrite:
    """One WriteAt frame being streamed into an upload's writer.

    It never raises from :meth:`feed`: if the upload dies while the frame is still arriving,
    the rest of the frame is dropped and :meth:`commit` reports the reason, so the connection
    can answer that frame and go on reading the next one.
    """

    def __init__(self, upload: Upload, offset: int, length: int) -> None:
        self.upload = upload
        self.offset = offset
        self.length = length
        self._received = 0
        self._failure: UploadError | None = None
        self._pending: PendingWrite | _NullPending
        try:
            self._pending = upload.writer.begin_write(offset, length)
        except WriterError as exc:
            if not self._redundant(exc):
                raise _write_refusal(upload, exc) from exc
            self._pending = _NullPending()

    def feed(self, data: memoryview) -> None:
        if self._failure is not None:
            return
        self._received += len(data)
        try:
            self._pending.feed(data)
        except WriterError as exc:
            self._fail(exc)

    def commit(self) -> int:
        """Make the frame's bytes uploadable; returns the committed offset for the Ack."""
        if self._failure is None:
            try:
                self._pending.commit()
            except WriterError as exc:
                self._fail(exc)
        if self._failure is not None:
            raise self._failure
        self.upload.note_received(self._received)
        return self.upload.writer.committed_offset

    def discard(self) -> None:
        if self._failure is None:
            try:
                self._pending.discard()
            except WriterError as exc:
                self._fail(exc)

    def _fail(self, exc: WriterError) -> None:
        self._pending = _NullPending()
        if not self._redundant(exc):
            self._failure = _write_refusal(self.upload, exc)

    def _redundant(self, exc: WriterError) -> bool:
        """Whether the writer closed (completing) holding every byte this frame carries.

        Such a frame is a late resend, and its Ack says nothing new; refusing it would
        fail a client whose Complete succeeded, or is about to, on another connection.
        """
        return (
            isinstance(exc, WriterClosedError)
            and self.upload.failure() is None
            and self.upload.holds(self.offset, self.offset + self.length)
        )


def _write_refusal(upload: Upload, exc: WriterError) -> UploadError:
    """Why ``upload``'s writer refused a write: the upload's recorded failure comes first.

    The writer closes as the upload ends, before or after the upload records why (abort,
    failure, release), so the closure itself says nothing about the reason.
    """
    failure = upload.failure()
    if failure is not None:
        return failure
    if not isinstance(exc, WriterClosedError):
        return _error_from_writer(exc)
    if upload.state is UploadState.COMPLETED:
        return UploadError(ErrorCode.INVALID_STATE, f"upload {upload.upload_id} is completed")
    # Closing without a failure: the upload is being released (idle, or shutdown).
    return UploadError(
        ErrorCode.UNKNOWN_UPLOAD,
        f"upload {upload.upload_id} is being released here; attach again with its token",
        retryable=True,
    )


class _NullPending:
    def feed(self, data: memoryview) -> None:
        pass

    def commit(self) -> None:
        pass

    def discard(self) -> None:
        pass


@dataclass
class _Completion:
    total_size: int
    crc32c: int | None
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    result: ObjectInfo | None = None
    error: UploadError | None = None


class Upload:
    """One upload's state in this process. Created only by :class:`UploadRegistry`."""

    def __init__(
        self,
        registry: UploadRegistry,
        upload_id: str,
        request: OpenRequest,
        client: str,
        window: int,
    ) -> None:
        self.upload_id = upload_id
        self.request = request
        self.client = client
        self.window = window
        self.state = UploadState.ACTIVE
        #: whether the window and the client's upload slot are still reserved for this upload
        self.holds_resources = True
        #: the sealed token; set once the writer has a session
        self.token = b""
        self._registry = registry
        self._writer: ReliableWriter | None = None
        self._listeners: set[UploadListener] = set()
        self._activity = trio.lowlevel.ParkingLot()
        self._last_activity = trio.current_time()
        self._completion: _Completion | None = None
        self._failure: UploadError | None = None
        self._nursery: trio.Nursery | None = None
        self._finished = trio.Event()
        self._stats_seen = _StatsCursor()

    def __repr__(self) -> str:
        return f"<Upload {self.upload_id} {self.request.bucket}/{self.request.name} {self.state}>"

    # --- what connections use -------------------------------------------------------

    @property
    def writer(self) -> ReliableWriter:
        if self._writer is None:
            raise UploadError(ErrorCode.INTERNAL, f"upload {self.upload_id} has no writer")
        return self._writer

    @property
    def committed_offset(self) -> int:
        return self.writer.committed_offset

    @property
    def window_end(self) -> int:
        return self.writer.window_end

    def received_ranges(self) -> tuple[tuple[int, int], ...]:
        return tuple(self.writer.received_ranges())

    def failure(self) -> UploadError | None:
        """Why this upload cannot take more requests, or ``None`` while it can."""
        if self._failure is not None:
            return self._failure
        if self.state is UploadState.ABORTED:
            return UploadError(ErrorCode.ABORTED, f"upload {self.upload_id} was aborted")
        if self.state is UploadState.RELEASED:
            return UploadError(
                ErrorCode.UNKNOWN_UPLOAD,
                f"upload {self.upload_id} was released here; attach again with its token",
                retryable=True,
            )
        return None

    @property
    def finished(self) -> bool:
        """Whether the upload's writer and tasks are all gone."""
        return self._finished.is_set()

    async def wait_finished(self) -> None:
        """Wait until the upload's writer and tasks are gone (completed, failed, or released)."""
        await self._finished.wait()

    def attach(self, listener: UploadListener) -> None:
        self._listeners.add(listener)
        self._touch()

    def detach(self, listener: UploadListener) -> None:
        self._listeners.discard(listener)
        self._touch()

    def holds(self, start: int, end: int) -> bool:
        """Whether every byte of ``[start, end)`` is received or committed already."""
        return all(gap_end <= start for _, gap_end in missing_ranges(self.received_ranges(), end))

    def begin_write(self, offset: int, length: int) -> StagedWrite:
        """Start taking a WriteAt frame for ``[offset, offset + length)``.

        Raises :class:`UploadError` with OUTSIDE_CREDIT when the frame reaches beyond the
        window any Credit ever granted (windows only grow, so a write within an older
        credit is always within the current one). After completion, a frame within the
        object is a late resend: it is taken and dropped, so its Ack says nothing new.
        """
        failure = self.failure()
        if failure is not None:
            raise failure
        if self.state is UploadState.COMPLETED and self.holds(offset, offset + length):
            self._touch()
            return StagedWrite(self, offset, length)
        if self.state is UploadState.COMPLETED:
            raise UploadError(ErrorCode.INVALID_STATE, f"upload {self.upload_id} is completed")
        end = offset + length
        expected = self.request.expected_size
        if expected is not None and end > expected:
            raise UploadError(
                ErrorCode.OUTSIDE_CREDIT,
                f"write [{offset}, {end}) goes past the declared size {expected}",
            )
        window_end = self.window_end
        if end > window_end:
            raise UploadError(
                ErrorCode.OUTSIDE_CREDIT,
                f"write [{offset}, {end}) goes past the credit window end {window_end}",
            )
        self._touch()
        return StagedWrite(self, offset, length)

    def note_received(self, nbytes: int) -> None:
        self._registry.metrics.bytes_received.inc(nbytes)
        self._touch()
        self._activity.unpark_all()

    async def complete(self, total_size: int, crc32c: int | None) -> ObjectInfo:
        """Finalize the object once every byte of ``[0, total_size)`` is in GCS.

        Idempotent: a repeated (or concurrent) Complete with the same size gets the same
        result. Cancelling the caller does not stop the completion, which runs in the
        upload's own nursery; a later Complete picks up its result.
        """
        completion = self._completion
        if completion is not None and completion.total_size != total_size:
            raise UploadError(
                ErrorCode.INVALID_STATE,
                f"upload {self.upload_id} is completing with size {completion.total_size}, "
                f"not {total_size}",
            )
        if completion is None:
            failure = self.failure()
            if failure is not None:
                raise failure
            completion = self._completion = _Completion(total_size, crc32c)
            assert self._nursery is not None
            self._nursery.start_soon(self._finish, completion)
        await completion.done.wait()
        if completion.error is not None:
            raise completion.error
        if completion.result is None:
            # The completion was cut short by the upload ending (abort, writer failure,
            # shutdown); the reason is recorded once the upload's tasks are gone.
            await self._finished.wait()
            raise self.failure() or UploadError(
                ErrorCode.INTERNAL, f"upload {self.upload_id} ended before completing"
            )
        return completion.result

    async def abort(self) -> None:
        """Cancel the GCS session; returns once every task of this upload has exited.

        Writes still arriving on any connection are answered with ABORTED. If the caller is
        cancelled partway, the upload is still marked aborted and its tasks are still
        cancelled; only the wait for them is cut short.
        """
        if self.state is UploadState.COMPLETED:
            raise UploadError(ErrorCode.INVALID_STATE, f"upload {self.upload_id} is completed")
        if self.state is UploadState.ABORTED:
            await self._finished.wait()
            return
        self.state = UploadState.ABORTED
        self._activity.unpark_all()
        try:
            if self._writer is not None:
                await self._writer.abort()
        except WriterError as exc:
            log_event(logger, logging.WARNING, "abort-failed", upload=self.upload_id, error=exc)
        finally:
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()
        await self._finished.wait()
        log_event(logger, logging.INFO, "upload-aborted", upload=self.upload_id)

    # --- the upload's own tasks -----------------------------------------------------

    def _touch(self) -> None:
        self._last_activity = trio.current_time()

    async def _await_all_received(self, total_size: int) -> None:
        """Wait until ``[0, total_size)`` is all received; fail if it stops arriving."""
        patience = self._registry.settings.complete_timeout
        while gaps := missing_ranges(self.received_ranges(), total_size):
            with trio.move_on_after(patience) as waiting:
                await self._activity.park()
            failure = self.failure()
            if failure is not None:
                raise failure
            if waiting.cancelled_caught:
                raise UploadError(
                    ErrorCode.MISSING_RANGES,
                    f"upload {self.upload_id}: nothing arrived for {patience:g} s; "
                    f"missing bytes {_describe_ranges(gaps)}",
                    retryable=True,
                )

    async def _finish(self, completion: _Completion) -> None:
        try:
            await self._await_all_received(completion.total_size)
            completion.result = await self.writer.complete(
                total_size=completion.total_size, crc32c=completion.crc32c
            )
        except UploadError as exc:
            completion.error = exc
            # Missing bytes may still come: a later Complete starts over.
            if exc.code is ErrorCode.MISSING_RANGES:
                self._completion = None
        except WriterError as exc:
            completion.error = self._writer_failed(exc)
        except ValueError as exc:
            # The writer refuses a total that contradicts the bytes it holds or the size
            # declared at open. The upload itself is fine: a corrected Complete may follow.
            completion.error = UploadError(ErrorCode.SIZE_MISMATCH, str(exc))
            self._completion = None
        else:
            self.state = UploadState.COMPLETED
            self._record_stats(self.writer.stats)  # counted before anyone hears of it
            # Give the window back before anyone hears of the completion, so a client that
            # opens its next upload right away finds the budget as it left it.
            self._registry._give_back(self)
            self._registry.metrics.uploads_completed.inc()
            log_event(
                logger,
                logging.INFO,
                "upload-completed",
                upload=self.upload_id,
                bucket=self.request.bucket,
                object=self.request.name,
                size=completion.result.size,
            )
        finally:
            completion.done.set()
            self._activity.unpark_all()

    async def _follow_writer(self) -> None:
        """Announce every move of the committed offset; notice when the writer fails."""
        writer = self.writer
        announced = writer.committed_offset
        try:
            while True:
                await writer.wait_committed(announced + 1)
                announced = writer.committed_offset
                self._record_stats(writer.stats)
                self._touch()
                self._activity.unpark_all()
                for listener in list(self._listeners):
                    listener.offer_credit(self, announced, writer.window_end)
        except WriterClosedError:
            return  # complete or closing: the offset will not move again
        except WriterError as exc:
            if self.state is not UploadState.ABORTED:
                self._writer_failed(exc)

    def _writer_failed(self, exc: WriterError) -> UploadError:
        """Record that the writer gave up; every attached connection hears of it at once."""
        if self._failure is None:
            log_event(logger, logging.WARNING, "upload-failed", upload=self.upload_id, error=exc)
        return self._record_failure(_error_from_writer(exc), reason=type(exc).__name__)

    def _crashed(self) -> UploadError:
        """Record that a bug ended the upload's tasks (call it while handling the exception).

        A failure recorded earlier stays: it is the reason clients were, or will be, told.
        """
        log_event(logger, logging.ERROR, "upload-crashed", exc=True, upload=self.upload_id)
        error = UploadError(ErrorCode.INTERNAL, f"upload {self.upload_id} broke")
        return self._record_failure(error, reason="crash")

    def _record_failure(self, error: UploadError, *, reason: str) -> UploadError:
        """The first failure recorded is the upload's; attached connections hear of it."""
        if self._failure is None and self.state in (UploadState.ACTIVE, UploadState.RELEASED):
            self._failure = error
            self.state = UploadState.FAILED
            self._registry.metrics.uploads_failed.labels(reason=reason).inc()
            for listener in list(self._listeners):
                listener.upload_failed(self, error)
            self._activity.unpark_all()
        return self._failure or error

    def _record_stats(self, stats: WriterStats) -> None:
        self._stats_seen.publish(stats, self._registry.metrics)

    async def _linger(self) -> None:
        """Hold the writer until the upload is completed, aborted, or idle long enough."""
        settings = self._registry.settings
        while self.state is UploadState.ACTIVE:
            if self._completion is not None or self._listeners:
                deadline = trio.current_time() + settings.upload_idle_timeout
            else:
                deadline = self._last_activity + settings.upload_idle_timeout
                if trio.current_time() >= deadline:
                    # Released from now on, though the writer takes a moment to stop: an
                    # attach arriving meanwhile takes the upload over afresh from GCS.
                    self.state = UploadState.RELEASED
                    log_event(logger, logging.INFO, "upload-released-idle", upload=self.upload_id)
                    return
            with trio.move_on_at(deadline):
                await self._activity.park()

    def _finished_running(self) -> None:
        if self.state is UploadState.ACTIVE:
            self.state = UploadState.RELEASED
        self._activity.unpark_all()
        self._finished.set()


class _StatsCursor:
    """Turns the writer's cumulative stats into increments of the server's counters."""

    def __init__(self) -> None:
        self._committed = 0
        self._retries: TallyCounter[str] = TallyCounter()

    def publish(self, stats: WriterStats, metrics: ServerMetrics) -> None:
        if stats.bytes_acked > self._committed:
            metrics.bytes_committed.inc(stats.bytes_acked - self._committed)
            self._committed = stats.bytes_acked
        for cause, count in stats.retries_by_cause.items():
            delta = count - self._retries[cause]
            if delta > 0:
                metrics.retries.labels(cause=cause).inc(delta)
                self._retries[cause] = count


class UploadRegistry:
    """Every upload this process holds, and the budget and limits they share.

    Upload tasks run in the nursery given at construction (the server's), so they outlive
    the connections that start them.
    """

    def __init__(
        self,
        settings: ServerSettings,
        backend: Backend,
        metrics: ServerMetrics,
        nursery: trio.Nursery,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        self.codec = (
            TokenCodec(settings.token_key, lifetime=settings.token_lifetime)
            if clock is None
            else TokenCodec(settings.token_key, lifetime=settings.token_lifetime, clock=clock)
        )
        self._nursery = nursery
        self._budget = BufferBudget(settings.total_buffer_limit, metrics)
        self._uploads: dict[str, Upload] = {}
        self._opening: dict[str, trio.Event] = {}
        self._per_client: TallyCounter[str] = TallyCounter()
        metrics.buffer_held.set_function(self.held_bytes)

    def __len__(self) -> int:
        return len(self._uploads)

    def get(self, upload_id: str) -> Upload | None:
        return self._uploads.get(upload_id)

    def held_bytes(self) -> int:
        """Bytes all live uploads hold in their buffers right now (read at scrape time)."""
        return sum(
            upload.writer.stats.held_bytes
            for upload in self._uploads.values()
            if upload.state is UploadState.ACTIVE
        )

    def uploads(self) -> list[Upload]:
        """Every upload this process holds (live, or finished and remembered for a while)."""
        return list(self._uploads.values())

    async def open(self, request: OpenRequest, client: str) -> Upload:
        """Start a new upload: a new GCS session, a writer, and a token for it.

        If cancelled partway, nothing is registered and nothing stays reserved; a GCS
        session may have been created, and is left to expire unused.
        """
        if not self.settings.allows(request.bucket, request.name):
            raise UploadError(
                ErrorCode.FORBIDDEN,
                f"writing {request.bucket}/{request.name} is not allowed by this proxy",
            )
        upload_id = secrets.token_urlsafe(12)
        upload = await self._start(upload_id, request, client, session_uri=None)
        try:
            session_uri = upload.writer.session_uri
        except WriterClosedError as exc:
            # The writer opened without a session (GCS answered the initiation with a
            # status it took for a lost session): nothing to hand out a token for.
            upload._writer_failed(exc)
            raise UploadError(
                ErrorCode.GCS_ERROR, "could not start the GCS upload", retryable=True
            ) from exc
        ticket = self.codec.issue(
            upload_id=upload_id,
            bucket=request.bucket,
            name=request.name,
            session_uri=session_uri,
            content_type=request.content_type,
            metadata=request.metadata,
            expected_size=request.expected_size,
            if_generation_match=request.if_generation_match,
        )
        upload.token = self.codec.seal(ticket)
        self.metrics.uploads_started.inc()
        log_event(
            logger,
            logging.INFO,
            "upload-opened",
            upload=upload_id,
            bucket=request.bucket,
            object=request.name,
            client=client,
            window=upload.window,
        )
        return upload

    async def attach(self, token: bytes, client: str) -> tuple[Upload, bool]:
        """The upload behind ``token``, taken over from GCS if this process does not hold it.

        Returns the upload and whether it was resumed from its GCS session (in which case
        the client must resend everything from the committed offset). If cancelled
        partway, the upload is not taken over here and stays resumable from its token.
        """
        try:
            ticket = self.codec.open(token)
        except BadTokenError as exc:
            raise UploadError(ErrorCode.BAD_TOKEN, str(exc)) from exc
        while ticket.upload_id in self._opening:
            await self._opening[ticket.upload_id].wait()
        upload = self._uploads.get(ticket.upload_id)
        if upload is not None:
            failure = upload.failure()
            if failure is not None and failure.code is not ErrorCode.UNKNOWN_UPLOAD:
                raise failure
            if failure is None:
                return upload, False
        if not self.settings.allows(ticket.bucket, ticket.name):
            raise UploadError(
                ErrorCode.FORBIDDEN,
                f"writing {ticket.bucket}/{ticket.name} is not allowed by this proxy",
            )
        upload = await self._start(
            ticket.upload_id, _request_from(ticket), client, session_uri=ticket.session_uri
        )
        session_uri = upload.writer.session_uri
        # GCS may have forgotten the session, in which case the writer started a new one
        # (from offset 0): the token must lead to the new session from now on.
        upload.token = (
            token
            if session_uri == ticket.session_uri
            else self.codec.seal(dataclasses.replace(ticket, session_uri=session_uri))
        )
        self.metrics.uploads_resumed.inc()
        log_event(
            logger,
            logging.INFO,
            "upload-resumed",
            upload=ticket.upload_id,
            committed=upload.committed_offset,
            client=client,
        )
        return upload, True

    async def _start(
        self, upload_id: str, request: OpenRequest, client: str, *, session_uri: str | None
    ) -> Upload:
        settings = self.settings
        if self._per_client[client] >= settings.max_uploads_per_client:
            raise UploadError(
                ErrorCode.TOO_BUSY,
                f"client {client} already has {self._per_client[client]} uploads open here",
                retryable=True,
            )
        # Claimed before any waiting, so concurrent opens and attaches see them at once.
        self._per_client[client] += 1
        opened = self._opening[upload_id] = trio.Event()
        window: int | None = None
        try:
            window = await self._budget.acquire(
                settings.upload_buffer_limit,
                settings.min_upload_window,
                patience=settings.budget_wait,
            )
            upload = Upload(self, upload_id, request, client, window)
            await self._nursery.start(self._run, upload, session_uri)
        except BaseException:
            if window is not None:
                self._budget.release(window)
            self._forget_client(client)
            raise
        finally:
            del self._opening[upload_id]
            opened.set()
        return upload

    def _give_back(self, upload: Upload) -> None:
        """Return ``upload``'s window and client slot; only the first call counts."""
        if upload.holds_resources:
            upload.holds_resources = False
            self._budget.release(upload.window)
            self._forget_client(upload.client)

    def _forget_client(self, client: str) -> None:
        self._per_client[client] -= 1
        if self._per_client[client] <= 0:
            del self._per_client[client]

    async def _run(
        self,
        upload: Upload,
        session_uri: str | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The upload's lifetime: open the writer, serve it, and let go of everything after.

        Failures before ``task_status.started()`` go to whoever opened the upload; after it,
        they are logged and recorded on the upload, never raised into the server's nursery.
        """
        request = upload.request
        started = False
        try:
            bucket = await trio.to_thread.run_sync(self.backend.bucket, request.bucket)
            async with open_writer(
                bucket,
                request.name,
                _writer_settings_for(self.settings.writer, upload.window),
                content_type=request.content_type,
                metadata=dict(request.metadata),
                if_generation_match=request.if_generation_match,
                expected_size=request.expected_size,
                session_uri=session_uri,
            ) as writer:
                upload._writer = writer
                async with trio.open_nursery() as nursery:
                    upload._nursery = nursery
                    self._uploads[upload.upload_id] = upload
                    self.metrics.active_uploads.inc()
                    nursery.start_soon(upload._follow_writer)
                    started = True
                    task_status.started()
                    await upload._linger()
                    nursery.cancel_scope.cancel()
                upload._record_stats(writer.stats)
        except WriterError as exc:
            if not started:
                raise _error_from_writer(exc) from exc
            upload._writer_failed(exc)
        except Exception as exc:
            if not started:
                raise UploadError(
                    ErrorCode.GCS_ERROR, f"could not start the GCS upload: {exc}", retryable=True
                ) from exc
            upload._crashed()
        finally:
            if started:
                self.metrics.active_uploads.dec()
                self._give_back(upload)
            upload._finished_running()
        if started:
            await self._retire(upload)

    async def _retire(self, upload: Upload) -> None:
        """Keep a finished upload's outcome visible for a while, then forget it."""
        if upload.state in (UploadState.COMPLETED, UploadState.ABORTED, UploadState.FAILED):
            await trio.sleep(self.settings.result_retention)
        if self._uploads.get(upload.upload_id) is upload:
            del self._uploads[upload.upload_id]


def _request_from(ticket: UploadTicket) -> OpenRequest:
    return OpenRequest(
        bucket=ticket.bucket,
        name=ticket.name,
        content_type=ticket.content_type,
        metadata=ticket.metadata,
        expected_size=ticket.expected_size,
        if_generation_match=ticket.if_generation_match,
    )
