"""``rup upload`` as users run it: exit codes, one-line errors, ``--json``, stdin.

The command runs its own trio loop, so the proxy it talks to runs in a thread of its own.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import google_crc32c
import pytest

from faultnet.gcs import GcsServer
from proxy.cli.main import main
from tests.proxy.cli.proxy_thread import AUTH_TOKEN, stored

TOKEN = AUTH_TOKEN


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    return path, data


def test_file_upload_prints_one_json_line(
    proxy_address: str,
    gcs_server: GcsServer,
    source: tuple[Path, bytes],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, data = source
    argv = ["upload", str(path), "gs://cmd/file.bin", "--proxy", proxy_address]
    assert main([*argv, "--auth-token", TOKEN, "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1
    summary = json.loads(out[0])
    assert summary["ok"] is True
    assert summary["size"] == len(data)
    assert (
        summary["crc32c"] == base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()
    )
    assert stored(gcs_server, "cmd", "file.bin") == data


def test_stdin_upload(proxy_address: str, gcs_server: GcsServer) -> None:
    data = os.urandom(2 * 1024 * 1024 + 5)
    completed = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "upload", "-", "gs://cmd/stdin.bin", "--json"],
        input=data,
        capture_output=True,
        env={**os.environ, "RUP_PROXY": proxy_address, "RUP_AUTH_TOKEN": TOKEN},
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr.decode()
    assert json.loads(completed.stdout)["size"] == len(data)
    assert stored(gcs_server, "cmd", "stdin.bin") == data


def test_wrong_token_exits_3_with_one_line(
    proxy_address: str, source: tuple[Path, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = source
    argv = ["upload", str(path), "gs://cmd/x", "--proxy", proxy_address, "--auth-token", "nope"]
    assert main(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "UNAUTHENTICATED" in err[0]
    assert "nope" not in err[0]


def test_precondition_failure_exits_4(
    proxy_address: str, source: tuple[Path, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = source
    argv = ["upload", str(path), "gs://cmd/once", "--proxy", proxy_address]
    argv += ["--auth-token", TOKEN, "--if-generation-match", "0", "--json"]
    assert main(argv) == 0
    assert main(argv) == 4
    last = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert last == {"ok": False, "error": last["error"], "exit_code": 4}


def _closed_port() -> int:
    with socket.socket() as sock:  # nothing listens on this port once it is closed
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_proxy_exits_5(
    source: tuple[Path, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = source
    argv = ["upload", str(path), "gs://cmd/x", "--proxy", f"127.0.0.1:{_closed_port()}"]
    argv += ["--retry-deadline", "1"]
    assert main(argv) == 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "cannot connect" in err


def test_verbose_says_why_each_attempt_failed(
    source: tuple[Path, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = source
    argv = ["upload", str(path), "gs://cmd/x", "--proxy", f"127.0.0.1:{_closed_port()}"]
    assert main([*argv, "--retry-deadline", "1", "--verbose"]) == 5
    lines = capsys.readouterr().err.splitlines()
    attempts = [line for line in lines if "connection 0: cannot connect" in line]
    assert len(attempts) >= 2, lines  # one per attempt, each stamped with its time
    assert all(line.startswith("rup upload: [") for line in attempts)
    assert "gave up after" in lines[-1]
    # without it, the one line of the outcome stays the only one
    assert main([*argv, "--retry-deadline", "1"]) == 5
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["upload", "missing-file", "gs://b/o", "--proxy", "127.0.0.1:1"],
        ["upload", "-", "s3://b/o", "--proxy", "127.0.0.1:1"],
        ["upload", "-", "gs://b/o", "--proxy", "no-port"],
        ["upload", "-", "gs://b/o", "--proxy", "127.0.0.1:1", "--connections", "0"],
        ["upload", "-", "gs://bkt/o", "--proxy", "127.0.0.1:1", "--retry-deadline", "-1"],
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RUP_PROXY", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["upload", "--help"])
    help_text = capsys.readouterr().out
    for code in ("0", "1", "2", "3", "4", "5", "6", "130"):
        assert f"\n  {code:<4} " in help_text


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("gs://ab/o", "3 to 63 characters"),
        ("gs://Upper/o", "lowercase letters"),
        ("gs://-dash/o", "start and end with a letter or digit"),
        ("gs://192.168.1.1/o", "IP address"),
        ("gs://googley/o", "goog"),
        ("gs://bkt/.", "'.' or '..'"),
        ("gs://bkt/..", "'.' or '..'"),
        ("gs://bkt/a\x07b", "control characters"),
        ("gs://bkt/a\nb", "control characters"),
        ("gs://bkt/" + "n" * 1025, "1 to 1024 bytes"),
        ("gs://bkt/" + "\u00e9" * 513, "1 to 1024 bytes"),  # 1026 bytes of UTF-8
    ],
)
def test_names_gcs_would_refuse_exit_2_before_connecting(
    url: str, reason: str, source: tuple[Path, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = source
    with socket.socket() as listener:  # a proxy that would notice a connection
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        host, port = listener.getsockname()
        assert main(["upload", str(path), url, "--proxy", f"{host}:{port}"]) == 2
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody came
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert reason in err
    assert "\x07" not in err  # the name is escaped, not printed raw


def test_an_http_server_at_the_address_fails_in_one_line_within_2_s(
    source: tuple[Path, bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = source
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        host, port = listener.getsockname()

        def answer_http() -> None:
            for _ in range(4):  # one per connection the client opens
                try:
                    connection, _ = listener.accept()
                except OSError:  # timed out: the client has given up
                    return
                with connection:
                    connection.recv(4096)
                    connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

        listener.settimeout(5.0)  # the thread ends even if the client stops connecting
        server = threading.Thread(target=answer_http, daemon=True)
        server.start()
        started = time.monotonic()
        code = main(["upload", str(path), "gs://bkt/o", "--proxy", f"{host}:{port}"])
        elapsed = time.monotonic() - started
    assert code == 1
    assert elapsed < 2.0
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "does not speak the rup protocol" in err
    assert "HTTP/1.1 400" in err


def test_several_proxies_fail_over_to_the_one_that_answers(
    proxy_address: str, gcs_server: GcsServer, source: tuple[Path, bytes]
) -> None:
    path, data = source
    with socket.socket() as sock:  # nothing listens here once it is closed
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    argv = ["upload", str(path), "gs://cmd/failover.bin", "--proxy", f"{dead},{proxy_address}"]
    assert main([*argv, "--auth-token", TOKEN]) == 0
    assert stored(gcs_server, "cmd", "failover.bin") == data
