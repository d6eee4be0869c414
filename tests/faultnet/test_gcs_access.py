"""Access to the endpoint: a bearer token on every request, and a private data dir."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from faultnet.gcs import UPLOAD_QUANTUM, GcsServer
from faultnet.gcs.clients import authorized_client, start_resumable_upload
from faultnet.gcs.command import ACCESS_TOKEN_ENV

Q = UPLOAD_QUANTUM
TOKEN = "s3cr3t-token-for-tests"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def guarded() -> Iterator[GcsServer]:
    with GcsServer(access_token=TOKEN) as server:
        server.store.create_bucket("bkt")
        yield server


def _error(response: requests.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["errors"][0]["reason"]


def test_every_request_needs_the_bearer(guarded: GcsServer) -> None:
    url = guarded.url
    for path in ("/storage/v1/b", "/storage/v1/b/bkt", "/storage/v1/b/bkt/o", "/retry_tests"):
        missing = requests.get(url + path, timeout=30)
        assert _error(missing) == (401, "required")
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = requests.get(url + path, headers={"Authorization": "Bearer guess"}, timeout=30)
        assert _error(wrong) == (401, "authError")
        basic = requests.get(url + path, headers={"Authorization": f"Basic {TOKEN}"}, timeout=30)
        assert _error(basic) == (401, "authError")
        assert TOKEN not in missing.text + wrong.text + basic.text
        assert requests.get(url + path, headers=BEARER, timeout=30).status_code == 200
    refused = requests.post(
        f"{url}/upload/storage/v1/b/bkt/o",
        params={"uploadType": "media", "name": "obj"},
        data=b"data",
        timeout=30,
    )
    assert refused.status_code == 401
    assert guarded.store.list_objects("bkt") == []


def test_a_session_uri_alone_is_not_enough(guarded: GcsServer) -> None:
    uri = start_resumable_upload(guarded.url, "bkt", "obj", headers=BEARER)
    chunk = {"Content-Range": f"bytes 0-{Q - 1}/*"}
    stolen = requests.put(uri, data=b"x" * Q, headers=chunk, timeout=30)
    assert stolen.status_code == 401
    assert requests.delete(uri, timeout=30).status_code == 401
    [session] = guarded.store.sessions()
    assert session.persisted_size == 0
    owned = requests.put(uri, data=b"x" * Q, headers={**chunk, **BEARER}, timeout=30)
    assert (owned.status_code, owned.headers["Range"]) == (308, f"bytes=0-{Q - 1}")


def test_a_stranger_big_body_is_not_read(guarded: GcsServer) -> None:
    """A 401 for a large upload closes the connection rather than reading 1 GiB first."""
    head = (
        "PUT /upload/storage/v1/b/bkt/o?uploadType=media&name=x HTTP/1.1\r\nHost: h\r\n"
        f"Content-Length: {1 << 30}\r\n\r\n"
    ).encode()
    with socket.create_connection(guarded.address, timeout=30) as sock:
        sock.sendall(head)
        reply = sock.makefile("rb").read()  # until the server closes
    assert reply.startswith(b"HTTP/1.1 401 ")
    assert b"Connection: close" in reply


def test_google_cloud_storage_with_a_static_token(guarded: GcsServer) -> None:
    client = authorized_client(guarded.url, TOKEN)
    bucket = client.bucket("bkt")
    big = os.urandom(3 * 1024 * 1024 + 17)
    resumable = bucket.blob("big", chunk_size=1024 * 1024)  # session URI requests too
    resumable.upload_from_string(big)
    bucket.blob("small").upload_from_string(b"small")
    assert bucket.blob("big").download_as_bytes() == big
    assert sorted(blob.name for blob in client.list_blobs("bkt")) == ["big", "small"]
    media = f"{guarded.url}/storage/v1/b/bkt/o/big?alt=media"
    assert requests.get(media, timeout=30).status_code == 401


def test_the_token_must_be_header_safe() -> None:
    for bad in ("", "has space", "line\nbreak", "x" * 4097):
        with pytest.raises(ValueError, match="access_token") as refused:
            GcsServer(access_token=bad)
        assert bad not in str(refused.value) or not bad


@contextmanager
def _cli_server(
    *arguments: str, env: dict[str, str] | None = None, umask: int = -1
) -> Iterator[str]:
    command = [sys.executable, "-m", "proxy.cli", "gcs-server", *arguments]
    environment = {k: v for k, v in os.environ.items() if k != ACCESS_TOKEN_ENV}
    environment.update(env or {})
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, env=environment, umask=umask
    ) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:")
            yield url
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0


@pytest.mark.parametrize("source", ["file", "environment"])
def test_gcs_server_takes_the_token_from_a_file_or_the_environment(
    tmp_path: Path, source: str
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    arguments = ("--access-token-file", str(token_file)) if source == "file" else ()
    env = {ACCESS_TOKEN_ENV: TOKEN} if source == "environment" else None
    with _cli_server(*arguments, env=env) as url:
        assert requests.get(f"{url}/storage/v1/b", timeout=30).status_code == 401
        assert requests.get(f"{url}/storage/v1/b", headers=BEARER, timeout=30).status_code == 200


def test_data_dir_is_private_whatever_the_umask(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with _cli_server("--data-dir", str(data_dir), umask=0) as url:
        assert requests.post(f"{url}/storage/v1/b", json={"name": "bkt"}, timeout=30).ok
        media = {"uploadType": "media", "name": "whole"}
        upload = f"{url}/upload/storage/v1/b/bkt/o"
        assert requests.post(upload, params=media, data=b"data", timeout=30).ok
        finished = start_resumable_upload(url, "bkt", "finished")
        assert requests.put(finished, data=b"done", timeout=30).status_code == 200
        pending = start_resumable_upload(url, "bkt", "pending")
        chunk = {"Content-Range": f"bytes 0-{Q - 1}/*"}
        assert requests.put(pending, data=b"x" * Q, headers=chunk, timeout=30).status_code == 308

        paths = [data_dir, *data_dir.rglob("*")]
        kinds = {
            path.suffix if path.suffix in (".json", ".part") else "data"
            for path in paths
            if path.is_file()
        }
        assert {".json", ".part", "data"} <= kinds  # every kind of file was made
        for path in paths:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o700 if path.is_dir() else 0o600), (path.name, oct(mode))
