"""The wire format, written in construct: the readable definition and the source of test vectors.

All integers are big-endian. A frame is a 28-byte header followed by `payload_size` bytes of
payload; the payload is the frame type's body below. The hot path does not run construct: it uses
the `struct.Struct` objects at the bottom, which tests/protocol check against these definitions.
"""

from __future__ import annotations

import enum
import struct
from typing import Any, Final

import google_crc32c
from construct import (
    Adapter,
    Bytes,
    Checksum,
    Const,
    Construct,
    Enum,
    FormatField,
    GreedyBytes,
    If,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    OneOf,
    PascalString,
    PrefixedArray,
    RawCopy,
    Struct,
    this,
)

__all__ = [
    "BODIES",
    "BODY_CHANGES",
    "FIRST_VERSION",
    "FRAMING_VERSION",
    "HEADER",
    "HEADER_FIELDS",
    "HEADER_FIELDS_STRUCT",
    "HEADER_SIZE",
    "HEADER_STRUCT",
    "MAGIC",
    "OFFSET_STRUCT",
    "WRITE_AT_PREFIX_SIZE",
    "FrameType",
    "body_layout",
    "crc32c",
]

MAGIC: Final = b"\xabRUP"
"""First four bytes of every frame; the non-ASCII first byte stops text protocols early."""

FRAMING_VERSION: Final = 1
"""The header's `version` byte: the layout of the header itself, the same whatever protocol
version HELLO and WELCOME negotiate. It changes only if the header does."""


class FrameType(enum.IntEnum):
    """Requests (client -> server) are 0x01-0x7F, replies (server -> client) 0x81-0xFF."""

    HELLO = 0x01
    OPEN_UPLOAD = 0x02
    ATTACH_UPLOAD = 0x03
    WRITE_AT = 0x04
    COMPLETE = 0x05
    ABORT = 0x06
    STATUS_QUERY = 0x07
    PING = 0x08
    PUT_OBJECT = 0x09
    OPEN_SEGMENT = 0x0A
    COMPOSE = 0x0B
    DISCARD = 0x0C

    WELCOME = 0x81
    UPLOAD_OPENED = 0x82
    ACK = 0x83
    CREDIT = 0x84
    STATUS = 0x85
    COMPLETED = 0x86
    ERROR = 0x87
    PONG = 0x88
    GOING_AWAY = 0x89
    INCOMPLETE = 0x8A
    COMPOSITE_OPENED = 0x8B

    @property
    def is_request(self) -> bool:
        return self < 0x80


def crc32c(data: bytes) -> int:
    return int(google_crc32c.value(bytes(data)))


HEADER_FIELDS: Final[Construct] = Struct(
    "magic" / Const(MAGIC),
    "version" / Int8ub,  # FRAMING_VERSION
    "frame_type" / Enum(Int8ub, FrameType),
    "flags" / Int16ub,  # no flags are defined: must be 0
    "seq" / Int64ub,  # 1, 2, 3, ... per direction
    "payload_size" / Int32ub,
    "payload_crc32c" / Int32ub,  # CRC32C of the payload bytes (0 for an empty payload)
)

HEADER: Final[Construct] = Struct(
    "fields" / RawCopy(HEADER_FIELDS),
    # Covers the 24 bytes before it, so a corrupted payload_size cannot desynchronise the stream
    # silently: the receiver knows the header is bad before trusting any field in it.
    "header_crc32c" / Checksum(Int32ub, crc32c, this.fields.data),
)

HEADER_SIZE: Final = 28


class _Bool(Adapter):  # type: ignore[misc]
    """A byte that must be exactly 0 or 1."""

    def __init__(self) -> None:
        super().__init__(OneOf(Int8ub, (0, 1)))

    def _decode(self, obj: int, context: Any, path: str) -> bool:
        return obj == 1

    def _encode(self, obj: bool, context: Any, path: str) -> int:
        return 1 if obj else 0


def _optional(subcon: Construct) -> Construct:
    """A presence byte (0 or 1) followed, when 1, by the value."""
    return _Optional(Struct("present" / _Bool(), "value" / If(this.present, subcon)))


class _Optional(Adapter):  # type: ignore[misc]
    def _decode(self, obj: Any, context: Any, path: str) -> Any:
        return obj.value if obj.present else None

    def _encode(self, obj: Any, context: Any, path: str) -> dict[str, Any]:
        return {"present": obj is not None, "value": obj}


def _text() -> Construct:
    """A u16 byte length, then that many bytes of UTF-8."""
    return PascalString(Int16ub, "utf8")


_REPLY_TO = "reply_to" / Int64ub
_RANGES = PrefixedArray(Int32ub, Struct("start" / Int64ub, "end" / Int64ub))
_METADATA = PrefixedArray(Int16ub, Struct("key" / _text(), "value" / _text()))

BODIES: Final[dict[FrameType, Construct]] = {
    FrameType.HELLO: Struct(
        "versions" / PrefixedArray(Int8ub, Int8ub),
        "max_frame_size" / Int32ub,
        "auth" / _text(),
        "client_name" / _text(),
    ),
    FrameType.OPEN_UPLOAD: Struct(
        "bucket" / _text(),
        "name" / _text(),
        "content_type" / _text(),
        "metadata" / _METADATA,
        "expected_size" / _optional(Int64ub),
        "if_generation_match" / _optional(Int64ub),
    ),
    FrameType.ATTACH_UPLOAD: Struct("token" / GreedyBytes),
    # WRITE_AT: an 8-byte offset, then the data (the rest of the payload). The payload CRC32C
    # covers both. Decoded by hand in the streaming receiver, never buffered whole.
    FrameType.WRITE_AT: Struct("offset" / Int64ub, "data" / GreedyBytes),
    FrameType.COMPLETE: Struct(
        "total_size" / Int64ub,
        "crc32c" / _optional(Int32ub),
    ),
    FrameType.ABORT: Struct(),
    FrameType.STATUS_QUERY: Struct(),
    FrameType.PING: Struct("nonce" / Int64ub),
    # Version 2: a whole small object in one request, answered by COMPLETED.
    FrameType.PUT_OBJECT: Struct(
        "bucket" / _text(),
        "name" / _text(),
        "content_type" / _text(),
        "metadata" / _METADATA,
        "if_generation_match" / _optional(Int64ub),
        "crc32c" / _optional(Int32ub),
        "data" / GreedyBytes,
    ),
    # Version 3: composite uploads, one temporary object per segment, composed at the end.
    FrameType.OPEN_SEGMENT: Struct("index" / Int32ub, "token" / GreedyBytes),
    FrameType.COMPOSE: Struct(
        "total_size" / Int64ub,
        "crc32c" / _optional(Int32ub),
        "token" / GreedyBytes,
    ),
    FrameType.DISCARD: Struct("token" / GreedyBytes),
    FrameType.WELCOME: Struct(
        _REPLY_TO,
        "version" / Int8ub,
        "max_frame_size" / Int32ub,
        "server_name" / _text(),
    ),
    FrameType.UPLOAD_OPENED: Struct(
        _REPLY_TO,
        "committed_offset" / Int64ub,
        "resumed" / _Bool(),
        "token" / GreedyBytes,
    ),
    FrameType.ACK: Struct(_REPLY_TO, "committed_offset" / Int64ub),
    FrameType.CREDIT: Struct(
        _REPLY_TO,
        "committed_offset" / Int64ub,
        "window_end" / Int64ub,
    ),
    FrameType.STATUS: Struct(
        _REPLY_TO,
        "committed_offset" / Int64ub,
        "window_end" / Int64ub,
        "received" / _RANGES,
    ),
    FrameType.COMPLETED: Struct(
        _REPLY_TO,
        "generation" / Int64ub,
        "size" / Int64ub,
        "crc32c" / Int32ub,
        "md5" / _optional(Bytes(16)),
    ),
    FrameType.ERROR: Struct(
        _REPLY_TO,
        "code" / Int16ub,
        "retryable" / _Bool(),
        "message" / _text(),
    ),
    FrameType.PONG: Struct(_REPLY_TO, "nonce" / Int64ub),
    FrameType.GOING_AWAY: Struct(_REPLY_TO, "message" / _text()),
    # Version 2: COMPLETE cannot finish yet; these byte ranges below total_size are missing.
    FrameType.INCOMPLETE: Struct(
        _REPLY_TO,
        "committed_offset" / Int64ub,
        "window_end" / Int64ub,
        "missing" / _RANGES,
    ),
    # Version 3: OPEN_UPLOAD made a composite upload; the connection stays unbound.
    FrameType.COMPOSITE_OPENED: Struct(
        _REPLY_TO,
        "segment_size" / Int64ub,
        "parallel_segments" / Int16ub,
        "token" / GreedyBytes,
    ),
}
"""Each frame type's body as version 1 defines it (or as the version that added it does)."""

BODY_CHANGES: Final[dict[int, dict[FrameType, Construct]]] = {
    2: {
        # The initial credit window, so a client can write without waiting for CREDIT.
        FrameType.UPLOAD_OPENED: Struct(
            _REPLY_TO,
            "committed_offset" / Int64ub,
            "resumed" / _Bool(),
            "window_end" / Int64ub,
            "token" / GreedyBytes,
        ),
    },
    3: {
        # The client may ask for one resumable session whatever the object's size.
        FrameType.OPEN_UPLOAD: Struct(
            "bucket" / _text(),
            "name" / _text(),
            "content_type" / _text(),
            "metadata" / _METADATA,
            "expected_size" / _optional(Int64ub),
            "if_generation_match" / _optional(Int64ub),
            "single_session" / _Bool(),
        ),
    },
}
"""The bodies a later protocol version lays out differently: version -> frame type -> body."""

_ADDED_IN: Final = {
    FrameType.PUT_OBJECT: 2,
    FrameType.INCOMPLETE: 2,
    FrameType.OPEN_SEGMENT: 3,
    FrameType.COMPOSE: 3,
    FrameType.DISCARD: 3,
    FrameType.COMPOSITE_OPENED: 3,
}
FIRST_VERSION: Final[dict[FrameType, int]] = {
    frame_type: _ADDED_IN.get(frame_type, 1) for frame_type in FrameType
}
"""The protocol version that introduced each frame type; an older peer does not know it."""


def body_layout(frame_type: FrameType, version: int) -> Construct:
    """The body of `frame_type` in protocol `version`: the latest change at or below it."""
    for changed_in in sorted(BODY_CHANGES, reverse=True):
        if changed_in <= version and frame_type in BODY_CHANGES[changed_in]:
            return BODY_CHANGES[changed_in][frame_type]
    return BODIES[frame_type]


# -- the hot path's view of the same bytes -------------------------------------------------------


def _struct_format(fields: Construct) -> str:
    """The `struct` format of a construct Struct made of fixed-size integers and byte strings."""
    codes = []
    for field in fields.subcons:
        while not isinstance(field, FormatField | Bytes):
            field = field.subcon  # unwrap Renamed, Const, Enum, ...
        codes.append(field.fmtstr[1:] if isinstance(field, FormatField) else f"{field.length}s")
    return ">" + "".join(codes)


HEADER_FIELDS_STRUCT: Final = struct.Struct(_struct_format(HEADER_FIELDS))
"""magic, version, frame_type, flags, seq, payload_size, payload_crc32c: what header_crc32c
covers. Derived from HEADER_FIELDS; tests/protocol/test_spec.py checks they agree."""

HEADER_STRUCT: Final = struct.Struct(HEADER_FIELDS_STRUCT.format + "I")
"""The whole header: HEADER_FIELDS_STRUCT, then header_crc32c."""

OFFSET_STRUCT: Final = struct.Struct(">Q")
WRITE_AT_PREFIX_SIZE: Final = OFFSET_STRUCT.size
