"""Bad input, fuzzed: every way of breaking a byte stream ends in a precise protocol error.

The only acceptable outcomes of feeding a Connection anything are events, a RemoteProtocolError
whose code names the problem, or a (non-fatal) PayloadCrcError; never another exception, a hang,
or memory that grows with a size the peer declared.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    LATEST_VERSION,
    MAX_CONTROL_BODY_SIZE,
    NEED_DATA,
    Ack,
    Complete,
    Connection,
    Credit,
    Error,
    ErrorCode,
    Event,
    Ping,
    Pong,
    RemoteProtocolError,
    Reply,
    Request,
    Role,
    Status,
    StatusQuery,
    WriteAt,
)
from protocol._codec import decode_body, encode_body
from protocol._spec import HEADER_SIZE, MAGIC, FrameType, crc32c
from tests.protocol.helpers import (
    CrcFailure,
    ReceivedWrite,
    bound_pair,
    decode_all,
    drain,
    frame,
    merge_writes,
)
from tests.protocol.test_spec import control_events

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- valid traffic ---------------------------------------------------------------------------------

requests = st.one_of(
    st.builds(WriteAt, st.integers(0, 2**40), st.binary(max_size=1500)),
    st.builds(Ping, st.integers(0, 2**64 - 1)),
    st.just(StatusQuery()),
)


@dataclass(frozen=True)
class Traffic:
    """Valid bytes in both directions between a bound pair, and fresh receivers for them."""

    to_server: bytes
    to_client: bytes
    frame_ends_to_server: tuple[int, ...]
    frame_ends_to_client: tuple[int, ...]
    new_server: Callable[[], Connection]
    new_client: Callable[[], Connection]


def build_traffic(batch: list[Request], reply_order: list[int], complete: bool) -> Traffic:
    if complete:
        batch = [*batch, Complete(0)]

    def new_server() -> Connection:
        return bound_pair()[1]

    def new_client() -> Connection:
        """A client that has sent `batch`, so the replies have requests to answer."""
        client, _ = bound_pair()
        for request in batch:
            client.send(request)
        return client

    client, server = bound_pair()
    to_server, ends_to_server = bytearray(), []
    for request in batch:
        to_server += client.send_bytes(request)
        ends_to_server.append(len(to_server))
    server.receive_data(bytes(to_server))
    received = merge_writes(drain(server))
    replies: dict[int, Reply] = {}  # each request is answered at most once
    for index in reply_order:
        event = received[index % len(received)]
        seq = getattr(event, "seq", 0)
        replies.setdefault(seq, _reply_for(event, seq))
    to_client, ends_to_client = bytearray(), []
    for reply in [*replies.values(), Credit(0, 0, 1 << 30)]:
        to_client += server.send_bytes(reply)
        ends_to_client.append(len(to_client))
    return Traffic(
        bytes(to_server),
        bytes(to_client),
        tuple(ends_to_server),
        tuple(ends_to_client),
        new_server,
        new_client,
    )


def _reply_for(event: object, seq: int) -> Reply:
    if isinstance(event, Ping):
        return Pong(seq, event.nonce)
    if isinstance(event, StatusQuery):
        return Status(seq, 0, ((0, 10), (20, 30)), 100)
    if isinstance(event, Complete):
        return Error(seq, ErrorCode.MISSING_RANGES, False, "missing [10, 20)")
    return Ack(seq, 5)  # a WriteAt


traffic = st.builds(
    build_traffic,
    st.lists(requests, min_size=1, max_size=6),
    st.lists(st.integers(0, 10), max_size=8),
    st.booleans(),
)


def decode(conn: Connection, data: bytes) -> tuple[list[object], RemoteProtocolError | None]:
    return decode_all(conn, data)


# -- random bytes ------------------------------------------------------------------------------


@FUZZ
@given(garbage=st.binary(min_size=1, max_size=600), role=st.sampled_from(Role))
def test_random_bytes(garbage: bytes, role: Role) -> None:
    fresh = Connection(role)
    events, error = decode(fresh, garbage)
    assert error is not None
    assert events == []
    assert isinstance(error.code, ErrorCode)
    assert str(error)


@FUZZ
@given(flow=traffic, garbage=st.binary(min_size=1, max_size=300))
def test_random_bytes_after_valid_frames(flow: Traffic, garbage: bytes) -> None:
    clean, _ = decode(flow.new_server(), flow.to_server)
    events, error = decode(flow.new_server(), flow.to_server + garbage)
    assert error is not None
    assert events[: len(clean)] == clean
    # The garbage is where the next frame should start.
    assert error.code is ErrorCode.MALFORMED_FRAME
    if len(garbage) < HEADER_SIZE:
        assert error.message.startswith("truncated frame")
    elif not garbage.startswith(MAGIC):
        assert error.message.startswith("no frame magic")


@FUZZ
@given(
    frame_type=st.sampled_from([t for t in FrameType if t.is_request and t is not FrameType.HELLO]),
    payload=st.binary(max_size=200),
)
def test_random_payloads_under_valid_headers(frame_type: FrameType, payload: bytes) -> None:
    _, server = bound_pair()
    events, error = decode(server, frame(frame_type, 3, payload))
    if error is None:
        (event,) = events
        assert reencode(event) == payload  # nothing was ignored or read loosely
        return
    assert error.seq == 3
    assert frame_type.name in error.message
    assert error.code in {ErrorCode.MALFORMED_FRAME, ErrorCode.UNEXPECTED_FRAME}


@FUZZ
@given(payload=st.binary(max_size=200), frame_type=st.sampled_from(list(FrameType)))
def test_random_reply_payloads_under_valid_headers(frame_type: FrameType, payload: bytes) -> None:
    client, _ = bound_pair()
    events, error = decode(client, frame(frame_type, 3, payload))
    if error is None:
        (reply,) = events
        assert isinstance(reply, Credit | Error)  # the only replies that may come unasked here
        assert reencode(reply) == payload
        return
    assert error.code in {ErrorCode.MALFORMED_FRAME, ErrorCode.UNEXPECTED_FRAME}
    assert frame_type.name in error.message


def reencode(event: object) -> bytes:
    if isinstance(event, ReceivedWrite):
        return event.offset.to_bytes(8, "big") + event.data
    assert isinstance(event, Request | Reply), event
    return encode_body(event, LATEST_VERSION)[1]


@FUZZ
@given(event=control_events, data=st.data())
def test_mutated_bodies_decode_exactly_or_not_at_all(
    event: Request | Reply, data: st.DataObject
) -> None:
    frame_type, body = encode_body(event, LATEST_VERSION)
    if not body:
        return
    mutated = bytearray(body)
    position = data.draw(st.integers(0, len(body) - 1))
    mutated[position] = data.draw(st.integers(0, 255).filter(lambda b: b != body[position]))
    try:
        decoded: Request | Reply | RemoteProtocolError = decode_body(
            frame_type, 7, bytes(mutated), LATEST_VERSION
        )
    except RemoteProtocolError as exc:
        decoded = exc
    if isinstance(decoded, RemoteProtocolError):
        assert decoded.code is ErrorCode.MALFORMED_FRAME
        assert decoded.message.startswith((f"malformed {frame_type.name} body", "invalid "))
        assert decoded.seq == 7
    else:
        assert encode_body(decoded, LATEST_VERSION)[1] == mutated


# -- re-chunking -------------------------------------------------------------------------------


@FUZZ
@given(flow=traffic, data=st.data())
def test_rechunking_does_not_change_the_events(flow: Traffic, data: st.DataObject) -> None:
    for stream, new_receiver in (
        (flow.to_server, flow.new_server),
        (flow.to_client, flow.new_client),
    ):
        whole, error = decode(new_receiver(), stream)
        assert error is None
        cuts = sorted(
            data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=20, unique=True))
        )
        receiver = new_receiver()
        pieces: list[Event] = []
        for start, end in itertools.pairwise([0, *cuts, len(stream)]):
            receiver.receive_data(stream[start:end])
            pieces.extend(drain(receiver))
        assert merge_writes(pieces) == whole


# -- mutated header fields -----------------------------------------------------------------------

_FIELDS = {  # name: (offset, struct format) within the header
    "version": (4, ">B"),
    "frame_type": (5, ">B"),
    "flags": (6, ">H"),
    "seq": (8, ">Q"),
    "payload_size": (16, ">I"),
    "payload_crc32c": (20, ">I"),
}


def mutate_header(
    stream: bytes, frame_start: int, field: str, value: int, *, fix_crc: bool
) -> bytes:
    offset, fmt = _FIELDS[field]
    header = bytearray(stream[frame_start : frame_start + HEADER_SIZE])
    struct.pack_into(fmt, header, offset, value)
    if fix_crc:
        struct.pack_into(">I", header, 24, crc32c(bytes(header[:24])))
    return stream[:frame_start] + bytes(header) + stream[frame_start + HEADER_SIZE :]


def _field_value(stream: bytes, frame_start: int, field: str) -> int:
    offset, fmt = _FIELDS[field]
    (value,) = struct.unpack_from(fmt, stream, frame_start + offset)
    return int(value)


@FUZZ
@given(flow=traffic, data=st.data(), field=st.sampled_from(list(_FIELDS)))
def test_any_mutated_header_field_is_caught_by_the_header_crc(
    flow: Traffic, data: st.DataObject, field: str
) -> None:
    starts = [0, *flow.frame_ends_to_server[:-1]]
    start = data.draw(st.sampled_from(starts))
    bits = 8 * struct.calcsize(_FIELDS[field][1])
    old = _field_value(flow.to_server, start, field)
    new = data.draw(st.integers(0, 2**bits - 1).filter(lambda v: v != old))
    mutated = mutate_header(flow.to_server, start, field, new, fix_crc=False)
    _, error = decode(flow.new_server(), mutated)
    assert error is not None
    assert error.code is ErrorCode.CORRUPT_HEADER
    assert error.message == "header CRC32C mismatch: the frame header is corrupt"


@FUZZ
@given(flow=traffic, data=st.data(), field=st.sampled_from(list(_FIELDS)))
def test_mutated_header_fields_with_a_valid_header_crc(
    flow: Traffic, data: st.DataObject, field: str
) -> None:
    ends = flow.frame_ends_to_server
    index = data.draw(st.integers(0, len(ends) - 1))
    start = ends[index - 1] if index else 0
    bits = 8 * struct.calcsize(_FIELDS[field][1])
    old = _field_value(flow.to_server, start, field)
    new = data.draw(st.integers(0, 2**bits - 1).filter(lambda v: v != old))
    clean, _ = decode(flow.new_server(), flow.to_server[:start])
    events, error = decode(
        flow.new_server(), mutate_header(flow.to_server, start, field, new, fix_crc=True)
    )
    assert events[: len(clean)] == clean  # frames before the mutated one are unaffected

    if field == "frame_type" and error is None:
        # With the header CRC fixed up, another type whose body happens to parse is simply a
        # different legal frame (a Ping's 8-byte nonce is an empty WriteAt at that offset).
        # It must still not pass for the original.
        assert events != decode(flow.new_server(), flow.to_server)[0]
        return
    seq = _field_value(flow.to_server, start, "seq")
    expected: dict[str, set[ErrorCode]] = {
        "version": {ErrorCode.UNSUPPORTED_VERSION},
        "flags": {ErrorCode.MALFORMED_FRAME},
        "seq": {ErrorCode.BAD_SEQUENCE},
        "frame_type": {
            ErrorCode.UNKNOWN_FRAME_TYPE,
            ErrorCode.UNEXPECTED_FRAME,
            ErrorCode.MALFORMED_FRAME,
            ErrorCode.FRAME_TOO_LARGE,
        },
    }
    if field in expected:
        assert error is not None
        assert error.code in expected[field], error
        if field != "frame_type":
            # An Error names the frame (reply_to) only once its seq is the expected one.
            assert error.seq == (0 if field in ("seq", "version") else seq)
    elif field == "payload_crc32c":
        # Only that request fails, retryably; every later frame still decodes.
        assert error is None
        assert CrcFailure(seq) in events
        assert len(events) == len(decode(flow.new_server(), flow.to_server)[0])
    else:  # payload_size: the stream falls out of step, which must not go unnoticed
        assert error is not None or any(isinstance(e, CrcFailure) for e in events)


# -- truncation --------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["to_server", "to_client"])
def test_truncation_at_every_byte(direction: str) -> None:
    flow = build_traffic(
        [WriteAt(0, b"0123456789" * 5), Ping(1), StatusQuery(), WriteAt(50, b"tail")],
        [0, 1, 2, 3, 4],
        complete=True,
    )
    stream = getattr(flow, direction)
    ends = set(getattr(flow, f"frame_ends_{direction}"))
    new_receiver = flow.new_server if direction == "to_server" else flow.new_client
    for cut in range(len(stream)):
        receiver = new_receiver()
        receiver.receive_data(stream[:cut])
        drain(receiver)  # incomplete input is never an error, only NEED_DATA
        receiver.receive_data(b"")
        if cut == 0 or cut in ends:
            _drain_to_closed(receiver)
            continue
        with pytest.raises(RemoteProtocolError, match=r"^truncated ") as excinfo:
            _drain_to_closed(receiver)
        assert excinfo.value.code is ErrorCode.MALFORMED_FRAME


def _drain_to_closed(conn: Connection) -> None:
    while True:
        event = conn.next_event()
        assert event is not NEED_DATA
        if type(event).__name__ == "ConnectionClosed":
            return


# -- oversized frames ----------------------------------------------------------------------------


@FUZZ
@given(
    frame_type=st.sampled_from([t for t in FrameType if t.is_request]),
    excess=st.integers(1, 2**32 - 1 - 8 - MAX_CONTROL_BODY_SIZE),
)
def test_oversized_frames_are_refused_from_the_header_alone(
    frame_type: FrameType, excess: int
) -> None:
    client, server = bound_pair()
    limit = MAX_CONTROL_BODY_SIZE
    if frame_type is FrameType.WRITE_AT:
        limit = 8 + server.max_frame_size
    elif frame_type is FrameType.PUT_OBJECT:
        limit += server.max_frame_size
    size = min(limit + excess, 2**32 - 1)
    header = frame(frame_type, 3, b"", payload_size=size)
    assert len(header) == HEADER_SIZE
    server.receive_data(header)  # not one payload byte: the refusal cannot have buffered any
    with pytest.raises(RemoteProtocolError, match=f"declares {size} payload bytes") as excinfo:
        server.next_event()
    assert excinfo.value.code is ErrorCode.FRAME_TOO_LARGE
    assert client.state.name == "BOUND"
    assert server.state.name == "ERROR"


@pytest.mark.parametrize(
    ("frame_type", "size"), [(FrameType.ABORT, 1), (FrameType.PING, 65_536), (FrameType.ACK, 16)]
)
def test_fixed_size_bodies_are_checked_from_the_header(frame_type: FrameType, size: int) -> None:
    _, server = bound_pair()
    server.receive_data(frame(frame_type, 3, b"", payload_size=size))
    with pytest.raises(RemoteProtocolError) as excinfo:
        server.next_event()
    if frame_type is FrameType.ACK:
        assert excinfo.value.message == "ACK seq 3: only a server sends ACK frames"
    else:
        assert excinfo.value.message.endswith(
            f"declares {size} payload bytes; its body is always"
            f" {8 if frame_type is FrameType.PING else 0}"
        )
        assert excinfo.value.code is ErrorCode.MALFORMED_FRAME


def test_a_huge_write_at_is_streamed_not_buffered() -> None:
    client, server = bound_pair(max_frame_size=16 * 1024 * 1024)
    server.receive_data(frame(FrameType.WRITE_AT, 3, b"", payload_size=8 + 16 * 1024 * 1024))
    server.receive_data(bytes(8))
    assert drain(server)[0].length == 16 * 1024 * 1024  # type: ignore[attr-defined]
    piece = bytes(1000)
    server.receive_data(piece)
    (event,) = drain(server)
    assert event.data.obj is piece  # type: ignore[attr-defined]
    del client


# -- corrupted payloads ------------------------------------------------------------------------


@FUZZ
@given(flow=traffic, data=st.data())
def test_corrupt_payload_fails_that_frame_only(flow: Traffic, data: st.DataObject) -> None:
    ends = flow.frame_ends_to_server
    index = data.draw(st.integers(0, len(ends) - 1))
    start = ends[index - 1] if index else 0
    payload_size = ends[index] - start - HEADER_SIZE
    if not payload_size:
        return  # nothing to corrupt (StatusQuery)
    position = start + HEADER_SIZE + data.draw(st.integers(0, payload_size - 1))
    flip = data.draw(st.integers(1, 255))
    mutated = bytearray(flow.to_server)
    mutated[position] ^= flip

    clean, _ = decode(flow.new_server(), flow.to_server)
    events, error = decode(flow.new_server(), bytes(mutated))
    assert error is None
    seq = _field_value(flow.to_server, start, "seq")
    assert events == [CrcFailure(seq) if getattr(e, "seq", 0) == seq else e for e in clean]


def test_every_header_byte_is_protected() -> None:
    client, _ = bound_pair()
    wire = client.send_bytes(WriteAt(0, b"payload"))
    for position in range(HEADER_SIZE):
        for flip in (0x01, 0x80, 0xFF):
            mutated = bytearray(wire)
            mutated[position] ^= flip
            _, error = decode(bound_pair()[1], bytes(mutated))
            assert error is not None
            expected = ErrorCode.MALFORMED_FRAME if position < 4 else ErrorCode.CORRUPT_HEADER
            assert error.code is expected, (position, flip, error)


def test_errors_name_the_frame_and_its_seq() -> None:
    _, server = bound_pair()
    server.receive_data(frame(FrameType.PING, 3, bytes(8), flags=4))
    with pytest.raises(RemoteProtocolError) as excinfo:
        server.next_event()
    assert excinfo.value.message == "PING seq 3: unknown flags 0x0004"
    assert excinfo.value.seq == 3
    _, server = bound_pair()
    server.receive_data(frame(0x42, 3, b""))
    with pytest.raises(RemoteProtocolError) as excinfo:
        server.next_event()
    assert (excinfo.value.message, excinfo.value.code) == (
        "unknown frame type 0x42",
        ErrorCode.UNKNOWN_FRAME_TYPE,
    )
    _, server = bound_pair()
    server.receive_data(frame(FrameType.ACK, 3, bytes(16)))
    with pytest.raises(RemoteProtocolError, match="only a server sends ACK frames") as excinfo:
        server.next_event()
    assert excinfo.value.code is ErrorCode.UNEXPECTED_FRAME
    _, server = bound_pair()
    server.receive_data(frame(FrameType.COMPLETE, 3, bytes(8) + b"\x01\x00"))
    with pytest.raises(RemoteProtocolError) as excinfo:
        server.next_event()
    assert excinfo.value.message == (
        "malformed COMPLETE body: field crc32c -> value: stream read less than specified amount,"
        " expected 4, found 1"
    )
    _, server = bound_pair()
    server.receive_data(frame(FrameType.COMPLETE, 3, bytes(9) + b"junk"))
    with pytest.raises(RemoteProtocolError) as excinfo:
        server.next_event()
    assert (
        excinfo.value.message == "malformed COMPLETE body: 4 unexpected bytes after the last field"
    )
