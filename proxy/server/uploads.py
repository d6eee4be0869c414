"""One upload in this process: its writer, credit, completion, abort and release.

An :class:`Upload` outlives the connection that opened it. Its writer runs in a nursery of
its own (:meth:`Upload.run`, started by the :class:`~proxy.server.registry.UploadRegistry`
inside the server's nursery), so connections can come and go (attach, drop, re-attach)
while the bytes keep flowing to GCS. Its lifecycle is one enum, :class:`UploadState`, and
one table, :data:`UPLOAD_TRANSITIONS`; :class:`UploadLifecycle` refuses any other move.
An upload ends in one of four ways:

* completed: the object exists; the result is kept for ``result_retention`` so a repeated
  Complete gets the same answer, and a frame resent from within the object (a client may
  still have one in flight when Complete succeeds on another connection) is acknowledged
  and dropped, as the bytes it carries are already in the object;
* aborted: the GCS session is cancelled;
* failed: the writer gave up (the error says why);
* released: nobody was attached and nothing happened for ``upload_idle_timeout``, or the
  server shut down. The GCS session is left alone, so the upload stays resumable through
  its token, on this instance or any other sharing the token key.

Credit: each upload holds an :class:`~proxy.server.budget.UploadWindow` paid for from the
server's shared budget, and grants clients ``[committed, committed + window)``. The window
starts small and grows as data arrives; with no connection attached the upload gives it
back, and takes it back when one attaches. Its end only ever moves forward, so a write
within any credit once announced is within the current one, and every attached connection
hears of each move (one Credit per chunk GCS acknowledges, and one per growth).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections import Counter as TallyCounter
from dataclasses import dataclass
from typing import Final, Protocol

import trio

from protocol import MAX_LISTED_RANGES, ErrorCode
from protocol.ranges import RangeSet, format_ranges
from proxy.server.backend import Backend
from proxy.server.budget import UploadWindow, writer_settings_for
from proxy.server.errors import ServerError
from proxy.server.logging import get_logger, log_event
from proxy.server.metrics import ServerMetrics
from proxy.server.settings import ServerSettings
from reliablewriter import (
    CHUNK_QUANTUM,
    ChecksumMismatchError,
    NonRetryableHTTPError,
    ObjectInfo,
    PendingWrite,
    ReliableWriter,
    SessionLostError,
    TooFragmentedError,
    WriterAbortedError,
    WriterClosedError,
    WriterError,
    WriterSettings,
    WriterStats,
    open_writer,
)
from reliablewriter.buffer import FRAGMENT_OVERHEAD
from reliablewriter.http_posts import WholeObjectPoster

__all__ = [
    "UPLOAD_TRANSITIONS",
    "IllegalTransitionError",
    "MissingRangesError",
    "OpenRequest",
    "StagedWrite",
    "Upload",
    "UploadHost",
    "UploadLifecycle",
    "UploadListener",
    "UploadState",
    "error_from_refused_start",
    "error_from_writer",
    "first_window",
    "largest_window",
    "whole_window",
]

logger = get_logger(__name__)


class UploadState(enum.Enum):
    ACTIVE = "active"
    """The writer runs: writes, status queries, Complete and Abort are served."""
    COMPLETED = "completed"
    """The object exists; the result is remembered for ``result_retention``."""
    ABORTED = "aborted"
    """An Abort cancelled the GCS session."""
    FAILED = "failed"
    """The writer gave up, or a bug ended the upload's tasks; ``failure()`` says why."""
    RELEASED = "released"
    """Let go here (idle, or shutdown) with the GCS session kept: attach again to resume."""


_U = UploadState

UPLOAD_TRANSITIONS: Final[dict[UploadState, frozenset[UploadState]]] = {
    _U.ACTIVE: frozenset({_U.COMPLETED, _U.ABORTED, _U.FAILED, _U.RELEASED}),
    # A released upload's writer is still stopping: it may fail meanwhile, and an Abort
    # that arrives in that moment still cancels the session.
    _U.RELEASED: frozenset({_U.FAILED, _U.ABORTED}),
    # An Abort after a failure still cancels the GCS session; the failure stays the reason.
    _U.FAILED: frozenset({_U.ABORTED}),
    _U.COMPLETED: frozenset(),
    _U.ABORTED: frozenset(),
}
"""For each state, the states an upload may move to from it; every other move is a bug."""


class IllegalTransitionError(RuntimeError):
    """A move :data:`UPLOAD_TRANSITIONS` does not allow: a bug in the server, never a client's."""

    def __init__(self, upload_id: str, current: UploadState, target: UploadState) -> None:
        super().__init__(f"upload {upload_id} cannot go from {current.name} to {target.name}")
        self.current = current
        self.target = target


class UploadLifecycle:
    """Where one upload is in :data:`UPLOAD_TRANSITIONS`, starting ACTIVE."""

    __slots__ = ("_state", "_upload_id")

    def __init__(self, upload_id: str) -> None:
        self._upload_id = upload_id
        self._state = UploadState.ACTIVE

    @property
    def state(self) -> UploadState:
        return self._state

    def can_move_to(self, target: UploadState) -> bool:
        return target in UPLOAD_TRANSITIONS[self._state]

    def move_to(self, target: UploadState) -> None:
        """Enter ``target``; raises :class:`IllegalTransitionError` if the table forbids it."""
        if not self.can_move_to(target):
            raise IllegalTransitionError(self._upload_id, self._state, target)
        self._state = target


@dataclass(frozen=True)
class OpenRequest:
    """What a client asks for when it opens a new upload."""

    bucket: str
    name: str
    content_type: str = "application/octet-stream"
    metadata: tuple[tuple[str, str], ...] = ()
    expected_size: int | None = None
    if_generation_match: int | None = None
    #: the window to start with (None: the server's smallest, which then grows); a larger
    #: one makes larger chunks from the start (a composite upload's segments)
    first_window: int | None = None
    #: store it by one request at COMPLETE whatever the settings: an upload whose token
    #: carries no session (it was opened so), attached again
    in_one_request: bool = False


def first_window(settings: ServerSettings, request: OpenRequest) -> int:
    """The window ``request``'s upload starts with: the one asked for, else a small object's
    whole size, else the server's smallest (which grows as data arrives). A function of the
    request and the settings alone, so that an attach elsewhere decides as the open did."""
    if request.first_window:
        return request.first_window
    size = _one_request_size(settings, request)
    return settings.min_upload_window if size is None else whole_window(settings, size)


def _one_request_size(settings: ServerSettings, request: OpenRequest) -> int | None:
    """The size of an upload that waits for COMPLETE and is stored by one request, or None
    for any other: one opened so before (its token has no session, so it must never get
    one: the client keeps its bytes only until they are durable), or a new one declared at
    most ``one_request_limit`` bytes (gcloud's single-request threshold is 8 MiB, the Go
    Writer's 16 MiB). A composite upload's segments, which ask for their window, are not: a
    session lets a segment resume on another instance from what GCS holds."""
    size = request.expected_size
    if size is not None and (
        request.in_one_request
        or (request.first_window is None and size <= settings.one_request_limit)
    ):
        return size
    return None


def largest_window(settings: ServerSettings, request: OpenRequest) -> int:
    """The most ``request``'s window may grow to: ``upload_buffer_limit``, or less for an
    upload of declared size, which never needs room for more than it holds (a window larger
    than that would only keep budget from other uploads)."""
    largest = settings.upload_buffer_limit
    if request.expected_size is not None:
        largest = whole_window(settings, request.expected_size)
    return max(largest, first_window(settings, request))


def whole_window(settings: ServerSettings, size: int) -> int:
    """A window holding ``size`` bytes whole, within what an upload may have."""
    whole = -(-size // CHUNK_QUANTUM) * CHUNK_QUANTUM
    return max(settings.min_upload_window, min(whole, settings.upload_buffer_limit))


def writer_settings(settings: ServerSettings, request: OpenRequest) -> WriterSettings:
    """The writer settings of ``request``'s upload. For a small object no chunk is ever due
    before COMPLETE (its smallest chunk is larger than it), so the writer opens no session
    and stores it with one request (``defer_session``)."""
    chosen = writer_settings_for(
        settings.writer, first_window(settings, request), settings.upload_buffer_limit
    )
    size = _one_request_size(settings, request)
    if size is None:
        return chosen
    above = (size // CHUNK_QUANTUM + 1) * CHUNK_QUANTUM
    largest = max(above, chosen.max_chunk_size)
    buffer_limit = max(largest, chosen.buffer_limit)
    return dataclasses.replace(
        chosen, min_chunk_size=above, max_chunk_size=largest, buffer_limit=buffer_limit
    )


class UploadListener(Protocol):
    """Something attached to an upload: hears when its window moves and when it fails.

    Connections implement these; they must not block (the upload calls them for every
    attached connection in turn, and one slow client must not hold up the others).
    """

    def offer_credit(self, upload: Upload, committed_offset: int, window_end: int) -> None: ...

    def upload_failed(self, upload: Upload, error: ServerError) -> None: ...


class UploadHost(Protocol):
    """What an upload needs from the registry that holds it."""

    @property
    def settings(self) -> ServerSettings: ...

    @property
    def metrics(self) -> ServerMetrics: ...

    @property
    def backend(self) -> Backend: ...

    @property
    def poster(self) -> WholeObjectPoster | None:
        """Sends an object stored in one request straight from trio, if the backend can."""

    def upload_running(self, upload: Upload) -> None:
        """The writer is up: the upload can be found and counted from now on."""

    def give_back(self, upload: Upload) -> None:
        """Return what the upload holds (window, client slot); only the first call counts."""

    def upload_stopped(self, upload: Upload) -> None:
        """The writer and tasks are gone: stop counting the upload, and give back."""


def error_from_writer(exc: WriterError) -> ServerError:
    """The client-facing form of a writer failure (its message holds no secrets)."""
    if isinstance(exc, NonRetryableHTTPError) and exc.status == 412:
        return ServerError(ErrorCode.PRECONDITION_FAILED, str(exc))
    if isinstance(exc, NonRetryableHTTPError) and exc.status in (401, 403):
        return ServerError(ErrorCode.FORBIDDEN, str(exc))
    if isinstance(exc, ChecksumMismatchError):
        return ServerError(ErrorCode.CHECKSUM_MISMATCH, str(exc))
    if isinstance(exc, WriterAbortedError):
        return ServerError(ErrorCode.ABORTED, str(exc))
    if isinstance(exc, TooFragmentedError):
        return ServerError(ErrorCode.FRAGMENT_LIMIT, str(exc))
    if isinstance(exc, SessionLostError) and not exc.lost_range:
        # Gone while resuming (or with nothing of ours lost): aborted, expired or finished,
        # perhaps on another proxy. Its token can never write again.
        return ServerError(ErrorCode.UPLOAD_FINISHED, str(exc))
    return ServerError(ErrorCode.GCS_ERROR, str(exc), retryable=False)


def error_from_refused_start(exc: WriterError) -> ServerError:
    """The client-facing form of a failure to start writing an object (a session's start,
    a one-request upload). A 400 there can only be about what the client asked for (a
    name, metadata or content type GCS refuses): INVALID_REQUEST, which a version-1 client
    hears as GCS_ERROR."""
    if isinstance(exc, NonRetryableHTTPError) and exc.status == 400:
        return ServerError(ErrorCode.INVALID_REQUEST, str(exc))
    return error_from_writer(exc)


class MissingRangesError(ServerError):
    """A Complete while bytes below its total_size are missing: the upload is fine, and the
    client sends them and completes again. Answered with INCOMPLETE, which lists them
    (version 1 gets MISSING_RANGES, with the first few in the message)."""

    def __init__(self, upload_id: str, missing: list[tuple[int, int]]) -> None:
        super().__init__(
            ErrorCode.MISSING_RANGES,
            f"upload {upload_id}: missing bytes {format_ranges(missing)}",
        )
        self.missing = tuple(missing[:MAX_LISTED_RANGES])


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
        self._pieces = 0
        self._failure: ServerError | None = None
        self._pending: PendingWrite | _NullPending
        if length == 0:
            self._pending = _NullPending()  # nothing to hold, wherever it points
            return
        try:
            self._pending = upload.writer.begin_write(offset, length)
        except WriterError as exc:
            if not self._redundant(exc):
                raise upload.write_refusal(exc) from exc
            self._pending = _NullPending()

    def feed(self, data: memoryview) -> None:
        if self._failure is not None:
            return
        self._received += len(data)
        self._pieces += 1
        try:
            self._pending.feed(data)
        except WriterError as exc:
            self._fail(exc)

    def commit(self, crc32c: int | None = None) -> int:
        """Make the frame's bytes uploadable; returns the committed offset for the Ack.

        ``crc32c`` is the frame data's verified CRC32C, if known (see
        :meth:`reliablewriter.PendingWrite.commit`)."""
        if self._failure is None:
            refusal = self.upload.fragment_refusal(self.offset, self._pieces)
            if refusal is not None:
                self.discard()
                self._failure = refusal
        if self._failure is None:
            try:
                self._pending.commit(crc32c)
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
            self._failure = self.upload.write_refusal(exc)

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


class _NullPending:
    def feed(self, data: memoryview) -> None:
        pass

    def commit(self, crc32c: int | None = None) -> None:
        pass

    def discard(self) -> None:
        pass


@dataclass
class _Completion:
    total_size: int
    crc32c: int | None
    done: trio.Event = dataclasses.field(default_factory=trio.Event)
    result: ObjectInfo | None = None
    error: ServerError | None = None


class Upload:
    """One upload's state in this process. Created only by the registry, run by :meth:`run`."""

    def __init__(
        self,
        host: UploadHost,
        upload_id: str,
        request: OpenRequest,
        client: str,
        credit: UploadWindow,
    ) -> None:
        self.upload_id = upload_id
        self.request = request
        self.client = client
        self._credit = credit
        #: the sealed token; set once the writer has a session
        self.token = b""
        self._host = host
        self._lifecycle = UploadLifecycle(upload_id)
        self._writer: ReliableWriter | None = None
        self._listeners: set[UploadListener] = set()
        self._activity = trio.lowlevel.ParkingLot()
        self._last_activity = trio.current_time()
        self._completion: _Completion | None = None
        self._failure: ServerError | None = None
        self._nursery: trio.Nursery | None = None
        self._finished = trio.Event()
        self._stats_seen = _StatsCursor()
        self._contiguous_cache: tuple[tuple[int, int], int] = ((-1, -1), 0)

    def __repr__(self) -> str:
        return f"<Upload {self.upload_id} {self.request.bucket}/{self.request.name} {self.state}>"

    @property
    def state(self) -> UploadState:
        return self._lifecycle.state

    # --- what connections use -------------------------------------------------------

    @property
    def writer(self) -> ReliableWriter:
        if self._writer is None:
            raise ServerError(ErrorCode.INTERNAL, f"upload {self.upload_id} has no writer")
        return self._writer

    @property
    def committed_offset(self) -> int:
        return self.writer.committed_offset

    @property
    def window(self) -> int:
        """The credit window's size now (it grows as data arrives)."""
        return self._credit.size

    @property
    def window_end(self) -> int:
        """Where the credit ends: never lower than any end announced before."""
        return self._credit.end(self.writer.committed_offset)

    def fragment_refusal(self, offset: int, pieces: int) -> ServerError | None:
        """FRAGMENT_LIMIT if holding ``pieces`` more separate pieces, for a write at
        ``offset``, would take the buffer's overhead past what the window pays for.

        A write that starts within the gap-free run from the committed offset is always
        taken: it is what lets the writer send a chunk and free the buffer, so refusing it
        would leave a fragmented upload stuck. Its pieces join the run (tiny ones are
        joined by the buffer), so this cannot be used to pile up fragments.
        """
        writer = self.writer
        overhead = writer.fragment_count * FRAGMENT_OVERHEAD
        allowance = self._credit.fragment_allowance
        if overhead + pieces * FRAGMENT_OVERHEAD <= allowance:
            return None
        contiguous_end = self._contiguous_end(writer)
        if offset <= contiguous_end:
            return None
        return ServerError(
            ErrorCode.FRAGMENT_LIMIT,
            f"upload {self.upload_id} holds {overhead // FRAGMENT_OVERHEAD} separate pieces,"
            f" the most its {self._credit.size}-byte window allows; this write was dropped:"
            f" send the lowest missing bytes first (from {contiguous_end}), then resend it",
        )

    def _contiguous_end(self, writer: ReliableWriter) -> int:
        """Where the gap-free run of bytes from 0 ends. Remembered while the buffer is
        unchanged, so a client whose writes keep being refused costs O(1) each, not a walk
        over every range held."""
        key = (writer.committed_offset, writer.buffered_cost)
        if self._contiguous_cache[0] != key:
            ranges = writer.received_ranges()
            end = ranges[0][1] if ranges and ranges[0][0] == 0 else 0
            self._contiguous_cache = (key, end)
        return self._contiguous_cache[1]

    def received_ranges(self) -> tuple[tuple[int, int], ...]:
        return tuple(self.writer.received_ranges())

    def missing(self, end: int) -> list[tuple[int, int]]:
        """The byte ranges below ``end`` neither received nor committed yet, lowest first."""
        return RangeSet(self.received_ranges()).missing(0, end)

    def failure(self) -> ServerError | None:
        """Why this upload cannot take more requests, or ``None`` while it can."""
        if self._failure is not None:
            return self._failure
        if self.state is UploadState.ABORTED:
            return ServerError(ErrorCode.ABORTED, f"upload {self.upload_id} was aborted")
        if self.state is UploadState.RELEASED:
            return ServerError(
                ErrorCode.UNKNOWN_UPLOAD,
                f"upload {self.upload_id} was released here; attach again with its token",
                retryable=True,
            )
        return None

    def session_uri(self) -> str:
        """The GCS session the token must lead to (a secret: never log it).

        Raises a retryable GCS_ERROR, and records the failure, if the writer opened without
        a session (GCS answered the initiation with a status it took for a lost session).
        """
        try:
            return self.writer.session_uri
        except WriterClosedError as exc:
            self._writer_failed(exc)
            raise ServerError(
                ErrorCode.GCS_ERROR, "could not start the GCS upload", retryable=True
            ) from exc

    def write_refusal(self, exc: WriterError) -> ServerError:
        """Why the writer refused a write: the upload's recorded failure comes first.

        The writer closes as the upload ends, before or after the upload records why (abort,
        failure, release), so the closure itself says nothing about the reason.
        """
        failure = self.failure()
        if failure is not None:
            return failure
        if not isinstance(exc, WriterClosedError):
            return error_from_writer(exc)
        if self.state is UploadState.COMPLETED:
            return ServerError(ErrorCode.INVALID_STATE, f"upload {self.upload_id} is completed")
        # Closing without a failure: the upload is being released (idle, or shutdown).
        return ServerError(
            ErrorCode.UNKNOWN_UPLOAD,
            f"upload {self.upload_id} is being released here; attach again with its token",
            retryable=True,
        )

    @property
    def finished(self) -> bool:
        """Whether the upload's writer and tasks are all gone."""
        return self._finished.is_set()

    async def wait_finished(self) -> None:
        """Wait until the upload's writer and tasks are gone (completed, failed, or released)."""
        await self._finished.wait()

    async def attach(self, listener: UploadListener) -> None:
        """Add ``listener``; the first one takes the window back (waiting up to
        ``budget_wait`` for budget, then TOO_BUSY with ``listener`` not attached)."""
        if not self._listeners and self._writer is not None and self.state is UploadState.ACTIVE:
            await self._credit.take_back(
                self._writer.committed_offset, patience=self._host.settings.budget_wait
            )
        self._listeners.add(listener)
        self._touch()

    def detach(self, listener: UploadListener) -> None:
        """Remove ``listener``; once none is left the window goes back to the budget, but
        for what the buffer really holds."""
        self._listeners.discard(listener)
        self._touch()
        self._give_back_window_if_alone()

    def _give_back_window_if_alone(self) -> None:
        if not self._listeners and self._writer is not None:
            self._credit.give_back(self._writer.buffered_cost)

    def holds(self, start: int, end: int) -> bool:
        """Whether every byte of ``[start, end)`` is received or committed already."""
        return RangeSet(self.received_ranges()).contains(start, end)

    def begin_write(self, offset: int, length: int) -> StagedWrite:
        """Start taking a WriteAt frame for ``[offset, offset + length)``.

        Raises :class:`ServerError` with OUTSIDE_CREDIT when the frame reaches beyond the
        window any Credit ever granted (windows only grow, so a write within an older
        credit is always within the current one). After completion, a frame within the
        object is a late resend: it is taken and dropped, so its Ack says nothing new.
        """
        failure = self.failure()
        if failure is not None:
            raise failure
        if length == 0:
            # Carries no byte, so it is never outside the window: the spec answers it with
            # an Ack of the committed offset, wherever it points.
            self._touch()
            return StagedWrite(self, offset, 0)
        if self.state is UploadState.COMPLETED and self.holds(offset, offset + length):
            self._touch()
            return StagedWrite(self, offset, length)
        if self.state is UploadState.COMPLETED:
            raise ServerError(ErrorCode.INVALID_STATE, f"upload {self.upload_id} is completed")
        end = offset + length
        expected = self.request.expected_size
        if expected is not None and end > expected:
            # Inside the window, perhaps, but never part of the object: the request is wrong,
            # not the client's credit accounting (the connection goes on).
            raise ServerError(
                ErrorCode.SIZE_MISMATCH,
                f"write [{offset}, {end}) goes past the declared size {expected}",
            )
        window_end = self.window_end
        if end > window_end:
            raise ServerError(
                ErrorCode.OUTSIDE_CREDIT,
                f"write [{offset}, {end}) goes past the credit window end {window_end}",
            )
        self._touch()
        return StagedWrite(self, offset, length)

    def note_received(self, nbytes: int) -> None:
        """A write of ``nbytes`` was taken: the window may grow.

        Only a completion waiting for missing bytes is woken (:meth:`_await_all_received`):
        :meth:`_linger` needs no wake-up per write, as it reads the time of the last activity
        when its deadline passes (a wake-up per frame cost a pass of the scheduler).
        """
        self._host.metrics.bytes_received.inc(nbytes)
        self._touch()
        if self._completion is not None:
            self._activity.unpark_all()
        if self._credit.grow_for(nbytes):
            self._announce(self.writer.committed_offset)

    def _announce(self, committed: int) -> None:
        window_end = self.window_end
        for listener in list(self._listeners):
            listener.offer_credit(self, committed, window_end)

    async def complete(self, total_size: int, crc32c: int | None) -> ObjectInfo:
        """Finalize the object once every byte of ``[0, total_size)`` is in GCS.

        Idempotent: a repeated (or concurrent) Complete with the same size gets the same
        result. Cancelling the caller does not stop the completion, which runs in the
        upload's own nursery; a later Complete picks up its result.
        """
        completion = self._completion
        if completion is not None and completion.total_size != total_size:
            raise ServerError(
                ErrorCode.INVALID_STATE,
                f"upload {self.upload_id} is completing with size {completion.total_size}, "
                f"not {total_size}",
            )
        if completion is None:
            failure = self.failure()
            if failure is not None:
                raise failure
            if self._nursery is None:
                raise ServerError(ErrorCode.INTERNAL, f"upload {self.upload_id} is not running")
            completion = self._completion = _Completion(total_size, crc32c)
            self._nursery.start_soon(self._finish, completion)
        await completion.done.wait()
        if completion.error is not None:
            raise completion.error
        if completion.result is None:
            # The completion was cut short by the upload ending (abort, writer failure,
            # shutdown); the reason is recorded once the upload's tasks are gone.
            await self._finished.wait()
            raise self.failure() or ServerError(
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
            raise ServerError(ErrorCode.INVALID_STATE, f"upload {self.upload_id} is completed")
        if self.state is UploadState.ABORTED:
            await self._finished.wait()
            return
        self._lifecycle.move_to(UploadState.ABORTED)
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

    # --- the upload's lifetime --------------------------------------------------------

    async def run(
        self,
        session_uri: str | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The upload's lifetime: open the writer, serve it, and let go of everything after.

        Failures before ``task_status.started()`` are raised (as :class:`ServerError`) to
        whoever opened the upload; after it, they are logged and recorded on the upload,
        never raised into the server's nursery. Cancelled, the upload is released: its GCS
        session is left alone, resumable through the token.
        """
        host = self._host
        request = self.request
        started = False
        try:
            bucket = await trio.to_thread.run_sync(host.backend.bucket, request.bucket)
            async with open_writer(
                bucket,
                request.name,
                writer_settings(host.settings, request),
                content_type=request.content_type,
                metadata=dict(request.metadata),
                if_generation_match=request.if_generation_match,
                expected_size=request.expected_size,
                session_uri=session_uri,
                # Only the process that opened the session knows nothing was committed;
                # a token's session that is gone is never replaced (see registry.attach).
                restart_if_nothing_committed=session_uri is None,
                # An object smaller than the first chunk is stored by one request at
                # COMPLETE, with no session at all (its token then resumes nothing: none
                # of its bytes is durable before the object is). Only with a pinned
                # generation, which is what makes a replay of its token harmless.
                defer_session=request.if_generation_match is not None,
                # Attached again without a session: the instance that held it may have
                # stored it before its answer reached the client.
                maybe_stored_before=request.in_one_request,
                poster=host.poster,
            ) as writer:
                self._writer = writer
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    host.upload_running(self)
                    nursery.start_soon(self._follow_writer)
                    started = True
                    task_status.started()
                    await self._linger()
                    nursery.cancel_scope.cancel()
                self._record_stats(writer.stats)
        except WriterError as exc:
            if not started:
                raise error_from_refused_start(exc) from exc
            self._writer_failed(exc)
        except Exception as exc:
            if not started:
                raise ServerError(
                    ErrorCode.GCS_ERROR, f"could not start the GCS upload: {exc}", retryable=True
                ) from exc
            self._crashed()
        finally:
            if started:
                host.upload_stopped(self)
            self._finished_running()

    def _touch(self) -> None:
        self._last_activity = trio.current_time()

    async def _await_all_received(self, total_size: int) -> None:
        """Wait until ``[0, total_size)`` is all received, at most ``complete_timeout`` (for
        frames still on their way on other connections); then raise
        :class:`MissingRangesError`, which is answered at once (INCOMPLETE)."""
        deadline = trio.current_time() + self._host.settings.complete_timeout
        while gaps := self.missing(total_size):
            with trio.move_on_at(deadline) as waiting:
                await self._activity.park()
            failure = self.failure()
            if failure is not None:
                raise failure
            if waiting.cancelled_caught and (gaps := self.missing(total_size)):
                raise MissingRangesError(self.upload_id, gaps)

    async def _finish(self, completion: _Completion) -> None:
        try:
            await self._await_all_received(completion.total_size)
            completion.result = await self.writer.complete(
                total_size=completion.total_size, crc32c=completion.crc32c
            )
        except ServerError as exc:
            completion.error = exc
            # Missing bytes may still come: a later Complete starts over.
            if exc.code is ErrorCode.MISSING_RANGES:
                self._completion = None
        except WriterError as exc:
            completion.error = self._writer_failed(exc)
        except ValueError as exc:
            # The writer refuses a total that contradicts the bytes it holds or the size
            # declared at open. The upload itself is fine: a corrected Complete may follow.
            completion.error = ServerError(ErrorCode.SIZE_MISMATCH, str(exc))
            self._completion = None
        else:
            self._lifecycle.move_to(UploadState.COMPLETED)
            self._record_stats(self.writer.stats)  # counted before anyone hears of it
            # Give the window back before anyone hears of the completion, so a client that
            # opens its next upload right away finds the budget as it left it.
            self._host.give_back(self)
            self._host.metrics.uploads_completed.inc()
            self._stats_seen.completed(self._host.metrics)
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
                self._give_back_window_if_alone()  # what the buffer holds shrank
                self._announce(announced)
        except WriterClosedError:
            return  # complete or closing: the offset will not move again
        except WriterError as exc:
            if self.state is not UploadState.ABORTED:
                self._writer_failed(exc)

    def _writer_failed(self, exc: WriterError) -> ServerError:
        """Record that the writer gave up; every attached connection hears of it at once."""
        if self._failure is None:
            log_event(logger, logging.WARNING, "upload-failed", upload=self.upload_id, error=exc)
        return self._record_failure(error_from_writer(exc), reason=type(exc).__name__)

    def _crashed(self) -> ServerError:
        """Record that a bug ended the upload's tasks (call it while handling the exception).

        A failure recorded earlier stays: it is the reason clients were, or will be, told.
        """
        log_event(logger, logging.ERROR, "upload-crashed", exc=True, upload=self.upload_id)
        error = ServerError(ErrorCode.INTERNAL, f"upload {self.upload_id} broke")
        return self._record_failure(error, reason="crash")

    def _record_failure(self, error: ServerError, *, reason: str) -> ServerError:
        """The first failure recorded is the upload's; attached connections hear of it."""
        if self._failure is None and self._lifecycle.can_move_to(UploadState.FAILED):
            self._failure = error
            self._lifecycle.move_to(UploadState.FAILED)
            self._host.metrics.uploads_failed.labels(reason=reason).inc()
            for listener in list(self._listeners):
                listener.upload_failed(self, error)
            self._activity.unpark_all()
        return self._failure or error

    def _record_stats(self, stats: WriterStats) -> None:
        self._stats_seen.publish(stats, self._host.metrics)

    async def _linger(self) -> None:
        """Hold the writer until the upload is completed, aborted, or idle long enough."""
        settings = self._host.settings
        while self.state is UploadState.ACTIVE:
            if self._completion is not None or self._listeners:
                deadline = trio.current_time() + settings.upload_idle_timeout
            else:
                deadline = self._last_activity + settings.upload_idle_timeout
                if trio.current_time() >= deadline:
                    # Released from now on, though the writer takes a moment to stop: an
                    # attach arriving meanwhile takes the upload over afresh from GCS.
                    self._lifecycle.move_to(UploadState.RELEASED)
                    log_event(logger, logging.INFO, "upload-released-idle", upload=self.upload_id)
                    return
            with trio.move_on_at(deadline):
                await self._activity.park()

    def _finished_running(self) -> None:
        if self.state is UploadState.ACTIVE:
            self._lifecycle.move_to(UploadState.RELEASED)
        self._activity.unpark_all()
        self._finished.set()


class _StatsCursor:
    """Turns the writer's cumulative stats into increments of the server's counters."""

    def __init__(self) -> None:
        self._committed = 0
        self._retries: TallyCounter[str] = TallyCounter()
        self._opened = trio.current_time()  # the upload's open or takeover, on this instance

    def completed(self, metrics: ServerMetrics) -> None:
        metrics.upload_duration.observe(trio.current_time() - self._opened)

    def publish(self, stats: WriterStats, metrics: ServerMetrics) -> None:
        if stats.bytes_acked > 0 and self._committed == 0:
            metrics.first_commit.observe(trio.current_time() - self._opened)
        if stats.bytes_acked > self._committed:
            metrics.bytes_committed.inc(stats.bytes_acked - self._committed)
            self._committed = stats.bytes_acked
        for cause, count in stats.retries_by_cause.items():
            delta = count - self._retries[cause]
            if delta > 0:
                metrics.retries.labels(cause=cause).inc(delta)
                self._retries[cause] = count
