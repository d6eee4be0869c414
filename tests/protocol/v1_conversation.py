"""A whole version-1 conversation, and the bytes the version-1 codec put on the wire for it.

`v1_transcript.json` was written by running this module (`python -m
tests.protocol.v1_conversation`) against the protocol package as it was before version 2 existed
(commit 80869fb), so it is the version-1 wire format as deployed clients and servers speak it.
test_v1_compat replays it against today's codec: with version 1 negotiated, both ends must put
exactly these bytes on the wire and read them back as the same events.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

from protocol import (
    NEED_DATA,
    Abort,
    Ack,
    AttachUpload,
    Complete,
    Completed,
    Connection,
    Credit,
    Error,
    ErrorCode,
    Event,
    GoingAway,
    Hello,
    OpenUpload,
    Ping,
    Pong,
    Role,
    Status,
    StatusQuery,
    UploadOpened,
    Welcome,
    WriteAt,
)
from protocol._spec import FrameType
from tests.protocol.helpers import body, frame

__all__ = ["CONVERSATION", "HELLO_OFFERING_1_AND_2", "TRANSCRIPT", "WELCOME_TO_1_AND_2"]

TRANSCRIPT: Final = Path(__file__).with_name("v1_transcript.json")

CONVERSATION: Final[tuple[tuple[str, Event], ...]] = (
    # (who sends it, the event); "client" events go client -> server.
    ("client", Hello((1,), 64 * 1024, auth="s3cret", client_name="v1-client")),
    ("server", Welcome(1, 1, 64 * 1024, "v1-server")),
    ("client", OpenUpload("bkt", "obj", "text/plain", (("k", "v"),), 11, 0)),
    ("server", UploadOpened(2, b"token", 0, False)),
    ("server", Credit(0, 0, 1 << 20)),
    ("client", WriteAt(0, b"hello ")),
    ("client", WriteAt(6, b"world")),
    ("client", StatusQuery()),
    ("client", Ping(42)),
    ("server", Ack(3, 0)),
    ("server", Pong(6, 42)),
    ("server", Status(5, 0, ((0, 11),), 1 << 20)),
    ("server", Ack(4, 0)),
    ("client", Complete(11, 0x1234)),
    ("server", Error(7, ErrorCode.MISSING_RANGES, False, "missing [5, 6)")),
    ("client", WriteAt(5, b" ")),
    ("server", Ack(8, 0)),
    ("client", Complete(11, 0x1234)),
    ("server", Completed(9, 1700000000000000, 11, 0x1234, bytes(range(16)))),
    ("client", AttachUpload(b"token")),
    ("server", UploadOpened(10, b"token", 11, True)),
    ("server", Credit(0, 11, 11 + (1 << 20))),
    ("client", Abort()),
    ("server", Ack(11, 0)),
    ("client", Ping(7)),
    ("server", GoingAway(0, "server shutting down")),
    ("server", Pong(12, 7)),
    ("server", Error(0, ErrorCode.IDLE_TIMEOUT, True, "connection idle for too long")),
)

HELLO_OFFERING_1_AND_2: Final = Hello((1, 2), 64 * 1024, auth="", client_name="v2-client")
"""What a version-2 client opens with; the transcript holds the version-1 server's answer."""
WELCOME_TO_1_AND_2: Final = Welcome(1, 1, 64 * 1024, "v1-server")


def _record() -> dict[str, object]:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    frames: list[str] = []
    for sender, event in CONVERSATION:
        source, sink = (client, server) if sender == "client" else (server, client)
        wire = source.send_bytes(event)
        frames.append(wire.hex())
        sink.receive_data(wire)
        while sink.next_event() is not NEED_DATA:
            pass
    # A version-2 client's Hello, built by hand (this codec cannot send it) and answered.
    hello = frame(
        FrameType.HELLO,
        1,
        body(
            FrameType.HELLO,
            versions=list(HELLO_OFFERING_1_AND_2.versions),
            max_frame_size=HELLO_OFFERING_1_AND_2.max_frame_size,
            auth=HELLO_OFFERING_1_AND_2.auth,
            client_name=HELLO_OFFERING_1_AND_2.client_name,
        ),
    )
    old_server = Connection(Role.SERVER)
    old_server.receive_data(hello)
    received = old_server.next_event()
    assert isinstance(received, Hello), received
    welcome = old_server.welcome(received, server_name="v1-server")
    assert welcome == WELCOME_TO_1_AND_2, welcome
    return {
        "conversation": frames,
        "hello_offering_1_and_2": hello.hex(),
        "welcome_to_1_and_2": old_server.send_bytes(welcome).hex(),
    }


if __name__ == "__main__":
    TRANSCRIPT.write_text(json.dumps(_record(), indent=1) + "\n")
    print(f"wrote {TRANSCRIPT}")
