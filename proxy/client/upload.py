"""The rup client: upload a file or a stream through the proxy over N connections, on trio.

One upload is spread over ``connections`` TCP connections ("slots"). The first slot opens the
upload and gets its token; the others attach with that token. Every slot then takes the
lowest piece of the object that still has to be sent, within the proxy's credit window, and
pipelines up to ``frames_in_flight`` ``WriteAt`` frames before it waits for their ``Ack``.
Pieces never cross a frame-size boundary, so a resend after a fault is the same frame again.

What is still to send is a :class:`~protocol.ranges.RangeSet`. A piece leaves it when a slot
takes it and goes back when the frame is lost (the connection dropped before the ``Ack``) or
refused as corrupt (``BAD_CRC``). When a slot reconnects it re-attaches with the token and
asks for ``Status``; the set becomes exactly what the proxy does not hold and no other
connection is sending. That is what makes a proxy restart harmless: the new instance
recovers the committed offset from GCS and the client resends only the rest.

Files are read with ``os.pread`` piece by piece (never loaded whole; a resend reads again).
A stream keeps only the bytes the proxy has not yet committed to GCS, within a bounded
buffer. The CRC32C of the whole object goes with ``Complete`` and the proxy's reply is
checked against it and the size.

Cancellation: cancelling any call here abandons the upload on this side; the proxy keeps
it resumable until its idle timeout, then GCS keeps the session for a week. Leaving
:func:`connect_upload`'s block without :meth:`Upload.complete` aborts the upload.

Errors: every failure reaches the caller as :class:`UploadError` (or a subclass); a broken,
closed or stalled connection is only a reason to reconnect. Once ``complete()`` has returned,
the upload is done: the object exists and matched what was sent, so anything the proxy says
afterwards about frames still in flight elsewhere (the proxy acknowledges such late resends
anyway) changes nothing.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Final, TypeVar

import google_crc32c
import trio

from protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Abort,
    Ack,
    AttachUpload,
    Complete,
    Completed,
    Connection,
    ConnectionClosed,
    Credit,
    Error,
    ErrorCode,
    Event,
    GoingAway,
    Hello,
    LocalProtocolError,
    OpenUpload,
    Pong,
    RemoteProtocolError,
    Reply,
    Request,
    Role,
    Status,
    StatusQuery,
    UploadOpened,
    Welcome,
    WriteAt,
    crc32c_combine,
)
from protocol.ranges import ByteRange, RangeSet

__all__ = [
    "ChecksumMismatchError",
    "ClientSettings",
    "Connector",
    "ProxyUnreachableError",
    "ReconnectPolicy",
    "Upload",
    "UploadError",
    "UploadProgress",
    "UploadRejectedError",
    "UploadResult",
    "connect_upload",
    "parse_gs_url",
    "parse_proxy_address",
    "upload_file",
    "upload_stream",
]

KiB: Final = 1024
MiB: Final = 1024 * KiB

_E = TypeVar("_E", bound=BaseException)

_RECEIVE_SIZE: Final = 64 * KiB
#: bytes a file source reads in one worker-thread call (the piece asked for and the next ones)
_READ_AHEAD: Final = 8 * MiB
_CLIENT_NAME: Final = "rup-client/0.1"
#: Codes that condemn a connection, not the upload: reconnecting may well succeed.
_CONNECTION_CODES: Final = frozenset(
    {
        ErrorCode.MALFORMED_FRAME,
        ErrorCode.BAD_SEQUENCE,
        ErrorCode.CORRUPT_HEADER,
        ErrorCode.UNKNOWN_FRAME_TYPE,
        ErrorCode.UNEXPECTED_FRAME,
        ErrorCode.OUTSIDE_CREDIT,
        ErrorCode.TOO_BUSY,
        ErrorCode.IDLE_TIMEOUT,
        ErrorCode.SHUTTING_DOWN,
    }
)


# -- errors -------------------------------------------------------------------------------


class UploadError(Exception):
    """An upload failed. ``code`` is the proxy's error code when the proxy gave one."""

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class ProxyUnreachableError(UploadError):
    """No connection to the proxy could be made or kept, within the reconnect policy."""


class UploadRejectedError(UploadError):
    """The proxy refused the upload for good (auth, permission, precondition, token, ...)."""


class ChecksumMismatchError(UploadError):
    """The object the proxy finalized differs from what was sent (size or CRC32C)."""


class _ConnectionLostError(Exception):
    """One connection is unusable; the slot that owns it reconnects."""

    def __init__(self, reason: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


# -- settings and results -----------------------------------------------------------------


@dataclass(frozen=True)
class ReconnectPolicy:
    """How a connection slot retries: exponential backoff with full jitter.

    ``max_attempts`` counts consecutive failures of one slot; any acknowledged frame resets
    the count, so a long upload over a flaky network is not capped, a dead proxy is.
    """

    max_attempts: int = 8
    initial_delay: float = 0.05
    max_delay: float = 2.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(self.max_delay, self.initial_delay * 2.0**attempt))


@dataclass(frozen=True)
class ClientSettings:
    """Tuning for one upload. The defaults suit a LAN or loopback proxy."""

    connections: int = 4
    #: payload bytes per WriteAt frame; capped by what the proxy's Welcome allows
    frame_size: int = 1 * MiB
    #: WriteAt frames sent on one connection before waiting for an Ack
    frames_in_flight: int = 4
    connect_timeout: float = 10.0
    #: while a reply is due, this long without a byte from the proxy means the link stalled
    reply_timeout: float = 30.0
    #: Complete waits for GCS to commit the tail, so it gets longer
    complete_timeout: float = 300.0
    #: a stream keeps at most this many bytes that the proxy has not committed yet
    stream_buffer: int = 64 * MiB
    max_complete_attempts: int = 6
    reconnect: ReconnectPolicy = field(default_factory=ReconnectPolicy)

    def __post_init__(self) -> None:
        if self.connections < 1:
            raise ValueError(f"connections must be at least 1, got {self.connections}")
        if self.frame_size < 1 or self.frames_in_flight < 1:
            raise ValueError("frame_size and frames_in_flight must be positive")
        if self.stream_buffer < self.frame_size:
            raise ValueError("stream_buffer must hold at least one frame")


@dataclass(frozen=True)
class UploadProgress:
    """A snapshot for progress displays; ``total`` is None while a stream is still open."""

    total: int | None
    bytes_sent: int
    bytes_received: int
    committed: int
    connections: int
    reconnects: int
    resent_bytes: int


@dataclass(frozen=True)
class UploadResult:
    """The finalized object, as the proxy reported it, plus what it took to get there."""

    bucket: str
    name: str
    size: int
    generation: int
    crc32c: int
    md5: bytes | None
    elapsed: float
    connections: int
    bytes_sent: int
    reconnects: int
    resent_bytes_by_cause: Mapping[str, int]
    errors_by_code: Mapping[str, int]

    @property
    def throughput(self) -> float:
        """Object bytes per second, over the whole upload."""
        return self.size / self.elapsed if self.elapsed > 0 else math.inf


#: Opens one byte stream to the proxy; lets callers add TLS, faults or a different transport.
Connector = Callable[[], Awaitable[trio.abc.Stream]]


def parse_proxy_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as a pair; ValueError with a clear message otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT for the proxy, got {text!r}")
    return host, int(port)


def parse_gs_url(url: str) -> tuple[str, str]:
    """``gs://bucket/object/name`` as ``(bucket, name)``; ValueError otherwise."""
    rest = url.removeprefix("gs://")
    bucket, _, name = rest.partition("/")
    if rest == url or not bucket or not name:
        raise ValueError(f"expected gs://BUCKET/OBJECT, got {url!r}")
    return bucket, name


# -- data sources -------------------------------------------------------------------------


class _FileSource:
    """Random access to a file: each piece is read when it is sent (and again if resent).

    Reads go to a worker thread several frames at a time: the piece asked for and the
    frames after it, each as a ``bytes`` of its own with its CRC32C. Slots take the lowest
    pieces in turn, so the next ones are usually those; one thread round trip per frame
    cost more CPU than the read itself. At most :data:`_READ_AHEAD` bytes wait, and a new
    batch replaces what the last one left.

    Each byte is checksummed once: the piece's CRC32C goes into its frame header, and the
    whole file's CRC32C is combined from those of the pieces as they were last sent
    (:func:`protocol.crc32c_combine`), folded in order below the committed offset. If the
    pieces do not tile the file (the upload resumed bytes sent by someone else), the file is
    read again to checksum it. A file whose size or modification time changed during the
    upload fails it: the bytes sent may come from different versions of the file.
    """

    def __init__(self, fd: int, size: int, frame_size: int) -> None:
        self._fd = fd
        self.size = size
        self.total: int | None = size
        self._frame_size = frame_size
        self._version = _file_version(fd)
        self._ahead: dict[int, tuple[bytes, int]] = {}
        #: the batch being read: its first and end offsets, and when it is in
        self._loading: tuple[int, int, trio.Event] | None = None
        #: pieces read and not folded yet: start -> (end, CRC32C)
        self._crcs: dict[int, tuple[int, int]] = {}
        #: the CRC32C of [0, _folded)
        self._folded = 0
        self._folded_crc = 0

    @property
    def available(self) -> int:
        return self.size

    async def read(self, start: int, end: int) -> tuple[bytes | memoryview, int | None]:
        """The bytes of ``[start, end)`` and their CRC32C."""
        while True:
            ahead = self._ahead.pop(start, None)
            if ahead is not None and len(ahead[0]) == end - start:
                self._crcs[start] = (end, ahead[1])
                return ahead
            loading = self._loading
            if loading is None or not loading[0] <= start < loading[1]:
                break
            await loading[2].wait()  # the batch in flight holds this piece, or shows it does not
        pieces = [(start, end)]
        limit = min(self.size, start + _READ_AHEAD)
        while pieces[-1][1] < limit:
            begin = pieces[-1][1]
            pieces.append((begin, min(begin + self._frame_size - begin % self._frame_size, limit)))
        loading = (start, pieces[-1][1], trio.Event())
        self._loading = loading
        try:
            batch = await trio.to_thread.run_sync(self._read_all, pieces)
        finally:
            if self._loading is loading:
                self._loading = None
            loading[2].set()
        self._ahead = dict(zip((begin for begin, _ in pieces[1:]), batch[1:], strict=True))
        self._crcs[start] = (end, batch[0][1])
        return batch[0]

    def _read_all(self, pieces: list[tuple[int, int]]) -> list[tuple[bytes, int]]:
        """In a worker thread: each piece read into a bytes object of its own, with its CRC."""
        batch = []
        for start, end in pieces:
            data = os.pread(self._fd, end - start, start)
            if len(data) != end - start:
                raise UploadError(f"file shrank while uploading: short read at offset {start}")
            batch.append((data, google_crc32c.value(data)))
        return batch

    def release(self, committed: int) -> None:
        """Bytes below ``committed`` are in GCS and never sent again: fold their CRCs."""
        self._fold(committed)

    def _fold(self, limit: int) -> None:
        crcs = self._crcs
        while (entry := crcs.get(self._folded)) is not None and entry[0] <= limit:
            del crcs[self._folded]
            end, crc = entry
            self._folded_crc = crc32c_combine(self._folded_crc, crc, end - self._folded)
            self._folded = end
        for start in [start for start in crcs if start < self._folded]:
            del crcs[start]  # superseded: those bytes were resent in other pieces

    def close(self) -> None:
        os.close(self._fd)

    async def crc32c(self) -> int:
        """The file's CRC32C, once every byte has been sent; UploadError if it changed."""
        if _file_version(self._fd) != self._version:
            raise UploadError("the file changed while it was being uploaded")
        self._fold(self.size)
        if self._folded == self.size:
            return self._folded_crc

        def checksum() -> int:
            crc, offset = 0, 0
            while offset < self.size:
                block = os.pread(self._fd, min(8 * MiB, self.size - offset), offset)
                if not block:
                    raise UploadError(f"file shrank while uploading: EOF at offset {offset}")
                crc = google_crc32c.extend(crc, block)
                offset += len(block)
            return crc

        return await trio.to_thread.run_sync(checksum)


def _file_version(fd: int) -> tuple[int, int]:
    status = os.fstat(fd)
    return status.st_size, status.st_mtime_ns


class _StreamSource:
    """The uncommitted tail of a stream, in frame-aligned blocks.

    Incoming chunks are coalesced into blocks of exactly ``block_size`` bytes, so a frame is
    a view of one block (no copy) and a resend after a fault finds its bytes again. Blocks
    are dropped as soon as the proxy reports them committed.
    """

    def __init__(self, block_size: int) -> None:
        self._block_size = block_size
        #: start -> (block, its CRC32C)
        self._blocks: dict[int, tuple[bytes, int]] = {}
        self._pending = bytearray()
        #: the CRC32C of the blocks so far, combined from theirs (each byte is read once)
        self._crc = 0
        self.written = 0
        #: bytes that are in blocks, hence sendable
        self.available = 0
        self.total: int | None = None

    def append(self, data: bytes) -> None:
        self.written += len(data)
        size = self._block_size
        if len(data) == size and not self._pending and type(data) is bytes:
            self._emit(data)  # immutable and exactly one block: kept as it is, no copy
            return
        view = memoryview(data)
        if self._pending:
            room = size - len(self._pending)
            self._pending += view[:room]
            view = view[room:]
            if len(self._pending) < size:
                return
            self._emit(bytes(self._pending))
            self._pending.clear()
        while len(view) >= size:  # one copy per byte: the caller may reuse its buffer
            self._emit(bytes(view[:size]))
            view = view[size:]
        self._pending += view

    def finish(self) -> None:
        if self._pending:
            self._emit(bytes(self._pending))
            self._pending.clear()
        self.total = self.written

    def _emit(self, block: bytes) -> None:
        crc = google_crc32c.value(block)
        self._crc = crc32c_combine(self._crc, crc, len(block))
        self._blocks[self.available] = (block, crc)
        self.available += len(block)

    async def read(self, start: int, end: int) -> tuple[bytes | memoryview, int | None]:
        """The bytes of ``[start, end)``, with their CRC32C if they are a whole block."""
        base = start - start % self._block_size
        entry = self._blocks.get(base)
        if entry is None or end > base + len(entry[0]):
            # pieces are cut on block boundaries, so this is a bookkeeping bug, not bad input
            raise AssertionError(f"bytes [{start}, {end}) are no longer buffered")
        block, crc = entry
        if start == base and end == base + len(block):
            return block, crc
        return memoryview(block)[start - base : end - base], None

    def release(self, committed: int) -> None:
        for base in [b for b, (block, _) in self._blocks.items() if b + len(block) <= committed]:
            del self._blocks[base]

    def close(self) -> None:
        self._blocks.clear()

    async def crc32c(self) -> int:
        return self._crc


_Source = _FileSource | _StreamSource


# -- one connection -----------------------------------------------------------------------


class _Waiter:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: Reply | _ConnectionLostError | None = None


class _Channel:
    """One connection to the proxy: a sans-IO Connection, a stream, and its outstanding requests.

    Replies are matched to requests by ``reply_to``. WriteAt frames are tracked by sequence
    number with the range they carry, so a lost connection hands those ranges back.
    """

    def __init__(self, upload: Upload, stream: trio.abc.Stream) -> None:
        self._upload = upload
        self._stream = stream
        self._conn = Connection(Role.CLIENT, max_frame_size=upload.settings.frame_size)
        #: payload bytes per WriteAt, as agreed in the Welcome
        self.max_data = upload.settings.frame_size
        self._send_lock = trio.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self.frames: dict[int, ByteRange] = {}
        #: a piece taken for sending that has no sequence number yet
        self.staged: ByteRange | None = None
        self.frame_slots = trio.Semaphore(upload.settings.frames_in_flight)
        self.failure: _ConnectionLostError | None = None
        self.going_away = False
        self.acked_any = False
        self._blocking = False
        self._patient = False
        self._cancel_scope = trio.CancelScope()
        self._receive_scope: trio.CancelScope | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def fail(self, reason: _ConnectionLostError) -> None:
        if self.failure is None:
            self.failure = reason
        for waiter in self._waiters.values():
            waiter.reply = reason
            waiter.done.set()
        self._waiters.clear()
        self._cancel_scope.cancel()

    def in_flight(self) -> list[ByteRange]:
        pieces = list(self.frames.values())
        if self.staged is not None:
            pieces.append(self.staged)
        return pieces

    async def run(self, bind: Callable[[_Channel], Awaitable[None]]) -> None:
        """Handshake, bind to the upload, then send pieces until cancelled or failed.

        Never raises for network trouble: the reason ends up in :attr:`failure` and the
        owning slot decides whether to reconnect. Upload-level refusals go to the upload.
        """
        try:
            with self._cancel_scope:
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._receive_loop)
                        await self._handshake()
                        await bind(self)
                        await self._send_loop()
                except* _ConnectionLostError as group:
                    self.fail(_first(group, _ConnectionLostError))
                except* UploadError as group:
                    error = _first(group, UploadError)
                    if not (self._upload._aborting and error.code == ErrorCode.ABORTED):
                        self._upload._fail(error)
                    self.fail(_ConnectionLostError(error.message, code=error.code))
                except* (trio.BrokenResourceError, trio.ClosedResourceError) as group:
                    reason = f"connection broke: {_first(group, Exception)!r}"
                    self.fail(_ConnectionLostError(reason))
                except* trio.TooSlowError:
                    self.fail(_ConnectionLostError("proxy stopped reading for too long"))
                except* RemoteProtocolError as group:
                    exc = _first(group, RemoteProtocolError)
                    reason = f"proxy broke the protocol: {exc.message}"
                    self.fail(_ConnectionLostError(reason, code=exc.code))
            if self.failure is None:
                self.fail(_ConnectionLostError("connection closed"))
        finally:
            await trio.aclose_forcefully(self._stream)

    async def _handshake(self) -> None:
        settings = self._upload.settings
        hello = Hello(
            versions=(PROTOCOL_VERSION,),
            max_frame_size=settings.frame_size,
            auth=self._upload._auth,
            client_name=_CLIENT_NAME,
        )
        with trio.fail_after(settings.connect_timeout):
            reply = await self.request(hello, blocking=True)
        if not isinstance(reply, Welcome):
            raise _unexpected(reply, "Hello")
        self.max_data = reply.max_frame_size
        self._upload._note_frame_size(reply.max_frame_size)

    # -- requests -------------------------------------------------------------------------

    async def _write_frame(self, buffers: list[bytes | memoryview]) -> None:
        """Write one frame; a broken, closed or stalled stream condemns this connection.

        Requests are also sent from tasks outside :meth:`run` (``complete()`` and
        ``abort()`` run in the caller's task), so the stream's own errors are turned into
        :class:`_ConnectionLostError` here, at the one place frames are written.
        """
        try:
            with trio.fail_after(self._upload.settings.reply_timeout):
                for buffer in buffers:
                    await self._stream.send_all(buffer)
        except trio.TooSlowError as exc:
            lost = _ConnectionLostError("proxy stopped reading for too long")
            self.fail(lost)
            raise lost from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            lost = _ConnectionLostError(f"connection broke: {exc!r}")
            self.fail(lost)
            raise lost from exc

    async def _send_piece(
        self, piece: ByteRange, data: bytes | memoryview, crc32c: int | None
    ) -> bool:
        """Send one WriteAt; False, with nothing sent, if a blocking request got in first."""
        async with self._send_lock:
            if self._blocking:
                return False
            buffers = self._conn.send(WriteAt(offset=piece[0], data=data, data_crc32c=crc32c))
            self.frames[self._conn.last_sent_seq] = piece
            self.staged = None
            self._arm_receive_timeout()
            await self._write_frame(buffers)
        return True

    async def request(
        self, event: Request, *, blocking: bool = False, patient: bool = False
    ) -> Reply:
        """Send ``event`` and return the proxy's reply to it (which may be an Error).

        ``blocking`` requests (Hello, Open, Attach, Complete, Abort) forbid any WriteAt on
        this connection until answered. A ``patient`` one (Complete) may take as long as GCS
        needs to finalize, so it waits ``complete_timeout`` rather than ``reply_timeout``.
        """
        waiter = _Waiter()
        while True:
            async with self._send_lock:
                if self.failure is not None:
                    raise self.failure
                # One blocking request at a time: the protocol allows nothing else while,
                # say, a Complete is in flight, so an Abort waits for its answer.
                if not (blocking and self._blocking):
                    try:
                        buffers = self._conn.send(event)
                    except LocalProtocolError as exc:
                        raise UploadError(
                            f"{self._upload._description}: cannot send"
                            f" {type(event).__name__} now: {exc.message}",
                            code=ErrorCode.INVALID_STATE,
                        ) from exc
                    self._waiters[self._conn.last_sent_seq] = waiter
                    self._blocking = self._blocking or blocking
                    self._patient = self._patient or patient
                    self._arm_receive_timeout()
                    await self._write_frame(buffers)
                    break
            await self._upload._wait_changed()
        try:
            await waiter.done.wait()
        finally:
            if blocking:
                self._blocking = False
                self._upload._notify()
            if patient:
                self._patient = False
        if isinstance(waiter.reply, _ConnectionLostError):
            raise waiter.reply
        assert waiter.reply is not None
        return waiter.reply

    # -- the two loops --------------------------------------------------------------------

    async def _send_loop(self) -> None:
        upload = self._upload
        while True:
            await self.frame_slots.acquire()
            while self._blocking:
                await upload._wait_changed()
            piece = await upload._next_piece(self)
            if piece is None:  # going away: let the proxy answer what is in flight
                self.frame_slots.release()
                await trio.sleep_forever()
            self.staged = piece
            data, crc32c = await upload._read_piece(piece)
            if not await self._send_piece(piece, data, crc32c):
                self.staged = None
                upload._hand_back(piece)
                self.frame_slots.release()
                continue
            upload._note_sent(len(data))

    def _receive_timeout(self) -> float:
        if not self._waiters and not self.frames:
            return math.inf
        settings = self._upload.settings
        return settings.complete_timeout if self._patient else settings.reply_timeout

    def _arm_receive_timeout(self) -> None:
        # a reply is now due: a receive that started with no deadline must get one
        if self._receive_scope is not None:
            deadline = trio.current_time() + self._receive_timeout()
            self._receive_scope.deadline = min(self._receive_scope.deadline, deadline)

    async def _receive_loop(self) -> None:
        while True:
            event = self._conn.next_event()
            if event is NEED_DATA:
                deadline = trio.current_time() + self._receive_timeout()
                with trio.CancelScope(deadline=deadline) as scope:
                    self._receive_scope = scope
                    data = await self._stream.receive_some(_RECEIVE_SIZE)
                self._receive_scope = None
                if scope.cancelled_caught:
                    self.fail(_ConnectionLostError("no reply from the proxy in time"))
                    return
                if not data:
                    self.fail(_ConnectionLostError("proxy closed the connection"))
                    return
                self._conn.receive_data(data)
                continue
            self._dispatch(event)

    def _dispatch(self, event: Event) -> None:
        upload = self._upload
        if not isinstance(event, Reply):
            message = "proxy closed the connection" if isinstance(event, ConnectionClosed) else ""
            self.fail(_ConnectionLostError(message or f"proxy sent a {type(event).__name__}"))
            return
        piece = self.frames.pop(event.reply_to, None) if event.reply_to else None
        if piece is not None:
            self.frame_slots.release()
            self._on_frame_reply(piece, event)
            if self.going_away and not self.frames:
                self.fail(_ConnectionLostError("proxy is going away"))
            return
        waiter = self._waiters.pop(event.reply_to, None) if event.reply_to else None
        if waiter is not None:
            waiter.reply = event
            waiter.done.set()
        elif isinstance(event, Credit):
            upload._note_credit(event.committed_offset, event.window_end)
        elif isinstance(event, GoingAway):
            self.going_away = True
            upload._notify()
            if not self.frames:
                self.fail(_ConnectionLostError("proxy is going away"))
        elif isinstance(event, Error):
            # unsolicited: the proxy is about to close this connection, or the upload is gone
            upload._count_error(event.code)
            if not _upload_fatal(event) or upload._aborting:
                self.fail(_ConnectionLostError(f"proxy said: {event.message}", code=event.code))
            else:
                upload._fail(_rejection(event))
        elif not isinstance(event, Pong):
            raise RemoteProtocolError(
                f"reply to unknown request {event.reply_to}: {type(event).__name__}",
                ErrorCode.UNEXPECTED_FRAME,
            )

    def _on_frame_reply(self, piece: ByteRange, event: Reply) -> None:
        upload = self._upload
        if isinstance(event, Ack | Credit):
            self.acked_any = True
            upload._note_received(piece, event.committed_offset)
            if isinstance(event, Credit):
                upload._note_credit(event.committed_offset, event.window_end)
        elif isinstance(event, Error):
            upload._count_error(event.code)
            upload._requeue([piece], cause=event.code.name.lower())
            if event.code == ErrorCode.BAD_CRC:
                return  # the header was intact: the connection goes on, the frame is resent
            if upload._aborting and event.code == ErrorCode.ABORTED:
                return
            if _upload_fatal(event):
                upload._fail(_rejection(event))
            else:
                self.fail(_ConnectionLostError(f"proxy said: {event.message}", code=event.code))
        else:
            raise RemoteProtocolError(
                f"a WriteAt was answered with {type(event).__name__}", ErrorCode.UNEXPECTED_FRAME
            )


def _first(group: BaseExceptionGroup[BaseException], kind: type[_E]) -> _E:
    """The first leaf of an exception group (nested groups included)."""
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, kind)
    return leaf


def _upload_fatal(error: Error) -> bool:
    return not error.retryable and error.code not in _CONNECTION_CODES


def _unexpected(reply: Event, request: str) -> UploadError | _ConnectionLostError:
    if isinstance(reply, Error):
        if _upload_fatal(reply):
            return _rejection(reply)
        return _ConnectionLostError(f"proxy said: {reply.message}", code=reply.code)
    return _ConnectionLostError(f"proxy answered {request} with {type(reply).__name__}")


def _rejection(error: Error) -> UploadRejectedError:
    return UploadRejectedError(
        f"proxy refused the upload: {error.code.name}: {error.message}", code=error.code
    )


# -- the upload -----------------------------------------------------------------------------


class Upload:
    """One upload spread over several connections. Made by :func:`connect_upload`."""

    def __init__(
        self,
        *,
        open_request: OpenUpload,
        settings: ClientSettings,
        connector: Connector,
        auth: str,
        progress: Callable[[UploadProgress], None] | None,
        description: str,
    ) -> None:
        self.settings = settings
        self._auth = auth
        self._open_request = open_request
        self._connector = connector
        self._progress = progress
        self._description = description
        self._rng = random.Random()
        self._changed = trio.Event()
        self._opened = trio.Event()
        #: a connection is sending OpenUpload; the others wait for its token
        self._opening = False
        self._token: bytes | None = None
        self._frame_size = settings.frame_size
        self._frame_size_agreed = False
        self._source: _Source | None = None
        self._to_send = RangeSet()
        self._received = RangeSet()
        #: pieces acknowledged while a StatusQuery is in flight (see _catch_up)
        self._ack_watchers: list[RangeSet] = []
        self._committed = 0
        self._window_end = 0
        self._channels: set[_Channel] = set()
        self._failure: UploadError | None = None
        self._cancel_scope: trio.CancelScope | None = None
        self._finished = False
        #: Complete succeeded and the object matched what was sent: the upload is done, and
        #: whatever the proxy says later about leftover frames changes nothing
        self._completed = False
        #: set by abort(): no new frames, and ABORTED errors are the expected outcome
        self._aborting = False
        self._started = time.monotonic()
        self.bytes_sent = 0
        self.reconnects = 0
        self.resent_bytes_by_cause: dict[str, int] = {}
        self.errors_by_code: dict[str, int] = {}

    # -- state shared by the channels ----------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_changed(self) -> None:
        await self._changed.wait()

    def _fail(self, error: UploadError) -> None:
        if self._completed:
            return
        if self._failure is None:
            self._failure = error
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()
        self._notify()

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _count_error(self, code: ErrorCode) -> None:
        self.errors_by_code[code.name] = self.errors_by_code.get(code.name, 0) + 1

    def _note_sent(self, length: int) -> None:
        self.bytes_sent += length
        self._report()

    def _note_committed(self, committed: int) -> None:
        if committed > self._committed:
            self._committed = committed
            self._received.add(0, committed)
            if self._source is not None:
                self._source.release(committed)

    def _note_credit(self, committed: int, window_end: int) -> None:
        self._note_committed(committed)
        self._window_end = max(self._window_end, window_end)
        self._notify()

    def _note_received(self, piece: ByteRange, committed: int) -> None:
        self._received.add(*piece)
        for watcher in self._ack_watchers:
            watcher.add(*piece)
        self._note_committed(committed)
        self._notify()
        self._report()

    def _note_frame_size(self, agreed: int) -> None:
        """Pieces are cut at multiples of the first agreed frame size, for the whole upload."""
        if not self._frame_size_agreed:
            self._frame_size = min(self._frame_size, agreed)
            self._frame_size_agreed = True

    def _hand_back(self, piece: ByteRange) -> None:
        """Return a piece that was taken but never sent."""
        self._to_send.add(*piece)
        self._notify()

    def _requeue(self, pieces: list[ByteRange], *, cause: str) -> None:
        for start, end in pieces:
            start = max(start, self._committed)
            for gap_start, gap_end in self._received.missing(start, end):
                self._to_send.add(gap_start, gap_end)
                self.resent_bytes_by_cause[cause] = (
                    self.resent_bytes_by_cause.get(cause, 0) + gap_end - gap_start
                )
        self._notify()

    def _resync(self, status: Status, acked_meanwhile: RangeSet) -> None:
        """Make the to-send set exactly what the proxy lacks and no connection is sending."""
        self._note_committed(status.committed_offset)
        self._window_end = max(self._committed, status.window_end)
        received = RangeSet(status.received)
        received.add(0, self._committed)
        for start, end in acked_meanwhile:
            received.add(start, end)
        needed = RangeSet([(self._committed, self._available())]) if self._source else RangeSet()
        for start, end in received:
            needed.remove(start, end)
        for channel in self._channels:
            for start, end in channel.in_flight():
                needed.remove(start, end)
        forgotten = needed.copy()
        for start, end in self._to_send:
            forgotten.remove(start, end)
        if forgotten:
            # the proxy acknowledged these once but no longer holds them: it restarted
            self.resent_bytes_by_cause["proxy_lost"] = (
                self.resent_bytes_by_cause.get("proxy_lost", 0) + forgotten.total
            )
        self._to_send = needed
        self._received = received
        self._notify()

    def _available(self) -> int:
        return self._source.available if self._source is not None else 0

    async def _next_piece(self, channel: _Channel) -> ByteRange | None:
        """The lowest piece to send that fits the credit window; None when going away."""
        while True:
            self._check()
            if channel.going_away or self._aborting or self._finished:
                return None
            if self._to_send:
                self._to_send.remove(0, self._committed)
                head = self._to_send.first()
                if head is not None:
                    start = head[0]
                    alignment = self._frame_size - start % self._frame_size
                    piece = self._to_send.take(self._window_end, min(alignment, channel.max_data))
                    if piece is not None:
                        return piece
            await self._wait_changed()

    async def _read_piece(self, piece: ByteRange) -> tuple[bytes | memoryview, int | None]:
        assert self._source is not None
        return await self._source.read(*piece)

    def _report(self) -> None:
        if self._progress is None:
            return
        self._progress(
            UploadProgress(
                total=self._source.total if self._source is not None else None,
                bytes_sent=self.bytes_sent,
                bytes_received=self._received.total,
                committed=self._committed,
                connections=len(self._channels),
                reconnects=self.reconnects,
                resent_bytes=sum(self.resent_bytes_by_cause.values()),
            )
        )

    # -- connection slots ----------------------------------------------------------------

    async def _run_slot(self, index: int) -> None:
        policy = self.settings.reconnect
        failures = 0
        last_reason = ""
        while not self._finished:
            if failures:
                if failures > policy.max_attempts:
                    self._fail(
                        ProxyUnreachableError(
                            f"{self._description}: gave up after {failures} failed connection"
                            f" attempts; last: {last_reason}"
                        )
                    )
                    return
                await trio.sleep(policy.delay(failures, self._rng))
            try:
                with trio.fail_after(self.settings.connect_timeout):
                    stream = await self._connector()
            except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                failures += 1
                last_reason = f"cannot connect: {exc or type(exc).__name__}"
                continue
            channel = _Channel(self, stream)
            await channel.run(self._bind)
            self._drop(channel)
            assert channel.failure is not None
            last_reason = channel.failure.reason
            if channel.failure.code is not None:
                self._count_error(channel.failure.code)
            if not self._finished:
                self.reconnects += 1
                failures = 1 if channel.acked_any else failures + 1
            self._report()

    def _drop(self, channel: _Channel) -> None:
        if channel in self._channels:
            self._channels.discard(channel)
            self._requeue(channel.in_flight(), cause="connection_lost")
            channel.frames.clear()
            channel.staged = None
        self._notify()

    async def _bind(self, channel: _Channel) -> None:
        """Open the upload (first connection) or attach to it, and catch up with its state."""
        if self._token is None and not self._opened.is_set() and not self._opening:
            self._opening = True
            try:
                reply = await channel.request(self._open_request, blocking=True)
            finally:
                self._opening = False
            if not isinstance(reply, UploadOpened):
                raise _unexpected(reply, "OpenUpload")
            self._token = reply.token
            self._note_committed(reply.committed_offset)
            self._opened.set()
            self._channels.add(channel)
            self._notify()
            return
        await self._opened.wait()
        assert self._token is not None
        reply = await channel.request(AttachUpload(token=self._token), blocking=True)
        if not isinstance(reply, UploadOpened):
            raise _unexpected(reply, "AttachUpload")
        if reply.resumed:
            # a different proxy instance: its credit starts afresh from what GCS holds
            self._window_end = reply.committed_offset
        self._note_committed(reply.committed_offset)
        self._channels.add(channel)
        await self._catch_up(channel)

    async def _catch_up(self, channel: _Channel) -> None:
        """Ask the proxy what it holds and make that the basis of what is left to send."""
        # Frames acknowledged while the Status is on its way are held too, even though the
        # Status (a snapshot taken earlier) cannot say so.
        acked_meanwhile = RangeSet()
        self._ack_watchers.append(acked_meanwhile)
        try:
            status = await channel.request(StatusQuery())
        finally:
            # by identity: RangeSets compare by content
            self._ack_watchers = [w for w in self._ack_watchers if w is not acked_meanwhile]
        if not isinstance(status, Status):
            raise _unexpected(status, "StatusQuery")
        self._resync(status, acked_meanwhile)

    async def _any_channel(self) -> _Channel:
        while True:
            self._check()
            for channel in self._channels:
                if channel.failure is None and not channel.going_away:
                    return channel
            await self._wait_changed()

    # -- public API ----------------------------------------------------------------------

    @property
    def committed_offset(self) -> int:
        """Bytes the proxy reports durable in GCS."""
        return self._committed

    async def send_file(self, path: str | os.PathLike[str]) -> None:
        """Queue a whole file for upload; it is read piece by piece as the slots send it.

        Returns at once; :meth:`complete` waits for the bytes. The file must not change
        until the upload completes.
        """
        if self._source is not None:
            raise RuntimeError("this upload already has data")
        fd = os.open(path, os.O_RDONLY)
        size = os.fstat(fd).st_size
        self._source = _FileSource(fd, size, self._frame_size)
        self._to_send.add(0, size)
        self._to_send.remove(0, self._committed)
        self._notify()

    async def write(self, data: bytes) -> None:
        """Append ``data`` to the object; waits while the stream buffer is full."""
        if self._source is None:
            self._source = _StreamSource(self._frame_size)
        source = self._source
        if not isinstance(source, _StreamSource) or source.total is not None:
            raise RuntimeError("write() is for streams that are not finished")
        # Never less than the proxy's window: it may need that much to commit anything.
        while source.written - self._committed >= max(
            self.settings.stream_buffer, self._window_end - self._committed
        ):
            self._check()
            await self._wait_changed()
        self._check()
        before = source.available
        source.append(bytes(data))
        if source.available > before:
            self._to_send.add(before, source.available)
            self._notify()

    async def complete(self) -> UploadResult:
        """Finish the object and return what GCS stored, once it matches what was sent.

        Raises :class:`UploadError` (or a subclass) on failure. Idempotent on the proxy side:
        a Complete lost with its connection is simply sent again.
        """
        if self._source is None:
            self._source = _StreamSource(self._frame_size)
        source = self._source
        if isinstance(source, _StreamSource) and source.total is None:
            before = source.available
            source.finish()
            self._to_send.add(before, source.available)
            self._notify()
        total = source.total
        assert total is not None
        # A file's checksum is combined from its pieces', so it is known once all were sent.
        while not self._received.contains(0, total):
            self._check()
            await self._wait_changed()
        crc32c = await source.crc32c()
        last_problem = ""
        for attempt in range(self.settings.max_complete_attempts):
            if attempt:
                await trio.sleep(self.settings.reconnect.delay(attempt, self._rng))
            while not self._received.contains(0, total):
                self._check()
                await self._wait_changed()
            channel = await self._any_channel()
            try:
                reply = await channel.request(
                    Complete(total_size=total, crc32c=crc32c), blocking=True, patient=True
                )
                if isinstance(reply, Error) and reply.code == ErrorCode.MISSING_RANGES:
                    # the proxy lost bytes it had acknowledged (a restart): catch up, resend
                    self._count_error(reply.code)
                    last_problem = reply.message
                    await self._catch_up(channel)
                    continue
            except _ConnectionLostError as exc:
                last_problem = exc.reason
                continue
            if isinstance(reply, Completed):
                self._finished = True
                result = self._result(reply, total, crc32c)
                self._completed = True
                self._notify()
                return result
            self._check()
            error = _unexpected(reply, "Complete")
            if isinstance(error, UploadError):
                self._fail(error)
                raise error
            last_problem = error.reason
        error = UploadError(
            f"{self._description}: the proxy did not finalize the object after"
            f" {self.settings.max_complete_attempts} attempts; last: {last_problem}"
        )
        self._fail(error)
        raise error

    def _result(self, reply: Completed, total: int, crc32c: int) -> UploadResult:
        if reply.size != total or reply.crc32c != crc32c:
            error = ChecksumMismatchError(
                f"{self._description}: GCS stored {reply.size} bytes with crc32c"
                f" {reply.crc32c:08x}, but {total} bytes with crc32c {crc32c:08x} were sent"
            )
            self._fail(error)
            raise error
        bucket, name = self._open_request.bucket, self._open_request.name
        return UploadResult(
            bucket=bucket,
            name=name,
            size=reply.size,
            generation=reply.generation,
            crc32c=reply.crc32c,
            md5=reply.md5,
            elapsed=time.monotonic() - self._started,
            connections=self.settings.connections,
            bytes_sent=self.bytes_sent,
            reconnects=self.reconnects,
            resent_bytes_by_cause=dict(self.resent_bytes_by_cause),
            errors_by_code=dict(self.errors_by_code),
        )

    async def abort(self) -> None:
        """Cancel the upload on the proxy and in GCS; the object is not created.

        Sending stops at once; frames already in flight fail on the proxy with ABORTED,
        which is expected here and not reported. An Abort waits for a Complete in flight on
        the same connection to be answered; once the object is complete, abort raises
        :class:`UploadError` with INVALID_STATE.
        """
        if self._completed:
            raise UploadError(
                f"{self._description}: cannot abort, the object is already complete",
                code=ErrorCode.INVALID_STATE,
            )
        self._aborting = True
        self._notify()
        channel = await self._any_channel()
        try:
            reply = await channel.request(Abort(), blocking=True)
        except _ConnectionLostError as exc:
            raise UploadError(f"{self._description}: abort not confirmed: {exc.reason}") from exc
        finally:
            self._finished = True
            self._notify()
        if isinstance(reply, Error) and reply.code != ErrorCode.ABORTED:
            raise _rejection(reply)


def _default_connector(host: str, port: int, tls: ssl.SSLContext | None) -> Connector:
    async def connect() -> trio.abc.Stream:
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        if tls is not None:
            ssl_stream = trio.SSLStream(stream, tls, server_hostname=host)
            await ssl_stream.do_handshake()
            stream = ssl_stream
        return stream

    return connect


@asynccontextmanager
async def connect_upload(
    proxy: str | tuple[str, int],
    bucket: str,
    name: str,
    *,
    connections: int | None = None,
    auth: str = "",
    tls: ssl.SSLContext | None = None,
    content_type: str = "application/octet-stream",
    metadata: Mapping[str, str] | None = None,
    if_generation_match: int | None = None,
    expected_size: int | None = None,
    settings: ClientSettings | None = None,
    connector: Connector | None = None,
    progress: Callable[[UploadProgress], None] | None = None,
) -> AsyncIterator[Upload]:
    """Open an upload of ``gs://bucket/name`` through the proxy and yield it once opened.

    Give the data with :meth:`Upload.send_file` or :meth:`Upload.write`, then call
    :meth:`Upload.complete`. ``connector`` replaces the plain TCP (or TLS) connection, e.g.
    with a fault-injecting stream. Leaving the block without completing aborts the upload.
    """
    settings = settings or ClientSettings()
    if connections is not None:
        settings = dataclasses.replace(settings, connections=connections)
    host, port = parse_proxy_address(proxy) if isinstance(proxy, str) else proxy
    upload = Upload(
        open_request=OpenUpload(
            bucket=bucket,
            name=name,
            content_type=content_type,
            metadata=tuple((metadata or {}).items()),
            expected_size=expected_size,
            if_generation_match=if_generation_match,
        ),
        settings=settings,
        connector=connector or _default_connector(host, port, tls),
        auth=auth,
        progress=progress,
        description=f"upload of gs://{bucket}/{name}",
    )
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            upload._cancel_scope = nursery.cancel_scope
            for index in range(settings.connections):
                nursery.start_soon(upload._run_slot, index)
            while not upload._opened.is_set() and upload._failure is None:
                await upload._wait_changed()
            if upload._failure is None:
                try:
                    yield upload
                except trio.Cancelled:
                    raise
                except BaseException as exc:  # re-raised below, outside the nursery, unwrapped
                    body_error = exc
                if not upload._finished and upload._failure is None:
                    with trio.move_on_after(5, shield=True), suppress(UploadError):
                        await upload.abort()
            upload._finished = True
            nursery.cancel_scope.cancel()
    finally:
        if upload._source is not None:
            upload._source.close()
    if upload._failure is not None and not isinstance(body_error, UploadError):
        raise upload._failure
    if body_error is not None:
        raise body_error


async def upload_file(
    path: str | os.PathLike[str],
    url: str,
    *,
    proxy: str | tuple[str, int],
    connections: int | None = None,
    auth: str = "",
    tls: ssl.SSLContext | None = None,
    content_type: str = "application/octet-stream",
    if_generation_match: int | None = None,
    settings: ClientSettings | None = None,
    connector: Connector | None = None,
    progress: Callable[[UploadProgress], None] | None = None,
) -> UploadResult:
    """Upload the file at ``path`` to ``url`` (``gs://bucket/object``) through ``proxy``."""
    bucket, name = parse_gs_url(url)
    async with connect_upload(
        proxy,
        bucket,
        name,
        connections=connections,
        auth=auth,
        tls=tls,
        content_type=content_type,
        if_generation_match=if_generation_match,
        expected_size=os.stat(path).st_size,
        settings=settings,
        connector=connector,
        progress=progress,
    ) as upload:
        await upload.send_file(path)
        return await upload.complete()


async def upload_stream(
    chunks: AsyncIterable[bytes],
    url: str,
    *,
    proxy: str | tuple[str, int],
    connections: int | None = None,
    auth: str = "",
    tls: ssl.SSLContext | None = None,
    content_type: str = "application/octet-stream",
    if_generation_match: int | None = None,
    settings: ClientSettings | None = None,
    connector: Connector | None = None,
    progress: Callable[[UploadProgress], None] | None = None,
) -> UploadResult:
    """Upload everything ``chunks`` yields (length unknown up front) to ``url``.

    Only bytes the proxy has not committed yet are kept, at most ``stream_buffer`` of them;
    ``chunks`` is not iterated further while that buffer is full.
    """
    bucket, name = parse_gs_url(url)
    async with connect_upload(
        proxy,
        bucket,
        name,
        connections=connections,
        auth=auth,
        tls=tls,
        content_type=content_type,
        if_generation_match=if_generation_match,
        settings=settings,
        connector=connector,
        progress=progress,
    ) as upload:
        async for chunk in chunks:
            await upload.write(chunk)
        return await upload.complete()
