"""A small JSON-over-HTTP/1.1 server on trio; h11 does the HTTP.

The chaos proxy's control API (:mod:`faultnet.control`) is the one user. h11 parses and
frames requests and responses (request line, headers, Content-Length, keep-alive, error
statuses); this module adds what a server must bound: the size of a request head and
body, the time one request may take, and the number of requests one connection may make.
It also turns every failure into one JSON answer with an ``error`` message, so nothing a
client sends can stop the process.

A handler is an async function from :class:`Request` to :class:`Response`. It may raise
:class:`HTTPError` to answer with a status and a message; any other exception is logged
and answered with a 500.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import h11
import trio

__all__ = [
    "MAX_CONNECTIONS",
    "MAX_REQUESTS_PER_CONNECTION",
    "MAX_REQUEST_BODY",
    "MAX_REQUEST_HEAD",
    "REQUEST_TIMEOUT",
    "HTTPError",
    "Handler",
    "Request",
    "Response",
    "serve_json",
]

logger = logging.getLogger(__name__)

#: longest request head (request line and headers) accepted; h11 answers 431 past it
MAX_REQUEST_HEAD = 16 * 1024
#: longest request body accepted; a toxic's or a proxy list's JSON is well under this
MAX_REQUEST_BODY = 64 * 1024
#: how long one request may take, from its first byte (or the previous answer) to its answer
REQUEST_TIMEOUT = 10.0
#: requests served on one kept-alive connection before it is closed
MAX_REQUESTS_PER_CONNECTION = 1000
#: connections served at once; more are closed as soon as they are accepted
MAX_CONNECTIONS = 64

_RECEIVE_SIZE = 16 * 1024
_SERVER_NAME = b"rup-faultproxy"


class HTTPError(Exception):
    """Answer the request with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> Response:
        """The answer this error makes; a subclass may shape its body differently."""
        return Response(self.status, {"error": self.message})


@dataclass(frozen=True)
class Request:
    """One request: its method, its path (percent-decoded, query dropped) and its body."""

    method: str
    path: str
    body: bytes
    #: header names in lower case; a repeated header keeps its last value
    headers: Mapping[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        """The body as JSON; an :class:`HTTPError` 400 when it is not."""
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HTTPError(400, f"body is not valid JSON: {exc}") from exc


@dataclass(frozen=True)
class Response:
    """An answer. ``body`` is any JSON value; ``None`` means no body at all (as for 204)."""

    status: int
    body: Any = None
    headers: tuple[tuple[str, str], ...] = ()

    def encode_body(self) -> bytes:
        if self.body is None:
            return b""
        return (json.dumps(self.body, indent=2) + "\n").encode()


Handler = Callable[[Request], Awaitable[Response]]


async def serve_json(
    listeners: Sequence[trio.SocketListener],
    handler: Handler,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on ``listeners`` until cancelled.

    Cancelling it closes the listeners and drops any request in progress unanswered.
    """

    open_connections = 0

    async def connection(stream: trio.SocketStream) -> None:
        nonlocal open_connections
        if open_connections >= MAX_CONNECTIONS:
            # Answering would cost as much as serving: hang up at once instead.
            await trio.aclose_forcefully(stream)
            return
        open_connections += 1
        try:
            await _serve_connection(stream, handler)
        finally:
            open_connections -= 1

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, connection, listeners)
        task_status.started()


async def _serve_connection(stream: trio.SocketStream, handler: Handler) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    async with stream:
        try:
            for _ in range(MAX_REQUESTS_PER_CONNECTION):
                with trio.move_on_after(REQUEST_TIMEOUT) as deadline:
                    keep_going = await _serve_one(connection, stream, handler)
                if deadline.cancelled_caught or not keep_going:
                    break
                connection.start_next_cycle()
            await _close_gently(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away: there is no one left to answer


async def _serve_one(
    connection: h11.Connection, stream: trio.SocketStream, handler: Handler
) -> bool:
    """Read one request and answer it; whether the connection can carry another."""
    try:
        request = await _read_request(connection, stream)
        if request is None:
            return False  # the client closed between requests
        try:
            response = await handler(request)
        except HTTPError:
            raise
        except Exception:
            # A bug in a handler must cost one request, not the whole proxy.
            logger.exception("control API: internal error")
            response = HTTPError(500, "internal error; see the proxy's log").response()
    except HTTPError as exc:
        response = exc.response()
    except h11.RemoteProtocolError as exc:
        # h11 says which status fits: 400 for a malformed request, 431 for a long head.
        response = HTTPError(exc.error_status_hint, f"malformed request: {exc}").response()
    if connection.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return False  # h11 cannot answer any more on this connection
    await _send_response(connection, stream, response)
    return _both_done(connection)


def _both_done(connection: h11.Connection) -> bool:
    """Whether the exchange ended cleanly on both sides, so another request may follow."""
    return connection.our_state is h11.DONE and connection.their_state is h11.DONE


async def _read_request(connection: h11.Connection, stream: trio.SocketStream) -> Request | None:
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            if connection.they_are_waiting_for_100_continue:
                # curl asks before sending a body over 1 KiB; say yes rather than make it wait
                await stream.send_all(
                    connection.send(h11.InformationalResponse(status_code=100, headers=[]))
                )
            connection.receive_data(await stream.receive_some(_RECEIVE_SIZE))
        elif isinstance(event, h11.Request):
            head = event
            _check_framing(event)
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_REQUEST_BODY:
                raise HTTPError(413, f"request body longer than {MAX_REQUEST_BODY} bytes")
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            target = head.target.decode("ascii", "replace").partition("?")[0]
            return Request(
                method=head.method.decode("ascii", "replace"),
                path=unquote(target),
                body=bytes(body),
                headers={
                    name.decode("latin-1"): value.decode("latin-1") for name, value in head.headers
                },
            )
        elif isinstance(event, h11.ConnectionClosed):
            return None


def _check_framing(head: h11.Request) -> None:
    headers = {name: value for name, value in head.headers}
    if b"transfer-encoding" in headers:
        # Every JSON client sends a Content-Length; refusing chunked bodies keeps the one
        # body limit checkable before a byte of the body is read.
        raise HTTPError(411, "send the body with a Content-Length, not chunked")
    length = int(headers.get(b"content-length", b"0"))  # h11 has checked it is a number
    if length > MAX_REQUEST_BODY:
        raise HTTPError(413, f"request body longer than {MAX_REQUEST_BODY} bytes")


async def _send_response(
    connection: h11.Connection, stream: trio.SocketStream, response: Response
) -> None:
    payload = response.encode_body()
    headers = [(b"server", _SERVER_NAME)]
    if response.body is not None:
        headers += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
        ]
    headers += [
        (name.encode("latin-1"), value.encode("latin-1")) for name, value in response.headers
    ]
    if connection.their_state is not h11.DONE:
        # The request was refused before its body was read: say so, then hang up.
        headers.append((b"connection", b"close"))
    events: list[h11.Event] = [h11.Response(status_code=response.status, headers=headers)]
    if payload:
        events.append(h11.Data(data=payload))
    events.append(h11.EndOfMessage())
    for event in events:
        data = connection.send(event)
        if data:
            await stream.send_all(data)


async def _close_gently(stream: trio.SocketStream) -> None:
    """Half-close, then drain briefly, so the client reads the answer before our close.

    Closing with unread request bytes in our buffer would reset the connection under it.
    """
    await stream.send_eof()
    with trio.move_on_after(REQUEST_TIMEOUT):
        while await stream.receive_some(_RECEIVE_SIZE):
            pass
