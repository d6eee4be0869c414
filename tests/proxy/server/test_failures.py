"""An upload whose tasks crash (a bug, not a GCS failure), seen from real connections."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import requests
import trio
from requests.adapters import HTTPAdapter

from faultnet.gcs import GcsServer
from faultnet.gcs.clients import anonymous_client
from protocol import AttachUpload, Error, ErrorCode
from proxy.server import ProxyServer, serve_in_background
from proxy.server.backend import Backend, TargetKind
from proxy.server.settings import KiB, ServerSettings
from tests.proxy.conftest import RawClient

Connect = Callable[..., Awaitable[RawClient]]


class CrashesOnChunks(HTTPAdapter):
    """Sessions start normally; sending a chunk raises what no transport error handler
    expects, so the writer's worker crashes (the writer records it, then re-raises it)."""

    def send(  # type: ignore[override]
        self, request: requests.PreparedRequest, **kwargs: Any
    ) -> requests.Response:
        if request.method == "PUT" and request.body is not None:
            raise RuntimeError("a bug in the HTTP stack")
        return super().send(request, **kwargs)


@pytest.fixture
def proxy_backend(gcs_server: GcsServer) -> Backend:
    session = requests.Session()
    session.mount("http://", CrashesOnChunks())
    client = anonymous_client(gcs_server.url, http=session)
    return Backend(client, TargetKind.EMBEDDED, gcs_server.url)


async def test_a_crashed_upload_tells_its_connections_and_keeps_one_reason(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    client = await raw_client(proxy_server)
    opened = await client.open(gcs_bucket, "crash.bin")
    await client.write(0, b"x" * (256 * KiB))  # a whole chunk: the worker sends it, and crashes

    # The attached connection hears of it at once, unsolicited, not at its next request.
    with trio.fail_after(10):
        told = await client.reply(Error)
    assert told.reply_to == 0

    # Whoever asks later hears the same reason.
    later = await raw_client(proxy_server)
    await later.send(AttachUpload(opened.token))
    refused = await later.reply(Error)
    assert refused.code == told.code
    assert refused.code in (ErrorCode.GCS_ERROR, ErrorCode.INTERNAL)


async def test_a_session_initiation_answered_410_starts_a_fresh_session(
    gcs_server: GcsServer, proxy_settings: ServerSettings, raw_client: Connect, gcs_bucket: str
) -> None:
    # A 410 at initiation once left the writer without a session, and the open crashed the
    # connection ("no session yet"). The proxy that opens a session knows nothing was
    # committed to it, so its writer may replace it (restart_if_nothing_committed).
    session = requests.Session()
    session.headers["x-retry-test-id"] = gcs_server.create_retry_test(
        {"storage.objects.insert": ["return-410"]}
    )
    client = anonymous_client(gcs_server.url, http=session)
    backend = Backend(client, TargetKind.EMBEDDED, gcs_server.url)
    async with serve_in_background(proxy_settings, backend) as server:
        connection = await raw_client(server)
        opened = await connection.open(gcs_bucket, "gone.bin")
        assert opened.token
