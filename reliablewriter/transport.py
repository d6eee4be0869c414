"""The blocking HTTP side of a writer: everything here runs in a worker thread.

Requests go through the google-cloud-storage client's own ``requests`` session
(``client._http``), so its credentials, endpoint override and any mounted adapter (such
as faultnet's fault injector) apply. Failures of the network come back as
:class:`TransportFailure` with a short cause for counters; HTTP answers, good or bad,
come back as :class:`~reliablewriter.resumable.HttpResponse` for the sans-IO core.

Why chunks are not sent through google-resumable-media's ``ResumableUpload``:
``transmit_next_chunk`` reads each chunk from a stream into a fresh ``bytes`` (a copy of
every payload byte), and its response handling mishandles the cases listed in
:mod:`reliablewriter.resumable`. Session initiation, which carries no payload, does go
through google-cloud-storage (``Blob.create_resumable_upload_session``).
"""

from __future__ import annotations

import json
import threading
import traceback
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import requests
from google.api_core import exceptions as api_exceptions
from google.cloud import storage  # type: ignore[import-untyped]

from .resumable import HttpResponse, error_reason

__all__ = [
    "COALESCE_FRACTION",
    "ChunkBody",
    "GcsTransport",
    "NoAnswer",
    "Refused",
    "SessionOptions",
    "StoreOutcome",
    "Stored",
    "TransportFailure",
    "UploadInterrupted",
    "delete_session",
    "http_session",
    "object_outcome",
    "post_whole_object",
    "request_timeout",
    "whole_object_outcome",
]


# What the HTTP stack raises when the network fails. ValueError is what ``select``/``poll``
# and ``io`` raise for a socket closed underneath them: urllib3 polls a pooled
# connection's socket before reusing it, and that socket may have been closed while the
# connection sat in the pool (a fault injector closing it, or another thread).
_NETWORK_ERRORS = (requests.RequestException, OSError, ValueError)


class UploadInterrupted(Exception):  # noqa: N818 - it is a signal, not a failure
    """Raised inside a request body when the writer stops sending (abort or shutdown)."""


class TransportFailure(Exception):  # noqa: N818 - named for what the network did
    """The request did not get a complete HTTP answer; ``cause`` names why.

    Deliberately carries no chained exception: those hold the request URL (a secret
    session URI) and, through their tracebacks, views of the payload.
    """

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


#: A view at most this fraction of a slice is copied into the sending thread's scratch buffer
#: with its neighbours, so small writes leave in slice-sized sends: each send costs a syscall
#: and a pass through http.client whatever its size (64 KiB writes were 128 sends per 8 MiB
#: chunk). Larger views go out as they are, uncopied.
COALESCE_FRACTION: Final = 4

_scratch = threading.local()


def _scratch_buffer(size: int) -> memoryview:
    """This thread's reusable ``size``-byte buffer for coalescing small views.

    One per sending thread, reused from chunk to chunk: a fresh buffer per chunk would cost
    a page fault per 4 KiB, about what the copy saves. Only the thread that fills it sends
    from it, one piece at a time, so no piece is overwritten before it is sent.
    """
    buffer: bytearray | None = getattr(_scratch, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = _scratch.buffer = bytearray(size)
    return memoryview(buffer)[:size]


class ChunkBody:
    """A request body made of memoryviews, sent without joining them.

    It has a length, so requests sends ``Content-Length`` instead of chunked encoding,
    and it iterates in slices of at most ``slice_size`` bytes, so that each socket send
    is bounded by the socket timeout and a stop request is noticed between slices. Runs of
    small views (at most ``slice_size / COALESCE_FRACTION`` each) are copied into one
    slice-sized scratch buffer per sending thread and sent together; larger views are
    sent from where they are. It can be iterated again (an auth refresh resends the
    request); each piece it yields is valid until the next is asked for.
    """

    def __init__(
        self,
        views: list[memoryview],
        *,
        slice_size: int,
        stop: threading.Event,
        on_sent: Callable[[int], None],
    ) -> None:
        self._views = views
        self._length = sum(len(view) for view in views)
        self._slice_size = slice_size
        self._stop = stop
        self._on_sent = on_sent

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[memoryview]:
        slice_size = self._slice_size
        small = slice_size // COALESCE_FRACTION
        scratch = memoryview(b"")  # taken from the thread only once a small view comes
        filled = 0
        for view in self._views:
            if len(view) > small:
                if filled:
                    yield from self._piece(scratch[:filled])
                    filled = 0
                for begin in range(0, len(view), slice_size):
                    yield from self._piece(view[begin : begin + slice_size])
                continue
            if not scratch:
                scratch = _scratch_buffer(slice_size)
            taken = 0
            while taken < len(view):
                count = min(len(view) - taken, slice_size - filled)
                scratch[filled : filled + count] = view[taken : taken + count]
                filled += count
                taken += count
                if filled == slice_size:
                    yield from self._piece(scratch)
                    filled = 0
        if filled:
            yield from self._piece(scratch[:filled])

    def _piece(self, piece: memoryview) -> Iterator[memoryview]:
        if self._stop.is_set():
            raise UploadInterrupted
        yield piece
        # The consumer asks for the next piece only once this one is sent.
        self._on_sent(len(piece))

    @property
    def views(self) -> list[memoryview]:
        """The views still held (empty once released)."""
        return self._views

    def release(self) -> None:
        """Let go of the views, whoever still holds this body."""
        self._views = []


@dataclass(frozen=True)
class SessionOptions:
    """What a new resumable session is created with."""

    content_type: str
    metadata: Mapping[str, str] | None
    if_generation_match: int | None
    expected_size: int | None


@dataclass(frozen=True)
class Stored:
    """A one-request upload was answered with the object GCS stored."""

    resource: Mapping[str, Any]


@dataclass(frozen=True)
class Refused:
    """A one-request upload was answered with an error status."""

    status: int
    reason: str


@dataclass(frozen=True)
class NoAnswer:
    """No whole answer came back; ``cause`` names why (for counters and errors)."""

    cause: str


StoreOutcome = Stored | Refused | NoAnswer


def _scrub(exc: BaseException | None) -> None:
    """Drop the frames' locals along an exception chain, so no payload view stays pinned."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if exc.__traceback__ is not None:
            traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__


def _plausible_session_uri(uri: object) -> bool:
    if not isinstance(uri, str):
        return False
    parts = urllib.parse.urlsplit(uri)
    query = urllib.parse.parse_qs(parts.query)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and "upload_id" in query


def _timed_out(exc: BaseException) -> bool:
    """Whether a timeout lies anywhere in the chain (requests wraps a send timeout twice)."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, requests.Timeout | TimeoutError):
            return True
        pending.extend(arg for arg in current.args if isinstance(arg, BaseException))
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return False


def _cause_of(exc: BaseException) -> str:
    if isinstance(exc, UploadInterrupted):
        return "interrupted"
    if _timed_out(exc):
        return "timeout"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "truncated-response"
    if isinstance(exc, requests.ConnectionError | ConnectionError):
        return "connection"
    if isinstance(exc, ValueError) and not isinstance(exc, requests.RequestException):
        return "closed-connection"
    return type(exc).__name__


def _reason_of(exc: api_exceptions.GoogleAPICallError) -> str:
    """GCS's explanation from the error's response body; the exception's own message
    starts with the request URL, which is kept out of errors."""
    response = exc.response
    if isinstance(response, requests.Response):
        return error_reason(HttpResponse(response.status_code, {}, response.content))
    return type(exc).__name__


def _is_length(value: str) -> bool:
    return value.isascii() and value.strip().isdigit()


def _response(response: requests.Response) -> HttpResponse:
    """The answer as the sans-IO core sees it, once it is known to be whole.

    ``http.client`` takes EOF for the end of a response head, so a response cut inside
    its head arrives as a shorter, plausible one: a 308 without ``Range`` ("nothing
    stored"), or with a cut ``Range``. GCS (and the strict endpoint) frame every response
    with ``Content-Length`` or chunked encoding, the length sent after ``Range``, so a
    response without that framing was cut: a failed attempt, never GCS's word. A body
    shorter than its ``Content-Length`` makes urllib3 raise while reading ``content``.
    """
    if any(char < " " and char != "\t" for char in response.reason or ""):
        # A status line whose end was damaged swallowed the next header line ("Incomplete
        # \r\xf5Range: ..."), leaving a framed 308 without its Range.
        raise TransportFailure("malformed-response")
    headers = {name.lower(): value for name, value in response.headers.items()}
    chunked = headers.get("transfer-encoding", "").strip().lower() == "chunked"
    if not chunked and not _is_length(headers.get("content-length", "")):
        raise TransportFailure("truncated-response")
    return HttpResponse(response.status_code, headers, response.content)


class GcsTransport:
    """Blocking requests for one upload session, over ``blob``'s client session."""

    def __init__(self, blob: storage.Blob, *, connect_timeout: float, read_timeout: float) -> None:
        self._blob = blob
        self._client = blob.bucket.client
        self._timeout = request_timeout(connect_timeout, read_timeout)

    @property
    def http(self) -> requests.Session:
        return http_session(self._client)

    def create_session(self, options: SessionOptions) -> str | HttpResponse:
        """Start a resumable session; its URI, or GCS's refusal.

        Raises :class:`TransportFailure` if no answer came back. google-cloud-storage's own
        retries are off: the writer retries under its :class:`~reliablewriter.RetryPolicy`.
        """
        blob = self._blob
        blob.metadata = dict(options.metadata) if options.metadata else None
        failure: TransportFailure | None = None
        try:
            uri: str = blob.create_resumable_upload_session(
                content_type=options.content_type,
                size=options.expected_size,
                timeout=self._timeout,
                checksum=None,
                if_generation_match=options.if_generation_match,
                retry=None,
            )
        except api_exceptions.GoogleAPICallError as exc:
            response = exc.response
            if isinstance(response, requests.Response) and response.status_code >= 300:
                return _response(response)
            # A success without a usable Location header: damaged on the way.
            failure = TransportFailure("bad-session-uri")
            _scrub(exc)
        except _NETWORK_ERRORS as exc:
            failure = TransportFailure(_cause_of(exc))
            _scrub(exc)
        if failure is not None:
            raise failure
        if not _plausible_session_uri(uri):
            # A response damaged on the way (a flipped byte in Location) would otherwise
            # poison every later request; a fresh session is the cure.
            raise TransportFailure("bad-session-uri")
        return uri

    def put(
        self,
        uri: str,
        headers: Mapping[str, str],
        body: ChunkBody | None,
    ) -> HttpResponse:
        """PUT a chunk (or, without a body, a status query) to the session at ``uri``."""
        failure: TransportFailure | None = None
        data: Any = body if body is not None and len(body) else b""
        try:
            with self.http.request(
                "PUT", uri, data=data, headers=dict(headers), timeout=self._timeout
            ) as response:
                return _response(response)
        except (*_NETWORK_ERRORS, UploadInterrupted) as exc:
            failure = TransportFailure(_cause_of(exc))
            _scrub(exc)
        finally:
            if body is not None:
                body.release()
        raise failure

    def get_object(self) -> Mapping[str, Any] | None:
        """The live object's metadata, or None if there is none (or it cannot be read).

        Raises :class:`TransportFailure` for failures worth another attempt.
        """
        found = self.lookup_object()
        return None if isinstance(found, int) else found

    def lookup_object(self) -> Mapping[str, Any] | int:
        """The live object's metadata (one metadata request), or the status refusing it.

        404 means there is no live object; any other status (403, ...) means it could not
        be read. Raises :class:`TransportFailure` for failures worth another attempt
        (network, 408, 429, 5xx).
        """
        failure: TransportFailure | None = None
        try:
            blob = self._blob.bucket.get_blob(self._blob.name, timeout=self._timeout, retry=None)
        except api_exceptions.GoogleAPICallError as exc:
            if exc.code is not None and exc.code < 500 and exc.code not in (408, 429):
                return int(exc.code)
            failure = TransportFailure(f"http-{exc.code}")
            _scrub(exc)
        except _NETWORK_ERRORS as exc:
            failure = TransportFailure(_cause_of(exc))
            _scrub(exc)
        if failure is not None:
            raise failure
        if blob is None:
            return 404
        # The JSON resource GCS returned; google-cloud-storage keeps it as ``_properties``.
        resource: Mapping[str, Any] = blob._properties
        return resource

    def delete(self, uri: str) -> HttpResponse:
        """Cancel the session at ``uri`` (GCS answers 499 when it did)."""
        return delete_session(self.http, uri, self._timeout)


def object_outcome(blob: storage.Blob, request: Callable[[], object]) -> StoreOutcome:
    """Run ``request``, a google-cloud-storage call that makes ``blob`` (an upload, a
    compose), and say what came of it. Never raises for what the network or GCS did."""
    outcome: StoreOutcome
    try:
        request()
    except api_exceptions.GoogleAPICallError as exc:
        status = int(exc.code) if exc.code is not None else 0
        outcome = Refused(status, _reason_of(exc)) if status else NoAnswer("bad-response")
        _scrub(exc)
        return outcome
    except _NETWORK_ERRORS as exc:
        outcome = NoAnswer(_cause_of(exc))
        _scrub(exc)
        return outcome
    # The JSON resource GCS returned; google-cloud-storage keeps it as ``_properties``.
    resource: Mapping[str, Any] = blob._properties
    return Stored(dict(resource))


def post_whole_object(
    http: requests.Session,
    url: str,
    body: bytes,
    content_type: str,
    timeout: tuple[float, float],
) -> StoreOutcome:
    """POST ``body``, a whole object's upload (multipart: its resource, then its bytes),
    to ``url`` over ``http``, and say what came of it. Never raises for what the network
    or GCS did.

    One request, sent as it is: no retries here (:mod:`reliablewriter.settled` decides,
    since a retry after a lost answer must read the object back first), and none of
    google-cloud-storage's per-request machinery, which costs a small object more CPU than
    the request itself.
    """
    outcome: StoreOutcome
    try:
        with http.request(
            "POST", url, data=body, headers={"content-type": content_type}, timeout=timeout
        ) as response:
            answer = _response(response)
    except TransportFailure as exc:
        return NoAnswer(exc.cause)
    except _NETWORK_ERRORS as exc:
        outcome = NoAnswer(_cause_of(exc))
        _scrub(exc)
        return outcome
    return whole_object_outcome(answer)


def whole_object_outcome(answer: HttpResponse) -> StoreOutcome:
    """What a whole answer to a whole-object upload says: the object stored, a refusal, or
    (a success whose object cannot be read) no answer, to be settled by a read back."""
    if not 200 <= answer.status < 300:
        return Refused(answer.status, error_reason(answer))
    try:
        resource = json.loads(answer.body)
    except ValueError:
        resource = None
    if not isinstance(resource, dict):
        return NoAnswer("bad-response")  # a success whose object cannot be read: look it up
    return Stored(resource)


def http_session(client: storage.Client) -> requests.Session:
    """The storage client's own ``requests`` session: its credentials, endpoint override
    and mounted adapters (faultnet's fault injector) apply to whatever goes through it."""
    session: requests.Session = client._http
    return session


def request_timeout(connect_timeout: float, read_timeout: float) -> tuple[float, float]:
    """requests' (connect, read) timeout pair for one request.

    urllib3 keeps the connect timeout on the socket until the request is sent, so it is
    what bounds each body slice's send; a stalled send must not outlast the read timeout.
    """
    return (min(connect_timeout, read_timeout), read_timeout)


def delete_session(http: requests.Session, uri: str, timeout: tuple[float, float]) -> HttpResponse:
    """DELETE the resumable session at ``uri``: GCS answers 499 when it cancelled it.

    Raises :class:`TransportFailure` if no whole answer came back.
    """
    failure: TransportFailure | None = None
    try:
        with http.request("DELETE", uri, timeout=timeout) as response:
            return _response(response)
    except _NETWORK_ERRORS as exc:
        failure = TransportFailure(_cause_of(exc))
        _scrub(exc)
    raise failure
