"""A minimal, fast, blocking HTTP/1.1 server connection: just what the GCS endpoint needs.

Why the endpoint keeps its own HTTP layer rather than h11 or ``http.server``: it is the
ingest fast path. Every byte of every upload in the tests, the chaos runs and the
benchmarks crosses it, and it must take chunks at several hundred MB/s on a small machine
while injecting faults at exact byte offsets in bodies (pause, cut, reset). Both need
control of the socket reads that a general library hides behind its own buffering.

``http.server`` reads bodies through a buffered file object and copies them repeatedly,
which caps it far below the ingest rate the endpoint must sustain. This module reads a
request head (bounded in size), then reads ``Content-Length`` bodies with ``recv_into``
straight into one preallocated buffer; ``Transfer-Encoding: chunked`` bodies (what
``requests`` sends when it does not know a length) are supported too.

A body cut off by the peer is not an error here: :meth:`HttpConnection.read_body` returns
what arrived with ``complete=False``, because what a server keeps of a truncated chunk is
an upload-protocol decision, not a wire one.

Fault hooks live at this layer because they act on bytes: a body read can pause after an
exact number of bytes, a response can pause or be cut after an exact number of body bytes,
and a connection can be reset (RST, via ``SO_LINGER`` 0).
"""

from __future__ import annotations

import contextlib
import mmap
import socket
import string
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qsl, urlsplit

__all__ = [
    "Body",
    "HttpConnection",
    "PeerGoneError",
    "ProtocolError",
    "Request",
    "Response",
]

_CRLF = b"\r\n"
_HEAD_END = b"\r\n\r\n"
_RECV_SIZE = 256 * 1024
_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")


class ProtocolError(Exception):
    """The peer sent something that is not HTTP/1.1 this server accepts.

    ``status`` is what to answer (400, 413, 431, 501) before closing the connection.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class PeerGoneError(Exception):
    """The peer closed or reset the connection (or the server is shutting it down)."""


@dataclass(frozen=True)
class Request:
    """A parsed request head. ``path`` stays percent-encoded; header names are lower-case."""

    method: str
    target: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    http_version: str

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("connection", "").split(",")}
        if self.http_version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


@dataclass(frozen=True)
class Body:
    """The bytes of a request body that arrived; ``complete`` is False if the peer cut it."""

    data: memoryview
    complete: bool


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes | bytearray | memoryview = b""
    headers: tuple[tuple[str, str], ...] = field(default=())
    content_type: str | None = "application/json; charset=UTF-8"


def _parse_head(head: bytes) -> Request:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes any byte
        raise ProtocolError(400, "undecodable request head") from exc
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not set(parts[0]) <= _TOKEN_CHARS:
        raise ProtocolError(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise ProtocolError(505 if version.startswith("HTTP/") else 400, "unsupported version")
    if not target.startswith("/"):
        raise ProtocolError(400, "request target must be origin-form")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t":
            raise ProtocolError(400, "obsolete header line folding")
        name, sep, value = line.partition(":")
        if not sep or not name or not set(name) <= _TOKEN_CHARS:
            raise ProtocolError(400, "malformed header line")
        key = name.lower()
        value = value.strip(" \t")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    split = urlsplit(target)
    # Bytes that are not UTF-8 survive as surrogates, for the API to refuse (not to guess).
    query = dict(parse_qsl(split.query, keep_blank_values=True, errors="surrogateescape"))
    return Request(method, target, split.path, query, headers, version)


class HttpConnection:
    """One server-side HTTP/1.1 connection over a blocking socket.

    Not thread-safe: one thread owns a connection. Every method that touches the socket
    raises :class:`PeerGoneError` when the peer has gone away, except :meth:`read_body`, which
    reports a cut-off body as ``Body(complete=False)``.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        max_head_bytes: int = 64 * 1024,
        max_body_bytes: int = 1 << 31,
    ) -> None:
        self._sock = sock
        self._max_head_bytes = max_head_bytes
        self._max_body_bytes = max_body_bytes
        self._buffer = bytearray()
        self._request: Request | None = None
        self._body_read = True
        self._continue_sent = False
        self._close_after_response = False
        #: False once nothing more can be exchanged (peer gone, body cut, connection closed)
        self.usable = True

    def close_after_response(self) -> None:
        """Send ``Connection: close`` with the next response and end the connection."""
        self._close_after_response = True

    @property
    def body_pending(self) -> bool:
        """True while the current request's body has not been read."""
        return not self._body_read

    # -- reading ------------------------------------------------------------------------

    def read_request(self) -> Request | None:
        """The next request head, or None if the peer closed cleanly between requests."""
        while True:
            end = self._buffer.find(_HEAD_END)
            if end >= 0:
                break
            if len(self._buffer) > self._max_head_bytes:
                raise ProtocolError(431, "request header fields too large")
            chunk = self._recv(_RECV_SIZE)
            if not chunk:
                if self._buffer.strip(b"\r\n"):
                    raise PeerGoneError("peer closed inside a request head")
                return None
            self._buffer += chunk
        if end > self._max_head_bytes:
            raise ProtocolError(431, "request header fields too large")
        head = bytes(self._buffer[:end]).lstrip(b"\r\n")
        del self._buffer[: end + len(_HEAD_END)]
        request = _parse_head(head)
        length = self._body_length(request)  # reject bad framing before anyone acts on it
        self._request = request
        self._body_read = length == 0
        self._continue_sent = False
        return request

    def declared_body_length(self) -> int | None:
        """The current request's Content-Length (0 if none); None for a chunked body."""
        if self._request is None:
            return 0
        return self._body_length(self._request)

    def _body_length(self, request: Request) -> int | None:
        """The declared body length; None for a chunked body."""
        transfer_encoding = request.header("transfer-encoding")
        content_length = request.header("content-length")
        if transfer_encoding is not None:
            if content_length is not None:
                raise ProtocolError(400, "both Content-Length and Transfer-Encoding")
            if transfer_encoding.strip().lower() != "chunked":
                raise ProtocolError(501, "unsupported Transfer-Encoding")
            return None
        if content_length is None:
            return 0
        values = {v.strip() for v in content_length.split(",")}
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise ProtocolError(400, "malformed Content-Length")
        length = int(next(iter(values)))
        if length > self._max_body_bytes:
            raise ProtocolError(413, "request body too large")
        return length

    def read_body(
        self,
        *,
        pause_at: int | None = None,
        pause: Callable[[memoryview], None] | None = None,
    ) -> Body:
        """Read the current request's whole body.

        If ``pause_at`` is given, ``pause(received)`` runs once exactly ``pause_at`` body
        bytes have arrived (not before, not after), then reading goes on. A body the peer
        cuts off comes back with ``complete=False`` and leaves the connection unusable.
        """
        request = self._request
        if request is None or self._body_read:
            return Body(memoryview(b""), complete=True)
        self._body_read = True
        if (request.header("expect") or "").lower() == "100-continue":
            self._send_continue()
        length = self._body_length(request)
        if length is None:
            return self._read_chunked(pause_at, pause)
        view = _allocate(length)
        on_pause = None if pause is None else lambda position: pause(view[:position])
        received = self._fill(view, 0, pause_at, on_pause)
        if received < length:
            self.usable = False
            return Body(view[:received], complete=False)
        return Body(view, complete=True)

    def discard_body(self) -> None:
        """Read and drop the current request's body, so the connection can serve the next.

        Raises PeerGoneError if the peer cuts the body short.
        """
        request = self._request
        if request is None or self._body_read:
            return
        length = self._body_length(request)
        if length is None:
            if not self.read_body().complete:
                raise PeerGoneError("peer cut a request body short")
            return
        self._body_read = True
        if (request.header("expect") or "").lower() == "100-continue":
            self._send_continue()
        scratch = memoryview(bytearray(min(length, _RECV_SIZE)))
        remaining = length
        while remaining:
            received = self._fill(scratch[: min(remaining, len(scratch))], 0, None, None)
            if not received:
                self.usable = False
                raise PeerGoneError("peer cut a request body short")
            remaining -= received

    def _send_continue(self) -> None:
        if not self._continue_sent:
            self._continue_sent = True
            self._sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _fill(
        self,
        view: memoryview,
        offset: int,
        pause_at: int | None,
        pause: Callable[[int], None] | None,
    ) -> int:
        """Fill ``view`` (the body bytes from ``offset`` on); returns how many arrived.

        ``pause(position)`` runs when the body reaches ``pause_at`` bytes.
        """
        position = 0
        total = len(view)
        while position < total:
            if pause is not None and pause_at is not None and offset + position == pause_at:
                pause(position)
                pause = None
            stop = total
            if pause is not None and pause_at is not None and offset + position < pause_at:
                stop = min(total, pause_at - offset)
            if self._buffer:
                count = min(len(self._buffer), stop - position)
                view[position : position + count] = self._buffer[:count]
                del self._buffer[:count]
            else:
                try:
                    count = self._sock.recv_into(view[position:stop])
                except OSError:
                    count = 0
                if count == 0:
                    return position
            position += count
        if pause is not None and pause_at is not None and offset + position == pause_at:
            pause(position)
        return position

    def _read_line(self, limit: int = 4096) -> bytes | None:
        while True:
            end = self._buffer.find(_CRLF)
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                return line
            if len(self._buffer) > limit:
                raise ProtocolError(400, "chunked framing line too long")
            try:
                chunk = self._recv(_RECV_SIZE)
            except PeerGoneError:
                return None
            if not chunk:
                return None
            self._buffer += chunk

    def _read_chunked(
        self, pause_at: int | None, pause: Callable[[memoryview], None] | None
    ) -> Body:
        body = bytearray()
        paused = False
        while True:
            line = self._read_line()
            if line is None:
                break
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError as exc:
                raise ProtocolError(400, "malformed chunk size") from exc
            if size < 0 or len(body) + size > self._max_body_bytes:
                raise ProtocolError(413, "request body too large")
            if size == 0:
                while (trailer := self._read_line()) is not None and trailer:
                    pass  # trailers carry nothing this server uses
                return Body(memoryview(body), complete=trailer is not None)
            start = len(body)
            body.extend(bytes(size))

            def on_pause(position: int, start: int = start) -> None:
                nonlocal paused
                if pause is not None and not paused:  # a boundary is seen by two chunks
                    paused = True
                    # A copy: the pause may keep it, and ``body`` still has to grow.
                    pause(memoryview(bytes(body[: start + position])))

            with memoryview(body) as whole:
                received = self._fill(whole[start:], start, pause_at, on_pause)
            if received < size:
                del body[start + received :]
                break
            if self._read_line() != b"":
                raise ProtocolError(400, "chunk data not followed by CRLF")
        self.usable = False
        return Body(memoryview(body), complete=False)

    def _recv(self, size: int) -> bytes:
        try:
            return self._sock.recv(size)
        except OSError as exc:
            raise PeerGoneError("connection lost while reading") from exc

    # -- writing ------------------------------------------------------------------------

    def send_response(
        self,
        response: Response,
        *,
        keep_alive: bool = True,
        cut_after: int | None = None,
        pause_at: int | None = None,
        pause: Callable[[], None] | None = None,
    ) -> None:
        """Send ``response``; Content-Length always reflects the whole body.

        ``cut_after`` sends only that many body bytes, then closes: the client sees a
        broken stream. ``pause_at``/``pause`` stall the body after that many bytes.
        """
        keep_alive = (
            keep_alive and self.usable and not self.body_pending and not self._close_after_response
        )
        body = memoryview(response.body)
        lines = [f"HTTP/1.1 {response.status} {_reason(response.status)}"]
        if response.content_type is not None and (body.nbytes or response.status >= 400):
            lines.append(f"Content-Type: {response.content_type}")
        lines.extend(f"{name}: {value}" for name, value in response.headers)
        lines.append(f"Content-Length: {body.nbytes}")
        if not keep_alive:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if cut_after is not None:
            self._sendall(head + bytes(body[:cut_after]))
            self.usable = False
            self.close()
            return
        if pause_at is not None and pause is not None and pause_at < body.nbytes:
            self._sendall(head + bytes(body[:pause_at]))
            pause()
            self._sendall(body[pause_at:])
        elif body.nbytes <= 64 * 1024:
            self._sendall(head + bytes(body))
        else:
            self._sendall(head)
            self._sendall(body)
        if not keep_alive:
            self.usable = False

    def _sendall(self, data: bytes | memoryview) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            self.usable = False
            raise PeerGoneError("connection lost while writing") from exc

    # -- ending -------------------------------------------------------------------------

    def reset(self) -> None:
        """Abort the connection with a TCP RST (``SO_LINGER`` 0), as a crashed server would."""
        self.usable = False
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._sock.close()

    def close(self) -> None:
        self.usable = False
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


#: bodies from this size on get pre-faulted pages (see _allocate)
_POPULATE_FROM = 1 << 20
_MAP_POPULATE: int | None = getattr(mmap, "MAP_POPULATE", None)


def _allocate(length: int) -> memoryview:
    """A fresh, writable buffer of ``length`` bytes for a request body.

    ``bytearray(n)`` zero-fills its memory, touching every fresh page one fault at a time,
    and then ``recv_into`` writes it all again. For large bodies an anonymous mapping with
    ``MAP_POPULATE`` (Linux) has the kernel supply zeroed pages in bulk, which measured
    40% faster for the allocation and first write. The buffer is freed with its last view.
    """
    if length < _POPULATE_FROM or _MAP_POPULATE is None:
        return memoryview(bytearray(length))
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_POPULATE
    return memoryview(mmap.mmap(-1, length, flags=flags))


def _reason(status: int) -> str:
    if status == 308:
        return "Resume Incomplete"
    if status == 499:
        return "Client Closed Request"
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Status"
