"""Error codes carried on the wire, and the exceptions the codec raises.

`ErrorCode` numbers are part of the wire format (they travel in `Error` frames) and never change
meaning. The exceptions follow h11: `RemoteProtocolError` means the peer sent something we cannot
accept, `LocalProtocolError` means our own code tried to send something the protocol forbids.
"""

from __future__ import annotations

import enum

__all__ = [
    "ErrorCode",
    "LocalProtocolError",
    "PayloadCrcError",
    "ProtocolError",
    "RemoteProtocolError",
]


class ErrorCode(enum.IntEnum):
    """Stable numeric error codes; docs/protocol.md explains each one.

    1-15 are framing errors raised by the codec itself; 16 and up are decided by the server.
    """

    MALFORMED_FRAME = 1
    UNSUPPORTED_VERSION = 2
    FRAME_TOO_LARGE = 3
    BAD_CRC = 4
    BAD_SEQUENCE = 5
    CORRUPT_HEADER = 6
    UNKNOWN_FRAME_TYPE = 7
    UNEXPECTED_FRAME = 8

    UNAUTHENTICATED = 16
    FORBIDDEN = 17
    BAD_TOKEN = 18
    UNKNOWN_UPLOAD = 19
    OUTSIDE_CREDIT = 20
    INVALID_STATE = 21
    ABORTED = 22
    MISSING_RANGES = 23
    PRECONDITION_FAILED = 24
    CHECKSUM_MISMATCH = 25
    SIZE_MISMATCH = 26

    GCS_ERROR = 32
    TOO_BUSY = 33
    IDLE_TIMEOUT = 34
    SHUTTING_DOWN = 35
    INTERNAL = 36

    @property
    def retryable(self) -> bool:
        """Whether repeating the same request (perhaps on a new connection) can succeed.

        This is the default for the code; an `Error` frame states retryability explicitly, so a
        server may override it (for example a GCS_ERROR caused by a 503 is retryable).
        """
        return self in _RETRYABLE


_RETRYABLE = frozenset(
    {
        ErrorCode.BAD_CRC,
        ErrorCode.TOO_BUSY,
        ErrorCode.IDLE_TIMEOUT,
        ErrorCode.SHUTTING_DOWN,
    }
)


class ProtocolError(Exception):
    """Base class of every protocol violation.

    `code` is the `ErrorCode` to report to the peer, `seq` the sequence number of the offending
    frame when its header could be trusted (0 otherwise), which makes a good `reply_to`.
    """

    def __init__(self, message: str, code: ErrorCode, *, seq: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.seq = seq

    @property
    def retryable(self) -> bool:
        return self.code.retryable

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, {self.code!r}, seq={self.seq})"


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol.

    Fatal for the connection (its state becomes ERROR) except for the `PayloadCrcError` subclass.
    The receiving side may still send one `Error` event to explain, then should close.
    """


class PayloadCrcError(RemoteProtocolError):
    """A frame's payload did not match the CRC32C in its (intact) header.

    Not fatal: the header was verified, so the stream is still in sync and the next frame can be
    read. The request `seq` failed and may be retried; reply with `Error(seq, BAD_CRC, True, ...)`.
    """

    def __init__(self, message: str, *, seq: int) -> None:
        super().__init__(message, ErrorCode.BAD_CRC, seq=seq)


class LocalProtocolError(ProtocolError):
    """Our own code tried to send an event that is invalid or illegal in the current state.

    Nothing was sent and the connection state is unchanged; this is a bug in the caller.
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.INTERNAL, *, seq: int = 0) -> None:
        super().__init__(message, code, seq=seq)
