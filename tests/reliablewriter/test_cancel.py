"""Issue 10 #6: cancelling an abandoned session from its URI alone, with no writer.

A restarted proxy knows an abandoned upload only from its token; when the resume window
expires, cancel_session DELETEs the session (GCS answers 499), retrying what is worth it.
"""

from __future__ import annotations

import dataclasses

import pytest

from faultnet.gcs import GcsApiError
from reliablewriter import (
    CancelResult,
    NonRetryableHTTPError,
    RetriesExhaustedError,
    SessionLostError,
    WriterSettings,
    cancel_session,
    open_writer,
)

from .conftest import KiB, Target, payload


async def _abandoned(target: Target, settings: WriterSettings) -> str:
    """The URI of a session holding 512 KiB, whose writer has gone away."""
    async with open_writer(target.bucket, "abandoned", settings) as writer:
        await writer.write_at(0, payload(600 * KiB))
        await writer.wait_committed(512 * KiB)
        return writer.session_uri


async def test_an_abandoned_session_is_cancelled_by_its_uri(
    target: Target, settings: WriterSettings
) -> None:
    session_uri = await _abandoned(target, settings)
    upload_id = session_uri.rsplit("upload_id=", 1)[1]
    assert await cancel_session(target.bucket, session_uri, settings) is CancelResult.CANCELLED
    with pytest.raises(GcsApiError) as gone:
        target.strict.store.session(upload_id)
    assert gone.value.status == 404
    # Cancelling again is harmless, and nobody can resume it.
    assert await cancel_session(target.bucket, session_uri, settings) is CancelResult.ALREADY_GONE
    with pytest.raises(SessionLostError):
        async with open_writer(target.bucket, "abandoned", settings, session_uri=session_uri):
            pass
    assert target.object_names() == []


async def test_cancelling_rides_out_transient_failures(
    target: Target, settings: WriterSettings
) -> None:
    session_uri = await _abandoned(target, settings)
    target.script("return-503", "return-reset-connection")
    assert await cancel_session(target.bucket, session_uri, settings) is CancelResult.CANCELLED
    assert target.script_done()


async def test_cancelling_a_finished_session_leaves_its_object(
    target: Target, settings: WriterSettings
) -> None:
    async with open_writer(target.bucket, "done", settings) as writer:
        await writer.write_at(0, b"done")
        await writer.complete()
        session_uri = writer.session_uri
    # The strict endpoint answers 499 (it forgets the finished session's result); GCS
    # may answer 200 or 404. Whatever the answer, the object stays.
    assert await cancel_session(target.bucket, session_uri, settings) in CancelResult
    assert target.read("done") == b"done"


async def test_a_refusal_and_giving_up_are_errors_without_the_session_uri(
    target: Target, settings: WriterSettings
) -> None:
    session_uri = await _abandoned(target, settings)
    secret = session_uri.rsplit("upload_id=", 1)[1]
    target.script("return-403")
    with pytest.raises(NonRetryableHTTPError, match="HTTP 403") as refused:
        await cancel_session(target.bucket, session_uri, settings)
    assert secret not in str(refused.value)
    settings = dataclasses.replace(
        settings, retry=dataclasses.replace(settings.retry, max_attempts=2)
    )
    target.script("return-503", "return-503")
    with pytest.raises(RetriesExhaustedError, match="last cause: http-503") as exhausted:
        await cancel_session(target.bucket, session_uri, settings)
    assert secret not in str(exhausted.value)
    assert target.script_done()
    # Still there to cancel once GCS answers.
    assert await cancel_session(target.bucket, session_uri, settings) is CancelResult.CANCELLED
