"""docs/protocol.md, rule by rule: one test per rule, named after its section (`test_s8_...` tests
a rule of section 8), all at the sans-IO level, so the spec and this file read side by side.

Rules the codec cannot enforce (marked "(server)" in the spec) are the server's, and are tested
with the server. The last part holds the properties that span sections: the same bytes get the
same answers however they are segmented and however late the server's replies are.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    ERROR_SPECS,
    FRAMING_VERSION,
    LATEST_VERSION,
    MAX_CONTROL_BODY_SIZE,
    MAX_LISTED_RANGES,
    MAX_MESSAGE_SIZE,
    MIN_FRAME_SIZE,
    NEED_DATA,
    Abort,
    Ack,
    AttachUpload,
    Complete,
    Completed,
    Compose,
    CompositeOpened,
    Connection,
    ConnectionState,
    Credit,
    Discard,
    Error,
    ErrorCode,
    Event,
    GoingAway,
    Hello,
    Incomplete,
    LocalProtocolError,
    OpenSegment,
    OpenUpload,
    PayloadCrcError,
    Ping,
    Pong,
    PutObject,
    RemoteProtocolError,
    Reply,
    Request,
    Role,
    Scope,
    Status,
    StatusQuery,
    UploadOpened,
    Welcome,
    WriteAt,
    WriteAtEnd,
    WriteAtStart,
)
from protocol._spec import HEADER_SIZE, FrameType
from protocol._state import ALLOWED_REPLIES, ALLOWED_REQUESTS, REPLY_TRANSITIONS
from tests.protocol.helpers import (
    body,
    decode_all,
    drain,
    frame,
    merge_writes,
    put_object_body,
    request_seq,
    transfer,
)

S = ConnectionState
V1, BOTH, V3 = (1,), (1, 2), (1, 2, 3)
WINDOW = 1 << 20


def pair(
    client_versions: tuple[int, ...] = BOTH, server_versions: tuple[int, ...] = BOTH
) -> tuple[Connection, Connection]:
    client = Connection(Role.CLIENT, max_frame_size=64 * 1024, versions=client_versions)
    server = Connection(Role.SERVER, max_frame_size=64 * 1024, versions=server_versions)
    (hello,) = transfer(client, server, client.hello())
    assert isinstance(hello, Hello)
    transfer(server, client, server.welcome(hello))
    return client, server


def bound(version: int = LATEST_VERSION, window_end: int = WINDOW) -> tuple[Connection, Connection]:
    client, server = pair(tuple(range(1, version + 1)))
    (request,) = transfer(client, server, OpenUpload("bucket", "object"))
    transfer(server, client, UploadOpened(request_seq(request), b"tok", 0, False, window_end))
    return client, server


def states(*ends: Connection) -> tuple[ConnectionState, ...]:
    return tuple(end.state for end in ends)


def refused(conn: Connection) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as excinfo:
        drain(conn)
    return excinfo.value


# -- section 1: frames -----------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_s1_the_header_version_is_the_framing_version_whatever_is_negotiated(version: int) -> None:
    client, server = bound(version)
    for wire in (client.send_bytes(Ping(1)), server.send_bytes(Credit(0, 0, WINDOW))):
        assert wire[4] == FRAMING_VERSION == 1


def test_s1_another_framing_version_is_unsupported_and_unsolicited() -> None:
    _, server = pair()
    server.receive_data(frame(FrameType.PING, 2, bytes(8), version=2))
    error = refused(server)
    assert (error.code, error.seq) == (ErrorCode.UNSUPPORTED_VERSION, 0)


def test_s1_the_seq_is_checked_before_the_frame_type_and_flags() -> None:
    _, server = pair()
    server.receive_data(frame(0x42, 9, b"", flags=1))
    error = refused(server)
    assert (error.code, error.seq) == (ErrorCode.BAD_SEQUENCE, 0)
    assert error.message == "frame type 0x42 has seq 9, expected 2"


def test_s1_header_checks_refuse_a_frame_before_any_payload_is_read() -> None:
    _, server = pair()  # IDLE: WRITE_AT is not allowed
    server.receive_data(frame(FrameType.WRITE_AT, 2, b"", payload_size=8 + 1000))
    error = refused(server)  # not one payload byte was given
    assert (error.code, error.seq) == (ErrorCode.UNEXPECTED_FRAME, 2)


def test_s1_bytes_left_after_the_last_field_are_malformed() -> None:
    _, server = pair()
    server.receive_data(frame(FrameType.PING, 2, bytes(8), payload_size=8) + b"")
    assert [type(e) for e in drain(server)] == [Ping]
    body_ = body(FrameType.ATTACH_UPLOAD, token=b"t")  # token is `rest`: nothing is left over
    server.receive_data(frame(FrameType.OPEN_UPLOAD, 3, body_ + b"\x00"))
    assert refused(server).code is ErrorCode.MALFORMED_FRAME


# -- section 2: frame types and bodies -------------------------------------------------------------


def test_s2_version_2_frame_types_do_not_exist_on_a_version_1_connection() -> None:
    client, server = bound(version=1)
    server.receive_data(frame(FrameType.PUT_OBJECT, 3, b""))
    assert refused(server).code is ErrorCode.UNKNOWN_FRAME_TYPE
    client.send(Complete(5))
    client.receive_data(frame(FrameType.INCOMPLETE, 3, bytes(8 * 3 + 4)))
    assert refused(client).code is ErrorCode.UNKNOWN_FRAME_TYPE


def test_s2_upload_opened_is_laid_out_by_the_negotiated_version() -> None:
    sizes = {}
    for version in (1, 2):
        client, server = pair(tuple(range(1, version + 1)))
        (request,) = transfer(client, server, OpenUpload("b", "o"))
        wire = server.send_bytes(UploadOpened(request_seq(request), b"tok", 7, False, 99))
        sizes[version] = len(wire) - HEADER_SIZE
        client.receive_data(wire)
        (opened,) = drain(client)
        assert opened == UploadOpened(2, b"tok", 7, False, 99 if version == 2 else None, seq=2)
    assert sizes == {1: 8 + 8 + 1 + 3, 2: 8 + 8 + 1 + 8 + 3}


def test_s2_value_rules_are_malformed_frames() -> None:
    client, _ = bound()
    client.send(Complete(10))
    unsorted = body(
        FrameType.INCOMPLETE,
        reply_to=3,
        committed_offset=0,
        window_end=WINDOW,
        missing=[{"start": 5, "end": 6}, {"start": 1, "end": 2}],
    )
    client.receive_data(frame(FrameType.INCOMPLETE, 3, unsorted))
    assert refused(client).code is ErrorCode.MALFORMED_FRAME


# -- section 4: sequence numbers and replies -------------------------------------------------------


def test_s4_each_direction_numbers_its_frames_from_1() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    (hello,) = transfer(client, server, client.hello())
    assert isinstance(hello, Hello)
    assert hello.seq == 1
    (welcome,) = transfer(server, client, server.welcome(hello))
    assert isinstance(welcome, Welcome)
    assert (welcome.seq, welcome.reply_to) == (1, 1)


def test_s4_no_request_has_seq_0() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(frame(FrameType.HELLO, 0, b""))
    assert refused(server).code is ErrorCode.BAD_SEQUENCE


def test_s4_an_error_names_a_frame_only_once_its_seq_was_the_expected_one() -> None:
    client, server = pair()
    client.send(Ping(1))  # seq 2 on the client's side...
    server.receive_data(frame(FrameType.PING, 5, bytes(8)))  # ...but 5 arrives
    error = refused(server)
    reply = Error.from_exception(error)
    assert reply.reply_to == 0  # unsolicited: it cannot be taken for the answer to seq 5
    (received,) = transfer(server, client, reply)
    assert received == replace(reply, seq=2)
    assert client.requests_in_flight == 1  # the Ping is still waiting for its own answer


@pytest.mark.parametrize("request_type", sorted(ALLOWED_REPLIES))
def test_s4_each_request_gets_only_the_replies_of_its_table_row(request_type: FrameType) -> None:
    for reply_type in (t for t in FrameType if not t.is_request):
        allowed = reply_type in ALLOWED_REPLIES[request_type]
        assert allowed == (reply_type in _DOCUMENTED_REPLIES[request_type]), reply_type


_DOCUMENTED_REPLIES = {  # section 4's table, as written there
    FrameType.HELLO: {FrameType.WELCOME, FrameType.ERROR},
    FrameType.OPEN_UPLOAD: {FrameType.UPLOAD_OPENED, FrameType.COMPOSITE_OPENED, FrameType.ERROR},
    FrameType.ATTACH_UPLOAD: {
        FrameType.UPLOAD_OPENED,
        FrameType.COMPOSITE_OPENED,
        FrameType.ERROR,
    },
    FrameType.OPEN_SEGMENT: {FrameType.UPLOAD_OPENED, FrameType.ERROR},
    FrameType.WRITE_AT: {FrameType.ACK, FrameType.ERROR},
    FrameType.COMPLETE: {FrameType.COMPLETED, FrameType.INCOMPLETE, FrameType.ERROR},
    FrameType.ABORT: {FrameType.ACK, FrameType.ERROR},
    FrameType.STATUS_QUERY: {FrameType.STATUS, FrameType.ERROR},
    FrameType.PING: {FrameType.PONG, FrameType.ERROR},
    FrameType.PUT_OBJECT: {FrameType.COMPLETED, FrameType.ERROR},
    FrameType.COMPOSE: {FrameType.COMPLETED, FrameType.INCOMPLETE, FrameType.ERROR},
    FrameType.DISCARD: {FrameType.ACK, FrameType.ERROR},
}


def test_s4_a_write_at_is_never_answered_by_credit() -> None:
    client, server = bound()
    (start, _, _) = transfer(client, server, WriteAt(0, b"abc"))
    assert isinstance(start, WriteAtStart)
    with pytest.raises(LocalProtocolError, match="CREDIT cannot answer WRITE_AT"):
        server.send(Credit(start.seq, 0, WINDOW))
    client.receive_data(frame(FrameType.CREDIT, 3, struct.pack(">QQQ", 3, 0, WINDOW)))
    assert refused(client).code is ErrorCode.UNEXPECTED_FRAME


def test_s4_only_credit_error_and_going_away_come_unsolicited() -> None:
    client, server = bound()
    events = transfer(server, client, Credit(0, 0, WINDOW), Error(0, ErrorCode.ABORTED, False, "x"))
    assert [type(e) for e in events] == [Credit, Error]
    assert transfer(server, client, GoingAway(0, "bye")) == [GoingAway(0, "bye", seq=5)]
    for reply in (Ack(0, 0), Pong(0, 1), Status(0, 0, (), WINDOW)):
        with pytest.raises(LocalProtocolError, match="must answer a request"):
            server.send(reply)


# -- section 5: negotiation and frame size ---------------------------------------------------------


@pytest.mark.parametrize(
    ("client_versions", "server_versions", "agreed"),
    [(BOTH, BOTH, 2), (V1, BOTH, 1), (BOTH, V1, 1), (V1, V1, 1)],
)
def test_s5_welcome_picks_the_newest_version_both_speak(
    client_versions: tuple[int, ...], server_versions: tuple[int, ...], agreed: int
) -> None:
    client, server = pair(client_versions, server_versions)
    assert client.version == server.version == agreed


def test_s5_max_frame_size_is_the_smaller_and_bounds_data_not_payload() -> None:
    client = Connection(Role.CLIENT, max_frame_size=2048)
    server = Connection(Role.SERVER, max_frame_size=4096)
    (hello,) = transfer(client, server, client.hello())
    assert isinstance(hello, Hello)
    transfer(server, client, server.welcome(hello))
    assert client.max_frame_size == server.max_frame_size == 2048
    (request,) = transfer(client, server, OpenUpload("b", "o"))
    transfer(server, client, UploadOpened(request_seq(request), b"t", 0, False, WINDOW))
    wire = client.send_bytes(WriteAt(0, bytes(2048)))  # exactly max_frame_size data bytes
    assert len(wire) == HEADER_SIZE + 8 + 2048
    server.receive_data(wire)
    assert drain(server)[-1] == WriteAtEnd(3)
    with pytest.raises(LocalProtocolError, match="above max_frame_size"):
        client.send(WriteAt(0, bytes(2049)))


@pytest.mark.parametrize(
    "code",
    [
        ErrorCode.UNAUTHENTICATED,
        ErrorCode.TOO_BUSY,
        ErrorCode.TOO_MANY_CONNECTIONS,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.BAD_CRC,
    ],
)
def test_s5_every_refused_hello_ends_the_connection(code: ErrorCode) -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    (hello,) = transfer(client, server, client.hello())
    assert isinstance(hello, Hello)
    (error,) = transfer(server, client, Error(hello.seq, code, code.retryable, "no"))
    assert isinstance(error, Error)
    assert error.code is code  # a client offering version 2 is refused with version-2 codes
    assert client.state is server.state is S.ERROR
    with pytest.raises(LocalProtocolError, match="cannot send HELLO in state ERROR"):
        client.send(client.hello())
    # A server that read on anyway would find nothing legal.
    server.receive_data(frame(FrameType.PING, 2, bytes(8)))
    assert refused(server).code is ErrorCode.UNEXPECTED_FRAME


def test_s5_a_damaged_hello_is_refused_with_bad_crc_and_closes() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    wire = bytearray(client.send_bytes(client.hello()))
    wire[-1] ^= 0x01
    server.receive_data(bytes(wire))
    error = refused(server)  # fatal, not a PayloadCrcError
    assert (error.code, error.seq, error.retryable) == (ErrorCode.BAD_CRC, 1, True)
    assert server.state is S.ERROR
    transfer(server, client, Error.from_exception(error))
    assert client.state is S.ERROR


def test_s5_errors_before_welcome_use_the_version_the_hello_implies() -> None:
    code = ErrorCode.TOO_MANY_CONNECTIONS
    for offered, expected in ((BOTH, code), (V1, ErrorCode.TOO_BUSY)):
        client, server = Connection(Role.CLIENT, versions=offered), Connection(Role.SERVER)
        (hello,) = transfer(client, server, client.hello())
        (error,) = transfer(server, client, Error(request_seq(hello), code, True, "full"))
        assert isinstance(error, Error)
        assert error.code is expected
    # No Hello read yet (a refusal at accept, a handshake timeout): version-1 codes only.
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    client.send(client.hello())
    (error,) = transfer(server, client, Error(0, ErrorCode.HANDSHAKE_TIMEOUT, True, "slow"))
    assert isinstance(error, Error)
    assert error.code is ErrorCode.IDLE_TIMEOUT


# -- section 6: connection states ------------------------------------------------------------------

_WAITING = {S.NEGOTIATING, S.BINDING, S.COMPLETING, S.ABORTING}


def test_s6_only_ping_may_follow_a_blocking_request() -> None:
    for state in _WAITING:
        assert ALLOWED_REQUESTS[state] == {FrameType.PING}, state


def test_s6_ping_is_legal_in_every_state_a_blocking_reply_leads_to() -> None:
    for after in REPLY_TRANSITIONS.values():
        if after is not S.ERROR:
            assert FrameType.PING in ALLOWED_REQUESTS[after], after
    assert ALLOWED_REQUESTS[S.ERROR] == frozenset()


@pytest.mark.parametrize("segments", [1, 2])
@pytest.mark.parametrize("reply_first", [True, False])
def test_s6_hello_then_ping_gets_the_same_answer_however_the_bytes_arrive(
    segments: int, reply_first: bool
) -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    wire = client.send_bytes(client.hello()) + client.send_bytes(Ping(7))
    cuts = [wire] if segments == 1 else [wire[:40], wire[40:]]
    received: list[Event] = []
    welcome_sent = False
    for piece in cuts:
        server.receive_data(piece)
        while (event := server.next_event()) is not NEED_DATA:
            received.append(event)
            if isinstance(event, Hello) and reply_first:
                server.send(server.welcome(event))  # answered before the Ping is read...
                welcome_sent = True
    if not welcome_sent:  # ...or only after it (a server whose replies lag)
        hello = received[0]
        assert isinstance(hello, Hello)
        server.send(server.welcome(hello))
    server.send(Pong(2, 7))
    assert received == [replace(client.hello(), seq=1), Ping(7, seq=2)]
    assert server.state is S.IDLE


_REQUESTS: dict[FrameType, Request] = {
    FrameType.HELLO: Hello(BOTH, MIN_FRAME_SIZE),
    FrameType.OPEN_UPLOAD: OpenUpload("b", "o"),
    FrameType.ATTACH_UPLOAD: AttachUpload(b"t"),
    FrameType.OPEN_SEGMENT: OpenSegment(0, b"t"),
    FrameType.COMPLETE: Complete(0),
    FrameType.ABORT: Abort(),
}


def _reply(reply_type: FrameType, seq: int) -> Reply:
    replies: dict[FrameType, Reply] = {
        FrameType.WELCOME: Welcome(seq, 2, MIN_FRAME_SIZE),
        FrameType.ERROR: Error(seq, ErrorCode.TOO_BUSY, True, "no"),
        FrameType.UPLOAD_OPENED: UploadOpened(seq, b"t", 0, False, WINDOW),
        FrameType.COMPLETED: Completed(seq, 1, 0, 0, None),
        FrameType.INCOMPLETE: Incomplete(seq, 0, WINDOW, ((0, 1),)),
        FrameType.ACK: Ack(seq, 0),
        FrameType.COMPOSITE_OPENED: CompositeOpened(seq, b"t", 64 * WINDOW, 4),
    }
    return replies[reply_type]


@pytest.mark.parametrize(
    ("request_type", "reply_type", "after"),
    [(request, reply, after) for (request, reply), after in REPLY_TRANSITIONS.items()],
)
def test_s6_every_transition_of_the_table(
    request_type: FrameType, reply_type: FrameType, after: ConnectionState
) -> None:
    if request_type is FrameType.HELLO:
        client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    elif request_type in (FrameType.OPEN_UPLOAD, FrameType.ATTACH_UPLOAD, FrameType.OPEN_SEGMENT):
        client, server = pair(V3, V3)
    else:
        client, server = bound()
    (request,) = transfer(client, server, _REQUESTS[request_type])
    waiting = {FrameType.HELLO: S.NEGOTIATING, FrameType.COMPLETE: S.COMPLETING}.get(
        request_type, S.ABORTING if request_type is FrameType.ABORT else S.BINDING
    )
    assert states(client, server) == (waiting, waiting)
    transfer(server, client, _reply(reply_type, request_seq(request)))
    assert states(client, server) == (after, after)


def test_s6_a_request_illegal_in_the_state_is_unexpected_frame() -> None:
    _, server = pair()
    server.receive_data(frame(FrameType.COMPLETE, 2, bytes(9)))
    assert refused(server).code is ErrorCode.UNEXPECTED_FRAME


def test_s6_incomplete_returns_the_connection_to_bound() -> None:
    client, server = bound()
    (complete,) = transfer(client, server, Complete(10))
    assert states(client, server) == (S.COMPLETING, S.COMPLETING)
    transfer(server, client, Incomplete(request_seq(complete), 0, WINDOW, ((0, 10),)))
    assert states(client, server) == (S.BOUND, S.BOUND)


def test_s6_put_objects_are_pipelined_in_idle_and_change_no_state() -> None:
    client, server = pair()
    puts = transfer(client, server, PutObject("b", "o1", b"one"), PutObject("b", "o2", b"two"))
    assert states(client, server) == (S.IDLE, S.IDLE)
    (opened,) = transfer(client, server, OpenUpload("b", "big"))
    assert states(client, server) == (S.BINDING, S.BINDING)
    # Their replies may come in any order, in any state.
    for put in reversed(puts):
        transfer(server, client, Completed(request_seq(put), 1, 3, 0, None))
    transfer(server, client, UploadOpened(request_seq(opened), b"t", 0, False, WINDOW))
    assert states(client, server) == (S.BOUND, S.BOUND)
    assert client.requests_in_flight == server.requests_in_flight == 0


# -- section 7: errors -----------------------------------------------------------------------------


def test_s7_every_code_has_a_scope_and_a_retryability() -> None:
    for code in ErrorCode:
        assert isinstance(code.scope, Scope)
        assert isinstance(code.retryable, bool)
        assert code.spec is ERROR_SPECS[code]
    assert ErrorCode.MISSING_RANGES.retryable is False  # send the ranges, not the same request
    assert ErrorCode.BAD_CRC.scope is Scope.FRAME
    assert ErrorCode.OUTSIDE_CREDIT.scope is Scope.CONNECTION
    assert ErrorCode.CHECKSUM_MISMATCH.scope is Scope.UPLOAD


def test_s7_retryable_is_the_tables_except_where_it_is_per_reply() -> None:
    for code, spec in ERROR_SPECS.items():
        for claimed in (True, False):
            client, server = bound()
            (received,) = transfer(server, client, Error(0, code, claimed, "m"))
            assert isinstance(received, Error)
            assert received.retryable is (claimed if spec.retryable_per_reply else spec.retryable)


def test_s7_a_code_newer_than_the_client_travels_as_its_version_1_code() -> None:
    for code, spec in ERROR_SPECS.items():
        client, server = bound(version=1)
        (received,) = transfer(server, client, Error(0, code, spec.retryable, "m"))
        assert isinstance(received, Error)
        assert received.code is (code if spec.since == 1 else spec.fallback)
        client, server = bound(version=2)
        (received,) = transfer(server, client, Error(0, code, spec.retryable, "m"))
        assert isinstance(received, Error)
        assert received.code is code


def test_s7_messages_are_capped_and_control_characters_escaped() -> None:
    client, server = bound()
    name = "\x1b[31m" + "n" * 70_000  # would not even fit a text field
    (error,) = transfer(server, client, Error(0, ErrorCode.GCS_ERROR, False, f"bad name {name}"))
    assert isinstance(error, Error)
    assert error.message.startswith("bad name \\x1b[31mnnn")
    assert len(error.message.encode()) <= MAX_MESSAGE_SIZE
    (going,) = transfer(server, client, GoingAway(0, "bye\r\n" * 1000))
    assert isinstance(going, GoingAway)
    assert going.message.startswith("bye\\r\\nbye")
    assert len(going.message.encode()) <= MAX_MESSAGE_SIZE


def test_s7_bad_crc_fails_only_that_request() -> None:
    client, server = bound()
    wire = bytearray(client.send_bytes(WriteAt(0, b"abc")))
    wire[-1] ^= 0x01
    server.receive_data(bytes(wire) + client.send_bytes(Ping(1)))
    with pytest.raises(PayloadCrcError) as excinfo:
        drain(server)
    assert not isinstance(excinfo.value, RemoteProtocolError)
    assert (excinfo.value.code, excinfo.value.seq) == (ErrorCode.BAD_CRC, 3)
    assert drain(server) == [Ping(1, seq=4)]  # the stream goes on
    transfer(server, client, Error.from_exception(excinfo.value), Pong(4, 1))
    assert client.requests_in_flight == 0


def test_s7_a_damaged_reply_is_fatal_for_the_client() -> None:
    client, server = bound()
    transfer(client, server, Ping(1))
    wire = bytearray(server.send_bytes(Pong(3, 1)))
    wire[-1] ^= 0x01
    client.receive_data(bytes(wire))
    error = refused(client)
    assert error.code is ErrorCode.BAD_CRC
    assert client.state is S.ERROR


def test_s7_fatal_framing_errors_are_connection_scoped() -> None:
    for code in ErrorCode:
        if code.value < 16 and code is not ErrorCode.BAD_CRC:
            assert code.scope is Scope.CONNECTION, code


# -- section 8: credit -----------------------------------------------------------------------------


def test_s8_version_2_upload_opened_carries_the_first_window() -> None:
    client, _ = bound(version=2, window_end=5000)
    assert client.window == (0, 5000)


def test_s8_version_1_upload_opened_grants_nothing_until_credit() -> None:
    client, server = bound(version=1, window_end=5000)  # the server's window_end is left out
    assert client.window == (0, 0)
    transfer(server, client, Credit(0, 0, 5000))
    assert client.window == (0, 5000)


def test_s8_an_upload_opened_without_a_window_is_an_empty_one_in_version_2() -> None:
    client, server = pair()
    (request,) = transfer(client, server, OpenUpload("b", "o"))
    (opened,) = transfer(server, client, UploadOpened(request_seq(request), b"t", 7, False))
    assert isinstance(opened, UploadOpened)
    assert opened.window_end == 7


def test_s8_credit_comes_only_while_an_upload_is_bound() -> None:
    client, server = pair()
    with pytest.raises(LocalProtocolError, match="unsolicited CREDIT is not allowed in state IDLE"):
        server.send(Credit(0, 0, WINDOW))
    (request,) = transfer(client, server, OpenUpload("b", "o"))
    with pytest.raises(LocalProtocolError, match="not allowed in state BINDING"):
        server.send(Credit(0, 0, WINDOW))
    transfer(server, client, UploadOpened(request_seq(request), b"t", 0, False, WINDOW))
    transfer(server, client, Credit(0, 0, WINDOW))
    (complete,) = transfer(client, server, Complete(0))
    transfer(server, client, Credit(0, 0, WINDOW))  # still bound while completing
    transfer(server, client, Completed(request_seq(complete), 1, 0, 0, None))
    with pytest.raises(LocalProtocolError, match="not allowed in state IDLE"):
        server.send(Credit(0, 0, WINDOW))
    # A client refuses one all the same: it would be taken for the next upload's.
    client.receive_data(frame(FrameType.CREDIT, server.last_sent_seq + 1, bytes(24)))
    assert refused(client).code is ErrorCode.UNEXPECTED_FRAME


def test_s8_window_end_never_decreases_on_a_connection() -> None:
    client, server = bound(window_end=8000)
    transfer(client, server, StatusQuery())
    replies = transfer(
        server, client, Credit(0, 100, 9000), Status(3, 0, ((0, 50),), 4000), Credit(0, 50, 8500)
    )
    assert [(r.committed_offset, r.window_end) for r in replies] == [  # type: ignore[attr-defined]
        (100, 9000),
        (100, 9000),
        (100, 9000),
    ]
    assert client.window == server.window == (100, 9000)


@settings(max_examples=100, deadline=None)
@given(
    offers=st.lists(
        st.tuples(
            st.sampled_from(["credit", "status", "ack"]), st.integers(0, 1000), st.integers(0, 1000)
        ),
        max_size=12,
    )
)
def test_s8_no_frame_lowers_the_window_on_a_connection(offers: list[tuple[str, int, int]]) -> None:
    # However stale the values a server hands send(), the client never sees its window go down.
    client, server = bound(window_end=0)
    seen = [(0, 0)]
    for kind, committed, extra in offers:
        if kind == "credit":
            replies = transfer(server, client, Credit(0, committed, committed + extra))
        elif kind == "status":
            (query,) = transfer(client, server, StatusQuery())
            replies = transfer(
                server, client, Status(request_seq(query), committed, (), committed + extra)
            )
        else:
            (start, *_) = transfer(client, server, WriteAt(0, b"x"))
            replies = transfer(server, client, Ack(request_seq(start), committed))
        (reply,) = replies
        if isinstance(reply, Ack):
            seen.append((reply.committed_offset, seen[-1][1]))
        else:
            assert isinstance(reply, Credit | Status)
            seen.append((reply.committed_offset, reply.window_end))
    for before, after in itertools.pairwise(seen):
        assert after[0] >= before[0]
        assert after[1] >= before[1]
    assert client.window == server.window


def test_s8_a_new_binding_starts_its_own_window() -> None:
    client, server = bound(window_end=9000)
    (complete,) = transfer(client, server, Complete(0))
    transfer(server, client, Completed(request_seq(complete), 1, 0, 0, None))
    assert client.window is server.window is None
    (request,) = transfer(client, server, OpenUpload("b", "other"))
    transfer(server, client, UploadOpened(request_seq(request), b"t", 0, False, 1000))
    assert client.window == server.window == (0, 1000)


def test_s8_acks_never_lower_the_committed_offset() -> None:
    client, server = bound()
    starts = [
        e
        for e in transfer(client, server, WriteAt(0, b"a"), WriteAt(1, b"b"))
        if isinstance(e, WriteAtStart)
    ]
    first, second = (start.seq for start in starts)
    transfer(server, client, Ack(second, 600))
    (stale,) = transfer(server, client, Ack(first, 0))
    assert isinstance(stale, Ack)
    assert stale.committed_offset == 600


# -- section 9: uploads ----------------------------------------------------------------------------


def test_s9_status_lists_at_most_the_lowest_max_listed_ranges() -> None:
    client, server = bound()
    (query,) = transfer(client, server, StatusQuery())
    ranges = tuple((2 * i, 2 * i + 1) for i in range(MAX_LISTED_RANGES + 500))
    (status,) = transfer(server, client, Status(request_seq(query), 0, ranges, WINDOW))
    assert isinstance(status, Status)
    assert status.received == ranges[:MAX_LISTED_RANGES]


def test_s9_incomplete_lists_at_most_the_lowest_max_listed_ranges() -> None:
    client, server = bound()
    (complete,) = transfer(client, server, Complete(10**9))
    missing = tuple((3 * i, 3 * i + 2) for i in range(MAX_LISTED_RANGES * 5))
    (reply,) = transfer(server, client, Incomplete(request_seq(complete), 0, WINDOW, missing))
    assert isinstance(reply, Incomplete)
    assert reply.missing == missing[:MAX_LISTED_RANGES]


def test_s9_a_version_1_client_hears_of_missing_bytes_as_missing_ranges() -> None:
    client, server = bound(version=1)
    (complete,) = transfer(client, server, Complete(100))
    missing = tuple((10 * i, 10 * i + 5) for i in range(10))
    (reply,) = transfer(server, client, Incomplete(request_seq(complete), 0, WINDOW, missing))
    assert isinstance(reply, Error)
    assert (reply.code, reply.retryable) == (ErrorCode.MISSING_RANGES, False)
    assert reply.message == (
        "missing bytes [0, 5), [10, 15), [20, 25), [30, 35), [40, 45), [50, 55), [60, 65),"
        " [70, 75) and 2 more"
    )
    assert client.state is S.BOUND


# -- section 10: PUT_OBJECT ------------------------------------------------------------------------


def test_s10_put_object_carries_a_whole_object_and_is_answered_completed() -> None:
    client, server = pair()
    put = PutObject("b", "o", b"hello", "text/plain", (("k", "v"),), 0, 0x9A71BB4C)
    (received,) = transfer(client, server, put)
    assert received == replace(put, seq=2)
    (done,) = transfer(server, client, Completed(2, 17, 5, 0x9A71BB4C, None))
    assert done == Completed(2, 17, 5, 0x9A71BB4C, None, seq=1 + 1)


def test_s10_put_object_data_is_at_most_max_frame_size() -> None:
    client, server = pair()
    with pytest.raises(LocalProtocolError, match="upload it with OpenUpload"):
        client.send(PutObject("b", "o", bytes(client.max_frame_size + 1)))
    client.send(PutObject("b", "o", bytes(client.max_frame_size)))
    oversized = put_object_body(bytes(server.max_frame_size + 1))
    server.receive_data(frame(FrameType.PUT_OBJECT, 2, oversized))
    assert refused(server).code is ErrorCode.FRAME_TOO_LARGE
    # ...and a payload above max_frame_size plus the fields' limit is refused from the header.
    _, server = pair()
    size = MAX_CONTROL_BODY_SIZE + server.max_frame_size + 1
    server.receive_data(frame(FrameType.PUT_OBJECT, 2, b"", payload_size=size))
    assert refused(server).code is ErrorCode.FRAME_TOO_LARGE


def test_s10_put_object_needs_version_2() -> None:
    client, _ = pair(V1)
    with pytest.raises(LocalProtocolError, match="PUT_OBJECT needs protocol version 2"):
        client.send(PutObject("b", "o", b"x"))


# -- section 11: going away ------------------------------------------------------------------------


@pytest.mark.parametrize("state", [S.IDLE, S.BOUND, S.COMPLETING])
def test_s11_going_away_may_come_in_any_state(state: ConnectionState) -> None:
    client, server = bound()
    if state is S.IDLE:
        client, server = pair()
    elif state is S.COMPLETING:
        transfer(client, server, Complete(0))
    (going,) = transfer(server, client, GoingAway(0, "bye"))
    assert isinstance(going, GoingAway)
    assert client.state is server.state is state


def test_s11_a_stream_that_ends_inside_a_frame_is_truncated() -> None:
    client, server = pair()
    events, error = decode_all(server, client.send_bytes(Ping(1))[:-1])
    assert events == []
    assert error is not None
    assert error.code is ErrorCode.MALFORMED_FRAME
    assert error.message.startswith("truncated PING frame")


# -- properties across sections: the same bytes, the same answers ----------------------------------


@dataclass(frozen=True)
class Conversation:
    """A legal conversation, as the server's side sees it.

    `to_server` is every frame the client sent; `after_replies[k]` is how many replies the
    client had received when it sent frame k (so those replies caused it, and a server must have
    sent them before it reads frame k); `answers` is what the server decided for each request
    (keyed by its seq), `refused_hello` whether it refused the Hello and stopped reading.
    """

    client_versions: tuple[int, ...]
    server_versions: tuple[int, ...]
    to_server: bytes
    frame_ends: tuple[int, ...]
    after_replies: tuple[int, ...]
    reply_order: tuple[int, ...]
    answers: dict[int, Reply]
    events: tuple[object, ...]
    replies: tuple[bytes, ...]


def _answer(event: object, server: Connection, choice: int) -> Reply:
    """A server's deterministic answer to `event` (a request, or a WriteAtEnd)."""
    seq = request_seq(event)
    match event:
        case Hello():
            if choice % 5 == 0:
                return Error(seq, ErrorCode.UNAUTHENTICATED, False, "bearer token not accepted")
            return server.welcome(event)
        case OpenUpload() | AttachUpload():
            if choice % 4 == 0:
                return Error(seq, ErrorCode.TOO_BUSY, True, "no budget")
            return UploadOpened(seq, b"token", 0, False, WINDOW)
        case WriteAtEnd():
            return Ack(seq, 0)
        case StatusQuery():
            return Status(seq, 0, ((0, 10),), WINDOW)
        case Complete():
            if choice % 3 == 0:
                return Incomplete(seq, 0, WINDOW, ((0, 10),))
            return Completed(seq, 1, 10, 0, None)
        case Abort():
            return Ack(seq, 0)
        case Ping(nonce=nonce):
            return Pong(seq, nonce)
        case PutObject(data=data):
            return Completed(seq, 1, len(data), 0, None)
    raise AssertionError(event)


def _request(state: ConnectionState, client: Connection, choice: int) -> Request | None:
    options: dict[ConnectionState, list[Callable[[], Request]]] = {
        S.AWAIT_HELLO: [client.hello],
        S.NEGOTIATING: [lambda: Ping(choice)],
        S.IDLE: [
            lambda: OpenUpload("b", f"o{choice}"),
            lambda: AttachUpload(b"token"),
            lambda: Ping(choice),
        ]
        + ([lambda: PutObject("b", "small", bytes(choice % 50))] if client.version == 2 else []),
        S.BOUND: [
            lambda: WriteAt(choice % 1000, bytes(choice % 300)),
            StatusQuery,
            lambda: Complete(10),
            Abort,
            lambda: Ping(choice),
        ],
    }
    for waiting in (S.BINDING, S.COMPLETING, S.ABORTING):
        options[waiting] = [lambda: Ping(choice)]
    makers = options.get(state)
    return makers[choice % len(makers)]() if makers else None


@st.composite
def conversations(draw: st.DrawFn) -> Conversation:
    client_versions = draw(st.sampled_from([V1, BOTH]))
    server_versions = draw(st.sampled_from([V1, BOTH]))
    client = Connection(Role.CLIENT, max_frame_size=MIN_FRAME_SIZE, versions=client_versions)
    server = Connection(Role.SERVER, max_frame_size=MIN_FRAME_SIZE, versions=server_versions)
    to_server = bytearray()
    ends: list[int] = []
    after: list[int] = []
    answers: dict[int, Reply] = {}
    order: list[int] = []
    in_flight_to_client: list[bytes] = []
    replies: list[bytes] = []
    delivered = 0
    events: list[object] = []
    for _ in range(draw(st.integers(1, 30))):
        deliver: bool = draw(st.booleans())
        if deliver and in_flight_to_client:
            client.receive_data(in_flight_to_client.pop(0))
            drain(client)
            delivered += 1
            continue
        request = _request(client.state, client, draw(st.integers(0, 10**6)))
        if request is None:
            break
        wire = client.send_bytes(request)
        to_server += wire
        ends.append(len(to_server))
        after.append(delivered)
        if server.state is S.ERROR:
            continue  # the server refused the Hello and reads nothing more
        server.receive_data(wire)
        for event in merge_writes(drain(server)):
            events.append(event)
            original = event
            if not isinstance(event, Request):  # a WriteAt, folded
                original = WriteAtEnd(request_seq(event))
            reply = _answer(original, server, draw(st.integers(0, 100)))
            answers[request_seq(event)] = reply
            order.append(request_seq(event))
            in_flight_to_client.append(server.send_bytes(reply))
            replies.append(in_flight_to_client[-1])
    return Conversation(
        client_versions,
        server_versions,
        bytes(to_server),
        tuple(ends),
        tuple(after),
        tuple(order),
        answers,
        tuple(events),
        tuple(replies),
    )


def _replay(conversation: Conversation, cuts: list[int], lags: list[int]) -> Replayed:
    """Feed the client's bytes to a fresh server in the pieces `cuts` makes, the server deciding
    each request as it reads it but sending its replies late, as `lags` says: never later than
    the client could have sent a frame that depends on one (its reply was what caused it)."""
    server = Connection(
        Role.SERVER, max_frame_size=MIN_FRAME_SIZE, versions=conversation.server_versions
    )
    pending: list[Reply] = []
    sent: list[bytes] = []
    events: list[Event] = []
    lag = itertools.cycle(lags)
    frames_read = 0
    stopped = False

    def send(reply: Reply) -> None:
        pending.remove(reply)
        sent.append(server.send_bytes(reply))

    stream = conversation.to_server
    for start, end in itertools.pairwise([0, *cuts, len(stream)]):
        server.receive_data(stream[start:end])
        while not stopped:
            if frames_read < len(conversation.after_replies):
                due = set(conversation.reply_order[: conversation.after_replies[frames_read]])
                for reply in [r for r in pending if r.reply_to in due]:
                    send(reply)
            for _ in range(min(next(lag), len(pending))):  # a few go now, any of them
                send(pending[next(lag) % len(pending)])
            event = server.next_event()
            if event is NEED_DATA:
                break
            events.append(event)
            if isinstance(event, Request | WriteAtStart):
                frames_read += 1
            if isinstance(event, Request | WriteAtEnd):
                reply = conversation.answers[request_seq(event)]
                pending.append(reply)
                if isinstance(event, Hello) and isinstance(reply, Error):
                    send(reply)  # a server that refuses a Hello reads nothing more
                    stopped = True
    while pending:
        send(pending[next(lag) % len(pending)])
    return Replayed(tuple(merge_writes(events)), tuple(sent))


@dataclass(frozen=True)
class Replayed:
    events: tuple[object, ...]
    replies: tuple[bytes, ...]


def _without_seq(replies: tuple[bytes, ...]) -> list[bytes]:
    """Reply frames as a multiset, blind to the seq each got from the order it was sent in."""
    return sorted(wire[5:6] + wire[HEADER_SIZE:] for wire in replies)


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _cuts(stream: bytes, data: st.DataObject) -> list[int]:
    """Where to split `stream` into segments: anywhere, a byte or a whole frame apart."""
    cuts = data.draw(st.sets(st.integers(1, max(1, len(stream) - 1)), max_size=25))
    return sorted(cut for cut in cuts if cut < len(stream))


@PROPERTY
@given(conversation=conversations(), data=st.data())
def test_s6_the_same_bytes_get_the_same_answers_whatever_their_segmentation(
    conversation: Conversation, data: st.DataObject
) -> None:
    replayed = _replay(conversation, _cuts(conversation.to_server, data), [0])
    assert replayed.events == conversation.events
    assert replayed.replies == conversation.replies  # byte for byte, in the same order


@PROPERTY
@given(conversation=conversations(), data=st.data())
def test_s6_the_same_bytes_get_the_same_answers_however_late_the_replies_are(
    conversation: Conversation, data: st.DataObject
) -> None:
    lags = data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=40))
    replayed = _replay(conversation, _cuts(conversation.to_server, data), lags)
    assert replayed.events == conversation.events
    assert _without_seq(replayed.replies) == _without_seq(conversation.replies)


# -- section 13: the walkthrough, as printed ------------------------------------------------------


def test_s13_the_whole_upload_in_the_spec_runs_as_printed() -> None:
    mib = 1024 * 1024
    # The walkthrough is a version-2 conversation (a version-3 one reads the same).
    client, server = Connection(Role.CLIENT, versions=BOTH), Connection(Role.SERVER)
    hello, ping = transfer(client, server, client.hello(auth="s3cret"), Ping(7))  # 1, 2
    assert (request_seq(hello), request_seq(ping)) == (1, 2)
    assert isinstance(hello, Hello)
    replies = transfer(server, client, server.welcome(hello), Pong(2, 7))  # 3, 4
    assert [(type(r), request_seq(r)) for r in replies] == [(Welcome, 1), (Pong, 2)]
    assert states(client, server) == (S.IDLE, S.IDLE)
    assert client.version == 2
    (opened,) = transfer(client, server, OpenUpload("b", "o", expected_size=11))  # 5
    assert request_seq(opened) == 3
    transfer(server, client, UploadOpened(3, b"token", 0, False, 32 * mib))  # 6
    assert client.window == (0, 32 * mib)
    transfer(server, client, Credit(0, 0, 32 * mib))  # 7
    good = client.send_bytes(WriteAt(0, b"hello "))  # 8
    damaged = bytearray(client.send_bytes(WriteAt(6, b"world")))  # 9
    damaged[-1] ^= 0x20
    server.receive_data(good + bytes(damaged))
    with pytest.raises(PayloadCrcError) as excinfo:
        drain(server)
    assert excinfo.value.seq == 5
    replies = transfer(server, client, Ack(4, 0), Error.from_exception(excinfo.value))  # 10, 11
    assert [request_seq(r) for r in replies] == [5, 6]
    (resend,) = merge_writes(transfer(client, server, WriteAt(6, b"world")))  # 12
    assert request_seq(resend) == 6
    transfer(server, client, Ack(6, 0))  # 13
    (complete,) = transfer(client, server, Complete(11, 0x1234))  # 14
    assert request_seq(complete) == 7
    (done,) = transfer(server, client, Completed(7, 1, 11, 0x1234, bytes(16)))  # 15
    assert request_seq(done) == 8
    assert states(client, server) == (S.IDLE, S.IDLE)
    assert client.requests_in_flight == server.requests_in_flight == 0


# -- section 14: composite uploads (version 3) -----------------------------------------------------


def test_s14_a_composite_open_binds_nothing_and_segments_bind_one_by_one() -> None:
    client, server = pair(V3, V3)
    (opened,) = transfer(client, server, OpenUpload("b", "o", expected_size=200 << 20))
    transfer(server, client, CompositeOpened(request_seq(opened), b"T", 64 << 20, 4))
    assert (*states(client, server), client.window) == (S.IDLE, S.IDLE, None)
    (segment,) = transfer(client, server, OpenSegment(3, b"T"))
    assert segment == OpenSegment(3, b"T", seq=3)
    assert states(client, server) == (S.BINDING, S.BINDING)
    transfer(server, client, UploadOpened(request_seq(segment), b"T3", 0, False, WINDOW))
    assert states(client, server) == (S.BOUND, S.BOUND)
    assert client.window == (0, WINDOW)
    (done,) = transfer(client, server, Complete(8 << 20, 0x1234))
    transfer(server, client, Completed(request_seq(done), 7, 8 << 20, 0x1234, None))
    # COMPOSE and DISCARD are pipelined in IDLE, like PUT_OBJECT; INCOMPLETE changes nothing.
    compose, discard = transfer(client, server, Compose(200 << 20, 9, b"T"), Discard(b"T"))
    transfer(server, client, Incomplete(request_seq(compose), 0, 0, ((64 << 20, 128 << 20),)))
    transfer(server, client, Ack(request_seq(discard), 0))
    assert states(client, server) == (S.IDLE, S.IDLE)


def test_s14_version_3_frames_are_unknown_to_a_version_2_peer() -> None:
    client, server = pair(BOTH, V3)
    assert client.version == server.version == 2
    with pytest.raises(LocalProtocolError, match="OPEN_SEGMENT needs protocol version 3"):
        client.send(OpenSegment(0, b"T"))
    server.receive_data(
        frame(FrameType.COMPOSE, 2, body(FrameType.COMPOSE, total_size=1, crc32c=None, token=b"T"))
    )
    assert refused(server).code is ErrorCode.UNKNOWN_FRAME_TYPE


def test_s14_single_session_is_on_the_wire_only_in_version_3() -> None:
    wish = OpenUpload("b", "o", expected_size=1, single_session=True)
    plain = OpenUpload("b", "o", expected_size=1)
    assert (
        pair(BOTH, V3)[0].send_bytes(wish)[HEADER_SIZE:]
        == (pair(BOTH, V3)[0].send_bytes(plain)[HEADER_SIZE:])
    )
    three, server = pair(V3, V3)
    (received,) = transfer(three, server, wish)
    assert isinstance(received, OpenUpload)
    assert received.single_session is True


@pytest.mark.parametrize(("segment_size", "parallel"), [(0, 4), (100_000, 4), (1 << 20, 0)])
def test_s14_composite_opened_value_rules(segment_size: int, parallel: int) -> None:
    client, server = pair(V3, V3)
    (opened,) = transfer(client, server, OpenUpload("b", "o", expected_size=1 << 30))
    reply = body(
        FrameType.COMPOSITE_OPENED,
        reply_to=request_seq(opened),
        segment_size=segment_size,
        parallel_segments=parallel,
        token=b"T",
    )
    client.receive_data(frame(FrameType.COMPOSITE_OPENED, 2, reply))
    assert refused(client).code is ErrorCode.MALFORMED_FRAME
