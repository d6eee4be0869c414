"""/metrics against Prometheus's naming guide, parsed by prometheus-client's own parser;
and the /healthz and /readyz probes on the same listener."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Awaitable, Callable

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from protocol import Complete, Completed, ErrorCode
from proxy.server import ProxyServer, serve_in_background
from proxy.server.backend import Backend
from proxy.server.health import Health
from proxy.server.metrics import GCS_METHODS, GCS_OUTCOMES
from proxy.server.settings import MiB, ServerSettings
from proxy.version import version
from tests.proxy.conftest import RawClient
from tests.proxy.server.test_observability import _scrape
from tests.proxy.server.test_uploads import send_range

Connect = Callable[..., Awaitable[RawClient]]

_NON_BASE_UNITS = re.compile(r"_(milliseconds|microseconds|minutes|hours|kib|mib|kb|mb|gb)(_|$)")


async def _families(server: ProxyServer) -> dict[str, Metric]:
    assert server.metrics_address is not None
    status, body = await _scrape(server.metrics_address)
    assert status.endswith("200 OK")
    return {family.name: family for family in text_string_to_metric_families(body)}


async def _upload_one(server: ProxyServer, raw_client: Connect, bucket: str) -> int:
    data = os.urandom(MiB + 7)
    client = await raw_client(server)
    await client.open(bucket, "conventions.bin")
    await send_range(client, data, 0, len(data))
    await client.send(Complete(len(data)))
    await client.reply(Completed)
    return len(data)


async def test_metric_names_follow_the_prometheus_naming_guide(
    proxy_settings: ServerSettings, proxy_backend: Backend, raw_client: Connect, gcs_bucket: str
) -> None:
    async with serve_in_background(
        proxy_settings, proxy_backend, metrics_listen=("127.0.0.1", 0)
    ) as server:
        before = await _families(server)
        size = await _upload_one(server, raw_client, gcs_bucket)
        after = await _families(server)

    for name, family in after.items():
        assert name.startswith(("rup_", "process_", "python_")), name
        assert not _NON_BASE_UNITS.search(name), f"{name}: not a base unit"
        assert "_total" not in name, f"{name}: the parser strips _total from counter families"
        for sample in family.samples:
            assert not sample.name.endswith("_created"), sample.name
            if family.type == "counter":
                assert sample.name == name + "_total", sample.name
            if "bytes" in name or "seconds" in name:
                unit = "bytes" if "bytes" in name else "seconds"
                assert name.endswith(unit), f"{name}: the unit goes last, before _total"
        if family.type == "histogram":
            assert name.endswith("_seconds"), f"{name}: a latency histogram is in seconds"

    # the counters the issue renamed: unit before _total
    assert after["rup_received_bytes"].samples[0].value == size
    assert after["rup_committed_bytes"].samples[0].value == size
    assert "rup_bytes_received" not in after
    # process metrics and build info
    assert after["process_resident_memory_bytes"].samples[0].value > 0
    (info,) = after["rup_build_info"].samples
    assert info.labels == {"version": version()}
    assert info.value == 1
    # histograms, observed by the upload
    durations = {s.name: s.value for s in after["rup_upload_duration_seconds"].samples}
    assert durations["rup_upload_duration_seconds_count"] == 1
    assert 0 < durations["rup_upload_duration_seconds_sum"] < 60
    first = {s.name: s.value for s in after["rup_upload_first_commit_seconds"].samples}
    assert first["rup_upload_first_commit_seconds_count"] == 1
    assert (
        first["rup_upload_first_commit_seconds_sum"] <= durations["rup_upload_duration_seconds_sum"]
    )
    requests = {
        (s.labels["method"], s.labels["outcome"]): s.value
        for s in after["rup_gcs_request_duration_seconds"].samples
        if s.name.endswith("_count")
    }
    assert set(requests) == {(m, o) for m in GCS_METHODS for o in GCS_OUTCOMES}
    # a resumable upload: one POST to start the session, PUTs for its chunks
    assert requests["POST", "success"] >= 1
    assert requests["PUT", "success"] >= 1

    # labelled counters have their series at zero before the first event
    failed = {s.labels["reason"]: s.value for s in before["rup_uploads_failed"].samples}
    assert failed["crash"] == 0
    assert failed["RetriesExhaustedError"] == 0
    errors = {s.labels["code"]: s.value for s in before["rup_errors_sent"].samples}
    assert set(errors) == {code.name for code in ErrorCode}
    assert set(errors.values()) == {0}
    retries = {s.labels["cause"]: s.value for s in before["rup_gcs_retries"].samples}
    assert retries["http-503"] == 0
    assert retries["timeout"] == 0


async def test_probes_on_the_metrics_listener(
    proxy_settings: ServerSettings, proxy_backend: Backend
) -> None:
    async with serve_in_background(
        proxy_settings, proxy_backend, metrics_listen=("127.0.0.1", 0)
    ) as server:
        assert server.metrics_address is not None
        healthz = await _scrape(server.metrics_address, "/healthz")
        readyz = await _scrape(server.metrics_address, "/readyz")
    assert healthz == ("HTTP/1.0 200 OK", "alive\n")
    assert readyz == ("HTTP/1.0 200 OK", "ready\n")


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_not_ready_while_the_gcs_endpoint_is_unreachable() -> None:
    port = _closed_port()
    health = Health(lambda: False, f"http://127.0.0.1:{port}", remember=0)
    status, reason = health.readyz()
    assert status.startswith("503")
    assert reason.startswith(f"GCS endpoint 127.0.0.1:{port} unreachable: ")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        assert health.readyz() == ("200 OK", "ready")
    assert health.healthz() == ("200 OK", "alive")


def test_not_ready_while_draining() -> None:
    draining = False
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        host, port = listener.getsockname()
        health = Health(lambda: draining, f"http://{host}:{port}")
        assert health.readyz() == ("200 OK", "ready")
        draining = True
        status, reason = health.readyz()
    assert status.startswith("503")
    assert reason.startswith("draining")


def test_the_gcs_check_is_remembered_for_a_moment() -> None:
    port = _closed_port()
    health = Health(lambda: False, f"http://127.0.0.1:{port}", remember=3600)
    assert health.readyz()[0].startswith("503")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        # within the remembered moment, the earlier answer stands (one connect per moment)
        assert health.readyz()[0].startswith("503")
