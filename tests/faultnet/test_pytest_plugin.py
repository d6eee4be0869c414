"""The pytest plugin, used as another team would: a test suite in a directory of its own,
run by a separate pytest process that finds the fixtures through the ``pytest11`` entry
point alone (no ``-p``, no conftest import of rup)."""

from __future__ import annotations

import errno
import importlib.metadata
import socket
import textwrap
import threading

import pytest

from faultnet.threaded_proxy import chaos_proxy_in_thread

pytest_plugins = ["pytester"]

#: every fixture's threads, by the names their owners give them
CONSUMER_CONFTEST = """
import threading

import pytest

OURS = ("gcs-", "chaos-proxy", "reliablewriter")


@pytest.fixture(autouse=True)
def no_threads_left_behind():
    # autouse fixtures are set up first, so this teardown runs after every other one's
    yield
    left = [t.name for t in threading.enumerate() if t.name.startswith(OURS)]
    assert left == []
"""

CONSUMER_TESTS = """
import pytest
import requests
from google.api_core import exceptions
from google.cloud.storage.retry import DEFAULT_RETRY

from faultnet import FaultCounters
from faultnet.gcs.clients import anonymous_client
from reliablewriter import RetryPolicy, WriterSettings, open_blocking_writer

DATA = bytes(range(256)) * 4096  # 1 MiB: four 256 KiB chunks
SETTINGS = WriterSettings(
    min_chunk_size=256 * 1024,
    max_chunk_size=256 * 1024,
    retry=RetryPolicy(initial_delay=0.01, max_delay=0.05, deadline=20.0),
)


@pytest.mark.parametrize("gcs_endpoint", ["memory", "disk"], indirect=True)
def test_endpoint_stores_and_serves(gcs_endpoint, gcs_bucket, gcs_client):
    gcs_client.bucket(gcs_bucket).blob("a").upload_from_string(b"hello")
    assert gcs_endpoint.url.startswith("http://127.0.0.1:")
    again = anonymous_client(gcs_endpoint.url).bucket(gcs_bucket).blob("a")
    assert again.download_as_bytes() == b"hello"
    assert gcs_endpoint.store.lookup(gcs_bucket, "a").size == 5


def test_a_plain_upload_fails_on_a_reset(gcs_bucket, faulty_gcs_client, gcs_client):
    # its retries start over from byte 0, so every attempt meets the reset
    client = faulty_gcs_client("reset_peer:up(after=300k)")
    with pytest.raises(exceptions.RetryError):
        blob = client.bucket(gcs_bucket).blob("big")
        blob.upload_from_string(DATA, retry=DEFAULT_RETRY.with_timeout(1.0))
    assert not gcs_client.bucket(gcs_bucket).blob("big").exists()


def test_the_reliablewriter_survives_the_same_reset(gcs_bucket, faulty_gcs_client, gcs_client):
    counters = FaultCounters()
    client = faulty_gcs_client("reset_peer:up(after=300k)", counters)
    with open_blocking_writer(client.bucket(gcs_bucket), "big", SETTINGS) as writer:
        writer.write(DATA)
    assert counters.faults_applied("reset_peer") >= 2
    assert gcs_client.bucket(gcs_bucket).blob("big").download_as_bytes() == DATA


def test_chaos_proxy_in_front_of_the_endpoint(gcs_endpoint, gcs_bucket, chaos_proxy):
    proxy = chaos_proxy(gcs_endpoint.address, control=True)
    blob = anonymous_client(proxy.url).bucket(gcs_bucket).blob("p")
    blob.upload_from_string(b"x" * 1000)
    assert proxy.stats().bytes_upstream > 1000
    proxy.add_toxic("reset_peer:up(after=0)", "cut", live=True)
    assert [t.name for t in proxy.toxics()] == ["cut"]
    with pytest.raises(requests.exceptions.ConnectionError):
        blob.upload_from_string(b"y" * 1000, retry=None)
    assert proxy.stats().faults["reset_peer"] >= 1
    listed = requests.get(f"{proxy.control_url}/proxies/{proxy.name}/toxics", timeout=5).json()
    assert [t["name"] for t in listed] == ["cut"]
    proxy.reset()
    blob.upload_from_string(b"z" * 1000)
    assert blob.download_as_bytes() == b"z" * 1000


def test_a_scripted_503_fails_a_plain_upload(gcs_bucket, gcs_retry_test):
    script = gcs_retry_test({"storage.objects.insert": ["return-503"]})
    assert script.headers == {"x-retry-test-id": script.id}
    with pytest.raises(exceptions.ServiceUnavailable):
        script.client.bucket(gcs_bucket).blob("s").upload_from_string(b"abc", retry=None)
    assert script.completed()


def test_the_reliablewriter_survives_a_scripted_503(gcs_bucket, gcs_retry_test, gcs_client):
    script = gcs_retry_test({"storage.objects.insert": ["return-503-after-512K"]})
    with open_blocking_writer(script.client.bucket(gcs_bucket), "w", SETTINGS) as writer:
        writer.write(DATA)
    assert script.completed()
    assert gcs_client.bucket(gcs_bucket).blob("w").download_as_bytes() == DATA
"""


def test_the_plugin_is_registered_for_pytest() -> None:
    plugins = importlib.metadata.entry_points(group="pytest11")
    assert "faultnet.pytest_plugin" in {ep.value for ep in plugins}


def test_a_consumer_suite_uses_every_fixture(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(textwrap.dedent(CONSUMER_CONFTEST))
    pytester.makepyfile(test_consumer=textwrap.dedent(CONSUMER_TESTS))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--timeout=60", timeout=120)
    result.assert_outcomes(passed=7)


def test_a_wrong_store_name_is_an_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_wrong="""
        import pytest

        @pytest.mark.parametrize("gcs_endpoint", ["tape"], indirect=True)
        def test_it(gcs_endpoint):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=60)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*gcs_endpoint takes memory or disk, not 'tape'*"])


def test_a_threaded_chaos_proxy_on_a_taken_port_fails_at_start() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        address = taken.getsockname()[:2]
        with (
            pytest.raises(OSError, match="in use") as refused,
            chaos_proxy_in_thread(("127.0.0.1", 9), listen=address),
        ):
            pass
    assert refused.value.errno == errno.EADDRINUSE
    assert not [t for t in threading.enumerate() if t.name == "chaos-proxy"]
