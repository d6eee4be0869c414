"""`Connection`: one end of a rup protocol connection, sans-IO in the style of h11.

Feed received bytes to `receive_data()`, pull events out of `next_event()`, and turn events into
bytes with `send()`. Nothing here does I/O, so cancellation is the caller's business: if the
caller abandons a `send()` result half-written, the byte stream is broken and the connection must
be closed; `next_event()` never blocks, so there is nothing to cancel on the receive side.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, replace
from typing import Final

import google_crc32c

from crcmath import crc32c_combine, crc32c_of_suffix

from ._codec import (
    FIXED_BODY_SIZES,
    MAX_CONTROL_BODY_SIZE,
    MAX_LISTED_RANGES,
    MIN_FRAME_SIZE,
    SEGMENT_QUANTUM,
    decode_body,
    encode_body,
)
from ._receive import ReceiveBuffer
from ._spec import (
    FIRST_VERSION,
    FRAMING_VERSION,
    HEADER_FIELDS_STRUCT,
    HEADER_SIZE,
    HEADER_STRUCT,
    MAGIC,
    OFFSET_STRUCT,
    WRITE_AT_PREFIX_SIZE,
    FrameType,
)
from ._state import (
    ALLOWED_REPLIES,
    ALLOWED_REQUESTS,
    REPLY_TRANSITIONS,
    REQUEST_TRANSITIONS,
    UNSOLICITED_REPLIES,
    UPLOAD_BOUND,
    ConnectionState,
)
from .errors import (
    ErrorCode,
    LocalProtocolError,
    PayloadCrcError,
    ProtocolError,
    RemoteProtocolError,
)
from .events import (
    NEED_DATA,
    Ack,
    ConnectionClosed,
    Credit,
    Error,
    Event,
    GoingAway,
    Hello,
    Incomplete,
    NeedData,
    PutObject,
    Reply,
    Request,
    Status,
    UploadOpened,
    Welcome,
    WriteAt,
    WriteAtData,
    WriteAtEnd,
    WriteAtStart,
)

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "FRAMING_VERSION",
    "HARD_MAX_FRAME_SIZE",
    "LATEST_VERSION",
    "MAX_CONTROL_BODY_SIZE",
    "MAX_LISTED_RANGES",
    "MAX_MESSAGE_SIZE",
    "MAX_TOKEN_SIZE",
    "MIN_FRAME_SIZE",
    "PROTOCOL_VERSION",
    "SEGMENT_QUANTUM",
    "SUPPORTED_VERSIONS",
    "Connection",
    "Role",
]

PROTOCOL_VERSION: Final = 1
"""Version 1, the original protocol (named so before version 2 existed; callers that offer only
it keep speaking version 1 unchanged)."""
LATEST_VERSION: Final = 3
"""Version 3: version 2 plus composite uploads (OPEN_UPLOAD.single_session, COMPOSITE_OPENED,
OPEN_SEGMENT, COMPOSE, DISCARD). Version 2 (planned as "1.1") added UPLOAD_OPENED.window_end,
INCOMPLETE, PUT_OBJECT and error codes 27-30 and 37-38. No version changes the meaning of
anything an earlier one has."""
SUPPORTED_VERSIONS: Final = (PROTOCOL_VERSION, 2, LATEST_VERSION)
DEFAULT_MAX_FRAME_SIZE: Final = 1024 * 1024
HARD_MAX_FRAME_SIZE: Final = 64 * 1024 * 1024
MAX_TOKEN_SIZE: Final = 8 * 1024
"""The largest upload token a server issues (and so must accept back in ATTACH_UPLOAD)."""
MAX_MESSAGE_SIZE: Final = 1024
"""The most UTF-8 bytes of an Error or GoingAway message `send()` puts on the wire."""

_U32: Final = struct.Struct(">I")
_crc_value = google_crc32c.value
_crc_extend = google_crc32c.extend
_FRAME_TYPES: Final = {int(frame_type): frame_type for frame_type in FrameType}
_FIRST_REPLY_TYPE: Final = 0x80
_FRAME_TYPES_IN: Final = {
    version: {int(t): t for t, since in FIRST_VERSION.items() if since <= version}
    for version in SUPPORTED_VERSIONS
}
_new_event = object.__new__
_set_attribute = object.__setattr__


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


@dataclass(frozen=True, slots=True)
class IncomingFrame:
    """A frame whose header has been read and whose payload is being buffered whole."""

    type: FrameType
    seq: int
    #: the payload's size from the header (already checked against the frame's limit)
    payload_size: int


class _Reading(enum.Enum):
    HEADER = enum.auto()
    BODY = enum.auto()
    WRITE_AT_OFFSET = enum.auto()
    WRITE_AT_DATA = enum.auto()


def _write_at_data(seq: int, data: memoryview) -> WriteAtData:
    """WriteAtData(seq, data), without the frozen dataclass __init__ and its per-field checks.

    Runs once per received buffer, where the generated __init__ was a measurable share.
    """
    event = _new_event(WriteAtData)
    _set_attribute(event, "seq", seq)
    _set_attribute(event, "data", data)
    return event


def _as_crc_input(data: bytes | memoryview) -> bytes:
    # google_crc32c only accepts bytes; a view is copied, but only one buffer's worth at a time.
    return data if type(data) is bytes else bytes(data)


class Connection:
    """One end of a connection.

    Sequence numbers: each direction numbers its frames 1, 2, 3, ...; `send()` assigns them, and
    `last_sent_seq` is the seq of the frame `send()` produced last (the `reply_to` its reply
    will carry). Every received event carries its frame's seq.

    `max_frame_size` bounds the data bytes of one WriteAt (or PutObject) frame. It is this end's
    own limit until `Welcome` has been sent or received, then the agreed one. Control frames
    (everything else) have bodies of at most MAX_CONTROL_BODY_SIZE bytes, whatever was agreed.

    `versions` are the protocol versions this end speaks (a client offers them all in `hello()`,
    a server's `welcome()` picks the newest one the client offered too). Replies a server sends
    are fitted to the client's version and to the protocol's promises by `send()`: see there.
    """

    def __init__(
        self,
        role: Role,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        versions: tuple[int, ...] = SUPPORTED_VERSIONS,
    ) -> None:
        if not MIN_FRAME_SIZE <= max_frame_size <= HARD_MAX_FRAME_SIZE:
            raise ValueError(
                f"max_frame_size must be in [{MIN_FRAME_SIZE}, {HARD_MAX_FRAME_SIZE}],"
                f" not {max_frame_size}"
            )
        if not versions or not set(versions) <= set(SUPPORTED_VERSIONS):
            raise ValueError(
                f"versions must be some of {list(SUPPORTED_VERSIONS)}, not {list(versions)}"
            )
        self.role: Final = role
        self.versions: Final = tuple(sorted(set(versions)))
        self._receives_requests = role is Role.SERVER
        self.version: int | None = None
        """The negotiated protocol version, once Welcome has passed."""
        self._max_frame_size = max_frame_size
        # (committed_offset, window_end): the largest sent (server) or received (client) since
        # the bound upload was bound; None while no upload is bound.
        self._window: tuple[int, int] | None = None
        # The frame types the negotiated version (version 1 until then) has, by number.
        self._frame_types = _FRAME_TYPES_IN[PROTOCOL_VERSION]
        self._state = ConnectionState.AWAIT_HELLO
        self._hello: Hello | None = None
        self._last_sent_seq = 0
        self._last_received_seq = 0
        # Requests awaiting their single reply: seq -> frame type.
        self._in_flight: dict[int, FrameType] = {}
        self._error: RemoteProtocolError | None = None

        self._buffer = ReceiveBuffer()
        self._eof = False
        self._reading = _Reading.HEADER
        # The frame being received:
        self._frame_type = FrameType.HELLO
        self._frame_seq = 0
        self._payload_size = 0
        self._remaining = 0
        self._expected_crc = 0
        self._crc = 0
        self._prefix_crc = 0
        self._data_length = 0

    def __repr__(self) -> str:
        return (
            f"<Connection {self.role.value} state={self._state.value}"
            f" sent={self._last_sent_seq} received={self._last_received_seq}"
            f" in_flight={len(self._in_flight)}>"
        )

    # -- introspection ---------------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def max_frame_size(self) -> int:
        return self._max_frame_size

    @property
    def last_sent_seq(self) -> int:
        return self._last_sent_seq

    @property
    def peer_closed(self) -> bool:
        """The peer sent EOF (`receive_data(b"")` was called)."""
        return self._eof

    @property
    def window(self) -> tuple[int, int] | None:
        """(committed_offset, window_end), the largest this connection has carried for the bound
        upload (from UploadOpened, Credit, Status, Incomplete and Acks); None while unbound.

        On a server these are never lower than what was sent before (`send()` sees to it). A
        client should still take the largest window_end over all its connections to the upload:
        frames on different connections have no order.
        """
        return self._window

    @property
    def incoming_frame(self) -> IncomingFrame | None:
        """The frame being received whole, known from its validated header before any of its
        payload is buffered; ``None`` between frames and during a WRITE_AT (whose data is
        handed on as it arrives, in WriteAtData events).

        A receiver can pay for a large payload before reading it: rup's server charges a
        PUT_OBJECT's bytes to its memory budget here, and stops reading until they are paid.
        """
        if self._reading is not _Reading.BODY:
            return None
        return IncomingFrame(self._frame_type, self._frame_seq, self._payload_size)

    @property
    def write_at_data_wanted(self) -> int:
        """How many data bytes of the WRITE_AT being received are still to come, while none of
        them is buffered; 0 otherwise (between frames, or with bytes waiting in the buffer).

        A receiver may then read up to this many bytes itself and pass them to
        `receive_write_at_data`: the bytes WriteAtData events would have carried, without an
        event, a buffer or a dispatch per receive. It is rup's server's path for a frame's
        data on a plain TCP connection.
        """
        if self._reading is _Reading.WRITE_AT_DATA and not self._buffer and not self._eof:
            return self._remaining
        return 0

    @property
    def requests_in_flight(self) -> int:
        """How many requests have been sent (client) or received (server) but not answered."""
        return len(self._in_flight)

    # -- negotiation helpers ---------------------------------------------------------------------

    def hello(self, *, auth: str = "", client_name: str = "") -> Hello:
        """The Hello a client should send: every version we speak and our frame size limit."""
        return Hello(self.versions, self._max_frame_size, auth=auth, client_name=client_name)

    def welcome(self, hello: Hello, *, server_name: str = "") -> Welcome:
        """The Welcome that answers a received `hello`: the newest common version, smaller limit."""
        common = set(hello.versions).intersection(self.versions)
        if not common:
            raise LocalProtocolError("no common protocol version to welcome", seq=hello.seq)
        max_frame_size = min(hello.max_frame_size, self._max_frame_size)
        return Welcome(hello.seq, max(common), max_frame_size, server_name)

    # -- receiving -------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes; b"" means the peer closed its sending side.

        The buffer is kept, not copied (WriteAtData events are views into it): do not modify it
        afterwards. Bytes are held until `next_event()` consumes them, so call it in a loop.
        """
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("received data after the peer closed the connection")
        if type(data) is not bytes:
            data = memoryview(data).cast("B")
        self._buffer.append(data)

    def receive_write_at_data(self, data: bytes) -> None:
        """Take the next bytes of the WRITE_AT frame's data, which the caller read itself and
        keeps: at most `write_at_data_wanted` of them, never empty. They count toward the
        frame's CRC32C exactly as WriteAtData pieces do; once all have come, `next_event()`
        returns the frame's WriteAtEnd (or raises PayloadCrcError if they were damaged).

        Raises LocalProtocolError for bytes that are not wanted: the caller mixed this with
        `receive_data`, or read past the frame.
        """
        size = len(data)
        if not 0 < size <= self.write_at_data_wanted:
            raise LocalProtocolError(
                f"{size} bytes offered as WRITE_AT data, where"
                f" {self.write_at_data_wanted} may be taken"
            )
        self._remaining -= size
        self._crc = _crc_extend(self._crc, data)

    def receive_size(self, limit: int) -> int:
        """How many bytes to ask the transport for next: at most `limit`, and never past the end
        of the header or payload being read.

        A receiver that asks for this much gets each WriteAt's data in buffers of its own, so
        every `WriteAtData` is a whole received buffer: its CRC32C needs no copy, and a view
        held on to pins only payload bytes, not the start of the next frame. A header and a
        WriteAt's 8-byte offset are asked for together.
        """
        buffered = len(self._buffer)
        reading = self._reading
        if reading is _Reading.WRITE_AT_DATA:
            wanted = self._remaining - buffered
        elif reading is _Reading.HEADER:
            wanted = HEADER_SIZE + WRITE_AT_PREFIX_SIZE - buffered
        elif reading is _Reading.WRITE_AT_OFFSET:
            wanted = WRITE_AT_PREFIX_SIZE - buffered
        else:
            wanted = self._payload_size - buffered
        return min(limit, wanted) if wanted > 0 else limit

    def next_event(self) -> Event | NeedData:
        """The next event, or NEED_DATA.

        Raises RemoteProtocolError when the peer broke the protocol; the connection is then in
        the ERROR state and every later call raises too. On a server, PayloadCrcError (not a
        RemoteProtocolError) means one request's payload was damaged: the frame `exc.seq` is
        dropped, answer it with `Error.from_exception(exc)`, and the next call continues with
        the following frame. A damaged HELLO, and on a client a damaged reply (its `reply_to`
        is in the damaged bytes), are fatal RemoteProtocolErrors with code BAD_CRC instead.
        """
        # The hot path, inlined: the next piece of a WriteAt payload, one event per buffer.
        if self._reading is _Reading.WRITE_AT_DATA and self._remaining:
            piece = self._buffer.take_piece(self._remaining)
            if piece is not None:
                self._remaining -= len(piece)
                if isinstance(piece, bytes):
                    self._crc = _crc_extend(self._crc, piece)
                    return _write_at_data(self._frame_seq, memoryview(piece))
                # google_crc32c takes only bytes: part of a buffer costs one bounded copy.
                self._crc = _crc_extend(self._crc, bytes(piece))
                return _write_at_data(self._frame_seq, piece)
            if not self._eof:
                return NEED_DATA
        if self._error is not None:
            raise RemoteProtocolError(
                f"connection already failed: {self._error.message}",
                self._error.code,
                seq=self._error.seq,
            )
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._state = ConnectionState.ERROR
            self._error = exc
            raise

    def _next_event(self) -> Event | NeedData:
        reading = self._reading
        if reading is _Reading.WRITE_AT_DATA:
            if self._remaining:
                return self._need_data()  # next_event() found the buffer empty
            self._reading = _Reading.HEADER
            # _crc covers the data alone; the header's covers the offset and the data.
            payload_crc = crc32c_combine(self._prefix_crc, self._crc, self._data_length)
            if payload_crc != self._expected_crc:
                raise PayloadCrcError(
                    f"WRITE_AT seq {self._frame_seq}: payload CRC32C mismatch"
                    f" ({payload_crc:08x} computed, {self._expected_crc:08x} in header)",
                    seq=self._frame_seq,
                )
            return WriteAtEnd(self._frame_seq, self._crc)

        if reading is _Reading.HEADER:
            if len(self._buffer) < HEADER_SIZE:
                return self._need_data()
            self._start_frame(self._buffer.take(HEADER_SIZE))
            reading = self._reading

        if reading is _Reading.WRITE_AT_OFFSET:
            if len(self._buffer) < WRITE_AT_PREFIX_SIZE:
                return self._need_data()
            prefix = self._buffer.take(WRITE_AT_PREFIX_SIZE)
            (offset,) = OFFSET_STRUCT.unpack(prefix)
            self._prefix_crc = _crc_value(prefix)
            self._crc = 0  # the data's own CRC32C, extended as its pieces are taken
            self._remaining = self._data_length = self._payload_size - WRITE_AT_PREFIX_SIZE
            self._reading = _Reading.WRITE_AT_DATA
            return WriteAtStart(self._frame_seq, offset, self._remaining)

        if len(self._buffer) < self._payload_size:
            return self._need_data()
        body = self._buffer.take(self._payload_size)
        self._reading = _Reading.HEADER
        frame_type, seq = self._frame_type, self._frame_seq
        crc = _crc_value(body)
        if crc != self._expected_crc:
            message = (
                f"{frame_type.name} seq {seq}: payload CRC32C mismatch"
                f" ({crc:08x} computed, {self._expected_crc:08x} in header)"
            )
            if self._receives_requests and frame_type is not FrameType.HELLO:
                raise PayloadCrcError(message, seq=seq)
            # A damaged reply cannot be matched to its request (reply_to is in the damaged
            # bytes), and every answer to a HELLO but WELCOME ends the connection: fatal.
            raise RemoteProtocolError(message, ErrorCode.BAD_CRC, seq=seq)
        event = decode_body(frame_type, seq, body, self.version or 1)
        if isinstance(event, Reply):
            self._check_reply(frame_type, event, RemoteProtocolError)
            self._apply_reply(frame_type, event)
            self._note_window(event)
        elif isinstance(event, Hello):
            self._receive_hello(event)
        elif isinstance(event, PutObject):
            data_length = len(event.data)
            if data_length > self._max_frame_size:
                raise RemoteProtocolError(
                    f"PUT_OBJECT seq {seq} carries {data_length} data bytes, above"
                    f" max_frame_size {self._max_frame_size}",
                    ErrorCode.FRAME_TOO_LARGE,
                    seq=seq,
                )
            # The data ends the body: its CRC32C is the body's with the fields' taken out
            # (CRC32C is linear), from the few bytes before the data, not a pass over it.
            fields_crc = _crc_value(body[: len(body) - data_length])
            _set_attribute(event, "data_crc32c", crc32c_of_suffix(crc, fields_crc, data_length))
        return event

    def _need_data(self) -> ConnectionClosed | NeedData:
        if not self._eof:
            return NEED_DATA
        if self._reading is _Reading.HEADER:
            if not self._buffer:
                return ConnectionClosed()
            raise RemoteProtocolError(
                f"truncated frame: the peer closed the connection after {len(self._buffer)}"
                f" of {HEADER_SIZE} header bytes",
                ErrorCode.MALFORMED_FRAME,
            )
        received = len(self._buffer)
        if self._reading is _Reading.WRITE_AT_DATA:
            received += self._payload_size - self._remaining
        raise RemoteProtocolError(
            f"truncated {self._frame_type.name} frame (seq {self._frame_seq}): the peer closed"
            f" the connection after {received} of {self._payload_size} payload bytes",
            ErrorCode.MALFORMED_FRAME,
            seq=self._frame_seq,
        )

    def _start_frame(self, header: bytes) -> None:
        """Validate a header before any of its payload is buffered, and set up to read it."""
        magic, version, raw_type, flags, seq, size, payload_crc, header_crc = HEADER_STRUCT.unpack(
            header
        )
        if magic != MAGIC:
            raise RemoteProtocolError(
                f"no frame magic where a frame should start: got {magic.hex()},"
                f" expected {MAGIC.hex()}",
                ErrorCode.MALFORMED_FRAME,
            )
        if _crc_value(header[: HEADER_SIZE - 4]) != header_crc:
            raise RemoteProtocolError(
                "header CRC32C mismatch: the frame header is corrupt", ErrorCode.CORRUPT_HEADER
            )
        # The header is intact. Errors name the frame's seq (their Error's reply_to) only once
        # it is known to be the expected one: until then an Error is unsolicited (reply_to 0).
        if version != FRAMING_VERSION:
            raise RemoteProtocolError(
                f"frame version {version} is not supported; supported: [{FRAMING_VERSION}]",
                ErrorCode.UNSUPPORTED_VERSION,
            )
        if seq != self._last_received_seq + 1:
            known = _FRAME_TYPES.get(raw_type)
            name = known.name if known is not None else f"frame type 0x{raw_type:02x}"
            raise RemoteProtocolError(
                f"{name} has seq {seq}, expected {self._last_received_seq + 1}",
                ErrorCode.BAD_SEQUENCE,
            )
        self._last_received_seq = seq
        frame_type = self._frame_types.get(raw_type)
        if frame_type is None:
            version = self.version or PROTOCOL_VERSION
            which = "unknown" if raw_type not in _FRAME_TYPES else f"version {version} has no"
            raise RemoteProtocolError(
                f"{which} frame type 0x{raw_type:02x}", ErrorCode.UNKNOWN_FRAME_TYPE, seq=seq
            )
        if flags:
            raise RemoteProtocolError(
                f"{frame_type.name} seq {seq}: unknown flags 0x{flags:04x}",
                ErrorCode.MALFORMED_FRAME,
                seq=seq,
            )
        is_request = raw_type < _FIRST_REPLY_TYPE
        if is_request is not self._receives_requests:
            sender = "client" if is_request else "server"
            raise RemoteProtocolError(
                f"{frame_type.name} seq {seq}: only a {sender} sends {frame_type.name} frames",
                ErrorCode.UNEXPECTED_FRAME,
                seq=seq,
            )
        self._check_payload_size(frame_type, seq, size)
        if is_request:
            self._receive_request(frame_type, seq)
        self._frame_type = frame_type
        self._frame_seq = seq
        self._payload_size = size
        self._expected_crc = payload_crc
        if frame_type is FrameType.WRITE_AT:
            self._reading = _Reading.WRITE_AT_OFFSET
        else:
            self._reading = _Reading.BODY

    def _check_payload_size(self, frame_type: FrameType, seq: int, size: int) -> None:
        name = frame_type.name
        limit = MAX_CONTROL_BODY_SIZE
        if frame_type is FrameType.PUT_OBJECT:
            limit += self._max_frame_size
        elif frame_type is FrameType.WRITE_AT:
            limit = WRITE_AT_PREFIX_SIZE + self._max_frame_size
            if size < WRITE_AT_PREFIX_SIZE:
                raise RemoteProtocolError(
                    f"WRITE_AT seq {seq}: {size} payload bytes cannot hold the 8-byte offset",
                    ErrorCode.MALFORMED_FRAME,
                    seq=seq,
                )
        if size > limit:
            raise RemoteProtocolError(
                f"{name} seq {seq} declares {size} payload bytes, more than the {limit} allowed",
                ErrorCode.FRAME_TOO_LARGE,
                seq=seq,
            )
        fixed = FIXED_BODY_SIZES.get(frame_type)
        if fixed is not None and size != fixed:
            raise RemoteProtocolError(
                f"{name} seq {seq} declares {size} payload bytes; its body is always {fixed}",
                ErrorCode.MALFORMED_FRAME,
                seq=seq,
            )

    def _receive_request(self, frame_type: FrameType, seq: int) -> None:
        # Runs on the header alone, so a request illegal in this state is refused before its
        # payload is read, and a request whose payload then fails its CRC can still be answered.
        if frame_type not in ALLOWED_REQUESTS[self._state]:
            raise RemoteProtocolError(
                f"{frame_type.name} seq {seq} is not allowed in state {self._state.value}"
                f" (allowed: {_names(ALLOWED_REQUESTS[self._state])})",
                ErrorCode.UNEXPECTED_FRAME,
                seq=seq,
            )
        self._in_flight[seq] = frame_type
        self._state = REQUEST_TRANSITIONS.get(frame_type, self._state)

    def _receive_hello(self, hello: Hello) -> None:
        self._hello = hello
        if not set(hello.versions).intersection(self.versions):
            raise RemoteProtocolError(
                f"client offers protocol versions {list(hello.versions)}; this server supports"
                f" {list(self.versions)}",
                ErrorCode.UNSUPPORTED_VERSION,
                seq=hello.seq,
            )

    # -- replies (checked on send by the server, on receipt by the client) -----------------------

    def _check_reply(self, frame_type: FrameType, reply: Reply, error: type[ProtocolError]) -> None:
        name = frame_type.name
        reply_to = reply.reply_to
        if reply_to == 0:
            states = UNSOLICITED_REPLIES.get(frame_type)
            if states is None:
                raise error(
                    f"{name} must answer a request, but its reply_to is 0",
                    ErrorCode.UNEXPECTED_FRAME,
                    seq=reply.seq,
                )
            if self._state not in states:
                raise error(
                    f"unsolicited {name} is not allowed in state {self._state.value}",
                    ErrorCode.UNEXPECTED_FRAME,
                    seq=reply.seq,
                )
            return
        request = self._in_flight.get(reply_to)
        if request is None:
            raise error(
                f"{name} answers seq {reply_to}, which is no request awaiting a reply",
                ErrorCode.UNEXPECTED_FRAME,
                seq=reply.seq,
            )
        if frame_type not in ALLOWED_REPLIES[request]:
            raise error(
                f"{name} cannot answer {request.name} (seq {reply_to});"
                f" allowed: {_names(ALLOWED_REPLIES[request])}",
                ErrorCode.UNEXPECTED_FRAME,
                seq=reply.seq,
            )
        if isinstance(reply, Welcome):
            self._check_welcome(reply, error)

    def _check_welcome(self, welcome: Welcome, error: type[ProtocolError]) -> None:
        assert self._hello is not None  # a Hello is in flight, or the Welcome was refused
        if welcome.version not in self._hello.versions or welcome.version not in self.versions:
            raise error(
                f"Welcome picks version {welcome.version}, which was not offered"
                f" (offered {list(self._hello.versions)})",
                ErrorCode.UNSUPPORTED_VERSION,
                seq=welcome.seq,
            )
        limit = min(self._hello.max_frame_size, self._max_frame_size)
        if welcome.max_frame_size > limit:
            raise error(
                f"Welcome agrees max_frame_size {welcome.max_frame_size}, above the {limit}"
                " both ends accept",
                ErrorCode.FRAME_TOO_LARGE,
                seq=welcome.seq,
            )

    def _apply_reply(self, frame_type: FrameType, reply: Reply) -> None:
        if reply.reply_to == 0:
            return
        request = self._in_flight.pop(reply.reply_to)
        if isinstance(reply, Welcome):
            self.version = reply.version
            self._frame_types = _FRAME_TYPES_IN[reply.version]
            self._max_frame_size = reply.max_frame_size
        self._state = REPLY_TRANSITIONS.get((request, frame_type), self._state)
        if self._state not in UPLOAD_BOUND:
            self._window = None

    def _note_window(self, reply: Reply) -> None:
        """Keep `window` up to date with a reply sent or received (after `_apply_reply`, which
        clears it whenever the connection is left without an upload)."""
        window = self._window
        if isinstance(reply, Ack):  # the per-frame case first
            committed = reply.committed_offset
            if window is not None and committed > window[0] and reply.reply_to:
                self._window = (committed, max(committed, window[1]))
            return
        kind = type(reply)
        if kind is UploadOpened:
            if self._state in UPLOAD_BOUND:
                # A new binding starts from its own offsets (version 1: no window granted yet).
                assert isinstance(reply, UploadOpened)
                committed = reply.committed_offset
                end = committed if reply.window_end is None else reply.window_end
                self._window = (committed, end)
        elif window is not None and (kind is Credit or kind is Status or kind is Incomplete):
            assert isinstance(reply, Credit | Status | Incomplete)
            self._window = (
                max(reply.committed_offset, window[0]),
                max(reply.window_end, window[1]),
            )

    # -- sending ---------------------------------------------------------------------------------

    def send(self, event: Event) -> list[bytes | memoryview]:
        """The buffers to write, in order, to send `event`; `last_sent_seq` is its seq.

        For WriteAt and PutObject the data is the last buffer, passed through without a copy.
        Raises LocalProtocolError (and changes nothing) if the event is invalid or illegal now.

        On a server, a reply is first made what the protocol promises the client, whatever the
        caller built: its Error `retryable` from ERROR_SPECS, codes and INCOMPLETE the client's
        version lacks as their version-1 forms, at most MAX_LISTED_RANGES ranges, messages of at
        most MAX_MESSAGE_SIZE bytes with control characters escaped, and committed_offset and
        window_end never lower than this connection already sent for the bound upload.
        """
        if isinstance(event, WriteAt):
            return self._send_write_at(event)
        if not isinstance(event, Request | Reply):
            raise LocalProtocolError(f"{type(event).__name__} events are never sent")
        if self.role is Role.SERVER and isinstance(event, Reply):
            if type(event) is Ack:  # once per WriteAt: inlined
                window = self._window
                if (
                    window is not None
                    and event.committed_offset < window[0]
                    and self._in_flight.get(event.reply_to) is FrameType.WRITE_AT
                ):
                    event = Ack(event.reply_to, window[0])
            else:
                event = self._fit_reply(event)
        # A PutObject's data ends its body: encoded without it, then sent as it is, uncopied.
        data = b""
        if isinstance(event, PutObject) and event.data:
            data, event = event.data, replace(event, data=b"")
        frame_type, body = encode_body(event, self.version or self._peer_version())
        if frame_type.is_request != (self.role is Role.CLIENT):
            raise LocalProtocolError(f"a {self.role.value} does not send {frame_type.name}")
        if int(frame_type) not in self._frame_types:  # int: cheaper to hash than the enum
            raise LocalProtocolError(
                f"{frame_type.name} needs protocol version {FIRST_VERSION[frame_type]};"
                f" this connection speaks {self.version or 'none yet'}",
                ErrorCode.UNKNOWN_FRAME_TYPE,
            )
        limit = MAX_CONTROL_BODY_SIZE
        if frame_type is FrameType.PUT_OBJECT:
            limit += self._max_frame_size
            if len(data) > self._max_frame_size:
                raise LocalProtocolError(
                    f"PutObject carries {len(data)} bytes, above max_frame_size"
                    f" {self._max_frame_size}: upload it with OpenUpload, WriteAt and Complete",
                    ErrorCode.FRAME_TOO_LARGE,
                )
        body_size = len(body) + len(data)
        if body_size > limit:
            raise LocalProtocolError(
                f"{frame_type.name} body is {body_size} bytes, above the {limit} allowed",
                ErrorCode.FRAME_TOO_LARGE,
            )
        if isinstance(event, Request):
            self._check_request(frame_type)
            if isinstance(event, Hello):
                self._check_hello(event)
        elif self._state is ConnectionState.ERROR:
            # After a fatal error the only thing left to say is why (or goodbye).
            if frame_type not in (FrameType.ERROR, FrameType.GOING_AWAY):
                raise LocalProtocolError(f"cannot send {frame_type.name} in state ERROR")
        else:
            assert isinstance(event, Reply)
            self._check_reply(frame_type, event, LocalProtocolError)

        seq = self._last_sent_seq + 1
        buffers: list[bytes | memoryview]
        if data:
            crc = crc32c_combine(_crc_value(body), _crc_value(_as_crc_input(data)), len(data))
            buffers = [self._header(frame_type, seq, body_size, crc), body, data]
        else:
            buffers = [self._header(frame_type, seq, body_size, _crc_value(body)) + body]
        self._last_sent_seq = seq
        if isinstance(event, Request):
            self._in_flight[seq] = frame_type
            self._state = REQUEST_TRANSITIONS.get(frame_type, self._state)
            if isinstance(event, Hello):
                self._hello = event
        elif self._state is ConnectionState.ERROR:
            self._in_flight.pop(event.reply_to, None)
        else:
            self._apply_reply(frame_type, event)
            self._note_window(event)
        return buffers

    def _peer_version(self) -> int:
        """The version the peer decodes: the negotiated one, or (a server answering a Hello)
        the one it would negotiate, or version 1 before that."""
        if self.version is not None:
            return self.version
        if self._hello is not None and self.role is Role.SERVER:
            common = set(self._hello.versions).intersection(self.versions)
            if common:
                return max(common)
        return PROTOCOL_VERSION

    def _fit_reply(self, reply: Reply) -> Reply:
        """`reply` as the protocol promises the client it will be, whatever the caller built.

        * An Error's `retryable` is its code's (ERROR_SPECS), unless the table leaves it to each
          reply (GCS_ERROR, UNKNOWN_UPLOAD).
        * An Error code or Incomplete the client's version lacks becomes what that version has
          (`ErrorCode.for_version`, `Incomplete.as_error`); UploadOpened.window_end is left out
          for a version-1 client (which learns its window from the Credit that follows), and
          for a version-2 client defaults to committed_offset (an empty window: wait for it).
        * Status and Incomplete list at most MAX_LISTED_RANGES ranges, the lowest.
        * Error and GoingAway messages are at most MAX_MESSAGE_SIZE bytes, control characters
          escaped, so a message that quotes a long or hostile name can always be sent.
        * committed_offset and window_end never go down on this connection while an upload is
          bound: a stale Credit, Status, Incomplete or Ack carries the largest values sent.
        """
        kind = type(reply)
        if kind is Credit or kind is Status:
            return self._no_lower_window(reply)
        version = self._peer_version()
        if isinstance(reply, Incomplete):
            if len(reply.missing) > MAX_LISTED_RANGES:
                reply = replace(reply, missing=reply.missing[:MAX_LISTED_RANGES])
            if version < FIRST_VERSION[FrameType.INCOMPLETE]:
                reply = reply.as_error()
            else:
                return self._no_lower_window(reply)
        if isinstance(reply, Error):
            # The table decides retryability, except where it leaves it to each reply.
            spec = reply.code.spec
            retryable = reply.retryable if spec.retryable_per_reply else spec.retryable
            code, message = reply.code.for_version(version), _fit_message(reply.message)
            if (
                code is not reply.code
                or message is not reply.message
                or (retryable is not reply.retryable)
            ):
                reply = replace(reply, code=code, retryable=retryable, message=message)
        elif isinstance(reply, GoingAway):
            message = _fit_message(reply.message)
            if message is not reply.message:
                reply = replace(reply, message=message)
        elif isinstance(reply, UploadOpened):
            if version < 2 and reply.window_end is not None:
                reply = replace(reply, window_end=None)
            elif version >= 2 and reply.window_end is None:
                # No window known yet: an empty one; the Credit that follows grants it.
                reply = replace(reply, window_end=reply.committed_offset)
        return reply

    def _no_lower_window(self, reply: Reply) -> Reply:
        window = self._window
        if window is None or self._state not in UPLOAD_BOUND:
            return reply
        committed, end = window
        if isinstance(reply, Status):
            received = reply.received
            if len(received) > MAX_LISTED_RANGES:
                reply = replace(reply, received=received[:MAX_LISTED_RANGES])
        assert isinstance(reply, Credit | Status | Incomplete)
        if reply.committed_offset < committed or reply.window_end < end:
            return replace(
                reply,
                committed_offset=max(committed, reply.committed_offset),
                window_end=max(end, reply.window_end),
            )
        return reply

    def send_bytes(self, event: Event) -> bytes:
        """`send()` joined into one bytes object (copies WriteAt data; fine for small frames)."""
        return b"".join(self.send(event))

    def _check_request(self, frame_type: FrameType) -> None:
        if frame_type not in ALLOWED_REQUESTS[self._state]:
            raise LocalProtocolError(
                f"cannot send {frame_type.name} in state {self._state.value}"
                f" (allowed: {_names(ALLOWED_REQUESTS[self._state])})",
                ErrorCode.UNEXPECTED_FRAME,
            )

    def _check_hello(self, hello: Hello) -> None:
        if not set(hello.versions) <= set(self.versions):
            # The server may pick any version offered: offer only what this end can speak.
            raise LocalProtocolError(
                f"Hello offers {list(hello.versions)}, but this end speaks only"
                f" {list(self.versions)}",
                ErrorCode.UNSUPPORTED_VERSION,
            )
        if hello.max_frame_size > self._max_frame_size:
            raise LocalProtocolError(
                f"Hello offers max_frame_size {hello.max_frame_size}, above this connection's"
                f" {self._max_frame_size}",
                ErrorCode.FRAME_TOO_LARGE,
            )

    def _send_write_at(self, event: WriteAt) -> list[bytes | memoryview]:
        data = event.data
        if type(data) is not bytes:
            data = memoryview(data).cast("B")
        size = len(data)
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("a server does not send WRITE_AT")
        self._check_request(FrameType.WRITE_AT)
        if size > self._max_frame_size:
            raise LocalProtocolError(
                f"WriteAt carries {size} bytes, above max_frame_size {self._max_frame_size}",
                ErrorCode.FRAME_TOO_LARGE,
            )
        if not 0 <= event.offset <= 2**64 - 1 - size:
            raise LocalProtocolError(f"WriteAt offset {event.offset} is out of range")
        prefix = OFFSET_STRUCT.pack(event.offset)
        if event.data_crc32c is None:
            crc = _crc_extend(_crc_value(prefix), _as_crc_input(data))
        else:
            crc = crc32c_combine(_crc_value(prefix), event.data_crc32c, size)
        seq = self._last_sent_seq + 1
        header = self._header(FrameType.WRITE_AT, seq, WRITE_AT_PREFIX_SIZE + size, crc)
        self._last_sent_seq = seq
        self._in_flight[seq] = FrameType.WRITE_AT
        return [header + prefix, data] if size else [header + prefix]

    @staticmethod
    def _header(frame_type: FrameType, seq: int, payload_size: int, payload_crc: int) -> bytes:
        fields = HEADER_FIELDS_STRUCT.pack(
            MAGIC, FRAMING_VERSION, frame_type, 0, seq, payload_size, payload_crc
        )
        return fields + _U32.pack(_crc_value(fields))


def _names(frame_types: frozenset[FrameType]) -> str:
    return ", ".join(sorted(t.name for t in frame_types)) or "nothing"


_ELLIPSIS: Final = "\N{HORIZONTAL ELLIPSIS}"


def _fit_message(text: str) -> str:
    """`text` with control (non-printable) characters escaped, cut to MAX_MESSAGE_SIZE bytes.

    Returns `text` itself when it needs neither, which is the common case.
    """
    if text.isprintable() and len(text) <= MAX_MESSAGE_SIZE // 4:
        return text  # short enough whatever its characters' UTF-8 lengths
    if not text.isprintable():
        text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    encoded = text.encode()
    if len(encoded) <= MAX_MESSAGE_SIZE:
        return text
    cut = encoded[: MAX_MESSAGE_SIZE - len(_ELLIPSIS.encode())]
    return cut.decode("utf-8", "ignore") + _ELLIPSIS
