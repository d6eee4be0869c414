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

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import google_crc32c
import trio
from google.cloud import storage  # type: ignore[import-untyped]

from .checksum import crc32c_to_b64
from .errors import ChecksumMismatchError, NonRetryableHTTPError
from .results import ObjectInfo
from .settings import RetryPolicy
from .settled import ExpectedObject, SettledRequest, settle
from .transport import GcsTransport, Refused

__all__ = [
    "ObjectRequest",
    "settled_upload",
    "upload_in_one_request",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ObjectRequest:
    """A whole object to store: its name, bytes and what GCS is asked to check."""

    name: str
    data: bytes | memoryview = field(repr=False)
    content_type: str | None = None
    metadata: Mapping[str, str] | None = None
    if_generation_match: int | None = None
    #: the CRC32C the caller says the bytes have; checked before anything is sent
    crc32c: int | None = None


def settled_upload(request: ObjectRequest, policy: RetryPolicy, *, now: float) -> SettledRequest:
    """The decisions of uploading ``request`` in one request, sans-IO.

    Raises :class:`ChecksumMismatchError` if ``request.crc32c`` is not the bytes' CRC32C.
    """
    crc32c = crc32c_to_b64(google_crc32c.value(bytes(request.data)))
    if request.crc32c is not None and crc32c_to_b64(request.crc32c) != crc32c:
        raise ChecksumMismatchError(
            "the bytes' CRC32C is not the one given; nothing was sent",
            expected=crc32c_to_b64(request.crc32c),
            actual=crc32c,
            name=request.name,
        )
    expected = ExpectedObject(request.name, len(request.data), crc32c, request.if_generation_match)
    return SettledRequest(
        expected, policy, now=now, action="the one-request upload", refusal=_refusal(request.name)
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
) -> ObjectInfo:
    """Store ``request`` as one object with one multipart upload (retried under ``policy``).

    Raises a :class:`~reliablewriter.WriterError`: :class:`NonRetryableHTTPError` for a
    refusal (412 when ``if_generation_match`` does not hold),
    :class:`ChecksumMismatchError` if ``request.crc32c`` is not the bytes' CRC32C (nothing
    is sent), :class:`RetriesExhaustedError` once ``policy`` gives up. Cancelled midway,
    the object is stored whole or not at all; which one, a read back tells.
    """
    upload = settled_upload(request, policy, now=trio.current_time())
    transport = GcsTransport(
        bucket.blob(request.name), connect_timeout=connect_timeout, read_timeout=read_timeout
    )
    info = await settle(
        upload,
        lambda: transport.store_whole_object(
            request.data,
            request.content_type,
            request.metadata,
            request.if_generation_match,
            upload.expected.crc32c,
        ),
        transport.lookup_object,
    )
    if upload.attempts:
        logger.info(
            "stored %r in one request after %d failed attempts", request.name, upload.attempts
        )
    return info
