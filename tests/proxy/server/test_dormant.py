"""The resume window: a released upload's GCS session is cancelled once nobody came back.

Sessions are real resumable sessions on the strict GCS endpoint; what is checked is what
GCS says about them afterwards (a status query answers 404 once a session is cancelled).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import requests
import trio

from faultnet.gcs import GcsServer
from faultnet.gcs.clients import anonymous_client, start_resumable_upload
from protocol import (
    SUPPORTED_VERSIONS,
    AttachUpload,
    ErrorCode,
    Hello,
    Status,
    StatusQuery,
    Welcome,
)
from proxy.server import serve_in_background
from proxy.server.backend import Backend, TargetKind
from proxy.server.dormant import DormantSessions
from proxy.server.settings import KiB, ServerSettings
from proxy.server.tokens import UploadTicket
from reliablewriter import RetryPolicy, WriterSettings
from tests.proxy.conftest import RawClient
from tests.proxy.server.test_uploads import send_range

Connect = Callable[..., Awaitable[RawClient]]

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


async def test_an_abandoned_upload_leaves_nothing_behind_on_disk(
    proxy_settings: ServerSettings, raw_client: Connect, tmp_path: Path
) -> None:
    # A client sends some bytes and vanishes. The proxy lets the upload go when idle, keeps
    # its session for the resume window, then cancels it: no partial file stays, and the
    # token can no longer write.
    settings = dataclasses.replace(
        proxy_settings, upload_idle_timeout=0.3, resume_window=0.5, token_key=os.urandom(32)
    )
    data = os.urandom(768 * KiB)
    sessions = tmp_path / "gcs" / "sessions"
    with GcsServer(data_dir=tmp_path / "gcs") as gcs:
        gcs.store.create_bucket("left")
        backend = Backend(anonymous_client(gcs.url), TargetKind.EMBEDDED, gcs.url)
        async with serve_in_background(settings, backend) as proxy:
            client = await raw_client(proxy)
            opened = await client.open("left", "abandoned.bin")
            await send_range(client, data, 0, len(data))
            for _ in range(200):  # some of it reached the session's partial file
                await client.send(StatusQuery())
                if (await client.reply(Status)).committed_offset > 0:
                    break
                await trio.sleep(0.05)
            assert list(sessions.glob("*.part"))
            await client.aclose()

            for _ in range(200):
                if not any(sessions.iterdir()):
                    break
                await trio.sleep(0.05)
            assert not any(sessions.iterdir()), sorted(p.name for p in sessions.iterdir())

            late = await raw_client(proxy, hello=False)
            await late.send(Hello(SUPPORTED_VERSIONS, 256 * KiB, client_name="late"))
            await late.reply(Welcome)
            await late.send(AttachUpload(opened.token))
            assert (await late.error()).code is ErrorCode.UPLOAD_FINISHED
        blob = anonymous_client(gcs.url).bucket("left").blob("abandoned.bin")
        assert not await trio.to_thread.run_sync(blob.exists)


async def test_a_finished_session_is_let_be(gcs_server: GcsServer, gcs_bucket: str) -> None:
    uri, ticket = _session(gcs_server, gcs_bucket, "finished.bin")
    size = 256 * KiB
    response = await trio.to_thread.run_sync(
        lambda: requests.put(
            uri,
            data=os.urandom(size),
            headers={"Content-Range": f"bytes 0-{size - 1}/{size}"},
            timeout=10,
        )
    )
    assert response.status_code == 200
    dormant = DormantSessions(_backend(gcs_server), _WINDOW, _WRITER)
    async with trio.open_nursery() as nursery:
        await nursery.start(dormant.run)
        dormant.remember(ticket, 0)
        await trio.sleep(_WINDOW * 1.5)
        assert len(dormant) == 0  # done with at the first look, not looked at again
        nursery.cancel_scope.cancel()
    blob = anonymous_client(gcs_server.url).bucket(gcs_bucket).blob("finished.bin")
    assert await trio.to_thread.run_sync(blob.exists)
