"""Composite uploads on the server: what they need beyond their segments.

A composite upload (docs/protocol.md section 14) has no GCS session of its own. Its token
names the object, the segment size and the generation the upload may replace; each segment
is an ordinary upload of a temporary object, opened by the registry; composing and
discarding read everything they need from GCS. So any instance sharing the token key can
serve any request of any composite upload, and an instance that dies takes nothing with it
but the segments it was writing, which the client sends again.

What GCS holds for upload ``u`` (``temporary_name``): segment ``i`` at
``<temp prefix><u>/<i>``, intermediate composes at ``<temp prefix><u>/c<level>.<j>`` while
composing, and ``<temp prefix><u>/discarded`` once the upload was discarded or failed its
checksum: a marker every instance consults before it writes for the upload again. The
sweep removes an upload's temporaries once the newest is older than the token lifetime,
after which no token can name the upload any more.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio
from google.api_core import exceptions as api_exceptions
from google.cloud import storage  # type: ignore[import-untyped]

from protocol import ErrorCode
from protocol.ranges import RangeSet
from proxy.server.backend import Backend
from proxy.server.errors import ServerError, quote
from proxy.server.logging import get_logger, log_event
from proxy.server.settings import ServerSettings
from proxy.server.tokens import UploadTicket
from proxy.server.uploads import (
    MissingRangesError,
    OpenRequest,
    error_from_writer,
    whole_window,
)
from reliablewriter import (
    ChecksumMismatchError,
    IncompleteObjectError,
    ObjectInfo,
    WriterError,
    complete_from_temporaries,
    temporary_name,
)
from reliablewriter.checksum import crc32c_to_b64
from reliablewriter.composite import segment_count
from reliablewriter.sweep import sweep_temporaries

__all__ = ["CompositeUploads"]

logger = get_logger(__name__)

_T = TypeVar("_T")

#: the marker that ends an upload for every instance (discarded, or its checksum failed)
_DISCARDED = "discarded"
#: GCS requests of the housekeeping and the checks here get this long each
_REQUEST_TIMEOUT = 60.0


@dataclass(frozen=True)
class _Outcome:
    """What this process remembers of a composite upload it finished."""

    info: ObjectInfo | None
    failure: ServerError | None
    total_size: int
    forget_at: float


class CompositeUploads:
    """Segment requests, composing, discarding and sweeping for composite uploads."""

    def __init__(self, settings: ServerSettings, backend: Backend) -> None:
        self._settings = settings
        self._backend = backend
        self._policy = settings.composite
        self._outcomes: dict[str, _Outcome] = {}
        self._locks: dict[str, trio.Lock] = {}
        #: buckets this process stored segments in: the ones its sweep looks at
        self._buckets: set[str] = set()

    def segment_request(self, ticket: UploadTicket, index: int) -> OpenRequest:
        """The upload of segment ``index``: its temporary object, of exactly its size."""
        count = segment_count(ticket.expected_size or 0, ticket.segment_size)
        if not 0 <= index < count:
            raise ServerError(
                ErrorCode.INVALID_REQUEST,
                f"upload {ticket.upload_id} has segments 0 to {count - 1}, not {index}",
            )
        start = index * ticket.segment_size
        size = min(ticket.segment_size, (ticket.expected_size or 0) - start)
        self._buckets.add(ticket.bucket)
        return OpenRequest(
            bucket=ticket.bucket,
            name=temporary_name(self._policy.temp_prefix, ticket.upload_id, index),
            content_type="application/octet-stream",
            metadata=(),
            expected_size=size,
            if_generation_match=None,
            # The whole segment from the start: a small first window (which grows as
            # data arrives) would only make its first chunks small, one GCS round trip
            # each, where the round trip is what a composite upload is for.
            first_window=whole_window(self._settings, size),
        )

    async def segment_stored(self, ticket: UploadTicket, index: int) -> bool:
        """Whether segment ``index``'s temporary object is in GCS with exactly its size (one
        metadata request): one this process stored may have been deleted since."""
        request = self.segment_request(ticket, index)

        def look() -> bool:
            bucket = self._backend.bucket(ticket.bucket)
            blob = bucket.get_blob(request.name, retry=None, timeout=_REQUEST_TIMEOUT)
            return blob is not None and blob.size == request.expected_size

        return await _in_thread(look, ticket, only_reads=True)

    async def check_not_discarded(self, ticket: UploadTicket) -> None:
        """ABORTED once the upload was discarded or aborted (one metadata request)."""

        def look() -> bool:
            return self._discarded_in(self._backend.bucket(ticket.bucket), ticket)

        if await _in_thread(look, ticket, only_reads=True):
            raise _discarded(ticket)

    async def check_writable(self, ticket: UploadTicket) -> None:
        """ABORTED once the upload was discarded, UPLOAD_FINISHED once the object is no
        longer the one it may replace (composed, or written by anyone else): either way
        its token never writes again. Two metadata requests."""
        discarded, live = await self._look_up(ticket)
        if discarded:
            raise _discarded(ticket)
        if live is not None and _replaced(ticket, live):
            raise ServerError(
                ErrorCode.UPLOAD_FINISHED,
                f"upload {ticket.upload_id} is over: {quote(ticket.name)} has changed since"
                " it opened",
            )

    async def compose(
        self, ticket: UploadTicket, total_size: int, crc32c: int | None
    ) -> ObjectInfo:
        """Compose the upload's segments into its object (idempotent; see the module doc).

        Raises MissingRangesError naming the segments not stored with their exact size, or
        the ServerError the client is told. Cancelled midway, the object exists whole or
        not at all, and its segments are deleted unless some were missing.
        """
        upload_id = ticket.upload_id
        if ticket.expected_size is not None and total_size != ticket.expected_size:
            raise ServerError(
                ErrorCode.SIZE_MISMATCH,
                f"upload {upload_id} was opened for {ticket.expected_size} bytes, not {total_size}",
            )
        async with self._lock(upload_id):
            remembered = self._remembered(upload_id, total_size)
            if remembered is not None:
                return remembered
            discarded, live = await self._look_up(ticket)
            if discarded:
                raise _discarded(ticket)
            if live is not None and _replaced(ticket, live):
                return _finished_before(ticket, live, total_size, crc32c)
            try:
                info = await self._compose(ticket, total_size, crc32c)
            except IncompleteObjectError as exc:
                # One range per missing segment: neighbours join, as INCOMPLETE lists them.
                raise MissingRangesError(upload_id, list(RangeSet(exc.missing))) from None
            except ChecksumMismatchError as exc:
                # Final, for every instance: the bytes stored are what the client sent.
                await self._mark_discarded(ticket)
                failure = error_from_writer(exc)
                self._remember(upload_id, None, failure, total_size)
                raise failure from None
            except WriterError as exc:
                raise error_from_writer(exc) from None
            self._remember(upload_id, info, None, total_size)
            log_event(
                logger,
                logging.INFO,
                "composite-completed",
                upload=upload_id,
                size=info.size,
                generation=info.generation,
            )
            return info

    async def discard(self, ticket: UploadTicket) -> None:
        """Mark the upload discarded in GCS, then delete its stored segments."""
        async with self._lock(ticket.upload_id):
            await self._mark_discarded(ticket)
            self._remember(ticket.upload_id, None, _discarded(ticket), -1)
        log_event(logger, logging.INFO, "composite-discarded", upload=ticket.upload_id)

    async def sweep_periodically(self) -> None:
        """Forever: delete the temporaries of uploads idle for longer than the token
        lifetime, in every bucket this process has stored segments in. Cancel to stop."""
        while True:
            await trio.sleep(self._policy.sweep_interval)
            for bucket in sorted(self._buckets):
                try:
                    swept = await trio.to_thread.run_sync(self._sweep, bucket)
                except (api_exceptions.GoogleAPICallError, OSError) as exc:
                    log_event(logger, logging.WARNING, "sweep-failed", error=type(exc).__name__)
                    continue
                if swept:
                    log_event(logger, logging.INFO, "sweep-removed", objects=swept)

    # --- GCS ------------------------------------------------------------------------------

    def _sweep(self, bucket: str) -> int:
        older_than = datetime.timedelta(seconds=self._settings.token_lifetime)
        removed = sweep_temporaries(
            self._backend.bucket(bucket),
            older_than=older_than,
            prefix=self._policy.temp_prefix,
            timeout=_REQUEST_TIMEOUT,
        )
        return len(removed)

    async def _look_up(self, ticket: UploadTicket) -> tuple[bool, ObjectInfo | None]:
        """Whether the upload was discarded, and the live object (None if there is none)."""

        def look() -> tuple[bool, ObjectInfo | None]:
            bucket = self._backend.bucket(ticket.bucket)
            discarded = self._discarded_in(bucket, ticket)
            live = bucket.get_blob(ticket.name, retry=None, timeout=_REQUEST_TIMEOUT)
            # The JSON resource GCS returned; google-cloud-storage keeps it as ``_properties``.
            info = None if live is None else ObjectInfo.from_resource(dict(live._properties))
            return discarded, info

        return await _in_thread(look, ticket, only_reads=True)

    async def _compose(
        self, ticket: UploadTicket, total_size: int, crc32c: int | None
    ) -> ObjectInfo:
        bucket = await _in_thread(lambda: self._backend.bucket(ticket.bucket), ticket)
        settings = self._policy.cut_for(self._settings.writer, ticket.segment_size)
        return await complete_from_temporaries(
            bucket,
            ticket.name,
            settings,
            upload_id=ticket.upload_id,
            total_size=total_size,
            crc32c=crc32c,
            if_generation_match=ticket.if_generation_match,
            content_type=ticket.content_type,
            metadata=dict(ticket.metadata),
        )

    def _marker(self, ticket: UploadTicket) -> str:
        """The name of the object that says the upload was discarded."""
        return temporary_name(self._policy.temp_prefix, ticket.upload_id, _DISCARDED)

    def _discarded_in(self, bucket: storage.Bucket, ticket: UploadTicket) -> bool:
        """Whether the upload's marker is in ``bucket`` (blocking: one metadata request)."""
        marker = self._marker(ticket)
        return bucket.get_blob(marker, retry=None, timeout=_REQUEST_TIMEOUT) is not None

    async def _mark_discarded(self, ticket: UploadTicket) -> None:
        prefix = temporary_name(self._policy.temp_prefix, ticket.upload_id, "")
        marker = self._marker(ticket)

        def mark_and_delete() -> None:
            bucket = self._backend.bucket(ticket.bucket)
            with contextlib.suppress(api_exceptions.PreconditionFailed):  # marked already
                bucket.blob(marker).upload_from_string(
                    b"", if_generation_match=0, retry=None, timeout=_REQUEST_TIMEOUT
                )
            for blob in bucket.list_blobs(prefix=prefix, timeout=_REQUEST_TIMEOUT):
                if blob.name != marker:
                    # Deleted meanwhile (another discard, a sweep) is the same outcome.
                    with contextlib.suppress(api_exceptions.NotFound):
                        bucket.delete_blob(blob.name, timeout=_REQUEST_TIMEOUT)

        self._buckets.add(ticket.bucket)
        await _in_thread(mark_and_delete, ticket)

    # --- what this process remembers ------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _lock(self, upload_id: str) -> AsyncIterator[None]:
        """One COMPOSE or DISCARD of an upload at a time here. A lock lives while someone
        holds or waits for it, so answering INCOMPLETE again and again keeps nothing."""
        lock = self._locks.setdefault(upload_id, trio.Lock())
        try:
            async with lock:
                yield
        finally:
            statistics = lock.statistics()
            if not statistics.locked and not statistics.tasks_waiting:
                self._locks.pop(upload_id, None)

    def _remember(
        self,
        upload_id: str,
        info: ObjectInfo | None,
        failure: ServerError | None,
        total_size: int,
    ) -> None:
        now = trio.current_time()
        for stale in [key for key, kept in self._outcomes.items() if kept.forget_at <= now]:
            del self._outcomes[stale]
        forget_at = now + self._settings.result_retention
        self._outcomes[upload_id] = _Outcome(info, failure, total_size, forget_at)

    def _remembered(self, upload_id: str, total_size: int) -> ObjectInfo | None:
        kept = self._outcomes.get(upload_id)
        if kept is None or kept.forget_at <= trio.current_time():
            return None
        if kept.failure is not None:
            raise kept.failure
        if kept.info is not None and kept.total_size != total_size:
            raise ServerError(
                ErrorCode.SIZE_MISMATCH,
                f"upload {upload_id} was completed at {kept.total_size} bytes, not {total_size}",
            )
        return kept.info


def _replaced(ticket: UploadTicket, live: ObjectInfo) -> bool:
    pinned = ticket.if_generation_match
    return pinned is not None and live.generation != pinned


def _finished_before(
    ticket: UploadTicket, info: ObjectInfo, total_size: int, crc32c: int | None
) -> ObjectInfo:
    """A COMPOSE repeated after the object changed: the same COMPLETED if the object is
    this upload's bytes as far as the client can say (size and CRC32C), else UPLOAD_FINISHED."""
    if crc32c is not None and info.size == total_size and info.crc32c == crc32c_to_b64(crc32c):
        return info
    raise ServerError(
        ErrorCode.UPLOAD_FINISHED,
        f"upload {ticket.upload_id} is over: {quote(ticket.name)} has changed since it opened",
    )


def _discarded(ticket: UploadTicket) -> ServerError:
    return ServerError(ErrorCode.ABORTED, f"upload {ticket.upload_id} was discarded")


async def _in_thread(
    work: Callable[[], _T], ticket: UploadTicket, *, only_reads: bool = False
) -> _T:
    """Run blocking GCS work in a thread; its failures become GCS_ERROR for the client.

    Cancelled, it waits for the work to end, unless the work ``only_reads`` (nothing it
    does is lost if its answer is dropped): then the thread is left to finish alone, so a
    shutdown does not wait for a GCS that does not answer.
    """
    try:
        return await trio.to_thread.run_sync(work, abandon_on_cancel=only_reads)
    except api_exceptions.GoogleAPICallError as exc:
        code = exc.code if isinstance(exc.code, int) else None
        raise ServerError(
            ErrorCode.GCS_ERROR,
            f"upload {ticket.upload_id}: GCS answered HTTP {code}",
            retryable=code is None or code >= 500 or code in (408, 429),
        ) from None
    except OSError as exc:
        raise ServerError(
            ErrorCode.GCS_ERROR,
            f"upload {ticket.upload_id}: {type(exc).__name__} talking to GCS",
            retryable=True,
        ) from None
