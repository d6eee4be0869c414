"""Small objects in one request: a multipart upload, retried but never stored twice by mistake.

When a whole object is in hand and fits one chunk, a resumable session costs two requests
more than it saves (initiation, then the final PUT). The Go Writer sends such an object
as one multipart upload, and so does this module: object metadata, the known CRC32C (which
GCS verifies) and ``ifGenerationMatch`` travel with the bytes.

A multipart upload has no session to ask what was stored, so a lost answer is the hard
case. The object may or may not have been stored; sending it again without a precondition
would store the same bytes a second time, as a new generation, and with one it would be
refused (412) by the copy the first attempt stored. So after any attempt without a clear
answer (no response, a cut one, a timeout, 408/429/5xx) the object is **read back** first:
if GCS holds an object of our size and CRC32C (and, under a precondition, not the
generation that precondition names), it is ours, and we are done; otherwise we send again.

The decisions are sans-IO, as in :mod:`reliablewriter.resumable`: :class:`OneRequestUpload`
is told what each attempt returned and answers with the next step. :func:`upload_in_one_request`
does the I/O (one blocking call in a worker thread per step) and the waiting. Cancelling it
midway leaves GCS holding either nothing new or the whole object, never part of it: a
multipart upload is stored whole or not at all.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import google_crc32c
import trio
from google.cloud import storage  # type: ignore[import-untyped]

from .checksum import crc32c_to_b64
from .errors import (
    ChecksumMismatchError,
    NonRetryableHTTPError,
    RetriesExhaustedError,
    UnexpectedResponseError,
    WriterError,
)
from .results import ObjectInfo
from .settings import RetryPolicy
from .transport import GcsTransport, NoAnswer, Refused, Stored, StoreOutcome, TransportFailure

__all__ = [
    "ObjectRequest",
    "OneRequestUpload",
    "ReadBack",
    "Send",
    "upload_in_one_request",
]

logger = logging.getLogger(__name__)

#: statuses after which the object may have been stored: read it back before sending again
_UNCLEAR_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))


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


@dataclass(frozen=True)
class Send:
    """Send the multipart upload; first wait ``delay`` seconds (a retry's backoff)."""

    delay: float = 0.0


@dataclass(frozen=True)
class ReadBack:
    """Look the object up: is what GCS holds ours?"""

    delay: float = 0.0


class _Phase(enum.Enum):
    SENDING = "sending"
    READING_BACK = "reading back"
    DONE = "done"
    FAILED = "failed"


class OneRequestUpload:
    """The decisions of a one-request upload, sans-IO: no socket, no clock of its own.

    Call :meth:`next_step`, do it, and report the result with :meth:`stored_outcome` or
    :meth:`read_back_outcome`, passing the current time. :attr:`result` (or :attr:`error`)
    is set once the upload is over.
    """

    def __init__(self, request: ObjectRequest, policy: RetryPolicy, *, now: float) -> None:
        self._request = request
        self._policy = policy
        self._size = len(request.data)
        self._crc32c = crc32c_to_b64(google_crc32c.value(bytes(request.data)))
        self._phase = _Phase.SENDING
        self._attempts = 0
        self._started = now
        #: an attempt may have stored the object: a refusal later may be our own copy's doing
        self._maybe_stored = False
        #: the read back follows a 412: if the object is not ours, the precondition failed
        self._after_refusal: Refused | None = None
        self.result: ObjectInfo | None = None
        self.error: WriterError | None = None
        if request.crc32c is not None and crc32c_to_b64(request.crc32c) != self._crc32c:
            self._fail(
                ChecksumMismatchError(
                    "the bytes' CRC32C is not the one given; nothing was sent",
                    expected=crc32c_to_b64(request.crc32c),
                    actual=self._crc32c,
                    name=request.name,
                )
            )

    @property
    def crc32c(self) -> str:
        """The bytes' CRC32C in GCS's form, sent for GCS to verify."""
        return self._crc32c

    @property
    def attempts(self) -> int:
        """Failed attempts so far (sends and read backs)."""
        return self._attempts

    def next_step(self) -> Send | ReadBack | None:
        """What to do now; None once :attr:`result` or :attr:`error` is set."""
        delay = self._policy.next_delay(self._attempts) if self._attempts else 0.0
        if self._phase is _Phase.SENDING:
            return Send(delay)
        if self._phase is _Phase.READING_BACK:
            # The first look after an unclear send goes at once: it costs one small request.
            return ReadBack(0.0 if self._after_refusal is not None else delay)
        return None

    def stored_outcome(self, outcome: StoreOutcome, *, now: float) -> None:
        """What the send returned."""
        assert self._phase is _Phase.SENDING
        if isinstance(outcome, Stored):
            self._accept(outcome.resource, how="GCS answered the upload")
        elif isinstance(outcome, Refused) and outcome.status not in _UNCLEAR_STATUSES:
            if outcome.status == 412 and self._maybe_stored:
                # Perhaps refused because an earlier attempt did store it: look.
                self._after_refusal = outcome
                self._phase = _Phase.READING_BACK
            else:
                self._fail(self._refusal_error(outcome))
        else:
            self._maybe_stored = True
            self._unclear(outcome, now=now)
            self._phase = _Phase.READING_BACK

    def read_back_outcome(self, outcome: Mapping[str, Any] | int | NoAnswer, *, now: float) -> None:
        """What looking the object up returned: its resource, a status (404: none), or
        no answer."""
        assert self._phase is _Phase.READING_BACK
        if isinstance(outcome, NoAnswer):
            self._unclear(outcome, now=now)
            return
        if not isinstance(outcome, int) and self._is_ours(outcome):
            self._accept(outcome, how="the object read back is ours")
            return
        if isinstance(outcome, int) and outcome != 404:
            self._fail(
                NonRetryableHTTPError(
                    "cannot read the object back to learn whether it was stored",
                    status=outcome,
                    reason="refused the metadata request",
                    name=self._request.name,
                )
            )
        elif self._after_refusal is not None:
            self._fail(self._refusal_error(self._after_refusal))
        else:
            self._phase = _Phase.SENDING  # not stored: sending again cannot store it twice

    # -- the rules ---------------------------------------------------------------------

    def _is_ours(self, resource: Mapping[str, Any]) -> bool:
        info = ObjectInfo.from_resource(resource)
        precondition = self._request.if_generation_match
        # Under ifGenerationMatch=G, generation G is the object we were to replace, not ours.
        replaced = bool(precondition) and info.generation == precondition
        return not replaced and info.size == self._size and info.crc32c == self._crc32c

    def _accept(self, resource: Mapping[str, Any], *, how: str) -> None:
        if not self._is_ours(resource):
            info = ObjectInfo.from_resource(resource)
            self._fail(
                UnexpectedResponseError(
                    f"{how}, but it holds {info.size} bytes with crc32c {info.crc32c}, "
                    f"not {self._size} bytes with crc32c {self._crc32c}",
                    name=self._request.name,
                )
            )
            return
        self.result = ObjectInfo.from_resource(resource)
        self._phase = _Phase.DONE

    def _unclear(self, outcome: StoreOutcome | NoAnswer, *, now: float) -> None:
        self._attempts += 1
        if self._policy.gives_up(self._attempts, now - self._started):
            cause = outcome.cause if isinstance(outcome, NoAnswer) else _cause(outcome)
            self._fail(
                RetriesExhaustedError(
                    "the one-request upload kept failing",
                    attempts=self._attempts,
                    cause=cause,
                    name=self._request.name,
                )
            )

    def _refusal_error(self, refused: Refused) -> NonRetryableHTTPError:
        return NonRetryableHTTPError(
            "GCS refused the upload",
            status=refused.status,
            reason=refused.reason,
            name=self._request.name,
        )

    def _fail(self, error: WriterError) -> None:
        self.error = error
        self._phase = _Phase.FAILED


def _cause(outcome: Stored | Refused) -> str:
    return f"http-{outcome.status}" if isinstance(outcome, Refused) else "unexpected-object"


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
    transport = GcsTransport(
        bucket.blob(request.name), connect_timeout=connect_timeout, read_timeout=read_timeout
    )
    upload = OneRequestUpload(request, policy, now=trio.current_time())
    while (step := upload.next_step()) is not None:
        await trio.sleep(step.delay)
        if isinstance(step, Send):
            stored = await trio.to_thread.run_sync(
                transport.store_whole_object,
                request.data,
                request.content_type,
                request.metadata,
                request.if_generation_match,
                upload.crc32c,
            )
            upload.stored_outcome(stored, now=trio.current_time())
        else:
            try:
                found: Mapping[str, Any] | int | NoAnswer = await trio.to_thread.run_sync(
                    transport.lookup_object
                )
            except TransportFailure as exc:
                found = NoAnswer(exc.cause)
            upload.read_back_outcome(found, now=trio.current_time())
    if upload.error is not None:
        raise upload.error
    assert upload.result is not None
    if upload.attempts:
        logger.info(
            "stored %r in one request after %d failed attempts", request.name, upload.attempts
        )
    return upload.result
