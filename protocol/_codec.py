"""Control-frame bodies <-> events, through the construct definitions in `_spec`.

WriteAt is not handled here: its payload is streamed by `Connection`. Validation that construct
cannot express (non-empty names, sorted ranges, ...) lives in `_problem()` so that the encoder
(raising LocalProtocolError) and the decoder (raising RemoteProtocolError) enforce the same rules.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from typing import Any, Final

from construct import Construct, ConstructError, GreedyBytes, SizeofError, StringError, Struct

from ._fast import decode_completed, decode_put_object, encode_completed, encode_put_object
from ._spec import BODIES, BODY_CHANGES, FrameType, body_layout
from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .events import (
    Abort,
    Ack,
    AttachUpload,
    Complete,
    Completed,
    Compose,
    CompositeOpened,
    Credit,
    Discard,
    Error,
    GoingAway,
    Hello,
    Incomplete,
    OpenSegment,
    OpenUpload,
    Ping,
    Pong,
    PutObject,
    Reply,
    Request,
    Status,
    StatusQuery,
    UploadOpened,
    Welcome,
    WriteAt,
)

__all__ = [
    "EVENT_TYPES",
    "FIXED_BODY_SIZES",
    "MAX_CONTROL_BODY_SIZE",
    "MAX_LISTED_RANGES",
    "MIN_FRAME_SIZE",
    "SEGMENT_QUANTUM",
    "decode_body",
    "encode_body",
    "frame_type_of",
]

MIN_FRAME_SIZE: Final = 1024
"""The smallest max_frame_size a peer may offer or agree to."""

MAX_CONTROL_BODY_SIZE: Final = 64 * 1024
"""The largest body of any frame but WriteAt and PutObject, whatever max_frame_size was agreed
(a PutObject may carry max_frame_size data bytes on top)."""

SEGMENT_QUANTUM: Final = 256 * 1024
"""A composite upload's segment_size is a multiple of this (GCS's resumable chunk unit)."""

MAX_LISTED_RANGES: Final = 1024
"""The most byte ranges a Status or Incomplete lists (16 KiB of body): the lowest ones."""

EVENT_TYPES: Final[dict[FrameType, type[Request | Reply]]] = {
    FrameType.HELLO: Hello,
    FrameType.OPEN_UPLOAD: OpenUpload,
    FrameType.ATTACH_UPLOAD: AttachUpload,
    FrameType.WRITE_AT: WriteAt,
    FrameType.COMPLETE: Complete,
    FrameType.ABORT: Abort,
    FrameType.STATUS_QUERY: StatusQuery,
    FrameType.PING: Ping,
    FrameType.PUT_OBJECT: PutObject,
    FrameType.OPEN_SEGMENT: OpenSegment,
    FrameType.COMPOSE: Compose,
    FrameType.DISCARD: Discard,
    FrameType.WELCOME: Welcome,
    FrameType.UPLOAD_OPENED: UploadOpened,
    FrameType.ACK: Ack,
    FrameType.CREDIT: Credit,
    FrameType.STATUS: Status,
    FrameType.COMPLETED: Completed,
    FrameType.ERROR: Error,
    FrameType.PONG: Pong,
    FrameType.GOING_AWAY: GoingAway,
    FrameType.INCOMPLETE: Incomplete,
    FrameType.COMPOSITE_OPENED: CompositeOpened,
}

_FRAME_TYPES: Final = {event_type: frame_type for frame_type, event_type in EVENT_TYPES.items()}

# What a receiver works out and adds to an event, not sent: PutObject's data_crc32c.
_RECEIVER_FIELDS: Final = frozenset({"seq", "data_crc32c"})
_FIELDS: Final = {
    frame_type: tuple(
        f.name for f in dataclasses.fields(event_type) if f.name not in _RECEIVER_FIELDS
    )
    for frame_type, event_type in EVENT_TYPES.items()
}
# Event fields that only later versions' bodies have. They are None exactly when the
# negotiated version's body lacks them: version 1's UploadOpened has no window_end.
_ADDED_LATER: Final = {FrameType.UPLOAD_OPENED: ("window_end",)}
# Wishes that only later versions can express, and that an older version's server fulfils
# anyway: they are left out of an older body whatever their value (a version-2 server never
# makes a composite upload, so it never needs to be asked for a single session).
_WISHES_ADDED_LATER: Final = {FrameType.OPEN_UPLOAD: ("single_session",)}


def _has_field(body: Construct, name: str) -> bool:
    return any(subcon.name == name for subcon in body.subcons)


def _fixed_size(frame_type: FrameType) -> int | None:
    try:
        return int(BODIES[frame_type].sizeof())
    except SizeofError:
        return None


FIXED_BODY_SIZES: Final[dict[FrameType, int]] = {
    frame_type: size
    for frame_type in FrameType
    if frame_type is not FrameType.WRITE_AT and (size := _fixed_size(frame_type)) is not None
}
"""Bodies whose size is known from the frame type alone, checked against the header (the same
in every version: no fixed-size body has changed)."""
assert not any(set(changes) & set(FIXED_BODY_SIZES) for changes in BODY_CHANGES.values())


# The replies that come once per WriteAt frame, as plain structs: construct takes tens of
# microseconds per frame for what struct does in one. Their layout is BODIES' (all u64, in
# field order; test_spec checks both ways agree), and their size is fixed, so the header
# check has already refused a body of any other length.
_PER_FRAME_LAYOUTS: Final = {
    FrameType.ACK: struct.Struct(">QQ"),
    FrameType.CREDIT: struct.Struct(">QQQ"),
}

# The frames of a one-request upload, read and written by hand (`_fast`); construct is the
# fallback that explains what is wrong with a body the fast path does not take.
_FAST_ENCODERS: Final[dict[FrameType, Callable[[dict[str, Any]], bytes | None]]] = {
    FrameType.PUT_OBJECT: encode_put_object,
    FrameType.COMPLETED: encode_completed,
}
_FAST_DECODERS: Final[dict[FrameType, Callable[[bytes], dict[str, Any] | None]]] = {
    FrameType.PUT_OBJECT: decode_put_object,
    FrameType.COMPLETED: decode_completed,
}

# Parsing keeps whatever follows the last field, so trailing garbage is reported precisely.
_PARSERS: Final = {
    version: {
        frame_type: Struct("body" / body_layout(frame_type, version), "trailing" / GreedyBytes)
        for frame_type in BODIES
    }
    for version in (1, *BODY_CHANGES)
}


def _parser(frame_type: FrameType, version: int) -> Struct:
    changed = [v for v in _PARSERS if v <= version]
    return _PARSERS[max(changed)][frame_type]


def frame_type_of(event: Request | Reply) -> FrameType:
    try:
        return _FRAME_TYPES[type(event)]
    except KeyError:
        raise LocalProtocolError(f"{type(event).__name__} cannot be sent") from None


def _problem(event: Request | Reply) -> str | None:
    """What makes `event` invalid beyond what the byte layout enforces, or None."""
    match event:
        case Hello(versions=versions, max_frame_size=max_frame_size):
            if not versions:
                return "Hello offers no versions"
            if 0 in versions:
                return "version 0 does not exist"
            if max_frame_size < MIN_FRAME_SIZE:
                return f"max_frame_size {max_frame_size} is below the minimum {MIN_FRAME_SIZE}"
        case Welcome(version=version, max_frame_size=max_frame_size):
            if version == 0:
                return "version 0 does not exist"
            if max_frame_size < MIN_FRAME_SIZE:
                return f"max_frame_size {max_frame_size} is below the minimum {MIN_FRAME_SIZE}"
        case (
            OpenUpload(bucket=bucket, name=name, metadata=metadata)
            | PutObject(bucket=bucket, name=name, metadata=metadata)
        ):
            if not bucket or not name:
                return "bucket and object name must not be empty"
            keys = [key for key, _ in metadata]
            if "" in keys or len(set(keys)) != len(keys):
                return "metadata keys must be non-empty and unique"
        case (
            AttachUpload(token=token)
            | OpenSegment(token=token)
            | Compose(token=token)
            | Discard(token=token)
        ):
            if not token:
                return "upload token must not be empty"
        case CompositeOpened(token=token, segment_size=size, parallel_segments=parallel):
            if not token:
                return "upload token must not be empty"
            if size <= 0 or size % SEGMENT_QUANTUM:
                return f"segment_size must be a positive multiple of {SEGMENT_QUANTUM}"
            if parallel < 1:
                return "parallel_segments must be at least 1"
        case UploadOpened(token=token, committed_offset=committed, window_end=window_end):
            if not token:
                return "upload token must not be empty"
            if window_end is not None:
                return _window_problem(committed, window_end)
        case Status(received=ranges) | Incomplete(missing=ranges):
            previous_end = -1
            for start, end in ranges:
                if not previous_end < start < end:
                    return "byte ranges must be non-empty, sorted and disjoint"
                previous_end = end
            return _window_problem(event.committed_offset, event.window_end)
        case Credit(committed_offset=committed, window_end=window_end):
            return _window_problem(committed, window_end)
        case GoingAway(reply_to=reply_to) if reply_to != 0:
            return "GoingAway is never a reply to a request (reply_to must be 0)"
    return None


def _window_problem(committed_offset: int, window_end: int) -> str | None:
    if window_end < committed_offset:
        return f"window_end {window_end} is below committed_offset {committed_offset}"
    return None


_RANGE_FIELDS: Final = {FrameType.STATUS: "received", FrameType.INCOMPLETE: "missing"}


def _to_construct(frame_type: FrameType, event: Request | Reply) -> dict[str, Any]:
    values = {name: getattr(event, name) for name in _FIELDS[frame_type]}
    if frame_type in (FrameType.OPEN_UPLOAD, FrameType.PUT_OBJECT):
        values["metadata"] = [{"key": k, "value": v} for k, v in values["metadata"]]
    elif (ranges := _RANGE_FIELDS.get(frame_type)) is not None:
        values[ranges] = [{"start": s, "end": e} for s, e in values[ranges]]
    return values


def encode_body(event: Request | Reply, version: int = 1) -> tuple[FrameType, bytes]:
    """The frame type and body bytes for a control event in protocol `version`;
    LocalProtocolError if the event is invalid or that version cannot carry it."""
    frame_type = frame_type_of(event)
    if (problem := _problem(event)) is not None:
        raise LocalProtocolError(f"invalid {frame_type.name}: {problem}")
    layout = _PER_FRAME_LAYOUTS.get(frame_type)
    fast = _FAST_ENCODERS.get(frame_type)
    if fast is not None:
        encoded = fast({name: getattr(event, name) for name in _FIELDS[frame_type]})
        if encoded is not None:
            return frame_type, encoded
    try:
        if layout is not None:
            return frame_type, layout.pack(*[getattr(event, name) for name in _FIELDS[frame_type]])
        body = body_layout(frame_type, version)
        values = _to_construct(frame_type, event)
        for name in _WISHES_ADDED_LATER.get(frame_type, ()):
            if not _has_field(body, name):
                del values[name]
        for name in _ADDED_LATER.get(frame_type, ()):
            if not _has_field(body, name):
                if values.pop(name) is not None:
                    raise LocalProtocolError(
                        f"{frame_type.name} has no {name} in protocol version {version}"
                    )
            elif values[name] is None:
                raise LocalProtocolError(
                    f"{frame_type.name} needs {name} in protocol version {version}"
                )
        encoded = body.build(values)
    except (ConstructError, UnicodeError, TypeError, ValueError, struct.error) as exc:
        raise LocalProtocolError(f"cannot encode {frame_type.name}: {exc}") from exc
    return frame_type, bytes(encoded)


def _describe(exc: ConstructError) -> str:
    if isinstance(exc, StringError):
        # construct's message quotes the offending bytes, which may be a secret (auth, token).
        return "text is not valid UTF-8"
    where = str(getattr(exc, "path", "") or "").removeprefix("(parsing) -> body")
    where = where.removeprefix(" -> ")
    detail = str(exc).splitlines()[-1]
    return f"field {where}: {detail}" if where else detail


def decode_body(frame_type: FrameType, seq: int, body: bytes, version: int = 1) -> Request | Reply:
    """The event for a received control frame whose payload CRC already matched, as laid out in
    protocol `version`."""
    name = frame_type.name
    layout = _PER_FRAME_LAYOUTS.get(frame_type)
    if layout is not None and len(body) == layout.size:
        values = dict(zip(_FIELDS[frame_type], layout.unpack(body), strict=True))
        return _checked(EVENT_TYPES[frame_type](**values, seq=seq), seq)
    fast = _FAST_DECODERS.get(frame_type)
    if fast is not None and (fields := fast(body)) is not None:
        return _checked(EVENT_TYPES[frame_type](**fields, seq=seq), seq)
    try:
        parsed_frame = _parser(frame_type, version).parse(body)
    except ConstructError as exc:
        raise RemoteProtocolError(
            f"malformed {name} body: {_describe(exc)}", ErrorCode.MALFORMED_FRAME, seq=seq
        ) from exc
    if trailing := len(parsed_frame.trailing):
        raise RemoteProtocolError(
            f"malformed {name} body: {trailing} unexpected bytes after the last field",
            ErrorCode.MALFORMED_FRAME,
            seq=seq,
        )
    parsed = parsed_frame.body
    values = {field: parsed[field] for field in _FIELDS[frame_type] if field in parsed}
    if frame_type is FrameType.HELLO:
        values["versions"] = tuple(values["versions"])
    elif frame_type in (FrameType.OPEN_UPLOAD, FrameType.PUT_OBJECT):
        values["metadata"] = tuple((item.key, item.value) for item in values["metadata"])
    elif (ranges := _RANGE_FIELDS.get(frame_type)) is not None:
        values[ranges] = tuple((item.start, item.end) for item in values[ranges])
    elif frame_type is FrameType.ERROR:
        try:
            values["code"] = ErrorCode(values["code"])
        except ValueError:
            raise RemoteProtocolError(
                f"malformed ERROR body: unknown error code {values['code']}",
                ErrorCode.MALFORMED_FRAME,
                seq=seq,
            ) from None
    return _checked(EVENT_TYPES[frame_type](**values, seq=seq), seq)


def _checked(event: Request | Reply, seq: int) -> Request | Reply:
    if (problem := _problem(event)) is not None:
        name = frame_type_of(event).name
        raise RemoteProtocolError(f"invalid {name}: {problem}", ErrorCode.MALFORMED_FRAME, seq=seq)
    return event
