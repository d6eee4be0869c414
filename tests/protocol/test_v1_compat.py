"""Version 1 keeps working unchanged: today's codec, with version 1 negotiated, puts on the wire
exactly the bytes the version-1 codec did (recorded in v1_transcript.json), reads them back as
the same events, and turns version-2 replies into what a version-1 peer understands."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from protocol import (
    PROTOCOL_VERSION,
    Complete,
    Connection,
    ConnectionState,
    Error,
    ErrorCode,
    Event,
    Incomplete,
    LocalProtocolError,
    OpenUpload,
    PutObject,
    RemoteProtocolError,
    Reply,
    Request,
    Role,
    UploadOpened,
    WriteAt,
)
from protocol._spec import FrameType
from tests.protocol.helpers import (
    ReceivedWrite,
    drain,
    frame,
    merge_writes,
    put_object_body,
    request_seq,
    transfer,
)
from tests.protocol.v1_conversation import (
    CONVERSATION,
    HELLO_OFFERING_1_AND_2,
    TRANSCRIPT,
    WELCOME_TO_1_AND_2,
)

RECORDED = json.loads(TRANSCRIPT.read_text())
V1 = (PROTOCOL_VERSION,)


def _numbered(conversation: tuple[tuple[str, Event], ...]) -> list[tuple[str, Event, int]]:
    """Each step with the seq its frame carries in its direction."""
    counters = {"client": 0, "server": 0}
    steps = []
    for sender, event in conversation:
        counters[sender] += 1
        steps.append((sender, event, counters[sender]))
    return steps


def _decoded(receiver: Connection, wire: bytes) -> object:
    receiver.receive_data(wire)
    (event,) = merge_writes(drain(receiver))
    return event


def _expected(event: Event, seq: int) -> object:
    if isinstance(event, WriteAt):
        return ReceivedWrite(seq, event.offset, bytes(event.data))
    assert isinstance(event, Request | Reply)
    return replace(event, seq=seq)


@pytest.mark.parametrize("server_versions", [V1, (1, 2)])
def test_a_version_1_client_is_served_byte_for_byte(server_versions: tuple[int, ...]) -> None:
    # A server that speaks both versions meets a client that offers only version 1.
    server = Connection(Role.SERVER, max_frame_size=64 * 1024, versions=server_versions)
    steps = _numbered(CONVERSATION)
    for (sender, event, seq), recorded in zip(steps, RECORDED["conversation"], strict=True):
        wire = bytes.fromhex(recorded)
        if sender == "client":
            assert _decoded(server, wire) == _expected(event, seq)
        else:
            assert server.send_bytes(event) == wire, event
    assert server.version == 1


def test_a_version_1_only_client_speaks_exactly_as_before() -> None:
    client = Connection(Role.CLIENT, max_frame_size=64 * 1024, versions=V1)
    for (sender, event, seq), recorded in zip(
        _numbered(CONVERSATION), RECORDED["conversation"], strict=True
    ):
        wire = bytes.fromhex(recorded)
        if sender == "client":
            assert client.send_bytes(event) == wire, event
        else:
            assert _decoded(client, wire) == _expected(event, seq)
    assert client.state is ConnectionState.IDLE


def test_a_version_2_client_is_welcomed_at_version_1_by_a_version_1_server() -> None:
    client = Connection(Role.CLIENT, max_frame_size=64 * 1024, versions=(1, 2))
    hello = client.hello(client_name=HELLO_OFFERING_1_AND_2.client_name)
    assert hello.versions == (1, 2)
    assert client.send_bytes(hello).hex() == RECORDED["hello_offering_1_and_2"]
    welcome = _decoded(client, bytes.fromhex(RECORDED["welcome_to_1_and_2"]))
    assert welcome == replace(WELCOME_TO_1_AND_2, seq=1)
    assert client.version == 1
    # From there on it speaks version 1, byte for byte, and cannot send what version 1 lacks.
    with pytest.raises(LocalProtocolError, match="PUT_OBJECT needs protocol version 2"):
        client.send(PutObject("bkt", "obj", b"data"))
    steps = list(zip(_numbered(CONVERSATION), RECORDED["conversation"], strict=True))[2:]
    for (sender, event, seq), recorded in steps:
        wire = bytes.fromhex(recorded)
        if sender == "client":
            assert client.send_bytes(event) == wire, event
        else:
            assert _decoded(client, wire) == _expected(event, seq)


def test_version_2_replies_are_fitted_to_a_version_1_client() -> None:
    client = Connection(Role.CLIENT, versions=V1)
    server = Connection(Role.SERVER)
    (hello,) = transfer(client, server, client.hello())
    transfer(server, client, server.welcome(hello))  # type: ignore[arg-type]
    assert server.version == client.version == 1
    (opened,) = transfer(client, server, OpenUpload("b", "o"))
    # The initial window does not exist in version 1's UPLOAD_OPENED: it is left out.
    (reply,) = transfer(server, client, UploadOpened(request_seq(opened), b"tok", 0, False, 4096))
    assert reply == UploadOpened(2, b"tok", 0, False, None, seq=2)
    # INCOMPLETE becomes version 1's MISSING_RANGES error, the ranges in its message.
    complete_seq = client.last_sent_seq + 1
    transfer(client, server, Complete(11))
    (reply,) = transfer(server, client, Incomplete(complete_seq, 0, 4096, ((0, 5), (7, 11))))
    assert reply == Error(
        complete_seq, ErrorCode.MISSING_RANGES, False, "missing bytes [0, 5), [7, 11)", seq=3
    )
    assert client.state is server.state is ConnectionState.BOUND
    # Codes version 1 does not define travel as the code that stands in for them.
    (reply,) = transfer(server, client, Error(0, ErrorCode.FRAGMENT_LIMIT, True, "too many"))
    assert isinstance(reply, Error)
    assert reply.code is ErrorCode.TOO_BUSY


def test_a_version_1_server_refuses_version_2_frames_as_unknown() -> None:
    # The version-1 codec did not know frame type 0x09 at all: the same code today.
    server = Connection(Role.SERVER, versions=V1)
    client = Connection(Role.CLIENT, versions=V1)
    (hello,) = transfer(client, server, client.hello())
    transfer(server, client, server.welcome(hello))  # type: ignore[arg-type]
    server.receive_data(frame(FrameType.PUT_OBJECT, 2, put_object_body(b"x")))
    with pytest.raises(RemoteProtocolError) as excinfo:
        server.next_event()
    assert excinfo.value.code is ErrorCode.UNKNOWN_FRAME_TYPE
    assert excinfo.value.seq == 2  # the frame's seq was the expected one: the Error names it
