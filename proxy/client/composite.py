"""Composite uploads (protocol section 14): the object's segments stored in parallel, then composed.

When the proxy answers ``OpenUpload`` with ``CompositeOpened``,
:func:`~proxy.client.connect_upload` yields a :class:`CompositeUpload`. Segment ``i`` holds the
object's bytes ``[i * segment_size, min((i + 1) * segment_size, size))``. Up to
``min(connections, parallel_segments)`` workers each take the lowest segment not stored yet and
store it as an upload of its own: a :class:`~proxy.client.transfer.Transfer` with one
connection, opened by ``OpenSegment``, over a source that is that slice of the data, and
completed by :meth:`Upload.complete` (which checks the stored size and CRC32C). So a segment
gets everything an ordinary upload has: the credit window, resends, and, after a lost
connection, a reconnect that attaches with the segment's own token. Once every segment is
stored, ``Compose`` (on a pooled connection, on any proxy) makes the object; an ``Incomplete``
names segments the proxies lost, which are stored again before composing again.

A file is read segment by segment (each its own file descriptor and read-ahead). A stream is
cut at the segment boundaries as it is written, and a segment keeps only the bytes the proxy
has not committed, as an ordinary stream does; so a stream's segment that a proxy loses after
it was stored cannot be sent again, and the upload fails.

Cancellation: as for :class:`Upload`. Cancelling :meth:`CompositeUpload.abort` partway leaves
the segments' workers stopped and the ``Discard`` unconfirmed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

import trio

from protocol import (
    Completed,
    Compose,
    CompositeOpened,
    Discard,
    Error,
    ErrorCode,
    Incomplete,
    OpenSegment,
    OpenUpload,
    Reply,
    crc32c_combine,
)
from protocol.ranges import ByteRange, RangeSet
from proxy.client.errors import (
    ConnectionLostError,
    UploadError,
    unexpected_reply,
)
from proxy.client.ledger import Ledger
from proxy.client.pool import open_connection_pool
from proxy.client.results import UploadProgress, UploadResult
from proxy.client.settings import Connector, UploadOptions
from proxy.client.sources import FileSource, Source, StreamSource, file_crc32c, file_version
from proxy.client.transfer import Transfer
from proxy.client.upload import Upload

__all__ = ["CompositeUpload"]

_log: Final = logging.getLogger("rup.client")

#: the cause under which a segment stored again (a proxy lost it) is counted as resent
_LOST_SEGMENT: Final = "proxy_lost"
#: uploads of one segment, each from its first byte, before its failure fails the upload
_SEGMENT_ATTEMPTS: Final = 3
#: failures that end the composite upload itself: opening its segment again cannot help
_FINAL_FOR_THE_UPLOAD: Final = frozenset(
    {
        ErrorCode.ABORTED,
        ErrorCode.UNAUTHENTICATED,
        ErrorCode.FORBIDDEN,
        ErrorCode.PRECONDITION_FAILED,
        ErrorCode.INVALID_REQUEST,
    }
)
#: a Compose answered "segments missing" this many times, each after storing them again,
#: means the proxies keep losing what they stored: give up rather than loop
_MAX_COMPOSE_ROUNDS: Final = 8


@dataclass(eq=False)
class _Segment:
    """One segment: its place in the object, its data, and how far it got."""

    index: int
    start: int
    end: int
    #: a stream's bytes of this segment (None for a file)
    stream: StreamSource | None = None
    #: the upload storing it now, if one is
    transfer: Transfer | None = None
    #: the CRC32C of the stored segment, once the proxy confirmed it
    stored_crc32c: int | None = None
    #: stored, as far as this run can tell: a resumed upload's segments until COMPOSE names
    #: the missing ones (its CRC32C is the file's)
    assumed: bool = False

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def stored(self) -> bool:
        return self.stored_crc32c is not None

    @property
    def committed(self) -> int:
        """Bytes of this segment durable in GCS."""
        if self.stored:
            return self.size
        return self.transfer.ledger.committed if self.transfer is not None else 0


@dataclass
class _Totals:
    """The counters of the segments' uploads that ended (a live one's ledger adds its own)."""

    bytes_sent: int = 0
    reconnects: int = 0
    restarts: int = 0
    resent_bytes_by_cause: dict[str, int] = field(default_factory=dict)
    errors_by_code: dict[str, int] = field(default_factory=dict)

    def count_resent(self, cause: str, length: int) -> None:
        _add_counts(self.resent_bytes_by_cause, {cause: length})

    def add(self, ledger: Ledger) -> None:
        self.bytes_sent += ledger.bytes_sent
        self.reconnects += ledger.reconnects
        self.restarts += ledger.restarts
        _add_counts(self.resent_bytes_by_cause, ledger.resent_bytes_by_cause)
        _add_counts(self.errors_by_code, ledger.errors_by_code)

    def with_live(self, ledgers: Iterable[Ledger]) -> _Totals:
        totals = _Totals(
            self.bytes_sent,
            self.reconnects,
            self.restarts,
            dict(self.resent_bytes_by_cause),
            dict(self.errors_by_code),
        )
        for ledger in ledgers:
            totals.add(ledger)
        return totals


def _segment_may_succeed_again(failure: UploadError) -> bool:
    """Whether a new upload of a segment may succeed where ``failure`` ended one: the proxy
    refused that upload (not the composite one), and the client had nothing against it."""
    return failure.code is not None and failure.code not in _FINAL_FOR_THE_UPLOAD


def _add_counts(into: dict[str, int], counts: dict[str, int]) -> None:
    for key, count in counts.items():
        into[key] = into.get(key, 0) + count


class CompositeUpload(Upload):
    """An upload the proxy made composite: its segments are stored in parallel, then composed.

    Made by :func:`~proxy.client.connect_upload` in place of an :class:`Upload`, with the
    same methods. The result's ``segments`` says how many segments the object has; GCS gives
    a composed object no MD5.
    """

    def __init__(
        self,
        transfer: Transfer,
        *,
        options: UploadOptions,
        addresses: list[tuple[str, int]],
        connector: Connector,
        nursery: trio.Nursery,
    ) -> None:
        super().__init__(transfer)
        opened = transfer.composite
        request = transfer.open_request
        assert opened is not None
        assert isinstance(request, OpenUpload)
        size = request.expected_size
        assert size is not None  # the transfer checked the reply (Transfer._open_composite)
        self._opened: CompositeOpened = opened
        self._size = size
        self._options = options
        self._addresses = addresses
        self._connector = connector
        self._nursery = nursery
        step = opened.segment_size
        count = max(1, -(-size // step))
        self._segments = [
            _Segment(index, index * step, min((index + 1) * step, size)) for index in range(count)
        ]
        self._worker_count = min(options.settings.connections, opened.parallel_segments, count)
        self._active_workers = 0
        self._worker_scopes: set[trio.CancelScope] = set()
        self._totals = _Totals()
        #: the file's descriptor and version (send_file), or the bytes written so far (write)
        self._file: tuple[int, tuple[int, int]] | None = None
        self._written: int | None = None

    # -- what the caller sees --------------------------------------------------------------

    def confirmed_ranges(self) -> list[ByteRange]:
        """The byte ranges (object offsets) the proxies have acknowledged holding."""
        held = RangeSet()
        for segment in self._segments:
            if segment.stored:
                held.add(segment.start, segment.end)
            elif segment.transfer is not None:
                for start, end in segment.transfer.ledger.received_ranges():
                    held.add(segment.start + start, segment.start + end)
        return list(held)

    @property
    def committed_offset(self) -> int:
        """Bytes the proxies report durable in GCS, over every segment."""
        return sum(segment.committed for segment in self._segments)

    async def send_file(self, path: str | os.PathLike[str]) -> None:
        """Queue a whole file; its segments start at once. See :meth:`Upload.send_file`."""
        if self._file is not None or self._written is not None:
            raise RuntimeError("this upload already has data")
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            # held by the upload's ledger, which closes it when the upload ends
            self._ledger.set_source(FileSource(fd, size, self._ledger.frame_size))
        except BaseException:
            os.close(fd)
            raise
        if size != self._size:
            raise UploadError(
                ErrorCode.SIZE_MISMATCH,
                f"{self._description}: the file has {size} bytes, but the upload was opened"
                f" for {self._size}",
            )
        self._file = (fd, file_version(fd))
        if self._transfer.composite_resumed:
            await self._assume_stored(fd)
        else:
            self._start_workers()

    async def write(self, data: bytes) -> None:
        """Append ``data`` to the object; waits while the stream buffer is full."""
        if self._file is not None:
            raise RuntimeError("write() is for streams that are not finished")
        if self._written is None:
            self._begin_stream()
        assert self._written is not None
        if not data:
            return
        end = self._written + len(data)
        if end > self._size:
            raise UploadError(
                ErrorCode.SIZE_MISMATCH,
                f"{self._description}: {end} bytes written, but the upload was opened for"
                f" {self._size}",
            )
        while self._held() >= self._buffer_limit():
            await self._transfer.wait_changed()
        self._transfer.lifecycle.check()
        view = memoryview(data)
        offset = self._written
        for segment in self._segments[self._index_of(offset) : self._index_of(end - 1) + 1]:
            stream = segment.stream
            assert stream is not None
            first, last = max(offset, segment.start), min(end, segment.end)
            whole = first == offset and last == end and type(data) is bytes
            before = stream.available
            stream.append(data if whole else bytes(view[first - offset : last - offset]))
            if stream.written == segment.size:
                stream.finish()
            ledger = segment.transfer.ledger if segment.transfer is not None else None
            if ledger is not None and ledger.source is stream and stream.available > before:
                ledger.extend(before, stream.available)  # else set_source will take it all
        self._written = end
        self._ledger.notify()

    def _begin_stream(self) -> None:
        self._written = 0
        for segment in self._segments:
            segment.stream = StreamSource(self._ledger.frame_size)
            if segment.size == 0:
                segment.stream.finish()
        self._start_workers()

    def _index_of(self, offset: int) -> int:
        return min(offset // self._opened.segment_size, len(self._segments) - 1)

    def _held(self) -> int:
        """Bytes of the stream kept in memory: written and not committed yet."""
        return sum(
            segment.stream.written - segment.committed
            for segment in self._segments
            if segment.stream is not None
        )

    def _buffer_limit(self) -> int:
        """Never less than the window of the segment being written: its proxy may need that
        much to commit anything."""
        assert self._written is not None
        segment = self._segments[self._index_of(self._written)]
        window = 0
        if segment.transfer is not None:
            ledger = segment.transfer.ledger
            window = ledger.window_end - ledger.committed
        return max(self._transfer.settings.stream_buffer, window)

    async def complete(self) -> UploadResult:
        """Store every segment, compose them, and return the object once it matches what was
        sent. Raises :class:`UploadError` (or a subclass) on failure."""
        transfer = self._transfer
        if self._file is None and self._written is None:
            self._begin_stream()  # no data given: an empty stream
        if self._written is not None and self._written != self._size:
            raise UploadError(
                ErrorCode.SIZE_MISMATCH,
                f"{self._description}: {self._written} bytes written, but the upload was"
                f" opened for {self._size}",
            )
        await self._all_stored()
        if self._file is not None and file_version(self._file[0]) != self._file[1]:
            failure = UploadError(None, "the file changed while it was being uploaded")
            transfer.fail(failure)
            raise failure
        crc32c = 0
        for segment in self._segments:
            assert segment.stored_crc32c is not None
            crc32c = crc32c_combine(crc32c, segment.stored_crc32c, segment.size)
        compose = Compose(total_size=self._size, crc32c=crc32c, token=self._opened.token)
        policy = transfer.settings.retry
        since = trio.current_time()
        attempt = 0
        incomplete_replies = 0
        last_problem = ""
        async with open_connection_pool(self._options, max_size=1) as pool:
            while True:
                if attempt:
                    if policy.expired(trio.current_time() - since):
                        break
                    await trio.sleep(policy.delay(attempt, transfer.rng))
                attempt += 1
                try:
                    async with pool.connection() as channel:
                        reply = await channel.request(compose, patient=True)
                except ConnectionLostError as exc:
                    last_problem = exc.reason
                    continue
                if isinstance(reply, Completed):
                    return self._finish(
                        reply,
                        self._size,
                        crc32c,
                        counts=self._totals.with_live([self._ledger]),
                        connections=self._worker_count,
                        segments=len(self._segments),
                    )
                if isinstance(reply, Incomplete):
                    # segments GCS does not hold (a proxy died before GCS had them, or they
                    # were deleted underneath): store them again, then compose again
                    incomplete_replies += 1
                    if incomplete_replies > _MAX_COMPOSE_ROUNDS:
                        break
                    self._ledger.count_error(ErrorCode.MISSING_RANGES)
                    last_problem = f"segments missing: {self._store_again(reply.missing)}"
                    await self._all_stored()
                    since, attempt = trio.current_time(), 0
                    continue
                transfer.lifecycle.check()
                if isinstance(reply, Error):
                    self._ledger.count_error(reply.code)
                error = unexpected_reply(reply, "Compose")
                if isinstance(error, UploadError):
                    transfer.fail(error)
                    raise error
                last_problem = error.reason
        if incomplete_replies > _MAX_COMPOSE_ROUNDS:
            why = f"it still missed segments after they were stored {_MAX_COMPOSE_ROUNDS} times"
        else:
            why = f"not within {policy.deadline:g} s of the last progress ({attempt} attempts)"
        failure = UploadError(
            None,
            f"{self._description}: the proxy did not compose the object: {why}; last:"
            f" {last_problem}",
            retryable=True,
        )
        transfer.fail(failure)
        raise failure

    async def _assume_stored(self, fd: int) -> None:
        """An earlier run's upload, resumed: what its segments hold lives in GCS alone. Take
        every segment as stored, with the CRC32C of the file's bytes; the first COMPOSE then
        completes (every segment was stored) or names the missing ones, which are stored as
        any missing segment is. Nothing is composed that does not match the file."""
        for segment in self._segments:
            segment.stored_crc32c = await trio.to_thread.run_sync(
                file_crc32c, fd, segment.start, segment.size
            )
            segment.assumed = True

    def _store_again(self, missing: Iterable[ByteRange]) -> str:
        """Mark the segments holding ``missing`` (object offsets) as not stored, and start
        workers for them; says which they are."""
        indexes: set[int] = set()
        for start, end in missing:
            if start < end:
                indexes.update(range(self._index_of(start), self._index_of(end - 1) + 1))
        for index in sorted(indexes):
            segment = self._segments[index]
            if segment.stored:
                segment.stored_crc32c = None
                if not segment.assumed:  # one this run stored, lost since
                    self._totals.count_resent(_LOST_SEGMENT, segment.size)
                segment.assumed = False
        self._start_workers()
        return ", ".join(str(index) for index in sorted(indexes)) or "none listed"

    async def _request_abort(self) -> Reply:
        """Stop the segments' workers at once, then discard the upload: its segments are
        deleted. ConnectionLostError if the request or its reply was lost."""
        for scope in self._worker_scopes:
            scope.cancel()
        async with (
            open_connection_pool(self._options, max_size=1) as pool,
            pool.connection() as channel,
        ):
            return await channel.request(Discard(token=self._opened.token))

    # -- the segments' workers -------------------------------------------------------------

    async def _all_stored(self) -> None:
        while not all(segment.stored for segment in self._segments):
            await self._transfer.wait_changed()

    def _start_workers(self) -> None:
        """Start workers until there are as many as the upload may use."""
        while self._active_workers < self._worker_count:
            self._active_workers += 1
            self._nursery.start_soon(self._work)

    def _next_segment(self) -> _Segment | None:
        """The lowest segment no worker has and none stored, if its bytes are at hand."""
        for segment in self._segments:
            if segment.stored or segment.transfer is not None:
                continue
            stream = segment.stream
            if stream is None or stream.written > 0 or stream.total is not None:
                return segment
            return None  # a stream's next segment has no bytes yet
        return None

    async def _work(self) -> None:
        """One worker: a segment that cannot be stored fails the upload; abort stops it."""
        scope = trio.CancelScope()
        self._worker_scopes.add(scope)
        try:
            with scope:
                await self._store_segments()
        except UploadError as error:
            self._transfer.fail(error)
        finally:
            self._worker_scopes.discard(scope)
            self._active_workers -= 1

    async def _store_segments(self) -> None:
        """Store segments, the lowest first, until each is stored or has a worker."""
        while True:
            segment = self._next_segment()
            if segment is not None:
                await self._store_with_retries(segment)
            elif all(s.stored or s.transfer is not None for s in self._segments):
                # no checkpoint from this look to the count going down: a segment marked to
                # be stored again from now on gets a worker of its own
                return
            else:
                await self._transfer.wait_changed()

    async def _store_with_retries(self, segment: _Segment) -> None:
        """Store ``segment``, opening it anew when one upload of it fails in a way another may
        not (GCS lost its session, say); UploadError once that is no use."""
        attempt = 1
        while True:
            try:
                # no checkpoint between one attempt's end and the next one's start, so no
                # other worker takes the segment meanwhile
                await self._store(segment)
            except UploadError as error:
                if attempt >= _SEGMENT_ATTEMPTS or not _segment_may_succeed_again(error):
                    raise
                attempt += 1
                _log.warning(
                    "%s: segment %d failed (%s), storing it again from its first byte",
                    self._description,
                    segment.index,
                    error.message,
                )
                continue
            return

    async def _store(self, segment: _Segment) -> None:
        """Store ``segment`` as an upload of its own; UploadError if it cannot be."""
        transfer = self._segment_transfer(segment)
        segment.transfer = transfer
        source: Source | None = None
        failure: UploadError | None = None
        try:
            async with trio.open_nursery() as nursery:
                transfer.start(nursery)
                nursery.start_soon(self._relay_changes, transfer.ledger)
                try:
                    await transfer.wait_opened()
                    if transfer.lifecycle.failure is None:
                        source = self._segment_source(segment, transfer.ledger.frame_size)
                        transfer.ledger.set_source(source)
                        await self._written_through(segment)
                        stored = await Upload(transfer).complete()
                        segment.stored_crc32c = stored.crc32c
                except UploadError as exc:  # raised below, outside the nursery
                    failure = exc
                finally:
                    transfer.stop()
            failure = failure or transfer.lifecycle.failure
        finally:
            segment.transfer = None
            self._totals.add(transfer.ledger)
            if failure is not None and not segment.stored and failure.code is not None:
                # what the proxy had of this attempt is lost: the next one sends it again
                self._totals.restarts += 1
                self._totals.count_resent(failure.code.name.lower(), transfer.ledger.received_total)
            if source is not None and segment.stream is None:
                source.close()  # a stream's segment is kept: it may have to be sent again
            self._ledger.notify()
            self._report()
        if failure is not None and not segment.stored:
            raise failure

    async def _written_through(self, segment: _Segment) -> None:
        """Wait until a stream's segment has all its bytes (a file's has them from the start)."""
        while segment.stream is not None and segment.stream.total is None:
            await self._transfer.wait_changed()

    def _segment_transfer(self, segment: _Segment) -> Transfer:
        options = self._options
        settings = dataclasses.replace(
            options.settings, connections=1, frame_size=self._ledger.frame_size
        )
        return Transfer(
            open_request=OpenSegment(index=segment.index, token=self._opened.token),
            options=dataclasses.replace(
                options,
                settings=settings,
                progress=self._report if options.progress is not None else None,
                token=None,
            ),
            addresses=self._addresses,
            connector=self._connector,
            destination=self._transfer.destination,
            description=f"segment {segment.index} of the {self._description}",
        )

    def _segment_source(self, segment: _Segment, frame_size: int) -> Source:
        if segment.stream is not None:
            if not segment.stream.holds_everything:
                raise UploadError(
                    None,
                    f"{self._description}: the proxy lost segment {segment.index}, and the"
                    " stream's bytes of it are gone: upload it again",
                )
            return segment.stream
        assert self._file is not None
        fd = os.dup(self._file[0])  # each segment reads ahead on its own
        return FileSource(fd, segment.size, frame_size, base=segment.start)

    async def _relay_changes(self, ledger: Ledger) -> None:
        """A segment's change (bytes committed, a credit) may be what the caller waits for."""
        while True:
            await ledger.wait_changed()
            self._ledger.notify()

    def _report(self, _: UploadProgress | None = None) -> None:
        """Progress for the whole object, whenever a segment's upload reports."""
        progress = self._options.progress
        if progress is None:
            return
        live = [s.transfer for s in self._segments if s.transfer is not None]
        totals = self._totals.with_live(transfer.ledger for transfer in live)
        progress(
            UploadProgress(
                total=self._size,
                bytes_sent=totals.bytes_sent,
                bytes_received=sum(
                    segment.size if segment.stored else 0 for segment in self._segments
                )
                + sum(transfer.ledger.received_total for transfer in live),
                committed=self.committed_offset,
                connections=len(live),
                reconnects=totals.reconnects,
                resent_bytes=sum(totals.resent_bytes_by_cause.values()),
                restarts=totals.restarts,
            )
        )
