"""Error codes carried on the wire, what each one means, and the exceptions the codec raises.

`ErrorCode` numbers are part of the wire format (they travel in `Error` frames) and never change
meaning; new codes are appended. `ERROR_SPECS` is the one table that says what a code means: how
far the failure reaches (`Scope`), whether trying again can help, which requests can receive it,
and which protocol version introduced it. Clients, the server and docs/protocol.md all read it
(tests/protocol/test_docs.py checks the spec's table is this one).

The exceptions follow h11: `RemoteProtocolError` means the peer sent something we cannot accept
(fatal for the connection), `LocalProtocolError` means our own code tried to send something the
protocol forbids. `PayloadCrcError` is neither: one request's payload was damaged in transit and
only that request fails.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from ._spec import FrameType

__all__ = [
    "ERROR_SPECS",
    "ErrorCode",
    "ErrorSpec",
    "LocalProtocolError",
    "PayloadCrcError",
    "ProtocolError",
    "RemoteProtocolError",
    "Scope",
    "error_spec",
]


class ErrorCode(enum.IntEnum):
    """Stable numeric error codes; `ERROR_SPECS` (and docs/protocol.md section 7) say what each
    one means.

    1-15 are framing errors raised by the codec itself; 16-31 are about a request or an upload,
    32 and up about the server's resources and lifecycle. Numbers are never reused.
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
    TOKEN_NOT_RESUMABLE = 27
    UPLOAD_FINISHED = 28
    FRAGMENT_LIMIT = 29
    INVALID_REQUEST = 30

    GCS_ERROR = 32
    TOO_BUSY = 33
    IDLE_TIMEOUT = 34
    SHUTTING_DOWN = 35
    INTERNAL = 36
    HANDSHAKE_TIMEOUT = 37
    TOO_MANY_CONNECTIONS = 38

    @property
    def spec(self) -> ErrorSpec:
        """What this code means: its row of `ERROR_SPECS`."""
        return ERROR_SPECS[self]

    @property
    def scope(self) -> Scope:
        return ERROR_SPECS[self].scope

    @property
    def retryable(self) -> bool:
        """Whether trying again (at the level `scope` names) can succeed.

        Every `Error` frame carries this value, except for the codes whose `retryable_per_reply`
        is set: those say per reply (a GCS_ERROR from a 503 is retryable, one from a 400 is not).
        """
        return ERROR_SPECS[self].retryable

    def for_version(self, version: int) -> ErrorCode:
        """The code to send a peer that speaks `version`: this one, or the older code that
        stands in for it (a peer fails to decode a code its version does not define)."""
        spec = ERROR_SPECS[self]
        if spec.since <= version or spec.fallback is None:
            return self
        return spec.fallback


class Scope(enum.Enum):
    """How far an error reaches."""

    FRAME = "frame"
    """Only the request it answers failed; the connection and the upload carry on."""
    CONNECTION = "connection"
    """The connection is finished (the server closes it); an upload bound to it lives on and can
    be attached again, on a new connection, with its token."""
    UPLOAD = "upload"
    """The upload failed (or, to an open, could not start), for every connection attached."""


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    """One row of the error table: everything the protocol says about one code."""

    code: ErrorCode
    scope: Scope
    retryable: bool
    """The value every reply carries, unless `retryable_per_reply`."""
    answers: frozenset[FrameType]
    """The requests that can receive this code as their reply."""
    unsolicited: bool
    """Whether it can also come unsolicited (reply_to 0): about the connection or the upload."""
    meaning: str
    """One line for people: when it is sent, and what a client does about it."""
    retryable_per_reply: bool = False
    since: int = 1
    """The protocol version that introduced it; older peers get `fallback` instead."""
    fallback: ErrorCode | None = None


_R = FrameType
_ANY: Final = frozenset(t for t in FrameType if t.is_request)
_OPENS: Final = frozenset({_R.OPEN_UPLOAD, _R.PUT_OBJECT})
# Requests about the bound upload: once it has failed, each of these gets the failure.
_ON_UPLOAD: Final = frozenset(
    {_R.ATTACH_UPLOAD, _R.WRITE_AT, _R.COMPLETE, _R.ABORT, _R.STATUS_QUERY}
)
_NONE: Final[frozenset[FrameType]] = frozenset()


def _specs(rows: Iterable[ErrorSpec]) -> dict[ErrorCode, ErrorSpec]:
    table = {row.code: row for row in rows}
    missing = set(ErrorCode) - set(table)
    if missing:  # pragma: no cover - caught by importing the module at all
        raise AssertionError(f"error codes without a row: {sorted(missing)}")
    return table


_S = Scope
# fmt: off
ERROR_SPECS: Final[dict[ErrorCode, ErrorSpec]] = _specs(
    [
        # -- framing, found by the codec ---------------------------------------------------
        ErrorSpec(
            ErrorCode.MALFORMED_FRAME, _S.CONNECTION, True, _ANY, True,
            "bad magic, unknown flags, a body that does not parse or breaks a value rule, a size"
            " that does not fit the frame type, or a stream that ends inside a frame"
            " (\"truncated ...\")",
        ),
        ErrorSpec(
            ErrorCode.UNSUPPORTED_VERSION, _S.CONNECTION, False, _ANY, True,
            "a frame header version other than 1, or a HELLO offering no version the server"
            " speaks (the message lists the ones it does)",
        ),
        ErrorSpec(
            ErrorCode.FRAME_TOO_LARGE, _S.CONNECTION, False, _ANY, True,
            "payload_size above the limit of section 5",
        ),
        ErrorSpec(
            ErrorCode.BAD_CRC, _S.FRAME, True, _ANY, False,
            "the payload does not match payload_crc32c: resend the request (a HELLO: on a new"
            " connection)",
        ),
        ErrorSpec(
            ErrorCode.BAD_SEQUENCE, _S.CONNECTION, True, _NONE, True,
            "seq is not the previous frame's plus one",
        ),
        ErrorSpec(
            ErrorCode.CORRUPT_HEADER, _S.CONNECTION, True, _NONE, True,
            "the header does not match header_crc32c",
        ),
        ErrorSpec(
            ErrorCode.UNKNOWN_FRAME_TYPE, _S.CONNECTION, True, _ANY, True,
            "a frame type that the negotiated version does not define",
        ),
        ErrorSpec(
            ErrorCode.UNEXPECTED_FRAME, _S.CONNECTION, True, _ANY, True,
            "a frame not allowed in this state or direction, or a reply to no request in flight",
        ),
        # -- requests and uploads ----------------------------------------------------------
        ErrorSpec(
            ErrorCode.UNAUTHENTICATED, _S.CONNECTION, False, frozenset({_R.HELLO}), False,
            "HELLO.auth was not accepted",
        ),
        ErrorSpec(
            ErrorCode.FORBIDDEN, _S.UPLOAD, False, _OPENS | _ON_UPLOAD, True,
            "the bucket or object is not allowed for this client, or GCS refused access (403)",
        ),
        ErrorSpec(
            ErrorCode.BAD_TOKEN, _S.UPLOAD, False, frozenset({_R.ATTACH_UPLOAD}), False,
            "the upload token was not issued by a proxy sharing this key, was tampered with, or"
            " expired",
        ),
        ErrorSpec(
            ErrorCode.UNKNOWN_UPLOAD, _S.UPLOAD, False, _ON_UPLOAD, True,
            "the token is genuine but this proxy does not hold its upload now; retryable: attach"
            " again (the upload is moving between connections or proxies); not retryable: it is"
            " gone",
            retryable_per_reply=True,
        ),
        ErrorSpec(
            ErrorCode.OUTSIDE_CREDIT, _S.CONNECTION, True, frozenset({_R.WRITE_AT}), False,
            "a WRITE_AT reaches past the credit window_end; the server closes the connection",
        ),
        ErrorSpec(
            ErrorCode.INVALID_STATE, _S.FRAME, False,
            frozenset({_R.WRITE_AT, _R.COMPLETE, _R.ABORT}), False,
            "the upload cannot do this now, for example a write past the end of a completed"
            " object",
        ),
        ErrorSpec(
            ErrorCode.ABORTED, _S.UPLOAD, False, _ON_UPLOAD, True,
            "the upload was aborted (by an ABORT on any connection)",
        ),
        ErrorSpec(
            ErrorCode.MISSING_RANGES, _S.FRAME, False, frozenset({_R.COMPLETE}), False,
            "version 1's answer to a COMPLETE while bytes below total_size are missing (version 2"
            " answers INCOMPLETE); the message lists them: send them, then COMPLETE again",
        ),
        ErrorSpec(
            ErrorCode.PRECONDITION_FAILED, _S.UPLOAD, False, _OPENS | _ON_UPLOAD, True,
            "if_generation_match does not hold: checked at the open, and again by GCS when the"
            " object is finalized",
        ),
        ErrorSpec(
            ErrorCode.CHECKSUM_MISMATCH, _S.UPLOAD, False, _ON_UPLOAD | {_R.PUT_OBJECT}, True,
            "the object's CRC32C is not the one the client gave: final, the object is not"
            " stored and every later request on the upload gets this error",
        ),
        ErrorSpec(
            ErrorCode.SIZE_MISMATCH, _S.FRAME, False, frozenset({_R.WRITE_AT, _R.COMPLETE}), False,
            "a write past expected_size, or a total_size that disagrees with expected_size or"
            " with bytes already written",
        ),
        ErrorSpec(
            ErrorCode.TOKEN_NOT_RESUMABLE, _S.UPLOAD, False, frozenset({_R.ATTACH_UPLOAD}), False,
            "this proxy cannot open the token (it restarted with another key, or the token is"
            " damaged); not an authentication failure: start the upload again from byte 0",
            since=2,
            fallback=ErrorCode.BAD_TOKEN,
        ),
        ErrorSpec(
            ErrorCode.UPLOAD_FINISHED, _S.UPLOAD, False, _ON_UPLOAD, True,
            "the token's upload was completed or aborted, perhaps on another proxy: it can never"
            " write again; read the object to learn its outcome",
            since=2,
            fallback=ErrorCode.UNKNOWN_UPLOAD,
        ),
        ErrorSpec(
            ErrorCode.FRAGMENT_LIMIT, _S.FRAME, True, frozenset({_R.WRITE_AT}), False,
            "the upload holds too many separate byte ranges: this write was dropped; send the"
            " lowest missing bytes first, then resend it",
            since=2,
            fallback=ErrorCode.TOO_BUSY,
        ),
        ErrorSpec(
            ErrorCode.INVALID_REQUEST, _S.FRAME, False, _OPENS, False,
            "well-formed but unacceptable values: a name or metadata GCS would refuse, or an"
            " open whose token would exceed MAX_TOKEN_SIZE",
            since=2,
            fallback=ErrorCode.GCS_ERROR,
        ),
        # -- the server's resources and lifecycle --------------------------------------------
        ErrorSpec(
            ErrorCode.GCS_ERROR, _S.UPLOAD, False, _OPENS | _ON_UPLOAD, True,
            "GCS failed the request or the upload (the message says how, and names a missing"
            " bucket); retryable says whether opening or attaching again may help",
            retryable_per_reply=True,
        ),
        ErrorSpec(
            ErrorCode.TOO_BUSY, _S.FRAME, True,
            frozenset({_R.HELLO, _R.ATTACH_UPLOAD}) | _OPENS, True,
            "a server limit (uploads, memory) is exhausted right now: try again after a backoff",
        ),
        ErrorSpec(
            ErrorCode.IDLE_TIMEOUT, _S.CONNECTION, True, _NONE, True,
            "the connection was idle too long and is being closed",
        ),
        ErrorSpec(
            ErrorCode.SHUTTING_DOWN, _S.CONNECTION, True,
            frozenset({_R.HELLO, _R.ATTACH_UPLOAD}) | _OPENS, False,
            "the server is going away: reconnect (to it or another) and attach",
        ),
        ErrorSpec(
            ErrorCode.INTERNAL, _S.UPLOAD, False, _ANY, True,
            "a bug in the server",
        ),
        ErrorSpec(
            ErrorCode.HANDSHAKE_TIMEOUT, _S.CONNECTION, True, _NONE, True,
            "no complete HELLO arrived within the handshake timeout; the server closes",
            since=2,
            fallback=ErrorCode.IDLE_TIMEOUT,
        ),
        ErrorSpec(
            ErrorCode.TOO_MANY_CONNECTIONS, _S.CONNECTION, True, frozenset({_R.HELLO}), True,
            "the server, or this client's share of it, has too many connections: close some, or"
            " retry after a backoff",
            since=2,
            fallback=ErrorCode.TOO_BUSY,
        ),
    ]
)
# fmt: on
"""Every code's row; the single source of what a code means (docs/protocol.md section 7)."""


def error_spec(code: ErrorCode) -> ErrorSpec:
    """What `code` means (the same as `code.spec`)."""
    return ERROR_SPECS[code]


class ProtocolError(Exception):
    """Base class of every protocol violation.

    `code` is the `ErrorCode` to report to the peer. `seq` is the sequence number of the
    offending frame when its header was intact and its seq the expected one, and 0 otherwise:
    exactly the `reply_to` of the `Error` that reports it (0 marks it unsolicited).
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
    """The peer sent bytes that break the protocol: fatal for the connection.

    The connection's state becomes ERROR. The receiving side may still send one `Error` event to
    explain (`Error.from_exception`), then closes.
    """


class PayloadCrcError(ProtocolError):
    """A request's payload did not match the CRC32C in its (intact) header. Not fatal.

    The header was verified, so the stream is still in step and the next frame can be read: the
    request `seq` failed and may be resent. Reply with `Error.from_exception(exc)` (BAD_CRC).

    Raised only where the damage is recoverable: on a server, for a request after the handshake.
    A damaged HELLO, or a damaged reply on a client (whose `reply_to` is in the damaged bytes,
    so which request it answered is unknown), is a fatal `RemoteProtocolError` with code BAD_CRC.
    It is deliberately not a RemoteProtocolError, so a handler of fatal errors never has to
    catch it first.
    """

    def __init__(self, message: str, *, seq: int) -> None:
        super().__init__(message, ErrorCode.BAD_CRC, seq=seq)


class LocalProtocolError(ProtocolError):
    """Our own code tried to send an event that is invalid or illegal in the current state.

    Nothing was sent and the connection state is unchanged; this is a bug in the caller.
    """

    def __init__(self, message: str, code: ErrorCode = ErrorCode.INTERNAL, *, seq: int = 0) -> None:
        super().__init__(message, code, seq=seq)
