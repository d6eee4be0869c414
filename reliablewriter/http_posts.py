"""Whole-object POSTs on trio streams: h11 over a small keep-alive pool, no worker thread.

A small object's one request through ``requests`` costs the proxy about a millisecond of CPU
on top of the request itself: requests' and urllib3's per-request machinery (preparing,
merging settings, cookies, adapters, pool bookkeeping) and the hop to a worker thread and
back. :class:`PostPool` writes the same POST with h11 straight onto a trio stream, and keeps
the connections alive for the next one.

What it keeps of the storage client's session: the endpoint (scheme, host, port), TLS with
certificate and host name checks for ``https`` (the session's CA bundle, or requests'),
the credentials' ``Authorization`` header (refreshed in a worker thread when the token is
not fresh, and once more after a 401, as google-auth's ``AuthorizedSession`` does), and
connect and read timeouts. What it does not do: HTTP proxies, client certificates, mounted
transport adapters. :func:`post_pool_for` says whether a session needs none of those.

Like :func:`~reliablewriter.transport.post_whole_object`, a POST is sent once and never
retried here: what an unclear answer means is :mod:`reliablewriter.settled`'s to decide.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import select
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import h11
import requests
import requests.adapters
import trio
from google.auth.credentials import AnonymousCredentials, TokenState
from google.auth.exceptions import GoogleAuthError

from .resumable import HttpResponse
from .transport import NoAnswer, Refused, StoreOutcome, whole_object_outcome

__all__ = [
    "Body",
    "Connector",
    "PostPool",
    "WholeObjectPoster",
    "post_pool_for",
]

#: an answer's body larger than this is not an object resource or an error: no answer
MAX_ANSWER_BYTES: Final = 1024 * 1024
_RECEIVE_SIZE: Final = 64 * 1024
#: a larger body is sent in slices of this size, each within the read timeout
_SEND_SLICE: Final = 256 * 1024
_USER_AGENT: Final = "rup-proxy"
_REFRESH_STATUS: Final = 401

#: a request body: one buffer, or several sent in order (a multipart body's head, the
#: object's own buffers and its tail), none of them copied
Body = bytes | memoryview | Sequence[bytes | memoryview]

#: opens a stream to ``(host, port)``; TLS, if wanted, is the connector's to do
Connector = Callable[[str, int], Awaitable[trio.abc.Stream]]


class WholeObjectPoster(Protocol):
    """Sends one whole-object POST and says what came of it, never raising for what the
    network or GCS did (what :func:`~reliablewriter.transport.post_whole_object` does in a
    worker thread)."""

    async def post(
        self, url: str, body: Body, content_type: str, timeouts: tuple[float, float]
    ) -> StoreOutcome: ...


class _NoAnswerError(Exception):
    """The request got no whole answer; ``cause`` names why (kept inside this module)."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


@dataclass
class _Connection:
    stream: trio.abc.Stream
    http: h11.Connection
    idle_since: float


class PostPool:
    """POSTs to one endpoint over kept-alive HTTP/1.1 connections, on trio.

    ``base_url``: the endpoint (``http`` or ``https``); every URL posted must be on it.
    ``credentials``: google-auth credentials whose ``Authorization`` each request carries
    (None: none). ``auth_request``: the google-auth transport a refresh goes through.
    ``ca_bundle``: the certificates an ``https`` endpoint is checked against, a file or a
    directory as requests takes them (None: the system's; read here, once). ``connect``:
    how a connection is opened (tests pass faultnet's); by default TCP, with TLS for
    ``https``. At most ``max_connections`` requests are in flight at once; a connection
    idle for ``idle_timeout`` seconds, or closed by the endpoint meanwhile, is not used
    again.

    Connections belong to the trio run that opened them: a pool used by a later run drops
    the earlier run's. :meth:`aclose` (in the run) or :meth:`close` (after it) closes the
    idle ones.
    """

    def __init__(
        self,
        base_url: str,
        *,
        credentials: Any = None,
        auth_request: Any = None,
        ca_bundle: str | None = None,
        connect: Connector | None = None,
        max_connections: int = 128,
        idle_timeout: float = 20.0,
    ) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("a PostPool needs an http or https endpoint")
        self._scheme = parts.scheme
        self._netloc = parts.netloc
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._credentials = credentials
        self._auth_request = auth_request
        self._ssl_context: ssl.SSLContext | None = None
        if parts.scheme == "https" and connect is None:
            in_directory = ca_bundle is not None and os.path.isdir(ca_bundle)
            self._ssl_context = ssl.create_default_context(
                cafile=None if in_directory else ca_bundle,
                capath=ca_bundle if in_directory else None,
            )
        self._connect = connect or self._open
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._idle: list[_Connection] = []
        self._run: trio.lowlevel.TrioToken | None = None
        self._limiter: trio.CapacityLimiter | None = None

    # -- posting -----------------------------------------------------------------------

    async def post(
        self, url: str, body: Body, content_type: str, timeouts: tuple[float, float]
    ) -> StoreOutcome:
        """POST ``body`` (one buffer, or several sent in order, none of them copied) to
        ``url``; ``timeouts`` is (connect, read) in seconds, the read timeout bounding each
        wait for the endpoint (sending included).

        Cancellation is noticed only until the request starts to leave: once a byte of it
        may have reached GCS, the answer is waited for (within the timeouts), so that what
        the request did is never lost.
        """
        parts = (body,) if isinstance(body, bytes | memoryview) else tuple(body)
        size = sum(len(part) for part in parts)
        limiter = self._limiter_for_this_run()
        async with limiter:
            headers = await self._headers(url, content_type, size)
            outcome = await self._post_once(url, headers, parts, timeouts)
            if (
                isinstance(outcome, Refused)
                and outcome.status == _REFRESH_STATUS
                and self._refreshable()
            ):
                # A token revoked or expired early: nothing was stored; refresh and send again.
                refused = outcome
                try:
                    await trio.to_thread.run_sync(self._refresh)
                except GoogleAuthError:  # a refresh that fails leaves the 401 standing
                    return refused
                headers = await self._headers(url, content_type, size)
                outcome = await self._post_once(url, headers, parts, timeouts)
        return outcome

    async def _post_once(
        self,
        url: str,
        headers: list[tuple[str, str]],
        body: tuple[bytes | memoryview, ...],
        timeouts: tuple[float, float],
    ) -> StoreOutcome:
        connect_timeout, read_timeout = timeouts
        target = self._target(url)
        try:
            connection = await self._connection(connect_timeout)
        except _NoAnswerError as exc:
            return NoAnswer(exc.cause)
        answer: HttpResponse | None = None
        cause = "timeout"  # unless the exchange says otherwise
        try:
            # From here on the request may have landed: only the read timeout, moved on
            # at each step, ends the wait (one scope for the whole exchange: each costs).
            with trio.CancelScope(shield=True) as waiting:
                try:
                    answer = await self._exchange(connection, target, headers, body,
                                                  read_timeout, waiting)  # fmt: skip
                except _NoAnswerError as exc:
                    cause = exc.cause
        finally:
            if answer is not None and _reusable(connection.http):
                connection.http.start_next_cycle()
                connection.idle_since = trio.current_time()
                self._idle.append(connection)
            else:
                _close_quietly(connection.stream)
        return NoAnswer(cause) if answer is None else whole_object_outcome(answer)

    async def _exchange(
        self,
        connection: _Connection,
        target: str,
        headers: list[tuple[str, str]],
        body: tuple[bytes | memoryview, ...],
        read_timeout: float,
        waiting: trio.CancelScope,
    ) -> HttpResponse:
        """Send the request and read the answer, each step due within ``read_timeout``
        (``waiting``'s deadline, which ends the exchange)."""
        http = connection.http
        try:
            head = http.send(h11.Request(method="POST", target=target, headers=headers)) or b""
        except h11.LocalProtocolError:
            # A header h11 will not send (a token with a line break): its message would
            # quote the value, a secret, so the error is dropped here, not chained.
            raise _NoAnswerError("bad-request-header") from None
        data: list[bytes | memoryview] = []
        for part in body:
            # With a Content-Length, h11 passes each part through uncopied, a view as well
            # as bytes (its annotation says bytes only).
            event = h11.Data(data=part)  # type: ignore[arg-type]
            data += http.send_with_data_passthrough(event) or ()
        end = http.send(h11.EndOfMessage()) or b""
        # A small request leaves in one send; a large body in slices, each due within the
        # read timeout (a stalled send ends the exchange, a slow one does not).
        pieces: list[bytes | memoryview]
        if sum(len(part) for part in data) <= _SEND_SLICE:
            pieces = [b"".join((head, *data, end))]
        else:
            pieces = [head]
            for part in data:
                view = memoryview(part)
                pieces += (view[at : at + _SEND_SLICE] for at in range(0, len(view), _SEND_SLICE))
            pieces.append(end)
        try:
            for piece in pieces:
                waiting.deadline = trio.current_time() + read_timeout
                await connection.stream.send_all(piece)
            return await self._answer(connection, read_timeout, waiting)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _NoAnswerError("connection") from exc

    async def _answer(
        self, connection: _Connection, read_timeout: float, waiting: trio.CancelScope
    ) -> HttpResponse:
        """The whole answer; raises :class:`_NoAnswerError` for anything less."""
        http = connection.http
        head: h11.Response | None = None
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as exc:
                # An end of file inside the answer, or an answer h11 cannot read.
                raise _NoAnswerError(
                    "truncated-response" if head is not None else "malformed-response"
                ) from exc
            if event is h11.NEED_DATA:
                waiting.deadline = trio.current_time() + read_timeout
                received = await connection.stream.receive_some(_RECEIVE_SIZE)
                if not received and head is None and not http.trailing_data[0]:
                    raise _NoAnswerError("connection")  # closed before answering
                http.receive_data(bytes(received))
            elif isinstance(event, h11.Response):
                head = event
                if not _framed(event):
                    # Read-until-close: GCS frames every answer, so this one was cut.
                    raise _NoAnswerError("truncated-response")
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_ANSWER_BYTES:
                    raise _NoAnswerError("bad-response")
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return _http_response(head, b"".join(parts))
            elif isinstance(event, h11.ConnectionClosed):
                raise _NoAnswerError("connection")
            # an InformationalResponse (100 Continue, unasked for) is passed over

    # -- connections -------------------------------------------------------------------

    def _limiter_for_this_run(self) -> trio.CapacityLimiter:
        token = trio.lowlevel.current_trio_token()
        if token is not self._run or self._limiter is None:
            self.close()  # connections of an earlier run cannot be used in this one
            self._run = token
            self._limiter = trio.CapacityLimiter(self._max_connections)
        return self._limiter

    async def _connection(self, connect_timeout: float) -> _Connection:
        now = trio.current_time()
        while self._idle:
            connection = self._idle.pop()  # the most recently used: the likeliest alive
            if now - connection.idle_since < self._idle_timeout and not _closed_by_peer(
                connection.stream
            ):
                return connection
            _close_quietly(connection.stream)
        try:
            with trio.fail_after(connect_timeout):
                stream = await self._connect(self._host, self._port)
        except trio.TooSlowError as exc:
            raise _NoAnswerError("timeout") from exc
        except (OSError, trio.BrokenResourceError) as exc:
            raise _NoAnswerError("connection") from exc
        return _Connection(stream, h11.Connection(h11.CLIENT), now)

    async def _open(self, host: str, port: int) -> trio.abc.Stream:
        if self._scheme == "http":
            stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
            return stream
        assert self._ssl_context is not None
        tls = await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=self._ssl_context, https_compatible=True
        )
        try:
            await tls.do_handshake()  # within the connect timeout, not the first send's
        except BaseException:
            _close_quietly(tls)
            raise
        return tls

    async def aclose(self) -> None:
        """Close the idle connections (in the run that uses the pool)."""
        idle, self._idle = self._idle, []
        for connection in idle:
            await trio.aclose_forcefully(connection.stream)

    def close(self) -> None:
        """Close the idle connections, from outside the run that opened them."""
        idle, self._idle = self._idle, []
        for connection in idle:
            _close_quietly(connection.stream)

    # -- requests ----------------------------------------------------------------------

    def _target(self, url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        if (parts.scheme, parts.netloc) != (self._scheme, self._netloc):
            raise ValueError("a PostPool posts only to its own endpoint")
        return f"{parts.path}?{parts.query}" if parts.query else parts.path

    async def _headers(self, url: str, content_type: str, length: int) -> list[tuple[str, str]]:
        headers = {
            "host": self._netloc,
            "user-agent": _USER_AGENT,
            "accept-encoding": "identity",  # a gzip answer is still understood
            "content-type": content_type,
            "content-length": str(length),
        }
        credentials = self._credentials
        if credentials is not None:
            if _fresh(credentials):
                credentials.apply(headers)  # no I/O: the token is in hand
            else:  # a refresh is a blocking request of its own
                await trio.to_thread.run_sync(
                    credentials.before_request, self._auth_request, "POST", url, headers
                )
        return list(headers.items())

    def _refreshable(self) -> bool:
        credentials = self._credentials
        return credentials is not None and not isinstance(credentials, AnonymousCredentials)

    def _refresh(self) -> None:
        self._credentials.refresh(self._auth_request)


def _fresh(credentials: Any) -> bool:
    if isinstance(credentials, AnonymousCredentials):
        return True
    return bool(credentials.token_state is TokenState.FRESH)


def _framed(head: h11.Response) -> bool:
    """Whether an answer says where its body ends (a length, or chunked encoding)."""
    if head.status_code in (204, 304):
        return True
    for name, value in head.headers:
        if name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value):
            return True
    return False


def _reusable(http: h11.Connection) -> bool:
    return http.our_state is h11.DONE and http.their_state is h11.DONE


def _http_response(head: h11.Response, body: bytes) -> HttpResponse:
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in head.headers}
    if headers.get("content-encoding", "").strip().lower() == "gzip":
        try:
            body = gzip.decompress(body)
        except (OSError, EOFError) as exc:
            raise _NoAnswerError("bad-response") from exc
    return HttpResponse(head.status_code, headers, body)


def _socket_of(stream: object) -> Any:
    """The socket under ``stream`` and its wrappers (TLS, faultnet), if one can be found."""
    for _ in range(8):
        sock = getattr(stream, "socket", None)
        if sock is not None:
            return sock
        stream = getattr(stream, "transport_stream", None)
        if stream is None:
            return None
    return None


def _closed_by_peer(stream: trio.abc.Stream) -> bool:
    """Whether an idle connection has something to read: the endpoint's close (or
    something unasked for), either way not a connection to send a request on."""
    sock = _socket_of(stream)
    if sock is None:
        return False
    try:
        poll = select.poll()
        poll.register(sock.fileno(), select.POLLIN)
        return bool(poll.poll(0))
    except (OSError, ValueError):
        return True


def _close_quietly(stream: trio.abc.Stream) -> None:
    """Close ``stream``'s socket now, in this run or after it (no graceful TLS close: the
    connection is given up). trio's own close needs its run, so the descriptor is taken
    from trio's socket first."""
    sock = _socket_of(stream)
    if sock is None:
        return
    with contextlib.suppress(OSError, ValueError):
        try:
            sock.close()  # in the run: tells trio's I/O manager too
        except RuntimeError:  # outside a run
            os.close(sock.detach())


def post_pool_for(session: requests.Session, base_url: str) -> PostPool | None:
    """A :class:`PostPool` doing what ``session`` would do for a POST to ``base_url``, or
    None if ``session`` does something it cannot: a mounted transport adapter (faultnet's,
    a test's), an HTTP proxy or anything else read from the environment on each request
    (``trust_env``: see :func:`proxy.server.backend.read_environment_once`), a client
    certificate, TLS without verification, or headers, parameters, auth or hooks of its own
    beyond its credentials."""
    adapter = session.get_adapter(base_url)
    if type(adapter) is not requests.adapters.HTTPAdapter:
        return None
    if session.trust_env or any(session.proxies.values()) or session.cert:
        return None
    if session.auth is not None or session.params or any(session.hooks.values()):
        return None
    if dict(session.headers) != dict(requests.utils.default_headers()):
        return None
    verify = session.verify
    if verify is False:
        return None
    credentials = getattr(session, "credentials", None)
    auth_request = None
    if credentials is not None:
        from google.auth.transport.requests import Request

        # A session of its own, as AuthorizedSession's: a refresh through ``session``
        # would ask these very credentials to refresh first.
        auth_request = Request(requests.Session())
    ca_bundle = verify if isinstance(verify, str) else requests.utils.DEFAULT_CA_BUNDLE_PATH
    return PostPool(base_url, credentials=credentials, auth_request=auth_request,
                    ca_bundle=ca_bundle)  # fmt: skip
