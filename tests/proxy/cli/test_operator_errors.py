"""Every failure an operator meets at startup is one line with a reason and a documented
exit code, never a traceback; and /readyz turns 503 as soon as SIGTERM starts the drain.

Each case runs the real command in a subprocess, as an operator would.
"""

from __future__ import annotations

import datetime
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from faultnet.gcs import GcsServer
from protocol import GoingAway
from tests.proxy.cli.commands import read_line, run_rup, rup_process
from tests.proxy.conftest import RawClient
from tests.proxy.server.test_observability import _scrape


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port some other process listens on, for as long as the test runs."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield int(listener.getsockname()[1])


def _one_line(result: subprocess.CompletedProcess[str], command: str) -> str:
    """The single ``rup COMMAND: ...`` line on stderr (log lines may come before it)."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"rup {command}: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


IN_USE = "address already in use"


def test_serve_on_a_port_in_use(taken_port: int) -> None:
    result = run_rup("serve", "--listen", f"127.0.0.1:{taken_port}")
    assert result.returncode == 1
    assert _one_line(result, "serve").startswith(
        f"rup serve: cannot listen on 127.0.0.1:{taken_port}: {IN_USE}"
    )


def test_serve_metrics_on_a_port_in_use(taken_port: int) -> None:
    result = run_rup("serve", "--listen", "127.0.0.1:0", "--metrics", f"127.0.0.1:{taken_port}")
    assert result.returncode == 1
    assert _one_line(result, "serve").startswith(
        f"rup serve: --metrics: cannot listen on 127.0.0.1:{taken_port}: {IN_USE}"
    )


def test_serve_embedded_endpoint_on_a_port_in_use(taken_port: int) -> None:
    result = run_rup(
        "serve", "--listen", "127.0.0.1:0", "--embedded", "--gcs-listen", f"127.0.0.1:{taken_port}"
    )
    assert result.returncode == 1
    assert _one_line(result, "serve").startswith(
        f"rup serve: embedded GCS endpoint: cannot listen on 127.0.0.1:{taken_port}: {IN_USE}"
    )


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("serve", ["--listen", "127.0.0.1:99999"], "port 99999 is out of range"),
        ("serve", ["--metrics", "127.0.0.1:65536"], "port 65536 is out of range"),
        ("gcs-server", ["--port", "70000"], "expected a port from 1 to 65535"),
        ("faultproxy", ["--control", "127.0.0.1:123456"], "port 123456 is out of range"),
    ],
)
def test_ports_out_of_range_are_usage_errors(command: str, args: list[str], message: str) -> None:
    result = run_rup(command, *args)
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert line.startswith(f"rup {command}: error: argument ")
    assert message in line


def test_gcs_server_on_a_port_in_use(taken_port: int) -> None:
    result = run_rup("gcs-server", "--port", str(taken_port))
    assert result.returncode == 1
    assert _one_line(result, "gcs-server") == (
        f"rup gcs-server: cannot listen on 127.0.0.1:{taken_port}: {IN_USE} "
        "(another process listens there)"
    )


def test_faultproxy_on_a_port_in_use(taken_port: int) -> None:
    result = run_rup(
        "faultproxy", "--listen", f"127.0.0.1:{taken_port}", "--upstream", "127.0.0.1:1"
    )
    assert result.returncode == 1
    assert _one_line(result, "faultproxy").startswith(
        f"rup faultproxy: cannot listen on 127.0.0.1:{taken_port}: {IN_USE}"
    )
    result = run_rup("faultproxy", "--control", f"127.0.0.1:{taken_port}")
    assert result.returncode == 1
    assert _one_line(result, "faultproxy").startswith(
        f"rup faultproxy: cannot listen on 127.0.0.1:{taken_port}: {IN_USE}"
    )


def test_missing_files_say_no_such_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pem"
    result = run_rup("serve", "--tls-cert", str(missing), "--tls-key", str(missing))
    assert result.returncode == 2
    assert _one_line(result, "serve") == f"rup serve: --tls-cert {missing}: no such file"

    result = run_rup("gcs-server", "--access-token-file", str(missing))
    assert result.returncode == 2
    assert _one_line(result, "gcs-server") == (
        f"rup gcs-server: no such file or directory: {missing}"
    )


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_failures_say_which_file(tmp_path: Path) -> None:
    cert_a, key_a = _self_signed(tmp_path, "a")
    _, key_b = _self_signed(tmp_path, "b")
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("hello\n")

    result = run_rup("serve", "--tls-cert", str(not_pem), "--tls-key", str(key_a))
    assert result.returncode == 2
    assert (
        _one_line(result, "serve") == f"rup serve: --tls-cert {not_pem}: no PEM certificate in it"
    )

    result = run_rup("serve", "--tls-cert", str(cert_a), "--tls-key", str(not_pem))
    assert result.returncode == 2
    assert _one_line(result, "serve") == f"rup serve: --tls-key {not_pem}: no PEM private key in it"

    result = run_rup("serve", "--tls-cert", str(cert_a), "--tls-key", str(key_b))
    assert result.returncode == 2
    assert _one_line(result, "serve") == (
        f"rup serve: --tls-key {key_b}: not the private key of the certificate in {cert_a}"
    )


async def test_readyz_turns_503_when_sigterm_starts_the_drain(gcs_server: GcsServer) -> None:
    async with rup_process(
        "serve", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
        "--gcs-endpoint", gcs_server.url,
    ) as (process, logs):  # fmt: skip
        listening = await read_line(process)
        host, _, port = listening.split("listening on ", 1)[1].split()[0].rpartition(":")
        metrics_line = await read_line(process)
        assert "metrics on http://" in metrics_line, metrics_line
        mhost, _, mport = metrics_line.split("http://", 1)[1].split("/")[0].rpartition(":")
        metrics = (mhost, int(mport))

        assert await _scrape(metrics, "/healthz") == ("HTTP/1.0 200 OK", "alive\n")
        assert await _scrape(metrics, "/readyz") == ("HTTP/1.0 200 OK", "ready\n")

        # A client holding its connection keeps the server draining until it leaves.
        client = RawClient(await trio.open_tcp_stream(host, int(port)))
        await client.hello()
        process.send_signal(signal.SIGTERM)
        assert isinstance(await client.reply(GoingAway), GoingAway)
        status, body = await _scrape(metrics, "/readyz")
        assert status == "HTTP/1.0 503 Service Unavailable"
        assert body.startswith("draining")
        assert await _scrape(metrics, "/healthz") == ("HTTP/1.0 200 OK", "alive\n")
        await client.aclose()
        with trio.fail_after(30):
            code = await process.wait()
    assert code == 0, logs.decode()
