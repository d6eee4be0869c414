"""Small objects in one request: a multipart upload, retried but never stored twice by mistake.

When a whole object is in hand and fits one chunk, a resumable session costs two requests
more than it saves (initiation, then the final PUT). The Go Writer sends such an object
as one multipart upload, and so does this module: object metadata, the known CRC32C (which
GCS verifies) and ``ifGenerationMatch`` travel with the bytes.

A multipart upload has no session to ask what was stored, so a lost answer is settled by
reading the object back before anything is sent again (:mod:`reliablewriter.settled`, which
compose shares). Cancelled midway, the object is stored whole or not at all, as a multipart
upload always is.
"""

from __future__ import annotations

import json
import logging
import secrets
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from google.cloud import storage  # type: ignore[import-untyped]

from .checksum import StreamChecksum, crc32c_to_b64
from .errors import ChecksumMismatchError, NonRetryableHTTPError
from .http_posts import WholeObjectPoster
from .results import ObjectInfo
from .settings import ChecksumMode, RetryPolicy
from .settled import ExpectedObject, SettledRequest, in_worker_thread, settle, settle_async
from .transport import (
    GcsTransport,
    Refused,
    StoreOutcome,
    http_session,
    post_whole_object,
    request_timeout,
)

__all__ = [
    "MultipartBody",
    "ObjectRequest",
    "multipart_body",
    "multipart_url",
    "settled_upload",
    "upload_in_one_request",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ObjectRequest:
    """A whole object to store: its name, bytes and what GCS is asked to check."""

    name: str
    #: the object's bytes, whole or in pieces (a writer's buffer views, so that they are
    #: copied once, into the request's body, and not joined first)
    data: bytes | memoryview | Sequence[bytes | memoryview] = field(repr=False)
    content_type: str | None = None
    metadata: Mapping[str, str] | None = None
    if_generation_match: int | None = None
    #: the CRC32C the caller says the bytes have; checked before anything is sent
    crc32c: int | None = None
    #: the bytes' CRC32C as the caller computed it from the bytes themselves (a protocol
    #: frame's, checked on arrival): taken instead of reading every byte again. GCS checks
    #: the bytes it receives against it, so a byte changed since still fails the upload.
    verified_crc32c: int | None = None
    #: an earlier attempt, perhaps in another process, may have stored these very bytes: a
    #: 412 is then read back, and an object of their size and CRC32C counts as stored
    maybe_stored_before: bool = False

    @property
    def pieces(self) -> tuple[memoryview, ...]:
        """The bytes as views, in order, none of them copied."""
        if isinstance(self.data, bytes | memoryview):
            return (memoryview(self.data),)
        return tuple(memoryview(piece) for piece in self.data)

    @property
    def size(self) -> int:
        return sum(piece.nbytes for piece in self.pieces)


def settled_upload(request: ObjectRequest, policy: RetryPolicy, *, now: float) -> SettledRequest:
    """The decisions of uploading ``request`` in one request, sans-IO.

    Raises :class:`ChecksumMismatchError` if ``request.crc32c`` is not the bytes' CRC32C
    (``request.verified_crc32c``, or else read from the bytes).
    """
    if request.verified_crc32c is not None:
        crc32c = crc32c_to_b64(request.verified_crc32c)
    else:
        checksum = StreamChecksum(ChecksumMode.CRC32C)  # reads a view without copying it whole
        checksum.extend(0, list(request.pieces))
        computed = checksum.crc32c
        assert computed is not None
        crc32c = computed
    if request.crc32c is not None and crc32c_to_b64(request.crc32c) != crc32c:
        raise ChecksumMismatchError(
            "the bytes' CRC32C is not the one given; nothing was sent",
            expected=crc32c_to_b64(request.crc32c),
            actual=crc32c,
            name=request.name,
        )
    expected = ExpectedObject(request.name, request.size, crc32c, request.if_generation_match)
    return SettledRequest(
        expected,
        policy,
        now=now,
        action="the one-request upload",
        refusal=_refusal(request.name),
        maybe_made=request.maybe_stored_before,
    )


@dataclass(frozen=True)
class MultipartBody:
    """One multipart/related upload: its ``Content-Type`` (naming the boundary) and body,
    as the buffers to send in order (the object's own among them, uncopied)."""

    content_type: str
    parts: tuple[bytes | memoryview, ...] = field(repr=False)

    @property
    def size(self) -> int:
        return sum(len(part) for part in self.parts)

    def joined(self) -> bytes:
        """The body in one buffer (a copy of the object), for a sender that needs one."""
        return b"".join(self.parts)


def multipart_body(request: ObjectRequest, crc32c: str) -> MultipartBody:
    """The upload of ``request`` as one multipart body: the object resource (name, content
    type, metadata and ``crc32c``, GCS's base64 form, which GCS verifies), then the bytes.

    The bytes are not copied: they are parts of the body as they are. The boundary is
    random, and never one that occurs in the bytes.
    """
    resource: dict[str, Any] = {
        "name": request.name,
        "contentType": request.content_type or "application/octet-stream",
        "crc32c": crc32c,
    }
    if request.metadata:
        resource["metadata"] = dict(request.metadata)
    pieces = request.pieces
    media_type = resource["contentType"].encode("utf-8")
    document = json.dumps(resource, separators=(",", ":")).encode("utf-8")
    while True:  # a repeat needs 128 random bits to turn up among the bytes: never, in practice
        boundary = b"rup-" + secrets.token_hex(16).encode("ascii")
        if not _occurs_in(b"--" + boundary, pieces):
            break
    head = b"".join((
        b"--", boundary, b"\r\ncontent-type: application/json; charset=UTF-8\r\n\r\n",
        document, b"\r\n--", boundary, b"\r\ncontent-type: ", media_type, b"\r\n\r\n",
    ))  # fmt: skip
    tail = b"".join((b"\r\n--", boundary, b"--\r\n"))
    return MultipartBody(
        f'multipart/related; boundary="{boundary.decode("ascii")}"', (head, *pieces, tail)
    )


def _occurs_in(needle: bytes, pieces: Sequence[memoryview]) -> bool:
    """Whether ``needle`` occurs in the concatenation of ``pieces``, read in place (a match
    may straddle pieces: each junction is searched with the bytes around it)."""
    overlap = len(needle) - 1
    carried = b""  # the end of what came before, as much as a straddling match can use
    for piece in pieces:
        joint = carried + bytes(piece[:overlap])
        if needle in joint or _find(piece, needle) >= 0:
            return True
        carried = (carried + bytes(piece[-overlap:]))[-overlap:] if overlap else b""
    return False


def _find(piece: memoryview, needle: bytes) -> int:
    # bytes.find needs a bytes object: a view of a whole one is searched in that object, in
    # place; only a view of part of one (rare: receives are kept whole) is copied to search
    whole = piece.obj
    if isinstance(whole, bytes) and len(piece) == len(whole):
        return whole.find(needle)
    return bytes(piece).find(needle)


def multipart_url(api_endpoint: str, bucket: str, if_generation_match: int | None) -> str:
    """Where a multipart upload into ``bucket`` goes, with its precondition if any."""
    query = "uploadType=multipart"
    if if_generation_match is not None:
        query += f"&ifGenerationMatch={if_generation_match}"
    return (
        f"{api_endpoint.rstrip('/')}/upload/storage/v1/b/"
        f"{urllib.parse.quote(bucket, safe='')}/o?{query}"
    )


def _refusal(name: str) -> Callable[[Refused], NonRetryableHTTPError]:
    def refusal(refused: Refused) -> NonRetryableHTTPError:
        return NonRetryableHTTPError(
            "GCS refused the upload", status=refused.status, reason=refused.reason, name=name
        )

    return refusal


async def upload_in_one_request(
    bucket: storage.Bucket,
    request: ObjectRequest,
    *,
    policy: RetryPolicy,
    connect_timeout: float = 30.0,
    read_timeout: float = 60.0,
    poster: WholeObjectPoster | None = None,
) -> ObjectInfo:
    """Store ``request`` as one object with one multipart upload (retried under ``policy``).

    The upload goes through ``bucket``'s client session in a worker thread, or, given a
    ``poster`` for the client's endpoint (:func:`~reliablewriter.http_posts.post_pool_for`),
    straight from trio; reading the object back goes through the session either way.

    Raises a :class:`~reliablewriter.WriterError`: :class:`NonRetryableHTTPError` for a
    refusal (412 when ``if_generation_match`` does not hold),
    :class:`ChecksumMismatchError` if ``request.crc32c`` is not the bytes' CRC32C (nothing
    is sent), :class:`RetriesExhaustedError` once ``policy`` gives up. Cancelled midway,
    the object is stored whole or not at all; which one, a read back tells.
    """
    upload = settled_upload(request, policy, now=trio.current_time())
    client = bucket.client
    timeouts = request_timeout(connect_timeout, read_timeout)
    url = multipart_url(client.api_endpoint, bucket.name, request.if_generation_match)
    multipart = multipart_body(request, upload.expected.crc32c)

    def look_up() -> Mapping[str, Any] | int:
        # only after an unclear answer: a blob handle costs more than it is worth up front
        transport = GcsTransport(
            bucket.blob(request.name), connect_timeout=connect_timeout, read_timeout=read_timeout
        )
        return transport.lookup_object()

    if poster is None:

        def send() -> StoreOutcome:
            return post_whole_object(http_session(client), url, multipart.joined(),
                                     multipart.content_type, timeouts)  # fmt: skip

        info = await settle(upload, send, look_up)
    else:

        async def post() -> StoreOutcome:
            return await poster.post(url, multipart.parts, multipart.content_type, timeouts)

        info = await settle_async(upload, post, in_worker_thread(look_up))
    if upload.attempts:
        logger.info(
            "stored %r in one request after %d failed attempts", request.name, upload.attempts
        )
    return info
