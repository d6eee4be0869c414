"""Conversations between a client and a server Connection: the state machine at work."""

from __future__ import annotations

import google_crc32c
import pytest

from protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    LATEST_VERSION,
    MIN_FRAME_SIZE,
    NEED_DATA,
    Abort,
    Ack,
    AttachUpload,
    Complete,
    Completed,
    Connection,
    ConnectionClosed,
    ConnectionState,
    Credit,
    Error,
    ErrorCode,
    Event,
    GoingAway,
    Hello,
    IncomingFrame,
    LocalProtocolError,
    OpenUpload,
    PayloadCrcError,
    Ping,
    Pong,
    PutObject,
    RemoteProtocolError,
    Role,
    Status,
    StatusQuery,
    UploadOpened,
    Welcome,
    WriteAt,
    WriteAtData,
    WriteAtEnd,
    WriteAtStart,
)
from protocol._codec import encode_body
from protocol._spec import HEADER_SIZE, OFFSET_STRUCT, FrameType
from protocol._state import ALLOWED_REQUESTS
from tests.protocol.helpers import (
    ReceivedWrite,
    body,
    bound_pair,
    drain,
    frame,
    merge_writes,
    negotiated_pair,
    request_seq,
    transfer,
)

S = ConnectionState


def test_a_whole_upload_conversation() -> None:
    client, server = negotiated_pair()
    assert (client.state, server.state) == (S.IDLE, S.IDLE)
    assert client.version == server.version == LATEST_VERSION

    (open_request,) = transfer(client, server, OpenUpload("bkt", "obj", metadata=(("a", "b"),)))
    assert isinstance(open_request, OpenUpload)
    assert open_request.seq == client.last_sent_seq == 2
    assert open_request.metadata == (("a", "b"),)
    assert (client.state, server.state) == (S.BINDING, S.BINDING)
    transfer(server, client, UploadOpened(open_request.seq, b"tok", 0, False))
    assert (client.state, server.state) == (S.BOUND, S.BOUND)

    # Pipelined: two writes, a status query and Complete without waiting for replies.
    received = merge_writes(
        transfer(
            client,
            server,
            WriteAt(0, b"hello "),
            WriteAt(6, memoryview(bytearray(b"world"))),
            StatusQuery(),
            Complete(11, 0x1234),
        )
    )
    assert received == [
        ReceivedWrite(3, 0, b"hello "),
        ReceivedWrite(4, 6, b"world"),
        StatusQuery(seq=5),
        Complete(11, 0x1234, seq=6),
    ]
    assert (client.state, server.state) == (S.COMPLETING, S.COMPLETING)
    assert server.requests_in_flight == client.requests_in_flight == 4

    # Replies may come in any order; each names the request it answers.
    replies = transfer(
        server,
        client,
        Status(5, 0, ((0, 11),), 1 << 20),
        Credit(0, 0, 1 << 20),
        Ack(4, 0),
        Ack(3, 11),
        Completed(6, 1700000000, 11, 0x1234, bytes(16)),
    )
    assert [type(reply) for reply in replies] == [Status, Credit, Ack, Ack, Completed]
    assert [request_seq(reply) for reply in replies] == [3, 4, 5, 6, 7]
    assert (client.state, server.state) == (S.IDLE, S.IDLE)
    assert server.requests_in_flight == client.requests_in_flight == 0


def test_write_at_data_is_passed_through_and_delivered_as_views() -> None:
    client, server = bound_pair()
    payload = b"x" * 5000
    buffers = client.send(WriteAt(0, payload))
    assert buffers[-1] is payload  # never copied on the way out
    header_and_offset = buffers[0]
    assert len(header_and_offset) == HEADER_SIZE + 8

    chunks = [bytes(header_and_offset), payload[:1000], payload[1000:]]
    events = []
    for chunk in chunks:
        server.receive_data(chunk)
        events.extend(drain(server))
    start, first, second, end = events
    assert start == WriteAtStart(3, 0, 5000)
    assert isinstance(first, WriteAtData)
    assert isinstance(second, WriteAtData)
    # Views into the very buffers that were received: no copy on the way in either.
    assert first.data.obj is chunks[1]
    assert second.data.obj is chunks[2]
    assert end == WriteAtEnd(3)
    # The data's own CRC32C comes with the end, worked out while checking the payload's.
    assert end.data_crc32c == google_crc32c.value(payload)


def test_receiving_what_receive_size_asks_for_keeps_each_payload_buffer_whole() -> None:
    client, server = bound_pair()
    wire = b"".join(
        b"".join(client.send(event))
        for event in (WriteAt(0, b"a" * 5000), Ping(7), WriteAt(5000, b"b" * 3000))
    )
    received: list[bytes] = []
    events: list[Event] = []
    while len(b"".join(received)) < len(wire):
        size = server.receive_size(1024)
        assert 0 < size <= 1024
        start = len(b"".join(received))
        received.append(wire[start : start + size])
        server.receive_data(received[-1])
        events.extend(drain(server))
    pieces = [event for event in events if isinstance(event, WriteAtData)]
    # Every payload piece is a whole received buffer: nothing of a header rides along.
    assert len(pieces) == 5 + 3  # 5000 and 3000 bytes in pieces of at most 1024
    for piece in pieces:
        buffer = piece.data.obj
        assert isinstance(buffer, bytes)
        assert any(buffer is whole for whole in received)
        assert len(piece.data) == len(buffer)
    assert merge_writes(events) == [
        ReceivedWrite(3, 0, b"a" * 5000),
        Ping(7, seq=4),
        ReceivedWrite(5, 5000, b"b" * 3000),
    ]


def _start_write_at(client: Connection, server: Connection, payload: bytes) -> bytes:
    """Send a WriteAt of ``payload``; the server gets its header and offset only. Returns
    the data bytes as they went on the wire."""
    buffers = client.send(WriteAt(0, payload))
    server.receive_data(bytes(buffers[0]))
    assert drain(server) == [WriteAtStart(client.last_sent_seq, 0, len(payload))]
    return b"".join(bytes(buffer) for buffer in buffers[1:])


def test_write_at_data_read_by_the_receiver_itself_is_checked_as_events_are() -> None:
    client, server = bound_pair()
    assert server.write_at_data_wanted == 0  # between frames
    data = _start_write_at(client, server, bytes(range(256)) * 20)
    taken = 0
    for size in (1000, 3000, 1120):
        assert server.write_at_data_wanted == len(data) - taken
        server.receive_write_at_data(data[taken : taken + size])
        taken += size
    assert server.write_at_data_wanted == 0
    end = server.next_event()
    assert end == WriteAtEnd(3)
    assert isinstance(end, WriteAtEnd)
    assert end.data_crc32c == google_crc32c.value(data)
    # And the stream goes on with the next frame as usual.
    transfer(client, server, Ping(9))
    assert server.write_at_data_wanted == 0


def test_damaged_write_at_data_read_by_the_receiver_is_refused_by_its_crc() -> None:
    client, server = bound_pair()
    data = bytearray(_start_write_at(client, server, b"x" * 4096))
    data[100] ^= 0x01
    server.receive_write_at_data(bytes(data[:2000]))
    server.receive_write_at_data(bytes(data[2000:]))
    with pytest.raises(PayloadCrcError) as refused:
        server.next_event()
    assert refused.value.seq == 3
    assert transfer(client, server, Ping(1)) == [Ping(1, seq=4)]  # still in step


def test_write_at_data_is_taken_only_as_much_as_is_wanted() -> None:
    client, server = bound_pair()
    data = _start_write_at(client, server, b"y" * 100)
    with pytest.raises(LocalProtocolError):
        server.receive_write_at_data(data + b"z")  # past the frame
    with pytest.raises(LocalProtocolError):
        server.receive_write_at_data(b"")
    server.receive_data(data[:10])  # bytes in the buffer go out as events first
    assert server.write_at_data_wanted == 0
    with pytest.raises(LocalProtocolError):
        server.receive_write_at_data(data[10:])
    (piece,) = drain(server)
    assert isinstance(piece, WriteAtData)
    assert server.write_at_data_wanted == 90
    server.receive_write_at_data(data[10:])
    assert server.next_event() == WriteAtEnd(3)


def test_a_frame_received_whole_is_announced_by_its_header_before_its_payload() -> None:
    client, server = negotiated_pair()
    wire = b"".join(client.send(PutObject("bucket", "object", b"x" * 5000)))
    seq = client.last_sent_seq
    announced: list[IncomingFrame | None] = [server.incoming_frame]
    server.receive_data(wire[: HEADER_SIZE + 10])
    assert server.next_event() is NEED_DATA
    announced.append(server.incoming_frame)
    server.receive_data(wire[HEADER_SIZE + 10 :])
    assert isinstance(server.next_event(), PutObject)
    announced.append(server.incoming_frame)
    payload = IncomingFrame(FrameType.PUT_OBJECT, seq, len(wire) - HEADER_SIZE)
    assert announced == [None, payload, None]


def test_a_put_objects_data_is_sent_uncopied_and_its_crc32c_known_on_arrival() -> None:
    client, server = negotiated_pair()
    data = bytes(range(256)) * 40
    buffers = client.send(PutObject("bucket", "object", data, metadata=(("k", "v"),)))
    assert buffers[-1] is data  # passed through, as a WriteAt's data is
    server.receive_data(b"".join(buffers))
    received = server.next_event()
    assert isinstance(received, PutObject)
    assert received.data == data
    assert received.data_crc32c == google_crc32c.value(data)
    # The CRC32C is the bytes' own, not the one the client claims for them.
    server.receive_data(b"".join(client.send(PutObject("bucket", "other", data, crc32c=1))))
    claimed = server.next_event()
    assert isinstance(claimed, PutObject)
    assert (claimed.crc32c, claimed.data_crc32c) == (1, google_crc32c.value(data))


def test_a_put_object_above_the_agreed_size_is_refused_before_anything_is_sent() -> None:
    client, _ = negotiated_pair(max_frame_size=MIN_FRAME_SIZE)
    with pytest.raises(LocalProtocolError, match="above max_frame_size") as local:
        client.send(PutObject("bucket", "object", bytes(MIN_FRAME_SIZE + 1)))
    assert local.value.code is ErrorCode.FRAME_TOO_LARGE
    assert client.last_sent_seq == 1  # only the Hello went out
    client.send(PutObject("bucket", "object", bytes(MIN_FRAME_SIZE)))  # the limit itself is fine


def test_a_write_at_is_never_announced_as_received_whole() -> None:
    client, server = bound_pair()
    wire = b"".join(client.send(WriteAt(0, b"a" * 5000)))
    server.receive_data(wire[: HEADER_SIZE + 100])
    assert [type(event) for event in drain(server)] == [WriteAtStart, WriteAtData]
    assert server.incoming_frame is None


def test_buffers_that_are_not_bytes_are_accepted_and_still_verified() -> None:
    client, server = bound_pair()
    wire = bytearray(client.send_bytes(WriteAt(0, b"abc" * 1000)))
    server.receive_data(wire[:100])  # a bytearray
    server.receive_data(memoryview(wire)[100:2000])
    server.receive_data(memoryview(bytes(wire[2000:])).cast("b"))  # signed bytes
    assert merge_writes(drain(server)) == [ReceivedWrite(3, 0, b"abc" * 1000)]
    wire[-1] ^= 1
    _, server = bound_pair()
    server.receive_data(memoryview(wire))
    with pytest.raises(PayloadCrcError, match="WRITE_AT seq 3: payload CRC32C mismatch"):
        drain(server)


def test_write_at_is_delivered_as_it_arrives() -> None:
    client, server = bound_pair()
    wire = client.send_bytes(WriteAt(100, bytes(50_000)))
    server.receive_data(wire[: HEADER_SIZE + 8 + 10])
    assert drain(server) == [
        WriteAtStart(3, 100, 50_000),
        WriteAtData(3, memoryview(bytes(10))),
    ]
    server.receive_data(wire[HEADER_SIZE + 8 + 10 :])
    data_event, end = drain(server)
    assert isinstance(data_event, WriteAtData)
    assert len(data_event.data) == 50_000 - 10
    assert end == WriteAtEnd(3)


def test_empty_write_at() -> None:
    client, server = bound_pair()
    assert transfer(client, server, WriteAt(7, b"")) == [WriteAtStart(3, 7, 0), WriteAtEnd(3)]


def test_hello_negotiates_the_smaller_frame_size() -> None:
    client = Connection(Role.CLIENT, max_frame_size=256 * 1024)
    server = Connection(Role.SERVER, max_frame_size=DEFAULT_MAX_FRAME_SIZE)
    (hello,) = transfer(client, server, client.hello(auth="token", client_name="me"))
    assert isinstance(hello, Hello)
    assert hello.auth == "token"
    welcome = server.welcome(hello, server_name="rup")
    assert welcome == Welcome(1, LATEST_VERSION, 256 * 1024, "rup")
    transfer(server, client, welcome)
    assert client.max_frame_size == server.max_frame_size == 256 * 1024


def test_frames_above_the_agreed_size_are_refused_both_ways() -> None:
    client, server = bound_pair(max_frame_size=MIN_FRAME_SIZE)
    with pytest.raises(LocalProtocolError, match="above max_frame_size") as local:
        client.send(WriteAt(0, bytes(MIN_FRAME_SIZE + 1)))
    assert local.value.code is ErrorCode.FRAME_TOO_LARGE
    transfer(client, server, WriteAt(0, bytes(MIN_FRAME_SIZE)))  # exactly the limit is fine

    # A peer that ignores the limit is stopped at the header.
    server.receive_data(frame(FrameType.WRITE_AT, 4, b"", payload_size=8 + MIN_FRAME_SIZE + 1))
    with pytest.raises(RemoteProtocolError, match="more than the 1032 allowed") as remote:
        server.next_event()
    assert remote.value.code is ErrorCode.FRAME_TOO_LARGE
    assert remote.value.seq == 4


def test_unknown_versions_only_get_a_clear_error() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    server.receive_data(frame(FrameType.HELLO, 1, _hello_body(versions=[4, 7])))
    with pytest.raises(RemoteProtocolError) as excinfo:
        server.next_event()
    assert excinfo.value.code is ErrorCode.UNSUPPORTED_VERSION
    assert str(excinfo.value) == (
        "client offers protocol versions [4, 7]; this server supports [1, 2, 3]"
    )
    # The server can still say why before it closes, and the client hears it.
    assert server.state is S.ERROR
    reply = Error.from_exception(excinfo.value)
    assert reply == Error(1, ErrorCode.UNSUPPORTED_VERSION, False, str(excinfo.value))
    client.send(client.hello())
    assert transfer(server, client, reply) == [Error(1, reply.code, False, reply.message, seq=1)]
    assert client.state is S.ERROR  # a refused Hello ends the connection


def test_a_client_can_offer_only_versions_it_speaks() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError, match=r"offers \[9\]"):
        client.send(Hello((9,), DEFAULT_MAX_FRAME_SIZE))


def test_welcome_must_pick_what_was_offered() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    transfer(client, server, client.hello())
    client.receive_data(frame(FrameType.WELCOME, 1, _welcome_body(1, DEFAULT_MAX_FRAME_SIZE * 2)))
    with pytest.raises(RemoteProtocolError, match="above the 1048576") as excinfo:
        client.next_event()
    assert excinfo.value.code is ErrorCode.FRAME_TOO_LARGE
    with pytest.raises(LocalProtocolError, match="version 4"):
        server.send(Welcome(1, 4, DEFAULT_MAX_FRAME_SIZE))


@pytest.mark.parametrize("state", [s for s in S if s is not S.ERROR])
def test_request_legality_matches_the_table_on_both_ends(state: ConnectionState) -> None:
    for request in _SAMPLE_REQUESTS:
        frame_type = _frame_type(request)
        client, server = _pair_in(state)
        allowed = frame_type in ALLOWED_REQUESTS[state]
        if allowed:
            received = merge_writes(transfer(client, server, request))
            assert len(received) == 1
        else:
            with pytest.raises(LocalProtocolError, match=f"cannot send {frame_type.name}"):
                client.send(request)
            # A client that sends it anyway is stopped by the server.
            forged, _ = _pair_in(state)
            wire = _forge(forged, request)
            server.receive_data(wire)
            with pytest.raises(RemoteProtocolError, match="is not allowed in state") as excinfo:
                drain(server)
            assert excinfo.value.code is ErrorCode.UNEXPECTED_FRAME
            assert server.state is S.ERROR


def test_sequence_numbers_must_count_up_by_one() -> None:
    client, server = negotiated_pair()
    server.receive_data(frame(FrameType.PING, 3, bytes(8)))  # 2 was skipped
    with pytest.raises(RemoteProtocolError, match="PING has seq 3, expected 2") as excinfo:
        server.next_event()
    assert excinfo.value.code is ErrorCode.BAD_SEQUENCE
    assert client.state is S.IDLE


def test_replies_must_answer_a_request_in_flight() -> None:
    client, server = negotiated_pair()
    transfer(client, server, Ping(1))
    with pytest.raises(LocalProtocolError, match="answers seq 9"):
        server.send(Pong(9, 1))
    with pytest.raises(LocalProtocolError, match="ACK cannot answer PING"):
        server.send(Ack(2, 0))
    with pytest.raises(LocalProtocolError, match="must answer a request"):
        server.send(Pong(0, 1))
    assert transfer(server, client, Pong(2, 1)) == [Pong(2, 1, seq=2)]
    # Each request is answered once.
    with pytest.raises(LocalProtocolError, match="answers seq 2"):
        server.send(Pong(2, 1))
    client.receive_data(frame(FrameType.PONG, 3, (2).to_bytes(8, "big") + bytes(8)))
    with pytest.raises(RemoteProtocolError, match="PONG answers seq 2") as excinfo:
        client.next_event()
    assert excinfo.value.code is ErrorCode.UNEXPECTED_FRAME


def test_unsolicited_credit_error_and_going_away() -> None:
    client, server = bound_pair()
    events = transfer(
        server,
        client,
        Credit(0, 0, 10),
        Error(0, ErrorCode.IDLE_TIMEOUT, True, "idle"),
        GoingAway(message="bye"),
    )
    assert [type(e) for e in events] == [Credit, Error, GoingAway]
    assert client.state is S.BOUND
    with pytest.raises(LocalProtocolError, match="never a reply"):
        server.send(GoingAway(3))
    fresh = Connection(Role.SERVER)
    with pytest.raises(LocalProtocolError, match="unsolicited CREDIT is not allowed"):
        fresh.send(Credit(0, 0, 10))
    fresh.send(Error(0, ErrorCode.TOO_BUSY, True, "try later"))  # before Hello is fine


def test_errors_to_blocking_requests_restore_the_previous_state() -> None:
    client, server = bound_pair()
    (complete,) = transfer(client, server, Complete(0))
    transfer(
        server, client, Error(request_seq(complete), ErrorCode.MISSING_RANGES, False, "[0, 5)")
    )
    assert (client.state, server.state) == (S.BOUND, S.BOUND)
    (abort,) = transfer(client, server, Abort())
    transfer(server, client, Error(request_seq(abort), ErrorCode.ABORTED, False, "gone"))
    assert (client.state, server.state) == (S.IDLE, S.IDLE)
    (attach,) = transfer(client, server, AttachUpload(b"t"))
    transfer(server, client, Error(request_seq(attach), ErrorCode.BAD_TOKEN, False, "no"))
    assert (client.state, server.state) == (S.IDLE, S.IDLE)


def test_payload_crc_error_is_retryable_and_not_fatal() -> None:
    client, server = bound_pair()
    good = client.send_bytes(WriteAt(0, b"abcdef"))
    corrupt = bytearray(good)
    corrupt[-1] ^= 0x01
    server.receive_data(bytes(corrupt))
    assert drain_until_error(server, PayloadCrcError) == [
        WriteAtStart(3, 0, 6),
        WriteAtData(3, memoryview(b"abcdeg")),
    ]
    # The failed request is answered, then the client resends it and the stream goes on.
    transfer(server, client, Error(3, ErrorCode.BAD_CRC, True, "payload CRC32C mismatch"))
    assert merge_writes(transfer(client, server, WriteAt(0, b"abcdef"))) == [
        ReceivedWrite(4, 0, b"abcdef")
    ]
    assert server.state is S.BOUND


def test_crc_error_on_a_blocking_request_is_answered_like_any_other() -> None:
    client, server = bound_pair()
    wire = bytearray(client.send_bytes(Complete(3)))
    wire[-1] ^= 0xFF
    server.receive_data(bytes(wire))
    with pytest.raises(PayloadCrcError) as excinfo:
        server.next_event()
    assert excinfo.value.retryable
    assert excinfo.value.code is ErrorCode.BAD_CRC
    assert server.state is S.COMPLETING
    transfer(server, client, Error.from_exception(excinfo.value))
    assert (client.state, server.state) == (S.BOUND, S.BOUND)


def test_clean_eof_between_frames_is_connection_closed() -> None:
    client, server = negotiated_pair()
    server.receive_data(b"")
    assert server.next_event() == ConnectionClosed()
    assert server.next_event() == ConnectionClosed()
    assert server.peer_closed
    with pytest.raises(RuntimeError, match="after the peer closed"):
        server.receive_data(b"more")
    # The other direction still works (half-close).
    assert transfer(server, client, GoingAway()) == [GoingAway(seq=2)]


def test_fatal_errors_stick() -> None:
    _, server = negotiated_pair()
    server.receive_data(b"GET / HTTP/1.1\r\n\r\n" + bytes(20))
    with pytest.raises(RemoteProtocolError, match="no frame magic") as first:
        server.next_event()
    with pytest.raises(RemoteProtocolError, match="already failed") as again:
        server.next_event()
    assert again.value.code is first.value.code is ErrorCode.MALFORMED_FRAME
    with pytest.raises(LocalProtocolError, match="in state ERROR"):
        server.send(Credit(0, 0, 1))
    server.send(GoingAway())


def test_local_errors_change_nothing() -> None:
    client, _ = bound_pair()
    before = (client.state, client.last_sent_seq, client.requests_in_flight)
    with pytest.raises(LocalProtocolError, match="does not send ACK"):
        client.send(Ack(1, 0))
    with pytest.raises(LocalProtocolError, match="never sent"):
        client.send(ConnectionClosed())
    with pytest.raises(LocalProtocolError, match="metadata keys"):
        client.send(OpenUpload("b", "o", metadata=(("k", "1"), ("k", "2"))))
    with pytest.raises(LocalProtocolError, match="out of range"):
        client.send(WriteAt(-1, b"x"))
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        client.send(Ping(nonce=-1))
    assert (client.state, client.last_sent_seq, client.requests_in_flight) == before


def test_connection_repr() -> None:
    client, _ = bound_pair()
    client.send(Ping())
    assert repr(client) == "<Connection client state=BOUND sent=3 received=2 in_flight=1>"


def test_secrets_stay_out_of_reprs() -> None:
    assert "s3cret" not in repr(Hello((1,), MIN_FRAME_SIZE, auth="s3cret"))
    assert "s3cret" not in repr(AttachUpload(b"s3cret"))
    assert "s3cret" not in repr(UploadOpened(1, b"s3cret", 0, False))
    assert repr(WriteAt(5, bytes(10**6))) == "WriteAt(offset=5, len(data)=1000000, seq=0)"
    assert repr(NEED_DATA) == "NEED_DATA"


def test_invalid_utf8_is_reported_without_echoing_it() -> None:
    server = Connection(Role.SERVER)
    body = _hello_body(auth="\udcff")
    server.receive_data(frame(FrameType.HELLO, 1, body))
    with pytest.raises(RemoteProtocolError, match="not valid UTF-8") as excinfo:
        server.next_event()
    assert "\\xff" not in str(excinfo.value)
    assert excinfo.value.code is ErrorCode.MALFORMED_FRAME


def test_max_frame_size_bounds() -> None:
    with pytest.raises(ValueError, match="max_frame_size must be in"):
        Connection(Role.SERVER, max_frame_size=MIN_FRAME_SIZE - 1)


# -- helpers -------------------------------------------------------------------------------------

_SAMPLE_REQUESTS = [
    Hello((1,), MIN_FRAME_SIZE),
    OpenUpload("b", "o"),
    AttachUpload(b"t"),
    WriteAt(0, b"data"),
    Complete(4),
    Abort(),
    StatusQuery(),
    Ping(5),
]


def _frame_type(request: object) -> FrameType:
    return FrameType[
        {
            "Hello": "HELLO",
            "OpenUpload": "OPEN_UPLOAD",
            "AttachUpload": "ATTACH_UPLOAD",
            "WriteAt": "WRITE_AT",
            "Complete": "COMPLETE",
            "Abort": "ABORT",
            "StatusQuery": "STATUS_QUERY",
            "Ping": "PING",
        }[type(request).__name__]
    ]


def _pair_in(state: ConnectionState) -> tuple[Connection, Connection]:
    """A client and server that agree they are in `state`."""
    client, server = (
        Connection(Role.CLIENT, max_frame_size=MIN_FRAME_SIZE),
        Connection(Role.SERVER, max_frame_size=MIN_FRAME_SIZE),
    )
    if state is S.AWAIT_HELLO:
        return client, server
    transfer(client, server, client.hello())
    if state is S.NEGOTIATING:
        return client, server
    transfer(server, client, Welcome(1, 1, MIN_FRAME_SIZE))
    if state is S.IDLE:
        return client, server
    transfer(client, server, OpenUpload("b", "o"))
    if state is S.BINDING:
        return client, server
    transfer(server, client, UploadOpened(2, b"t", 0, False))
    if state is S.BOUND:
        return client, server
    transfer(client, server, Complete(0) if state is S.COMPLETING else Abort())
    assert client.state is server.state is state
    return client, server


def _forge(client: Connection, request: object) -> bytes:
    """The bytes of `request` as the next frame of `client`, state rules ignored."""
    seq = client.last_sent_seq + 1
    if isinstance(request, WriteAt):
        return frame(FrameType.WRITE_AT, seq, OFFSET_STRUCT.pack(request.offset) + request.data)
    frame_type, body = encode_body(request)  # type: ignore[arg-type]
    return frame(frame_type, seq, body)


def drain_until_error(conn: Connection, error: type[Exception]) -> list[object]:
    events: list[object] = []
    while True:
        try:
            event = conn.next_event()
        except error:
            return events
        assert event is not NEED_DATA, f"expected {error.__name__}"
        events.append(event)


def _hello_body(versions: list[int] | None = None, auth: str = "") -> bytes:
    if auth == "\udcff":  # not encodable: splice raw invalid UTF-8 in
        raw = body(
            FrameType.HELLO, versions=[1], max_frame_size=MIN_FRAME_SIZE, auth="?", client_name=""
        )
        return raw.replace(b"\x00\x01?", b"\x00\x01\xff")
    return body(
        FrameType.HELLO,
        versions=versions or [1],
        max_frame_size=MIN_FRAME_SIZE,
        auth=auth,
        client_name="",
    )


def _welcome_body(version: int, max_frame_size: int) -> bytes:
    return body(
        FrameType.WELCOME,
        reply_to=1,
        version=version,
        max_frame_size=max_frame_size,
        server_name="",
    )
