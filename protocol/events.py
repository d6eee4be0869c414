"""The events a `Connection` sends and receives: one frozen dataclass per message.

Requests travel client -> server, replies server -> client. Every received event carries the
sequence number of the frame it came from in `seq`; on events you build to send, leave `seq` at 0
(the `Connection` numbers outgoing frames itself and ignores the field).

A received `WriteAt` is not delivered whole: it arrives as `WriteAtStart`, zero or more
`WriteAtData` (memoryviews into the buffers given to `receive_data`, never a copy) and, once the
payload CRC32C has been verified, `WriteAtEnd`. Data seen before `WriteAtEnd` is unverified.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from .errors import ErrorCode, ProtocolError

__all__ = [
    "NEED_DATA",
    "Abort",
    "Ack",
    "AttachUpload",
    "Complete",
    "Completed",
    "Compose",
    "CompositeOpened",
    "ConnectionClosed",
    "Credit",
    "Discard",
    "Error",
    "Event",
    "GoingAway",
    "Hello",
    "Incomplete",
    "NeedData",
    "OpenSegment",
    "OpenUpload",
    "Ping",
    "Pong",
    "PutObject",
    "Reply",
    "Request",
    "Status",
    "StatusQuery",
    "UploadOpened",
    "Welcome",
    "WriteAt",
    "WriteAtData",
    "WriteAtEnd",
    "WriteAtStart",
]


class _Sentinel(enum.Enum):
    NEED_DATA = enum.auto()

    def __repr__(self) -> str:
        return self.name


NEED_DATA: Final = _Sentinel.NEED_DATA
"""Returned by `Connection.next_event()` when more bytes must be received first."""

NeedData = Literal[_Sentinel.NEED_DATA]
"""The type of `NEED_DATA`, for annotations."""


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of everything `Connection.next_event()` returns."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The peer closed its sending side cleanly, between two frames."""


@dataclass(frozen=True, slots=True)
class Request(Event):
    """A message from client to server. Every request is answered by exactly one reply."""

    seq: int = field(default=0, kw_only=True)


@dataclass(frozen=True, slots=True)
class Reply(Event):
    """A message from server to client; `reply_to` is the seq of the request it answers.

    `reply_to` is 0 for unsolicited messages (only `Credit`, `Error` and `GoingAway` may be).
    """

    reply_to: int
    seq: int = field(default=0, kw_only=True)


# -- requests ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello(Request):
    """First frame of every connection: the protocol versions the client speaks and the largest
    frame (payload data bytes) it is willing to exchange. `auth` is a bearer token: never logged.
    """

    versions: tuple[int, ...]
    max_frame_size: int
    auth: str = field(default="", repr=False)
    client_name: str = ""


@dataclass(frozen=True, slots=True)
class OpenUpload(Request):
    """Start (or, with the same name and preconditions, resume) an upload into GCS.

    `metadata` is kept as a tuple of (key, value) pairs so the event stays hashable; a mapping
    passed in is converted. `if_generation_match=0` means "only if the object does not exist".
    """

    bucket: str
    name: str
    content_type: str = "application/octet-stream"
    metadata: tuple[tuple[str, str], ...] = ()
    expected_size: int | None = None
    if_generation_match: int | None = None
    single_session: bool = False
    """Version 3: never make this a composite upload (answer UploadOpened, not
    CompositeOpened). Older versions have no composite uploads, so they leave it out."""

    def __post_init__(self) -> None:
        _normalise_metadata(self)


def _normalise_metadata(event: OpenUpload | PutObject) -> None:
    metadata: object = event.metadata
    if isinstance(metadata, Mapping):
        object.__setattr__(event, "metadata", tuple(metadata.items()))
    elif not isinstance(metadata, tuple):
        object.__setattr__(event, "metadata", tuple(event.metadata))


@dataclass(frozen=True, slots=True)
class AttachUpload(Request):
    """Bind this connection to an upload another connection opened; `token` is opaque."""

    token: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class WriteAt(Request):
    """Send `data` for byte range [offset, offset + len(data)) of the object.

    Only the sending side builds this event; `data` is passed through `send()` without a copy.
    Prefer `bytes`: google-crc32c reads only bytes, so other buffers are copied once,
    transiently, to checksum them. A sender that already has the CRC32C of `data` (it
    checksummed the bytes as it read them) gives it as `data_crc32c`, and `send()` does not
    read `data` at all; a wrong value makes the receiver refuse the frame (BAD_CRC).
    """

    offset: int
    data: bytes | bytearray | memoryview
    data_crc32c: int | None = None

    def __repr__(self) -> str:
        return f"WriteAt(offset={self.offset}, len(data)={len(self.data)}, seq={self.seq})"


@dataclass(frozen=True, slots=True)
class Complete(Request):
    """Finalize the upload at `total_size` bytes; idempotent (re-sending returns `Completed`)."""

    total_size: int
    crc32c: int | None = None


@dataclass(frozen=True, slots=True)
class Abort(Request):
    """Cancel the upload this connection is bound to, for every connection attached to it."""


@dataclass(frozen=True, slots=True)
class StatusQuery(Request):
    """Ask for the committed offset and the byte ranges the server holds."""


@dataclass(frozen=True, slots=True)
class Ping(Request):
    nonce: int = 0


@dataclass(frozen=True, slots=True)
class PutObject(Request):
    """Version 2: store a whole object in one request (open, write and complete at once).

    Answered by `Completed` (or `Error`), like `Complete`; no token is issued, nothing is left to
    attach to. `data` is at most the agreed max_frame_size; a larger object is uploaded with
    OpenUpload, WriteAt and Complete. `crc32c`, when given, is checked like Complete's. Without
    `if_generation_match`, repeating a PutObject whose reply was lost stores the bytes again.

    `data_crc32c` is set by the receiving `Connection` only: the CRC32C of `data` as received,
    worked out from the frame's verified payload CRC32C without reading the data again (so it
    is the bytes' own, whatever `crc32c` claims). Like WriteAtEnd's, it is not part of the
    event's equality, and a sender leaves it None.
    """

    bucket: str
    name: str
    data: bytes = field(repr=False)
    content_type: str = "application/octet-stream"
    metadata: tuple[tuple[str, str], ...] = ()
    if_generation_match: int | None = None
    crc32c: int | None = None
    data_crc32c: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _normalise_metadata(self)


@dataclass(frozen=True, slots=True)
class OpenSegment(Request):
    """Version 3: bind this connection to segment `index` of the composite upload `token`
    names (the token from `CompositeOpened`).

    A segment is an upload of its own: bytes [index * segment_size, ...) of the object, written
    at offsets counted from the segment's first byte, completed with `Complete` (its size and
    CRC32C) and answered by `UploadOpened` with the segment's own token, which `AttachUpload`
    resumes. Opening a segment that is already being written here binds to it.
    """

    index: int
    token: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Compose(Request):
    """Version 3: finish the composite upload `token` names, from the segments stored in GCS.

    Pipelined and unbound, like `PutObject`. Answered by `Completed` (the object; composite, so
    it has no MD5), by `Incomplete` listing the byte ranges of segments not stored (send them,
    then Compose again), or by `Error`. Idempotent while the server can tell the object is this
    upload's.
    """

    total_size: int
    crc32c: int | None = None
    token: bytes = field(default=b"", repr=False)


@dataclass(frozen=True, slots=True)
class Discard(Request):
    """Version 3: abort the composite upload `token` names and delete its segments; answered by
    `Ack`. The token can never write again."""

    token: bytes = field(repr=False)


# -- streamed receive side of WriteAt ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WriteAtStart(Event):
    """A `WriteAt` frame began: `length` data bytes for [offset, offset + length) follow."""

    seq: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class WriteAtData(Event):
    """The next piece of the payload of the `WriteAt` with this seq (a view, not a copy)."""

    seq: int
    data: memoryview

    def __repr__(self) -> str:
        return f"WriteAtData(seq={self.seq}, len(data)={len(self.data)})"


@dataclass(frozen=True, slots=True)
class WriteAtEnd(Event):
    """The `WriteAt` with this seq ended and its payload CRC32C matched.

    `data_crc32c` is the CRC32C of the frame's data alone (without its offset), worked out
    while checking the payload's, so a receiver can build an object's CRC32C from its frames
    without reading a byte again. It is not part of the event's equality: the end of a frame
    is that frame's end.
    """

    seq: int
    data_crc32c: int | None = field(default=None, compare=False)


# -- replies -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Welcome(Reply):
    """Answers `Hello`: the chosen version and the agreed (smaller) maximum frame size."""

    version: int
    max_frame_size: int
    server_name: str = ""


@dataclass(frozen=True, slots=True)
class UploadOpened(Reply):
    """Answers `OpenUpload` and `AttachUpload`; `token` lets other connections attach.

    `window_end` is the initial credit window's end (version 2; None from a version-1 peer,
    which sends a `Credit` instead). A server may always set it: `Connection.send()` leaves it
    out for a version-1 client.
    """

    token: bytes = field(repr=False)
    committed_offset: int
    resumed: bool
    window_end: int | None = None


@dataclass(frozen=True, slots=True)
class Ack(Reply):
    """Success; GCS has acknowledged (committed) bytes [0, committed_offset)."""

    committed_offset: int


@dataclass(frozen=True, slots=True)
class Credit(Reply):
    """The client may send bytes in [committed_offset, window_end). May be unsolicited."""

    committed_offset: int
    window_end: int


@dataclass(frozen=True, slots=True)
class Status(Reply):
    """Answers `StatusQuery`; `received` lists sorted, disjoint half-open ranges [start, end).

    `received` may leave out ranges the server holds, never claim ones it does not: `send()`
    keeps the lowest MAX_LISTED_RANGES. Bytes below `committed_offset` are held whether listed
    or not.
    """

    committed_offset: int
    received: tuple[tuple[int, int], ...]
    window_end: int


@dataclass(frozen=True, slots=True)
class Completed(Reply):
    """Answers `Complete`: the object is final in GCS. `md5` is 16 raw bytes when GCS sent one."""

    generation: int
    size: int
    crc32c: int
    md5: bytes | None


@dataclass(frozen=True, slots=True)
class Error(Reply):
    """A request failed (or, with reply_to=0, the connection or upload did)."""

    code: ErrorCode
    retryable: bool
    message: str

    @classmethod
    def from_exception(cls, exc: ProtocolError, reply_to: int | None = None) -> Error:
        """The reply that reports `exc` to the peer; `reply_to` defaults to `exc.seq`."""
        return cls(exc.seq if reply_to is None else reply_to, exc.code, exc.retryable, exc.message)


@dataclass(frozen=True, slots=True)
class Pong(Reply):
    nonce: int


@dataclass(frozen=True, slots=True)
class Incomplete(Reply):
    """Version 2: answers a `Complete` that cannot finish yet because bytes are missing.

    `missing` lists the lowest missing ranges below the Complete's total_size (at most
    MAX_LISTED_RANGES: if the list is full, more may follow it). The connection stays bound:
    send them, then Complete again. To a version-1 client `send()` turns this into
    `self.as_error()`, the MISSING_RANGES error version 1 knows.
    """

    committed_offset: int
    window_end: int
    missing: tuple[tuple[int, int], ...]

    def as_error(self) -> Error:
        """Version 1's form of this reply: Error(MISSING_RANGES), the ranges in its message."""
        shown = ", ".join(f"[{start}, {end})" for start, end in self.missing[:_RANGES_IN_TEXT])
        more = len(self.missing) - _RANGES_IN_TEXT
        if more > 0:
            shown += f" and {more} more"
        code = ErrorCode.MISSING_RANGES
        return Error(self.reply_to, code, code.retryable, f"missing bytes {shown}")


_RANGES_IN_TEXT: Final = 8


@dataclass(frozen=True, slots=True)
class CompositeOpened(Reply):
    """Version 3: answers an `OpenUpload` the server made composite. The connection stays
    unbound: write each segment through `OpenSegment` (at most `parallel_segments` at once is
    what the server serves best), then `Compose`. `token` names the whole upload."""

    token: bytes = field(repr=False)
    segment_size: int
    parallel_segments: int


@dataclass(frozen=True, slots=True)
class GoingAway(Reply):
    """The server is shutting down: it answers requests in flight, then closes."""

    reply_to: int = 0
    message: str = ""
