"""Composite uploads: one object from K resumable sessions in parallel, then composed.

A resumable session is one sequential stream: each chunk waits for its answer before the
next goes. :class:`CompositeWriter` cuts the object into fixed segments
(:attr:`CompositeSettings.segment_size`, a multiple of 256 KiB) and uploads each as its own
temporary object, ``<temp_prefix><upload_id>/<index>``, through its own
:class:`~reliablewriter.ReliableWriter`, up to ``parallel_segments`` at once. A segment
starts as soon as its first bytes arrive, so the buffer an out-of-order caller needs is
about K segments' windows, and a gap at the head stalls only the head's segment.

Completing composes the segments in order (:mod:`reliablewriter.compose`: at most 32
sources per call, a tree beyond), the final compose carrying the caller's
``ifGenerationMatch``. The object's CRC32C is combined from the segments' (GCS's own
values) with :func:`~reliablewriter.checksum.crc32c_combine`, so no byte is read twice;
it is checked against the caller's before the final compose and against GCS's after. Then
the temporaries are deleted. GCS gives composite objects no MD5.

Failures: a segment's writer retries on its own (a lost session included, under its
rules); if it fails, the composite fails with its error. Every way out that does not
complete (an error, :meth:`CompositeWriter.abort`, leaving the block, cancellation)
deletes the temporaries; a process that dies leaves them for ``rup sweep``
(:func:`reliablewriter.sweep.sweep_temporaries`).

:func:`complete_from_temporaries` completes an upload whose segments were uploaded by
anyone (other processes, other proxy instances): GCS, where every segment has a
deterministic name, is the only state it needs.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from functools import partial

import trio
from google.api_core import exceptions as api_exceptions
from google.cloud import storage  # type: ignore[import-untyped]

from .checksum import normalize_crc32c
from .compose import MAX_COMPONENT_COUNT, ComposeOptions, compose_parts, delete_objects
from .errors import (
    IncompleteObjectError,
    NonRetryableHTTPError,
    RetriesExhaustedError,
    WriterAbortedError,
    WriterError,
)
from .results import ObjectInfo
from .settings import CHUNK_QUANTUM, MiB, WriterSettings
from .transport import _NETWORK_ERRORS
from .writer import ReliableWriter, open_writer

__all__ = [
    "DEFAULT_TEMP_PREFIX",
    "CompositeSettings",
    "CompositeWriter",
    "complete_from_temporaries",
    "open_composite_writer",
    "segment_count",
    "temporary_name",
]

logger = logging.getLogger(__name__)

#: where temporary objects live unless configured otherwise (gsutil reserves a namespace too)
DEFAULT_TEMP_PREFIX = ".rup/tmp/"


def segment_count(total_size: int, segment_size: int) -> int:
    """How many segments an object of ``total_size`` bytes is cut into (an empty one too
    is one segment)."""
    return max(1, -(-total_size // segment_size))


def temporary_name(prefix: str, upload_id: str, part: int | str) -> str:
    """The deterministic name of an upload's temporary object: a segment (its index) or
    an intermediate compose (``c<level>.<index>``)."""
    return f"{prefix}{upload_id}/{part}"


@dataclass(frozen=True)
class CompositeSettings:
    """How a composite upload is cut and run.

    ``segment_size`` must be a positive multiple of 256 KiB (64 MiB by default);
    ``parallel_segments`` (K) segments may be in flight at once, each with its own
    ``writer`` settings, so the upload holds at most K writers' ``buffer_limit``.
    ``temp_prefix`` is the reserved namespace for temporary objects.
    """

    segment_size: int = 64 * MiB
    parallel_segments: int = 4
    temp_prefix: str = DEFAULT_TEMP_PREFIX
    writer: WriterSettings = field(default_factory=WriterSettings)

    def __post_init__(self) -> None:
        if self.segment_size <= 0 or self.segment_size % CHUNK_QUANTUM:
            raise ValueError(f"segment_size must be a positive multiple of {CHUNK_QUANTUM}")
        if self.parallel_segments < 1:
            raise ValueError("parallel_segments must be at least 1")
        if not self.temp_prefix.endswith("/") or self.temp_prefix.startswith("/"):
            raise ValueError("temp_prefix must end with '/' and not start with one")

    @property
    def max_buffered_cost(self) -> int:
        """The most the upload's writers can hold together."""
        return self.parallel_segments * self.writer.max_buffered_cost


@dataclass
class _Segment:
    """One segment: its writer while it uploads, its object once it is complete."""

    index: int
    start: int
    name: str
    writer: ReliableWriter | None = None
    #: set once the segment's size is known and its writer should complete
    size: int | None = None
    sized: trio.Event = field(default_factory=trio.Event)
    info: ObjectInfo | None = None
    done: trio.Event = field(default_factory=trio.Event)


class CompositeWriter:
    """One object uploaded as parallel segments. Create it with :func:`open_composite_writer`.

    Writes go to the segment they fall in; segments ``[lowest unfinished, + K)`` may be open
    at once, and a write further on waits. A caller that fills the lowest missing bytes
    first (as rup's client does) therefore never deadlocks.
    """

    def __init__(
        self,
        bucket: storage.Bucket,
        name: str,
        settings: CompositeSettings,
        *,
        upload_id: str,
        nursery: trio.Nursery,
        content_type: str,
        metadata: Mapping[str, str] | None,
        if_generation_match: int | None,
    ) -> None:
        self._bucket = bucket
        self._name = name
        self._settings = settings
        self._upload_id = upload_id
        self._nursery = nursery
        self._content_type = content_type
        self._metadata = metadata
        self._if_generation_match = if_generation_match
        self._segments: dict[int, _Segment] = {}
        self._intermediates: list[str] = []
        self._changed = trio.Event()
        self._failure: WriterError | None = None
        self._result: ObjectInfo | None = None

    # --- what callers can read ------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def upload_id(self) -> str:
        return self._upload_id

    @property
    def result(self) -> ObjectInfo | None:
        return self._result

    @property
    def temporary_names(self) -> tuple[str, ...]:
        """Every temporary object this upload has started, segments then intermediates."""
        return (*(s.name for s in self._segments.values()), *self._intermediates)

    @property
    def buffered_cost(self) -> int:
        return sum(s.writer.buffered_cost for s in self._segments.values() if s.writer is not None)

    def received_ranges(self) -> tuple[tuple[int, int], ...]:
        """Half-open byte ranges of the object held or committed, merged, in order."""
        ranges: list[tuple[int, int]] = []
        for segment in sorted(self._segments.values(), key=lambda s: s.index):
            held = (
                ((0, segment.info.size),)
                if segment.info is not None
                else segment.writer.received_ranges()
                if segment.writer is not None
                else ()
            )
            for start, end in held:
                start, end = segment.start + start, segment.start + end
                if ranges and start <= ranges[-1][1]:
                    ranges[-1] = (ranges[-1][0], max(ranges[-1][1], end))
                else:
                    ranges.append((start, end))
        return tuple(ranges)

    # --- writing --------------------------------------------------------------------

    async def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Hold ``data`` as the bytes at ``offset`` (a view is kept, nothing is copied).

        Waits while the segment it falls in cannot open yet or its writer's window is
        full. Cancelled while waiting, a prefix may have been taken; writing the whole of
        it again is always safe (the first copy wins).
        """
        if offset < 0:
            raise ValueError(f"offset must not be negative, got {offset}")
        view = memoryview(data).cast("B")
        size = self._settings.segment_size
        while view:
            index, local = divmod(offset, size)
            if index >= MAX_COMPONENT_COUNT:
                raise ValueError(
                    f"byte {offset} would make segment {index}: GCS composes at most "
                    f"{MAX_COMPONENT_COUNT} components; use a larger segment_size"
                )
            piece = view[: size - local]
            segment = await self._open_segment(index)
            writer = segment.writer
            assert writer is not None
            # A complete segment's bytes are all in GCS: what comes again is a resend.
            if writer.result is None and not segment.done.is_set():
                await writer.write_at(local, piece)
                if segment.size is None and writer.received_ranges() == ((0, size),):
                    self._size_segment(segment, size)
            view, offset = view[len(piece) :], offset + len(piece)
        await trio.lowlevel.checkpoint()

    async def _open_segment(self, index: int) -> _Segment:
        while True:
            self._check_usable()
            segment = self._segments.get(index)
            if segment is not None:
                if segment.writer is None:
                    await self._wait_for_change()  # opening in another task
                    continue
                return segment
            if index < self._lowest_unfinished() + self._settings.parallel_segments:
                segment = _Segment(
                    index,
                    index * self._settings.segment_size,
                    temporary_name(self._settings.temp_prefix, self._upload_id, index),
                )
                self._segments[index] = segment
                try:
                    await self._nursery.start(self._run_segment, segment)
                except BaseException as exc:
                    del self._segments[index]
                    if isinstance(exc, WriterError):
                        self._fail(exc)
                    raise
                finally:
                    self._notify()
                return segment
            await self._wait_for_change()

    def _lowest_unfinished(self) -> int:
        index = 0
        while (segment := self._segments.get(index)) is not None and segment.info is not None:
            index += 1
        return index

    async def _run_segment(
        self, segment: _Segment, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The segment's writer, from its session to its object; failures are the upload's."""
        try:
            async with open_writer(
                self._bucket,
                segment.name,
                self._settings.writer,
                if_generation_match=0,  # a temporary is new; a retried finalization stays safe
                # Its session is this writer's own, never resumed: if GCS loses it before a
                # byte is committed, a new one from byte 0 cannot lose or repeat anything.
                restart_if_nothing_committed=True,
            ) as writer:
                segment.writer = writer
                task_status.started()
                await segment.sized.wait()
                if segment.size is None:
                    return  # set by a clean-up: the writer is aborted
                segment.info = await writer.complete(segment.size)
        except WriterError as exc:
            if segment.writer is None:
                raise  # before started(): the opening caller gets it
            self._fail(exc)
        finally:
            segment.done.set()
            self._notify()

    def _size_segment(self, segment: _Segment, size: int) -> None:
        segment.size = size
        segment.sized.set()

    # --- finishing ------------------------------------------------------------------

    async def complete(self, total_size: int, crc32c: int | str | None = None) -> ObjectInfo:
        """Complete every segment, compose them into the object, delete the temporaries.

        Every byte below ``total_size`` must have been written, else
        :class:`~reliablewriter.IncompleteObjectError` (and the upload carries on).
        ``crc32c`` is the caller's expectation of the whole object, checked before the
        final compose. On any other failure the temporaries are deleted and the error
        raised. Cancelled midway, the temporaries stay until :meth:`abort` or the end of
        the ``async with`` block deletes them.
        """
        await trio.lowlevel.checkpoint()
        if self._result is not None:
            return self._result
        self._check_usable()
        size = self._settings.segment_size
        count = segment_count(total_size, size)
        held = self.received_ranges()
        if held and held[-1][1] > total_size:
            raise ValueError(f"bytes are held past the total size {total_size}")
        missing = _gaps(held, total_size)
        if missing:
            raise IncompleteObjectError(missing=tuple(missing), name=self._name, offset=None)
        if total_size == 0:
            await self._open_segment(0)
        expected = normalize_crc32c(crc32c) if crc32c is not None else None
        try:
            return await self._finish(count, total_size, expected)
        except WriterError as exc:
            self._fail(exc)
            with trio.CancelScope(shield=True):
                await self._clean_up()
            raise

    async def _finish(self, count: int, total: int, expected: str | None) -> ObjectInfo:
        segments = [self._segments[index] for index in range(count)]
        last = segments[-1]
        if last.size is None:
            self._size_segment(last, total - last.start)
        elif last.start + last.size != total:
            raise ValueError(f"total size {total} disagrees with segment {last.index}")
        for segment in segments:
            await segment.done.wait()
            self._check_usable()
        info = await compose_parts(
            self._bucket,
            self._name,
            [segment.info for segment in segments if segment.info is not None],
            self._compose_options(),
            expected_crc32c=expected,
            made=self._intermediates,
        )
        self._result = info
        with trio.CancelScope(shield=True):
            await self._clean_up()
        return info

    def _compose_options(self) -> ComposeOptions:
        return _compose_options(
            self._settings,
            self._upload_id,
            if_generation_match=self._if_generation_match,
            content_type=self._content_type,
            metadata=self._metadata,
        )

    async def abort(self) -> None:
        """Stop every segment, cancel their sessions and delete the temporaries.

        A completed object is left alone. Cancelled partway, the upload is still marked
        aborted; temporaries not yet deleted are left for a sweep.
        """
        if self._result is not None:
            await trio.lowlevel.checkpoint()
            return
        self._fail(WriterAbortedError("the upload was aborted", name=self._name))
        await self._clean_up()

    async def _clean_up(self) -> None:
        """Abort open writers, then delete every temporary object (each is idempotent)."""
        for segment in list(self._segments.values()):
            if segment.writer is not None:
                await segment.writer.abort()
            segment.sized.set()  # a task waiting for its size now finds its writer aborted
        writer = self._settings.writer
        await delete_objects(
            self._bucket,
            self.temporary_names,
            policy=writer.retry,
            connect_timeout=writer.connect_timeout,
            read_timeout=writer.progress_timeout,
        )

    # --- internals ------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _fail(self, error: WriterError) -> None:
        if self._failure is None:
            self._failure = error
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_for_change(self) -> None:
        await self._changed.wait()


def _intermediate_name(prefix: str, upload_id: str, level: int, index: int) -> str:
    return temporary_name(prefix, upload_id, f"c{level}.{index}")


def _compose_options(
    settings: CompositeSettings,
    upload_id: str,
    *,
    if_generation_match: int | None,
    content_type: str,
    metadata: Mapping[str, str] | None,
) -> ComposeOptions:
    """How an upload's segments are composed: intermediates in its own namespace, the
    segment writers' retry policy and timeouts, and what the final object carries."""
    writer = settings.writer
    return ComposeOptions(
        intermediate=partial(_intermediate_name, settings.temp_prefix, upload_id),
        policy=writer.retry,
        if_generation_match=if_generation_match,
        content_type=content_type,
        metadata=metadata,
        connect_timeout=writer.connect_timeout,
        read_timeout=writer.progress_timeout,
    )


def _gaps(held: tuple[tuple[int, int], ...], total: int) -> list[tuple[int, int]]:
    gaps: list[tuple[int, int]] = []
    position = 0
    for start, end in held:
        if start > position:
            gaps.append((position, min(start, total)))
        position = max(position, end)
        if position >= total:
            break
    if position < total:
        gaps.append((position, total))
    return gaps


@contextlib.asynccontextmanager
async def open_composite_writer(
    bucket: storage.Bucket,
    name: str,
    settings: CompositeSettings | None = None,
    *,
    upload_id: str | None = None,
    content_type: str = "application/octet-stream",
    metadata: Mapping[str, str] | None = None,
    if_generation_match: int | None = None,
) -> AsyncIterator[CompositeWriter]:
    """Start a composite upload of ``bucket/name``; segments open as their bytes arrive.

    ``upload_id`` names the temporary namespace (a random one by default). Leaving the
    block without :meth:`~CompositeWriter.complete` aborts: segment sessions are cancelled
    and temporaries deleted, since a composite upload is not resumed from a session.
    """
    upload_id = upload_id or uuid.uuid4().hex
    try:
        async with trio.open_nursery() as nursery:
            writer = CompositeWriter(
                bucket,
                name,
                settings or CompositeSettings(),
                upload_id=upload_id,
                nursery=nursery,
                content_type=content_type,
                metadata=metadata,
                if_generation_match=if_generation_match,
            )
            try:
                yield writer
            finally:
                if writer.result is None:
                    with trio.CancelScope(shield=True):
                        await writer.abort()
    except BaseExceptionGroup as group:
        # Segment tasks store their failures rather than raise, so a group here wraps one
        # exception, usually the caller's own: give it back unwrapped (as open_writer does).
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def _list_parts(bucket: storage.Bucket, prefix: str, timeout: float) -> list[ObjectInfo]:
    """Every object under ``prefix`` (blocking; GCS lists are strongly consistent)."""
    return [
        ObjectInfo.from_resource(blob._properties)
        for blob in bucket.list_blobs(prefix=prefix, timeout=timeout, retry=None)
    ]


async def complete_from_temporaries(
    bucket: storage.Bucket,
    name: str,
    settings: CompositeSettings,
    *,
    upload_id: str,
    total_size: int,
    crc32c: int | str | None = None,
    if_generation_match: int | None = None,
    content_type: str = "application/octet-stream",
    metadata: Mapping[str, str] | None = None,
) -> ObjectInfo:
    """Complete a composite upload from what GCS holds, whoever uploaded its segments.

    GCS is the only shared state: each segment is found by its deterministic name
    (:func:`temporary_name`) in one listing, and must hold exactly its share of
    ``total_size`` bytes. Any that is missing or of another size raises
    :class:`~reliablewriter.IncompleteObjectError` naming its byte ranges, which the caller
    sends again (as its own segment objects) before completing again; nothing is deleted
    then. Otherwise the segments are composed as by :meth:`CompositeWriter.complete` (the
    CRC32C combined and checked against ``crc32c``) and every temporary of the upload is
    deleted, after success or after any other failure.
    """
    writer = settings.writer
    prefix = temporary_name(settings.temp_prefix, upload_id, "")
    found = {info.name: info for info in await _retrying_listing(bucket, prefix, settings)}
    count = segment_count(total_size, settings.segment_size)
    parts: list[ObjectInfo] = []
    missing: list[tuple[int, int]] = []
    for index in range(count):
        start = index * settings.segment_size
        end = min(total_size, start + settings.segment_size)
        info = found.get(temporary_name(settings.temp_prefix, upload_id, index))
        if info is None or info.size != end - start:
            missing.append((start, end))
        else:
            parts.append(info)
    if missing:
        raise IncompleteObjectError(missing=tuple(missing), name=name)
    options = _compose_options(
        settings,
        upload_id,
        if_generation_match=if_generation_match,
        content_type=content_type,
        metadata=metadata,
    )
    made: list[str] = []
    try:
        return await compose_parts(
            bucket,
            name,
            parts,
            options,
            expected_crc32c=normalize_crc32c(crc32c) if crc32c is not None else None,
            made=made,
        )
    finally:
        with trio.CancelScope(shield=True):
            await delete_objects(
                bucket,
                [*found, *made],
                policy=writer.retry,
                connect_timeout=writer.connect_timeout,
                read_timeout=writer.progress_timeout,
            )


async def _retrying_listing(
    bucket: storage.Bucket, prefix: str, settings: CompositeSettings
) -> list[ObjectInfo]:
    policy = settings.writer.retry
    started = trio.current_time()
    attempts = 0
    while True:
        try:
            return await trio.to_thread.run_sync(
                _list_parts, bucket, prefix, settings.writer.progress_timeout
            )
        except (api_exceptions.GoogleAPICallError, *_NETWORK_ERRORS) as exc:
            status = getattr(exc, "code", None)
            if isinstance(status, int) and not policy.is_retryable_status(status):
                raise NonRetryableHTTPError(
                    "cannot list the upload's segments",
                    status=status,
                    reason="refused the listing",
                    name=prefix,
                ) from None
            attempts += 1
            if policy.gives_up(attempts, trio.current_time() - started):
                raise RetriesExhaustedError(
                    "listing the upload's segments kept failing",
                    attempts=attempts,
                    cause=type(exc).__name__,
                    name=prefix,
                ) from None
        await trio.sleep(policy.next_delay(attempts))
