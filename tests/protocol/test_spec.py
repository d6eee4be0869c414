"""The construct spec and the hot path's struct layouts describe the same bytes."""

from __future__ import annotations

import struct
from dataclasses import fields as fields_of
from dataclasses import replace

import construct
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    LATEST_VERSION,
    MAX_CONTROL_BODY_SIZE,
    Abort,
    Ack,
    AttachUpload,
    Complete,
    Completed,
    Compose,
    CompositeOpened,
    Connection,
    Credit,
    Discard,
    Error,
    ErrorCode,
    GoingAway,
    Hello,
    Incomplete,
    LocalProtocolError,
    OpenSegment,
    OpenUpload,
    Ping,
    Pong,
    PutObject,
    Reply,
    Request,
    Role,
    Status,
    StatusQuery,
    UploadOpened,
    Welcome,
    WriteAt,
)
from protocol._codec import (
    EVENT_TYPES,
    FIXED_BODY_SIZES,
    decode_body,
    encode_body,
    frame_type_of,
)
from protocol._fast import (
    decode_completed,
    decode_put_object,
    encode_completed,
    encode_put_object,
)
from protocol._spec import (
    BODIES,
    FIRST_VERSION,
    HEADER,
    HEADER_FIELDS,
    HEADER_FIELDS_STRUCT,
    HEADER_SIZE,
    HEADER_STRUCT,
    MAGIC,
    OFFSET_STRUCT,
    FrameType,
    body_layout,
    crc32c,
)
from tests.protocol.helpers import bound_pair, negotiated_pair

u8 = st.integers(0, 2**8 - 1)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


def test_crc32c_is_castagnoli() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value


def test_header_sizes_agree() -> None:
    assert HEADER.sizeof() == HEADER_STRUCT.size == HEADER_SIZE == 28


@settings(deadline=None)
@given(version=u8, frame_type=st.sampled_from(FrameType), flags=u16, seq=u64, size=u32, crc=u32)
def test_header_construct_build_equals_struct_pack(
    version: int, frame_type: FrameType, flags: int, seq: int, size: int, crc: int
) -> None:
    fields = {
        "version": version,
        "frame_type": frame_type,
        "flags": flags,
        "seq": seq,
        "payload_size": size,
        "payload_crc32c": crc,
    }
    built = HEADER.build({"fields": {"value": fields}})
    prefix = HEADER_FIELDS_STRUCT.pack(MAGIC, version, frame_type, flags, seq, size, crc)
    assert prefix == HEADER_FIELDS.build(fields)
    assert built == prefix + struct.pack(">I", crc32c(prefix))
    assert HEADER_STRUCT.unpack(built) == (
        MAGIC,
        version,
        frame_type,
        flags,
        seq,
        size,
        crc,
        crc32c(prefix),
    )
    parsed = HEADER.parse(built).fields.value
    assert (parsed.version, int(parsed.frame_type), parsed.flags, parsed.seq) == (
        version,
        frame_type,
        flags,
        seq,
    )
    assert (parsed.payload_size, parsed.payload_crc32c) == (size, crc)


@settings(deadline=None)
@given(offset=u64, data=st.binary(max_size=64))
def test_write_at_frame_matches_construct(offset: int, data: bytes) -> None:
    client, _ = bound_pair()
    seq = client.last_sent_seq + 1
    wire = client.send_bytes(WriteAt(min(offset, 2**64 - 1 - len(data)), data))
    header = HEADER.parse(wire[:HEADER_SIZE]).fields.value
    assert header.frame_type == "WRITE_AT"
    assert header.seq == seq
    payload = wire[HEADER_SIZE:]
    assert header.payload_size == len(payload)
    assert header.payload_crc32c == crc32c(payload)
    parsed = BODIES[FrameType.WRITE_AT].parse(payload)
    assert parsed.offset == OFFSET_STRUCT.unpack(payload[:8])[0]
    assert parsed.data == data


def test_fixed_body_sizes_come_from_the_spec() -> None:
    assert FIXED_BODY_SIZES == {
        FrameType.ABORT: 0,
        FrameType.STATUS_QUERY: 0,
        FrameType.PING: 8,
        FrameType.ACK: 16,
        FrameType.CREDIT: 24,
        FrameType.PONG: 16,
    }


def test_every_frame_type_has_a_body_and_an_event() -> None:
    assert set(BODIES) == set(FrameType) == set(EVENT_TYPES)


@pytest.mark.parametrize(
    ("event", "expected_hex"),
    [
        (Ping(nonce=0x0102030405060708), "0102030405060708"),
        (Ack(7, 1 << 20), "00000000000000070000000000100000"),
        (Complete(10), "000000000000000a00"),
        (Complete(10, 0xE3069283), "000000000000000a01e3069283"),
        (
            OpenUpload("b", "o", "t", (("k", "v"),), expected_size=None, if_generation_match=0),
            "00016200016f000174000100016b00017600010000000000000000",
        ),
    ],
)
def test_body_vectors(event: Ping | Ack | Complete | OpenUpload, expected_hex: str) -> None:
    frame_type, encoded = encode_body(event)
    assert encoded.hex() == expected_hex
    assert decode_body(frame_type, 0, encoded) == event


def test_worked_example_in_the_docs_is_what_the_codec_sends() -> None:
    client, server = negotiated_pair()
    assert client.last_sent_seq == 1
    wire = client.send_bytes(Ping(nonce=42))
    # The same bytes are printed, annotated, in docs/protocol.md ("A worked example").
    assert wire.hex() == (
        "ab52555001080000000000000000000200000008c777146c7cba8e6e000000000000002a"
    )
    assert server.state is client.state


def test_construct_refuses_what_the_codec_refuses() -> None:
    with pytest.raises(construct.ConstructError):
        BODIES[FrameType.COMPLETE].parse(bytes(8) + b"\x02")  # presence byte must be 0 or 1
    with pytest.raises(construct.ConstructError):
        BODIES[FrameType.ACK].parse(bytes(15))


def test_a_fresh_connection_speaks_version_one() -> None:
    client = Connection(Role.CLIENT)
    wire = client.send_bytes(client.hello())
    assert HEADER.parse(wire[:HEADER_SIZE]).fields.value.version == 1


# -- every control event survives encode -> decode -----------------------------------------------

text = st.text(max_size=20)
nonempty_text = st.text(min_size=1, max_size=20)
token = st.binary(min_size=1, max_size=40)


@st.composite
def ranges(draw: st.DrawFn) -> tuple[tuple[int, int], ...]:
    bounds = sorted(draw(st.sets(st.integers(0, 2**64 - 1), max_size=8)))
    return tuple(zip(bounds[::2], bounds[1::2], strict=False))


control_events = st.one_of(
    st.builds(
        Hello,
        st.lists(st.integers(1, 255), min_size=1, max_size=5).map(tuple),
        st.integers(1024, 2**32 - 1),
        auth=text,
        client_name=text,
    ),
    st.builds(
        OpenUpload,
        nonempty_text,
        nonempty_text,
        text,
        st.dictionaries(nonempty_text, text, max_size=4).map(lambda d: tuple(d.items())),
        st.none() | u64,
        st.none() | u64,
    ),
    st.builds(AttachUpload, token),
    st.builds(Complete, u64, st.none() | u32),
    st.just(Abort()),
    st.just(StatusQuery()),
    st.builds(Ping, u64),
    st.builds(Welcome, u64, st.integers(1, 255), st.integers(1024, 2**32 - 1), text),
    st.builds(
        UploadOpened,
        u64,
        token,
        st.integers(0, 2**32),
        st.booleans(),
        st.integers(2**32, 2**64 - 1),
    ),
    st.builds(Ack, u64, u64),
    st.builds(Credit, u64, st.integers(0, 2**32), st.integers(2**32, 2**64 - 1)),
    st.builds(Status, u64, st.integers(0, 2**32), ranges(), st.integers(2**32, 2**64 - 1)),
    st.builds(Completed, u64, u64, u64, u32, st.none() | st.binary(min_size=16, max_size=16)),
    st.builds(Error, u64, st.sampled_from(ErrorCode), st.booleans(), text),
    st.builds(Pong, u64, u64),
    st.builds(GoingAway, st.just(0), text),
    st.builds(
        PutObject,
        nonempty_text,
        nonempty_text,
        st.binary(max_size=64),
        text,
        st.dictionaries(nonempty_text, text, max_size=4).map(lambda d: tuple(d.items())),
        st.none() | u64,
        st.none() | u32,
    ),
    st.builds(Incomplete, u64, st.integers(0, 2**32), st.integers(2**32, 2**64 - 1), ranges()),
    st.builds(OpenSegment, st.integers(0, 2**32 - 1), token),
    st.builds(Compose, u64, st.none() | u32, token),
    st.builds(Discard, token),
    st.builds(
        CompositeOpened,
        u64,
        token,
        st.integers(1, 2**20).map(lambda n: n * 256 * 1024),
        st.integers(1, 2**16 - 1),
    ),
)
"""One of every control event, as the latest version lays them out (see `as_version_1`)."""


def as_version_1(event: Request | Reply) -> Request | Reply | None:
    """`event` as version 1 carries it, or None if version 1 has no such frame."""
    if FIRST_VERSION[frame_type_of(event)] > 1:
        return None
    if isinstance(event, UploadOpened):
        return replace(event, window_end=None)
    return event


@settings(max_examples=300, deadline=None)
@given(event=control_events, seq=st.integers(1, 2**64 - 1))
def test_control_events_round_trip(event: Request | Reply, seq: int) -> None:
    frame_type, body = encode_body(event, LATEST_VERSION)
    assert decode_body(frame_type, seq, body, LATEST_VERSION) == replace(event, seq=seq)
    # The body is exactly what the construct spec builds and parses.
    assert body_layout(frame_type, LATEST_VERSION).parse(body) is not None
    assert len(body) <= MAX_CONTROL_BODY_SIZE
    old = as_version_1(event)
    if old is not None:
        frame_type, body = encode_body(old, 1)
        assert decode_body(frame_type, seq, body, 1) == replace(old, seq=seq)
        assert BODIES[frame_type].parse(body) is not None


def test_a_version_1_body_cannot_carry_a_version_2_field() -> None:
    with pytest.raises(LocalProtocolError, match="UPLOAD_OPENED has no window_end in protocol"):
        encode_body(UploadOpened(1, b"t", 0, False, 10), 1)
    with pytest.raises(LocalProtocolError, match="UPLOAD_OPENED needs window_end in protocol"):
        encode_body(UploadOpened(1, b"t", 0, False), 2)


@settings(deadline=None)
@given(
    event=st.builds(Ack, u64, u64)
    | st.builds(Credit, u64, st.integers(0, 2**32), st.integers(2**32, 2**64 - 1))
)
def test_per_frame_replies_are_encoded_exactly_as_the_spec_builds_them(event: Ack | Credit) -> None:
    # Ack and Credit skip construct on the hot path; their bytes must not differ.
    frame_type, body = encode_body(event)
    fields = {f.name: getattr(event, f.name) for f in fields_of(event) if f.name != "seq"}
    assert body == BODIES[frame_type].build(fields)
    parsed = BODIES[frame_type].parse(body)
    assert {name: parsed[name] for name in fields} == fields


@settings(max_examples=200, deadline=None)
@given(
    event=st.builds(
        PutObject,
        text,
        text,
        st.binary(max_size=64),
        text,
        st.dictionaries(text, text, max_size=4).map(lambda d: tuple(d.items())),
        st.none() | u64,
        st.none() | u32,
    )
    | st.builds(Completed, u64, u64, u64, u32, st.none() | st.binary(min_size=16, max_size=16))
)
def test_the_one_request_frames_skip_construct_with_the_same_bytes(
    event: PutObject | Completed,
) -> None:
    # PUT_OBJECT and COMPLETED are read and written by hand (protocol/_fast.py); their bytes
    # must be the spec's both ways, even for values the codec refuses afterwards (empty names).
    # seq is the header's; a received PutObject's data_crc32c is the receiver's own work
    fields = {
        f.name: getattr(event, f.name)
        for f in fields_of(event)
        if f.name not in ("seq", "data_crc32c")
    }
    frame_type = frame_type_of(event)
    values = dict(fields)
    if isinstance(event, PutObject):
        values["metadata"] = [{"key": k, "value": v} for k, v in event.metadata]
    built = BODIES[frame_type].build(values)
    if isinstance(event, PutObject):
        assert encode_put_object(fields) == built
        assert decode_put_object(built) == fields
    else:
        assert encode_completed(fields) == built
        assert decode_completed(built) == fields
        for cut in range(len(built)):  # a truncation is left to construct's precise error
            assert decode_completed(built[:cut]) is None
