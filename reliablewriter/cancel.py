"""Cancelling a resumable session by its URI alone, without a writer.

A proxy that restarted knows an abandoned upload only from its token; when the upload's
resume window expires it cancels the session so that GCS keeps nothing of it. (A live
writer's :meth:`~reliablewriter.ReliableWriter.abort` sends the same DELETE, once.)
"""

from __future__ import annotations

import enum
import random

import trio
from google.cloud import storage  # type: ignore[import-untyped]

from .errors import NonRetryableHTTPError, RetriesExhaustedError
from .resumable import HttpResponse, error_reason
from .settings import RetryPolicy, WriterSettings
from .transport import TransportFailure, delete_session, http_session, request_timeout

__all__ = ["CancelResult", "cancel_session"]

# GCS's answer to a DELETE that cancelled the session ("Client Closed Request").
_CANCELLED = 499
_GONE = frozenset({404, 410})


class CancelResult(enum.Enum):
    """What became of the session."""

    #: GCS answered 499: the session is cancelled. (A session that had finished may be
    #: answered so too; its object stays: cancelling never deletes an object.)
    CANCELLED = "cancelled"
    #: 404/410: the session was already cancelled, expired, or finalized and forgotten.
    ALREADY_GONE = "already-gone"
    #: 200/201: the session had finished; the object exists (cancelling cannot undo it).
    FINISHED = "finished"


async def cancel_session(
    bucket: storage.Bucket, session_uri: str, settings: WriterSettings | None = None
) -> CancelResult:
    """DELETE the resumable session at ``session_uri`` through ``bucket``'s client.

    The request goes through the storage client's own HTTP session, so its credentials
    apply: ``session_uri`` must be one this process trusts (checked against the
    configured endpoint, never taken from an unauthenticated source as given). Failures
    of the network and retryable statuses are retried under ``settings.retry``; other
    refusals raise :class:`~reliablewriter.NonRetryableHTTPError`, and giving up raises
    :class:`~reliablewriter.RetriesExhaustedError`. Neither names the session URI (a
    secret). If cancelled partway, the DELETE may or may not have reached GCS; calling
    again is safe (a second answer is ``ALREADY_GONE``).
    """
    settings = settings or WriterSettings()
    policy = settings.retry
    http = http_session(bucket.client)
    timeout = request_timeout(settings.connect_timeout, settings.progress_timeout)
    rng = random.Random()
    attempts = 0
    started = trio.current_time()
    while True:
        try:
            response = await trio.to_thread.run_sync(delete_session, http, session_uri, timeout)
        except TransportFailure as failure:
            cause = failure.cause
        else:
            result = _result_of(response, policy)
            if result is not None:
                return result
            cause = f"http-{response.status}"
        attempts += 1
        if policy.gives_up(attempts, trio.current_time() - started):
            raise RetriesExhaustedError(
                "could not cancel the upload session", attempts=attempts, cause=cause
            )
        await trio.sleep(policy.next_delay(attempts, rng))


def _result_of(response: HttpResponse, policy: RetryPolicy) -> CancelResult | None:
    """The answer's meaning, or None for a status worth another attempt."""
    status = response.status
    if status == _CANCELLED:
        return CancelResult.CANCELLED
    if status in _GONE:
        return CancelResult.ALREADY_GONE
    if status in (200, 201):
        return CancelResult.FINISHED
    if policy.is_retryable_status(status):
        return None
    raise NonRetryableHTTPError(
        "GCS refused to cancel the upload session", status=status, reason=error_reason(response)
    )
