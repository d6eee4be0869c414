"""rup's wire protocol: a sans-IO codec for the framed binary protocol in docs/protocol.md.

Nothing here does I/O. A server loop looks like::

    conn = Connection(Role.SERVER)
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            conn.receive_data(await stream.receive_some())  # b"" at EOF
            continue
        ...  # handle the event; answer requests with conn.send(reply)

`Connection.send()` returns buffers to write in order (for WriteAt, the caller's data
itself, uncopied); `Connection.last_sent_seq` is the seq that the reply will carry in
`reply_to`. Received WriteAt payload arrives as WriteAtStart, WriteAtData (views into the
received buffers) and WriteAtEnd once its CRC32C verified.

Protocol versions 1, 2 and 3 (`SUPPORTED_VERSIONS`) are negotiated by Hello and Welcome; a server
builds its replies the same way for all, and `send()` fits them to the client's version (see
`Connection.send`). `ERROR_SPECS` says what every `ErrorCode` means.
"""

from crcmath import crc32c_combine, crc32c_of_suffix

from ._spec import MAGIC, FrameType
from ._state import ConnectionState
from .connection import (
    DEFAULT_MAX_FRAME_SIZE,
    FRAMING_VERSION,
    HARD_MAX_FRAME_SIZE,
    LATEST_VERSION,
    MAX_CONTROL_BODY_SIZE,
    MAX_LISTED_RANGES,
    MAX_MESSAGE_SIZE,
    MAX_TOKEN_SIZE,
    MIN_FRAME_SIZE,
    PROTOCOL_VERSION,
    SEGMENT_QUANTUM,
    SUPPORTED_VERSIONS,
    Connection,
    IncomingFrame,
    Role,
)
from .errors import (
    ERROR_SPECS,
    ErrorCode,
    ErrorSpec,
    LocalProtocolError,
    PayloadCrcError,
    ProtocolError,
    RemoteProtocolError,
    Scope,
    error_spec,
)
from .events import (
    NEED_DATA,
    Abort,
    Ack,
    AttachUpload,
    Complete,
    Completed,
    Compose,
    CompositeOpened,
    ConnectionClosed,
    Credit,
    Discard,
    Error,
    Event,
    GoingAway,
    Hello,
    Incomplete,
    NeedData,
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
    WriteAtData,
    WriteAtEnd,
    WriteAtStart,
)

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "ERROR_SPECS",
    "FRAMING_VERSION",
    "HARD_MAX_FRAME_SIZE",
    "LATEST_VERSION",
    "MAGIC",
    "MAX_CONTROL_BODY_SIZE",
    "MAX_LISTED_RANGES",
    "MAX_MESSAGE_SIZE",
    "MAX_TOKEN_SIZE",
    "MIN_FRAME_SIZE",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "SEGMENT_QUANTUM",
    "SUPPORTED_VERSIONS",
    "Abort",
    "Ack",
    "AttachUpload",
    "Complete",
    "Completed",
    "Compose",
    "CompositeOpened",
    "Connection",
    "ConnectionClosed",
    "ConnectionState",
    "Credit",
    "Discard",
    "Error",
    "ErrorCode",
    "ErrorSpec",
    "Event",
    "FrameType",
    "GoingAway",
    "Hello",
    "IncomingFrame",
    "Incomplete",
    "LocalProtocolError",
    "NeedData",
    "OpenSegment",
    "OpenUpload",
    "PayloadCrcError",
    "Ping",
    "Pong",
    "ProtocolError",
    "PutObject",
    "RemoteProtocolError",
    "Reply",
    "Request",
    "Role",
    "Scope",
    "Status",
    "StatusQuery",
    "UploadOpened",
    "Welcome",
    "WriteAt",
    "WriteAtData",
    "WriteAtEnd",
    "WriteAtStart",
    "crc32c_combine",
    "crc32c_of_suffix",
    "error_spec",
]
