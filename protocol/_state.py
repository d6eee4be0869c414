"""The connection state machine, as tables.

Both ends run the same machine over the same frames: the client feeds it the requests it sends
and the replies it receives, the server the requests it receives and the replies it sends.

Requests are either *blocking* (Hello, OpenUpload, AttachUpload, OpenSegment, Complete, Abort: the
client sends nothing but Ping until the reply arrives) or *pipelined* (WriteAt, StatusQuery, Ping,
PutObject, Compose, Discard: any number may be in flight). Only blocking requests and their replies
change the state, and while one is in flight the only other request is Ping, which is legal both in
the waiting state and in every state its reply can lead to (but ERROR, where the connection ends).
So the two ends never disagree about the state, however requests and replies cross on the wire, and
a server decides every request the same way whether or not it has sent the blocking reply yet: the
answer never depends on how the bytes were split into segments.

Every table here is the same for all protocol versions; a frame type a version does not know
(`_spec.FIRST_VERSION`) is refused before these tables are consulted.
"""

from __future__ import annotations

import enum
from typing import Final

from ._spec import FrameType

__all__ = [
    "ALLOWED_REPLIES",
    "ALLOWED_REQUESTS",
    "REPLY_TRANSITIONS",
    "REQUEST_TRANSITIONS",
    "UNSOLICITED_REPLIES",
    "UPLOAD_BOUND",
    "ConnectionState",
]


class ConnectionState(enum.Enum):
    AWAIT_HELLO = "AWAIT_HELLO"
    """Nothing sent yet: the client must open with Hello."""
    NEGOTIATING = "NEGOTIATING"
    """Hello in flight, waiting for Welcome (or an Error, which ends the connection)."""
    IDLE = "IDLE"
    """Negotiated, no upload bound to this connection."""
    BINDING = "BINDING"
    """OpenUpload or AttachUpload in flight."""
    BOUND = "BOUND"
    """An upload is bound: writes, status queries, Complete and Abort are allowed."""
    COMPLETING = "COMPLETING"
    """Complete in flight: Completed unbinds, an Error returns to BOUND."""
    ABORTING = "ABORTING"
    """Abort in flight: any reply unbinds."""
    ERROR = "ERROR"
    """The connection is over: a fatal protocol error happened, or Hello was refused. Only an
    Error (or GoingAway) may still be sent; then the server closes."""


_S = ConnectionState
_T = FrameType

ALLOWED_REQUESTS: Final[dict[ConnectionState, frozenset[FrameType]]] = {
    _S.AWAIT_HELLO: frozenset({_T.HELLO}),
    _S.NEGOTIATING: frozenset({_T.PING}),
    _S.IDLE: frozenset(
        {
            _T.OPEN_UPLOAD,
            _T.ATTACH_UPLOAD,
            _T.OPEN_SEGMENT,
            _T.PUT_OBJECT,
            _T.COMPOSE,
            _T.DISCARD,
            _T.PING,
        }
    ),
    _S.BINDING: frozenset({_T.PING}),
    _S.BOUND: frozenset({_T.WRITE_AT, _T.COMPLETE, _T.ABORT, _T.STATUS_QUERY, _T.PING}),
    _S.COMPLETING: frozenset({_T.PING}),
    _S.ABORTING: frozenset({_T.PING}),
    _S.ERROR: frozenset(),
}
"""Which requests the client may send in each state."""

REQUEST_TRANSITIONS: Final[dict[FrameType, ConnectionState]] = {
    _T.HELLO: _S.NEGOTIATING,
    _T.OPEN_UPLOAD: _S.BINDING,
    _T.ATTACH_UPLOAD: _S.BINDING,
    _T.OPEN_SEGMENT: _S.BINDING,
    _T.COMPLETE: _S.COMPLETING,
    _T.ABORT: _S.ABORTING,
}
"""The blocking requests, and the state sending one enters."""

ALLOWED_REPLIES: Final[dict[FrameType, frozenset[FrameType]]] = {
    _T.HELLO: frozenset({_T.WELCOME, _T.ERROR}),
    _T.OPEN_UPLOAD: frozenset({_T.UPLOAD_OPENED, _T.COMPOSITE_OPENED, _T.ERROR}),
    _T.ATTACH_UPLOAD: frozenset({_T.UPLOAD_OPENED, _T.COMPOSITE_OPENED, _T.ERROR}),
    _T.OPEN_SEGMENT: frozenset({_T.UPLOAD_OPENED, _T.ERROR}),
    _T.WRITE_AT: frozenset({_T.ACK, _T.ERROR}),
    _T.COMPLETE: frozenset({_T.COMPLETED, _T.INCOMPLETE, _T.ERROR}),
    _T.ABORT: frozenset({_T.ACK, _T.ERROR}),
    _T.STATUS_QUERY: frozenset({_T.STATUS, _T.ERROR}),
    _T.PING: frozenset({_T.PONG, _T.ERROR}),
    _T.PUT_OBJECT: frozenset({_T.COMPLETED, _T.ERROR}),
    _T.COMPOSE: frozenset({_T.COMPLETED, _T.INCOMPLETE, _T.ERROR}),
    _T.DISCARD: frozenset({_T.ACK, _T.ERROR}),
}
"""For each request, the replies that may answer it (each request gets exactly one)."""

REPLY_TRANSITIONS: Final[dict[tuple[FrameType, FrameType], ConnectionState]] = {
    (_T.HELLO, _T.WELCOME): _S.IDLE,
    (_T.HELLO, _T.ERROR): _S.ERROR,  # every refused Hello ends the connection
    (_T.OPEN_UPLOAD, _T.UPLOAD_OPENED): _S.BOUND,
    (_T.OPEN_UPLOAD, _T.ERROR): _S.IDLE,
    # A composite upload binds nothing: its segments are bound one by one (OPEN_SEGMENT).
    (_T.OPEN_UPLOAD, _T.COMPOSITE_OPENED): _S.IDLE,
    (_T.ATTACH_UPLOAD, _T.COMPOSITE_OPENED): _S.IDLE,
    (_T.OPEN_SEGMENT, _T.UPLOAD_OPENED): _S.BOUND,
    (_T.OPEN_SEGMENT, _T.ERROR): _S.IDLE,
    (_T.ATTACH_UPLOAD, _T.UPLOAD_OPENED): _S.BOUND,
    (_T.ATTACH_UPLOAD, _T.ERROR): _S.IDLE,
    (_T.COMPLETE, _T.COMPLETED): _S.IDLE,
    (_T.COMPLETE, _T.INCOMPLETE): _S.BOUND,
    (_T.COMPLETE, _T.ERROR): _S.BOUND,
    (_T.ABORT, _T.ACK): _S.IDLE,
    (_T.ABORT, _T.ERROR): _S.IDLE,
}
"""(request answered, reply) -> the state after the reply. Other replies keep the state."""

UPLOAD_BOUND: Final = frozenset({_S.BOUND, _S.COMPLETING, _S.ABORTING})
"""The states in which an upload is bound to the connection."""

UNSOLICITED_REPLIES: Final[dict[FrameType, frozenset[ConnectionState]]] = {
    # CREDIT names no upload, so it may only come while one is bound: none for an old upload
    # after the reply that unbound it, none for the next one before UPLOAD_OPENED.
    _T.CREDIT: UPLOAD_BOUND,
    _T.ERROR: frozenset(ConnectionState),
    _T.GOING_AWAY: frozenset(ConnectionState),
}
"""Replies that may be sent with reply_to=0, and the states in which they may be."""
