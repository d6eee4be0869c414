"""Process faults, for real: the proxy is killed or stopped mid-upload and started again.

Every test runs real processes: ``rup serve`` (restarted with the same arguments, as a
supervisor would), ``rup upload`` (never restarted: it must ride the restart out),
``rup faultproxy`` between them (bandwidth-limited, so a small object is still in flight
when the signal comes), and for an external endpoint ``rup gcs-server --data-dir``. The
object must then match the source byte for byte, and the logs must show that the upload
really was resumed by the second proxy process (so the test cannot pass by finishing
before the fault).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage  # type: ignore[import-untyped]
from google.oauth2.credentials import Credentials

from protocol import NEED_DATA, PROTOCOL_VERSION, Connection, Hello, OpenUpload, Role, Welcome
from proxy.server.keys import generate_key_text
from tests.proxy.server.processes import RupProcess, free_port, running

pytestmark = pytest.mark.slow

#: small, but at the faultproxy's rate it takes a few seconds: both faults land mid-upload
_OBJECT_SIZE = 3 * 1024 * 1024
#: per connection, client to proxy
_RATE = "512k"
_CONNECTIONS = 2
#: how long after the upload opened the SIGKILL comes, and after it resumed the SIGTERM
_FIRST_FAULT_AFTER = 0.7
_SECOND_FAULT_AFTER = 0.5
#: how long the proxy stays down ("a few seconds")
_DOWN_FOR = 1.5
_BUCKET = "restarts"


def _embedded_reader(proxy: RupProcess, data_dir: Path) -> Callable[[], storage.Client]:
    """How an operator reads objects back from the embedded endpoint (see the README)."""

    def client() -> storage.Client:
        url = proxy.wait_for(r"embedded GCS endpoint (\S+)").split()[-1]
        secret = (data_dir / "keys" / "gcs-access-token").read_text().strip()
        return storage.Client(
            project="any",
            credentials=Credentials(token=secret),  # type: ignore[no-untyped-call]
            client_options={"api_endpoint": url},
        )

    return client


def _anonymous_reader(url: str) -> Callable[[], storage.Client]:
    def client() -> storage.Client:
        return storage.Client(
            project="any",
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options={"api_endpoint": url},
        )

    return client


def _kill_and_restart(
    proxy: RupProcess, signum: signal.Signals, *, then: Callable[[], None] | None = None
) -> None:
    """Signal the proxy mid-upload, keep it down a few seconds, start it as it was.

    ``then`` runs while the proxy is down.
    """
    proxy.send_signal(signum)
    code = proxy.wait(timeout=30)
    run = proxy.stderr()
    if signum is signal.SIGTERM:
        assert code == 0, run
        assert "drained" in run, run  # chunks on their way to GCS were let through
    assert "upload-completed" not in run, "the fault came too late to test anything"
    if then is not None:
        then()
    time.sleep(_DOWN_FOR)
    proxy.start().listening_on()


@dataclass(frozen=True)
class _Relay:
    """A bandwidth-limited faultproxy in front of a proxy, at an address chosen here (so
    the client can be started without waiting for it), with its control API."""

    process: RupProcess
    address: str
    control: str

    def unthrottle(self) -> None:
        """Drop the bandwidth limit for the connections accepted from now on: once the
        faults are done, the rest of the upload need not crawl."""
        response = requests.delete(f"http://{self.control}/toxics/0", timeout=10)
        assert response.ok, response.text


def _relay(name: str, upstream_port: int, directory: Path) -> _Relay:
    address = f"127.0.0.1:{free_port()}"
    control = f"127.0.0.1:{free_port()}"
    process = RupProcess(
        name,
        ["faultproxy", "--listen", address, "--upstream", f"127.0.0.1:{upstream_port}",
         "--plan", f"bandwidth:up(rate={_RATE})", "--control", control],
        directory,
    )  # fmt: skip
    return _Relay(process, address, control)


def _upload(source: Path, name: str, proxies: list[str], directory: Path) -> RupProcess:
    return RupProcess(
        "upload",
        ["upload", str(source), f"gs://{_BUCKET}/{name}", "--proxy", ",".join(proxies),
         "--connections", str(_CONNECTIONS), "--json"],
        directory,
    )  # fmt: skip


def _external_endpoint(directory: Path) -> tuple[RupProcess, str]:
    port = free_port()
    endpoint = RupProcess(
        "gcs", ["gcs-server", "--port", str(port), "--data-dir", str(directory / "gcs")], directory
    )
    return endpoint, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("gcs", ["data-dir", "external"])
def test_an_upload_survives_a_proxy_killed_then_stopped(tmp_path: Path, gcs: str) -> None:
    """SIGKILL mid-upload, then (once the upload resumed) SIGTERM: exit 0, byte for byte."""
    source = tmp_path / "source.bin"
    data = os.urandom(_OBJECT_SIZE)
    source.write_bytes(data)
    port = free_port()
    serve_args = ["serve", "--listen", f"127.0.0.1:{port}", "--create-buckets"]
    processes: list[RupProcess] = []
    env: dict[str, str] = {}
    if gcs == "external":
        endpoint, url = _external_endpoint(tmp_path)
        processes.append(endpoint.start())
        serve_args += ["--gcs-endpoint", url]
        env["RUP_TOKEN_KEY"] = generate_key_text()
    else:
        serve_args += ["--data-dir", str(tmp_path / "data")]
    proxy = RupProcess("proxy", serve_args, tmp_path, env=env)
    relay = _relay("faultproxy", port, tmp_path)
    upload = _upload(source, "restarted.bin", [relay.address], tmp_path)
    processes += [proxy, relay.process, upload]
    with running(*processes):
        # All at once: the client retries until the proxy listens.
        for process in (proxy, relay.process, upload):
            process.start()
        proxy.listening_on()
        proxy.wait_for("upload-opened", stream="stderr")
        time.sleep(_FIRST_FAULT_AFTER)
        _kill_and_restart(proxy, signal.SIGKILL)
        proxy.wait_for("upload-resumed", stream="stderr", timeout=60)
        time.sleep(_SECOND_FAULT_AFTER)
        _kill_and_restart(proxy, signal.SIGTERM, then=relay.unthrottle)

        assert upload.wait(timeout=120) == 0, upload.stdout() + upload.stderr()
        assert "upload-resumed" in proxy.stderr(), proxy.stderr()
        summary = json.loads(upload.stdout().strip().splitlines()[-1])
        if gcs == "external":
            reader = _anonymous_reader(url)
        else:
            reader = _embedded_reader(proxy, tmp_path / "data")
        stored = reader().bucket(_BUCKET).blob("restarted.bin").download_as_bytes()
    assert stored == data
    # Resumed both times through its token (a proxy that could not open it would have
    # made the client start over from byte 0).
    assert summary["restarts"] == 0, summary


def _the_one_that_opened_first(proxies: list[RupProcess]) -> tuple[RupProcess, RupProcess]:
    """(the proxy the upload was opened on, the other one): the client picks either."""
    for _ in range(600):
        for index, proxy in enumerate(proxies):
            if "upload-opened" in proxy.stderr():
                return proxy, proxies[1 - index]
        time.sleep(0.05)
    raise AssertionError("no proxy opened the upload within 30 s")


def test_an_upload_fails_over_to_another_proxy_sharing_the_key(tmp_path: Path) -> None:
    """``--proxy A,B``: A is killed for good mid-upload; B resumes it from its token."""
    source = tmp_path / "source.bin"
    data = os.urandom(_OBJECT_SIZE)
    source.write_bytes(data)
    endpoint, url = _external_endpoint(tmp_path)
    key = {"RUP_TOKEN_KEY": generate_key_text()}
    processes = [endpoint]
    proxies: list[RupProcess] = []
    relays: list[_Relay] = []
    addresses: list[str] = []
    for name in ("a", "b"):
        port = free_port()
        proxy = RupProcess(
            f"proxy-{name}",
            ["serve", "--listen", f"127.0.0.1:{port}", "--gcs-endpoint", url, "--create-buckets"],
            tmp_path,
            env=key,
        )
        relay = _relay(f"faultproxy-{name}", port, tmp_path)
        proxies.append(proxy)
        relays.append(relay)
        addresses.append(relay.address)
        processes += [proxy, relay.process]
    upload = _upload(source, "failover.bin", addresses, tmp_path)
    processes.append(upload)
    with running(*processes):
        for process in processes:
            process.start()
        first, second = _the_one_that_opened_first(proxies)
        time.sleep(_FIRST_FAULT_AFTER)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        assert "upload-completed" not in first.stderr(), "the fault came too late"
        for relay in relays:
            relay.unthrottle()

        assert upload.wait(timeout=120) == 0, upload.stdout() + upload.stderr()
        assert "upload-resumed" in second.stderr(), second.stderr()
        stored = _anonymous_reader(url)().bucket(_BUCKET).blob("failover.bin").download_as_bytes()
    assert stored == data


def test_sigterm_stops_the_proxy_promptly_while_gcs_never_answers(tmp_path: Path) -> None:
    """An open waits on a GCS lookup that never returns (a listener that accepts and stays
    silent); SIGTERM still ends the proxy within its grace and drain times, not the
    lookup's 30 s timeout: a shutdown does not wait for answers it would only drop."""
    with socket.socket() as silent_gcs:
        silent_gcs.bind(("127.0.0.1", 0))
        silent_gcs.listen(16)  # connections complete in the backlog; nothing is ever read
        gcs_port = silent_gcs.getsockname()[1]
        port = free_port()
        proxy = RupProcess(
            "proxy",
            ["serve", "--listen", f"127.0.0.1:{port}", "--gcs-endpoint",
             f"http://127.0.0.1:{gcs_port}", "--drain-timeout", "1"],
            tmp_path,
            env={"RUP_TOKEN_KEY": generate_key_text()},
        )  # fmt: skip
        with running(proxy.start()), socket.create_connection(proxy.listening_on()) as client:
            protocol = Connection(Role.CLIENT)
            client.settimeout(10)
            client.sendall(protocol.send_bytes(Hello((PROTOCOL_VERSION,), 256 * 1024)))
            while isinstance(event := protocol.next_event(), type(NEED_DATA)):
                protocol.receive_data(client.recv(65536))
            assert isinstance(event, Welcome), event
            client.sendall(protocol.send_bytes(OpenUpload("bucket", "waits-on-gcs.bin")))
            time.sleep(0.5)  # the open is in its lookup now
            stopping = time.monotonic()
            proxy.send_signal(signal.SIGTERM)
            assert proxy.wait(timeout=20) == 0
            assert time.monotonic() - stopping < 12.0  # not the lookup's 30 s


def test_sigterm_ends_the_proxy_in_bounded_time_while_a_chunk_is_stuck_on_its_way_to_gcs(
    tmp_path: Path,
) -> None:
    """A chunk stalls on its way to GCS (the link stops moving after 3 MiB). SIGTERM still
    ends the proxy within its grace, drain and shutdown margin (not the writer's 60 s
    progress timeout), exit 0, and the upload resumes on the next instance from GCS."""
    source = tmp_path / "source.bin"
    data = os.urandom(12 * 1024 * 1024)  # past the first 8 MiB chunk (a 32 MiB window's quarter)
    source.write_bytes(data)
    endpoint, url = _external_endpoint(tmp_path)
    stalling = f"127.0.0.1:{free_port()}"
    link = RupProcess(
        "stalling-link",
        ["faultproxy", "--listen", stalling, "--upstream", url.removeprefix("http://"),
         "--plan", "stall:up(after=3m)"],
        tmp_path,
    )  # fmt: skip
    port = free_port()
    key = {"RUP_TOKEN_KEY": generate_key_text()}
    serve = ["serve", "--listen", f"127.0.0.1:{port}", "--create-buckets", "--drain-timeout", "1"]
    stuck = RupProcess("proxy", [*serve, "--gcs-endpoint", f"http://{stalling}"], tmp_path, env=key)
    after = RupProcess("proxy-after", [*serve, "--gcs-endpoint", url], tmp_path, env=key)
    upload = _upload(source, "stuck.bin", [f"127.0.0.1:{port}"], tmp_path)
    with running(endpoint, link, stuck, after, upload):
        for process in (endpoint, link, stuck):
            process.start()
        stuck.listening_on()
        upload.start()
        stuck.wait_for("upload-opened", stream="stderr")
        time.sleep(2.0)  # every byte reaches the proxy; its first chunk is stuck mid-way
        stopping = time.monotonic()
        stuck.send_signal(signal.SIGTERM)
        assert stuck.wait(timeout=40) == 0, stuck.stderr()
        took = time.monotonic() - stopping
        assert "upload-completed" not in stuck.stderr(), "the chunk was not stuck"
        assert "shutdown-forced" in stuck.stderr(), stuck.stderr()
        # grace 5 s + drain 1 s + margin 5 s, and some slack; not the chunk's 60 s
        assert took < 20.0, took

        after.start().listening_on()
        assert upload.wait(timeout=120) == 0, upload.stdout() + upload.stderr()
        assert "upload-resumed" in after.stderr(), after.stderr()
        stored = _anonymous_reader(url)().bucket(_BUCKET).blob("stuck.bin").download_as_bytes()
    assert stored == data
