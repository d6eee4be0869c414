"""The resume window: a released upload's GCS session is cancelled once nobody came back.

Sessions are real resumable sessions on the strict GCS endpoint; what is checked is what
GCS says about them afterwards (a status query answers 404 once a session is cancelled).
"""

from __future__ import annotations

import os

import requests
import trio

from faultnet.gcs import GcsServer
from faultnet.gcs.clients import anonymous_client, start_resumable_upload
from proxy.server.backend import Backend, TargetKind
from proxy.server.dormant import DormantSessions
from proxy.server.settings import KiB
from proxy.server.tokens import UploadTicket
from reliablewriter import RetryPolicy, WriterSettings

_WINDOW = 0.4
_WRITER = WriterSettings(
    min_chunk_size=256 * KiB,
    max_chunk_size=256 * KiB,
    buffer_limit=256 * KiB,
    retry=RetryPolicy(initial_delay=0.01, max_delay=0.05, deadline=5.0),
    progress_timeout=5.0,
)


def _session(gcs_server: GcsServer, bucket: str, name: str) -> tuple[str, UploadTicket]:
    uri = start_resumable_upload(gcs_server.url, bucket, name, query={"ifGenerationMatch": "0"})
    backend = _backend(gcs_server)
    ticket = UploadTicket(
        upload_id=f"u-{name}",
        bucket=bucket,
        name=name,
        session_ref=backend.session_reference(bucket, uri),
        if_generation_match=0,
    )
    return uri, ticket


def _backend(gcs_server: GcsServer) -> Backend:
    return Backend(anonymous_client(gcs_server.url), TargetKind.ENDPOINT, gcs_server.url)


def _status(uri: str) -> int:
    response = requests.put(uri, headers={"Content-Range": "bytes */*"}, timeout=10)
    return response.status_code


async def _cancelled(uri: str) -> None:
    """Wait (at most 10 s) until GCS says the session at ``uri`` is gone."""
    for _ in range(200):
        if await trio.to_thread.run_sync(_status, uri) == 404:
            return
        await trio.sleep(0.05)
    raise AssertionError("the session was not cancelled within 10 s")


def _persist(uri: str, size: int) -> None:
    response = requests.put(
        uri,
        data=os.urandom(size),
        headers={"Content-Range": f"bytes 0-{size - 1}/*"},
        timeout=10,
    )
    assert response.status_code == 308


async def test_a_session_nobody_came_back_for_is_cancelled_after_the_window(
    gcs_server: GcsServer, gcs_bucket: str
) -> None:
    uri, ticket = _session(gcs_server, gcs_bucket, "abandoned.bin")
    kept_uri, kept = _session(gcs_server, gcs_bucket, "reattached.bin")
    dormant = DormantSessions(_backend(gcs_server), _WINDOW, _WRITER)
    async with trio.open_nursery() as nursery:
        await nursery.start(dormant.run)
        dormant.remember(ticket, 0)
        dormant.remember(kept, 0)
        dormant.forget(kept.upload_id)  # its client came back
        await trio.sleep(_WINDOW / 2)
        assert await trio.to_thread.run_sync(_status, uri) == 308  # still resumable
        await _cancelled(uri)
        assert len(dormant) == 0
        nursery.cancel_scope.cancel()

    assert await trio.to_thread.run_sync(_status, kept_uri) == 308


async def test_a_session_another_proxy_is_writing_is_left_alone(
    gcs_server: GcsServer, gcs_bucket: str
) -> None:
    uri, ticket = _session(gcs_server, gcs_bucket, "moving.bin")
    dormant = DormantSessions(_backend(gcs_server), _WINDOW, _WRITER)
    async with trio.open_nursery() as nursery:
        await nursery.start(dormant.run)
        dormant.remember(ticket, 0)
        # Another proxy took the upload over and committed bytes meanwhile.
        await trio.to_thread.run_sync(_persist, uri, 256 * KiB)
        await trio.sleep(_WINDOW * 1.5)
        assert await trio.to_thread.run_sync(_status, uri) == 308
        assert ticket.upload_id in dormant  # looked at again one window later
        # Nothing moved in that window: now it goes.
        await _cancelled(uri)
        nursery.cancel_scope.cancel()


async def test_past_the_limit_the_oldest_session_is_cancelled_early(
    gcs_server: GcsServer, gcs_bucket: str
) -> None:
    sessions = [_session(gcs_server, gcs_bucket, f"many-{index}.bin") for index in range(3)]
    dormant = DormantSessions(_backend(gcs_server), 3600.0, _WRITER, limit=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(dormant.run)
        for _, ticket in sessions:
            dormant.remember(ticket, 0)
        oldest_uri = sessions[0][0]
        await _cancelled(oldest_uri)  # long before its hour is up
        assert len(dormant) == 2
        for uri, _ in sessions[1:]:
            assert await trio.to_thread.run_sync(_status, uri) == 308
        nursery.cancel_scope.cancel()

