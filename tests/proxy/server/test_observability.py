"""What the proxy tells operators: Prometheus metrics, and logs that never hold secrets."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Awaitable, Callable

import google_crc32c
import pytest
import trio

from faultnet.gcs import GcsServer
from faultnet.gcs.clients import anonymous_client
from faultnet.plan import FaultPlan
from faultnet.transport import faulty_session
from protocol import (
    PROTOCOL_VERSION,
    AttachUpload,
    Complete,
    Completed,
    ErrorCode,
    Hello,
    UploadOpened,
)
from proxy.server import ProxyServer, serve_in_background
from proxy.server.backend import Backend, TargetKind
from proxy.server.logging import (
    REDACTED,
    RedactingFormatter,
    log_event,
    protect_third_party_loggers,
    redact,
)
from proxy.server.settings import KiB, MiB, ServerSettings
from reliablewriter import RetryPolicy
from tests.proxy.conftest import RawClient
from tests.proxy.server.test_uploads import send_range

Connect = Callable[..., Awaitable[RawClient]]
StartProxy = Callable[..., contextlib.AbstractAsyncContextManager[ProxyServer]]

SESSION_URI = "http://127.0.0.1:1/upload/storage/v1/b/b/o?uploadType=resumable&upload_id=ABCDEF"


async def _scrape(address: tuple[str, int], path: str = "/metrics") -> tuple[str, str]:
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        response = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                response += chunk
    head, _, body = response.decode().partition("\r\n\r\n")
    return head.splitlines()[0], body


def _sample(body: str, name: str) -> float:
    for line in body.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


async def test_metrics_endpoint_counts_an_upload(
    proxy_settings: ServerSettings, proxy_backend: Backend, raw_client: Connect, gcs_bucket: str
) -> None:
    data = os.urandom(MiB + 1)
    async with serve_in_background(
        proxy_settings, proxy_backend, metrics_listen=("127.0.0.1", 0)
    ) as server:
        assert server.metrics_address is not None
        client = await raw_client(server)
        await client.open(gcs_bucket, "metered.bin")
        await send_range(client, data, 0, len(data))
        await client.send(Complete(len(data)))
        await client.reply(Completed)
        await client.send(AttachUpload(b"not a token at all, clearly not"))
        assert (await client.error()).code is ErrorCode.BAD_TOKEN  # v1's name for it

        status, body = await _scrape(server.metrics_address)
        missing, _ = await _scrape(server.metrics_address, "/other")

    assert status.endswith("200 OK")
    assert "404" in missing
    assert _sample(body, "rup_uploads_started_total") == 1
    assert _sample(body, "rup_uploads_completed_total") == 1
    assert _sample(body, "rup_received_bytes_total") == len(data)
    assert _sample(body, "rup_committed_bytes_total") == len(data)
    assert 'rup_errors_sent_total{code="TOKEN_NOT_RESUMABLE"} 1.0' in body
    assert _sample(body, "rup_buffer_reserved_bytes") == 0
    assert _sample(body, "rup_buffer_held_bytes") == 0
    assert _sample(body, "rup_connections") == 1


async def test_the_metrics_endpoint_stops_with_the_server(
    proxy_settings: ServerSettings, proxy_backend: Backend
) -> None:
    async with serve_in_background(
        proxy_settings, proxy_backend, metrics_listen=("127.0.0.1", 0)
    ) as server:
        assert server.metrics_address is not None
        address = server.metrics_address
        status, _ = await _scrape(address)
        assert status.endswith("200 OK")

    with pytest.raises(OSError, match="connect"):
        await trio.open_tcp_stream(*address)
    assert not [thread for thread in threading.enumerate() if thread.name == "rup-metrics"]


async def test_logs_of_a_full_upload_hold_no_secrets(
    start_proxy: StartProxy,
    raw_client: Connect,
    gcs_bucket: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bearer = "bearer-" + os.urandom(8).hex()
    data = os.urandom(MiB)
    caplog.set_level(logging.DEBUG)
    async with start_proxy(auth_tokens=(bearer,)) as server:
        client = await raw_client(server, auth=bearer)
        opened = await client.open(gcs_bucket, "secretive.bin")
        second = await raw_client(server, auth=bearer)
        await second.send(AttachUpload(opened.token))
        await second.reply(UploadOpened)
        await send_range(client, data, 0, len(data))
        await client.send(Complete(len(data)))
        await client.reply(Completed)
        bad = await raw_client(server, hello=False)
        await bad.send(Hello((PROTOCOL_VERSION,), 256 * 1024, auth=bearer + "x"))
        assert (await bad.error()).code is ErrorCode.UNAUTHENTICATED
        (upload,) = server.registry.uploads()
        session_id = upload.writer.session_uri.rsplit("upload_id=", 1)[-1]
    formatter = RedactingFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    text = "\n".join(lines + [record.getMessage() for record in caplog.records])
    assert "upload-opened" in text  # the logs did capture the upload
    assert bearer not in text
    assert opened.token.hex() not in text
    assert repr(opened.token)[2:-1] not in text
    assert len(session_id) > 8
    assert session_id not in text


def test_redact_masks_session_ids_and_bearer_tokens() -> None:
    message = f"PUT {SESSION_URI} failed; Authorization: Bearer abc.def"

    scrubbed = redact(message)

    assert "ABCDEF" not in scrubbed
    assert "abc.def" not in scrubbed
    assert REDACTED in scrubbed


@pytest.mark.parametrize(
    "name", ["urllib3.connectionpool", "urllib3.connection", "google.cloud.storage"]
)
def test_http_library_loggers_are_scrubbed(name: str, caplog: pytest.LogCaptureFixture) -> None:
    # urllib3.connection warns "Failed to parse headers (url=...)" with the session URI when
    # a response head is damaged; each such logger needs its own filter.
    protect_third_party_loggers()
    with caplog.at_level(logging.DEBUG, logger=name):
        logging.getLogger(name).warning("Failed to parse headers (url=%s)", SESSION_URI)

    (record,) = caplog.records
    assert "ABCDEF" not in record.getMessage()
    assert REDACTED in record.getMessage()


def test_structured_log_lines_are_key_value_and_redacted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("proxy.test")
    with caplog.at_level(logging.INFO, logger="proxy.test"):
        log_event(logger, logging.INFO, "gcs-error", upload="u1", error=f"boom at {SESSION_URI}")

    (record,) = caplog.records
    line = RedactingFormatter().format(record)
    assert " gcs-error upload=u1 error=" in line
    assert "ABCDEF" not in line
    assert "ABCDEF" not in record.getMessage()


async def test_gcs_faults_are_retried_and_counted_by_cause(
    proxy_settings: ServerSettings, gcs_server: GcsServer, raw_client: Connect, gcs_bucket: str
) -> None:
    # Every connection to GCS is reset once 300 KiB of request bytes went through it. With
    # 256 KiB chunks each connection carries one chunk whole and is cut in the next one,
    # which must be retried (after a status query) on a new connection.
    plan = FaultPlan.parse("seed=1; reset_peer:up(after=300k)")
    http = faulty_session(plan, pool_maxsize=16)
    backend = Backend(anonymous_client(gcs_server.url, http=http), TargetKind.ENDPOINT, "faulty")
    patient = dataclasses.replace(
        proxy_settings.writer,
        min_chunk_size=256 * KiB,
        max_chunk_size=256 * KiB,
        retry=RetryPolicy(max_attempts=50, initial_delay=0.01, max_delay=0.1),
    )
    settings = dataclasses.replace(proxy_settings, writer=patient)
    data = os.urandom(3 * MiB + 17)
    async with serve_in_background(settings, backend, metrics_listen=("127.0.0.1", 0)) as server:
        assert server.metrics_address is not None
        client = await raw_client(server)
        await client.open(gcs_bucket, "retried.bin")
        await send_range(client, data, 0, len(data))
        await client.send(Complete(len(data), google_crc32c.value(data)))
        assert (await client.reply(Completed)).crc32c == google_crc32c.value(data)
        _, body = await _scrape(server.metrics_address)

    retries = [line for line in body.splitlines() if line.startswith("rup_gcs_retries_total{")]
    assert retries, body
    assert sum(float(line.rsplit(" ", 1)[1]) for line in retries) >= 1
    assert _sample(body, "rup_committed_bytes_total") == len(data)
    stored = await trio.to_thread.run_sync(
        anonymous_client(gcs_server.url).bucket(gcs_bucket).blob("retried.bin").download_as_bytes
    )
    assert stored == data
