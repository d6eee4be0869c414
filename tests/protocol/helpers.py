"""Building blocks for the protocol tests: connected pairs, raw frames, event collection."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from protocol import (
    NEED_DATA,
    Connection,
    ConnectionClosed,
    Event,
    OpenUpload,
    PayloadCrcError,
    RemoteProtocolError,
    Role,
    UploadOpened,
    WriteAtData,
    WriteAtEnd,
    WriteAtStart,
)
from protocol._spec import BODIES, HEADER, FrameType, crc32c

__all__ = [
    "CrcFailure",
    "ReceivedWrite",
    "body",
    "bound_pair",
    "decode_all",
    "drain",
    "frame",
    "merge_writes",
    "negotiated_pair",
    "put_object_body",
    "request_seq",
    "transfer",
]


def drain(conn: Connection) -> list[Event]:
    """Every event `conn` can produce from what it has received so far."""
    events: list[Event] = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return events


def transfer(sender: Connection, receiver: Connection, *events: Event) -> list[Event]:
    """Send `events` from one end and return what the other end decodes from them."""
    for event in events:
        for buffer in sender.send(event):
            receiver.receive_data(buffer)
    return drain(receiver)


def negotiated_pair(max_frame_size: int = 64 * 1024) -> tuple[Connection, Connection]:
    client = Connection(Role.CLIENT, max_frame_size=max_frame_size)
    server = Connection(Role.SERVER, max_frame_size=max_frame_size)
    (hello,) = transfer(client, server, client.hello(auth="s3cret", client_name="test"))
    assert isinstance(hello, type(client.hello()))
    transfer(server, client, server.welcome(hello))
    return client, server


def bound_pair(max_frame_size: int = 64 * 1024) -> tuple[Connection, Connection]:
    client, server = negotiated_pair(max_frame_size)
    (request,) = transfer(client, server, OpenUpload("bucket", "object"))
    transfer(server, client, UploadOpened(request_seq(request), b"token", 0, False))
    return client, server


def request_seq(event: object) -> int:
    seq = getattr(event, "seq", None)
    assert isinstance(seq, int)
    return seq


def frame(
    frame_type: int,
    seq: int,
    payload: bytes,
    *,
    version: int = 1,
    flags: int = 0,
    payload_size: int | None = None,
    payload_crc32c: int | None = None,
) -> bytes:
    """A frame built with the construct spec, any field overridable (header CRC stays valid)."""
    fields = {
        "version": version,
        "frame_type": frame_type,
        "flags": flags,
        "seq": seq,
        "payload_size": len(payload) if payload_size is None else payload_size,
        "payload_crc32c": crc32c(payload) if payload_crc32c is None else payload_crc32c,
    }
    return bytes(HEADER.build({"fields": {"value": fields}})) + payload


def body(frame_type: FrameType, **fields: object) -> bytes:
    return bytes(BODIES[frame_type].build(fields))


def put_object_body(data: bytes) -> bytes:
    """A PUT_OBJECT body built by hand (so no codec check stands in the way)."""
    return body(
        FrameType.PUT_OBJECT,
        bucket="b",
        name="o",
        content_type="",
        metadata=[],
        if_generation_match=None,
        crc32c=None,
        data=data,
    )


@dataclass(frozen=True)
class ReceivedWrite:
    seq: int
    offset: int
    data: bytes


def merge_writes(
    events: Iterable[Event | CrcFailure], *, allow_unfinished: bool = False
) -> list[object]:
    """Events with each streamed WriteAt folded into one ReceivedWrite (seqs included)."""
    merged: list[object] = []
    start: WriteAtStart | None = None
    pieces: list[bytes] = []
    for event in events:
        if isinstance(event, WriteAtStart):
            assert start is None
            start, pieces = event, []
        elif isinstance(event, WriteAtData):
            assert start is not None
            assert event.seq == start.seq
            pieces.append(bytes(event.data))
        elif isinstance(event, CrcFailure) and start is not None:
            merged.append(event)
            start = None
        elif isinstance(event, WriteAtEnd):
            assert start is not None
            assert event.seq == start.seq
            data = b"".join(pieces)
            assert len(data) == start.length
            merged.append(ReceivedWrite(start.seq, start.offset, data))
            start = None
        else:
            merged.append(event)
    assert start is None or allow_unfinished, "a WriteAt was left unfinished"
    return merged


@dataclass(frozen=True)
class CrcFailure:
    """Stands for a PayloadCrcError in a decoded event list (it is not fatal)."""

    seq: int


def decode_all(conn: Connection, data: bytes) -> tuple[list[object], RemoteProtocolError | None]:
    """Feed `data` and EOF; return the events (merged) and the fatal error that ended them."""
    conn.receive_data(data)
    conn.receive_data(b"")
    events: list[Event | CrcFailure] = []
    error: RemoteProtocolError | None = None
    while True:
        try:
            event = conn.next_event()
        except PayloadCrcError as exc:
            events.append(CrcFailure(exc.seq))
            continue
        except RemoteProtocolError as exc:
            error = exc
            break
        assert event is not NEED_DATA, "NEED_DATA after EOF"
        if isinstance(event, ConnectionClosed):
            break
        events.append(event)
    return merge_writes(events, allow_unfinished=error is not None), error
