"""The endpoint's HTTP layer: bad input, keep-alive, concurrency, and staying alive."""

from __future__ import annotations

import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from faultnet.gcs import UPLOAD_QUANTUM, GcsServer
from faultnet.gcs.clients import start_resumable_upload

Q = UPLOAD_QUANTUM


def _exchange(server: GcsServer, data: bytes, *, half_close: bool = True) -> bytes:
    """Send ``data`` and read until the server closes the connection."""
    with socket.create_connection(server.address, timeout=30) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def _still_serving(server: GcsServer) -> bool:
    return requests.get(f"{server.url}/storage/v1/b", timeout=30).status_code == 200


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /storage/v1/b HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431),
        (b"GET /storage/v1/b\r\n\r\n", 400),
        (b"GET storage/v1/b HTTP/1.1\r\n\r\n", 400),
        (b"GET /storage/v1/b HTTP/2.0\r\n\r\n", 505),
        (b"GET /storage/v1/b HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET /storage/v1/b HTTP/1.1\r\nX: 1\r\n folded\r\n\r\n", 400),
        (b"PUT /x HTTP/1.1\r\nContent-Length: ten\r\n\r\n", 400),
        (b"PUT /x HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n", 400),
        (b"PUT /x HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"PUT /x HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ],
)
def test_malformed_requests_get_a_status_and_the_server_goes_on(
    gcs_server: GcsServer, request_bytes: bytes, status: int
) -> None:
    raw = _exchange(gcs_server, request_bytes)
    assert _status_of(raw) == status
    assert b"Connection: close" in raw
    assert _still_serving(gcs_server)


def test_body_over_the_limit_is_413() -> None:
    with GcsServer(max_body_bytes=1000) as server:
        raw = _exchange(server, b"PUT /x HTTP/1.1\r\nContent-Length: 1001\r\n\r\n")
        assert _status_of(raw) == 413


def test_bad_chunked_framing_is_400(gcs_server: GcsServer, gcs_bucket: str) -> None:
    uri = start_resumable_upload(gcs_server.url, gcs_bucket, "obj")
    target = uri.split(":", 2)[2].split("/", 1)[1]
    raw = _exchange(
        gcs_server,
        f"PUT /{target} HTTP/1.1\r\nContent-Range: bytes */*\r\n"
        "Transfer-Encoding: chunked\r\n\r\nzz\r\n".encode(),
    )
    assert _status_of(raw) == 400


def test_unknown_paths_and_methods(gcs_server: GcsServer, gcs_bucket: str) -> None:
    assert requests.get(f"{gcs_server.url}/nowhere", timeout=30).status_code == 404
    assert requests.patch(f"{gcs_server.url}/storage/v1/b", timeout=30).status_code == 405
    missing = requests.get(f"{gcs_server.url}/storage/v1/b/{gcs_bucket}/o/nope", timeout=30)
    assert missing.status_code == 404
    assert missing.json()["error"]["errors"][0]["reason"] == "notFound"
    unknown_type = requests.post(
        f"{gcs_server.url}/upload/storage/v1/b/{gcs_bucket}/o",
        params={"uploadType": "weird", "name": "x"},
        timeout=30,
    )
    assert unknown_type.status_code == 400


def test_handler_failure_is_a_500_and_the_server_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real failure (the session's part file turned into a directory) answers 500.

    The log names the exception and where it was raised, but never its text: that holds
    the session file's path, and no session id or data-dir path may reach a log or a body.
    """
    with GcsServer(data_dir=tmp_path) as server:
        server.store.create_bucket("bkt")
        uri = start_resumable_upload(server.url, "bkt", "obj")
        upload_id = uri.rsplit("upload_id=", 1)[1]
        [part] = (tmp_path / "sessions").glob("*.part")
        part.unlink()
        part.mkdir()
        response = requests.put(
            uri, data=b"x" * Q, headers={"Content-Range": f"bytes 0-{Q - 1}/*"}, timeout=30
        )
        assert response.status_code == 500
        assert "IsADirectoryError" in caplog.text
        for secret in (upload_id, str(tmp_path), part.name):
            assert secret not in caplog.text
            assert secret not in response.text
        assert _still_serving(server)


def test_keep_alive_serves_several_requests_on_one_connection(
    gcs_server: GcsServer, gcs_bucket: str
) -> None:
    one = f"GET /storage/v1/b/{gcs_bucket} HTTP/1.1\r\nHost: h\r\n\r\n".encode()
    last = f"GET /storage/v1/b/{gcs_bucket} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    raw = _exchange(gcs_server, one * 3 + last.encode(), half_close=False)
    assert raw.count(b"HTTP/1.1 200 OK") == 4


def test_expect_100_continue(gcs_server: GcsServer, gcs_bucket: str) -> None:
    uri = start_resumable_upload(gcs_server.url, gcs_bucket, "obj")
    target = "/" + uri.split("/", 3)[3]
    head = (
        f"PUT {target} HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nConnection: close\r\n"
        f"Content-Range: bytes 0-4/5\r\nContent-Length: 5\r\n\r\n"
    ).encode()
    with socket.create_connection(gcs_server.address, timeout=30) as sock:
        sock.sendall(head)
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        assert sock.recv(100).startswith(b"HTTP/1.1 200 OK")
    assert gcs_server.store.get_object(gcs_bucket, "obj")[0] == b"hello"


def test_links_follow_the_host_the_client_used(gcs_server: GcsServer, gcs_bucket: str) -> None:
    response = requests.post(
        f"{gcs_server.url}/upload/storage/v1/b/{gcs_bucket}/o",
        params={"uploadType": "resumable", "name": "obj"},
        headers={"Host": "proxy.example:8080"},
        timeout=30,
    )
    assert response.headers["Location"].startswith(
        f"http://proxy.example:8080/upload/storage/v1/b/{gcs_bucket}/o?"
    )


def test_object_names_with_slashes_and_unicode(gcs_server: GcsServer, gcs_bucket: str) -> None:
    name = "dir/sub dir/naïve #1?.txt"
    gcs_server.store.insert_object(gcs_bucket, name, b"data")
    quoted = quote(name, safe="")
    meta = requests.get(f"{gcs_server.url}/storage/v1/b/{gcs_bucket}/o/{quoted}", timeout=30)
    assert meta.json()["name"] == name
    media = requests.get(meta.json()["mediaLink"], timeout=30)
    assert media.content == b"data"


def test_download_ranges(gcs_server: GcsServer, gcs_bucket: str) -> None:
    gcs_server.store.insert_object(gcs_bucket, "obj", bytes(range(100)))
    url = f"{gcs_server.url}/storage/v1/b/{gcs_bucket}/o/obj?alt=media"

    def fetch(byte_range: str) -> requests.Response:
        return requests.get(url, headers={"Range": byte_range}, timeout=30)

    middle = fetch("bytes=10-19")
    assert (middle.status_code, middle.content) == (206, bytes(range(10, 20)))
    assert middle.headers["Content-Range"] == "bytes 10-19/100"
    assert fetch("bytes=90-").content == bytes(range(90, 100))
    assert fetch("bytes=-5").content == bytes(range(95, 100))
    assert fetch("bytes=100-").status_code == 416
    whole = requests.get(url, timeout=30)
    assert whole.headers["X-Goog-Hash"].startswith("crc32c=")
    assert whole.headers["X-Goog-Stored-Content-Length"] == "100"


def test_sixty_four_concurrent_uploads_while_one_client_stalls(
    gcs_server: GcsServer, gcs_bucket: str
) -> None:
    stalled_uri = start_resumable_upload(gcs_server.url, gcs_bucket, "stalled")
    target = "/" + stalled_uri.split("/", 3)[3]
    uploads = 64
    payloads = {f"obj-{i}": bytes([i]) * (2 * Q + i) for i in range(uploads)}

    def upload(name: str) -> int:
        payload = payloads[name]
        uri = start_resumable_upload(gcs_server.url, gcs_bucket, name)
        first = requests.put(
            uri, data=payload[:Q], headers={"Content-Range": f"bytes 0-{Q - 1}/*"}, timeout=60
        )
        assert first.status_code == 308
        rest = requests.put(
            uri,
            data=payload[Q:],
            headers={"Content-Range": f"bytes {Q}-{len(payload) - 1}/{len(payload)}"},
            timeout=60,
        )
        return rest.status_code

    with socket.create_connection(gcs_server.address, timeout=30) as stalled:
        # Head and half the body, then nothing: its connection thread waits on it.
        stalled.sendall(
            f"PUT {target} HTTP/1.1\r\nHost: h\r\nContent-Range: bytes 0-{2 * Q - 1}/*\r\n"
            f"Content-Length: {2 * Q}\r\n\r\n".encode()
            + bytes(Q)
        )
        barrier = threading.Barrier(uploads)

        def upload_together(name: str) -> int:
            barrier.wait(60)
            return upload(name)

        with ThreadPoolExecutor(uploads) as pool:
            statuses = list(pool.map(upload_together, payloads))
        assert statuses == [200] * uploads
        for name, payload in payloads.items():
            assert gcs_server.store.get_object(gcs_bucket, name)[0] == payload
        [stalled_session] = [s for s in gcs_server.store.sessions() if s.name == "stalled"]
        assert stalled_session.persisted_size == 0  # nothing is kept before the body ends


def test_stop_interrupts_a_scripted_stall(gcs_bucket: str) -> None:
    server = GcsServer()
    server.start()
    server.store.create_bucket(gcs_bucket)
    uri = start_resumable_upload(server.url, gcs_bucket, "obj")
    test_id = server.create_retry_test({"storage.objects.insert": ["stall-for-3600s-after-0K"]})
    sock = socket.create_connection(server.address, timeout=30)
    target = "/" + uri.split("/", 3)[3]
    sock.sendall(
        f"PUT {target} HTTP/1.1\r\nHost: h\r\nx-retry-test-id: {test_id}\r\n"
        "Content-Range: bytes 0-0/1\r\nContent-Length: 1\r\n\r\n".encode()
    )
    while not server.retry_tests.get(test_id)["completed"]:  # the stall has begun
        threading.Event().wait(0.01)
    server.stop()  # returns although the stall has an hour to go; pytest-timeout guards
    sock.close()


def test_retry_test_api_accepts_testbench_json_transport(gcs_server: GcsServer) -> None:
    response = requests.post(
        f"{gcs_server.url}/retry_test",
        data=json.dumps(
            {"instructions": {"storage.objects.get": ["return-500"]}, "transport": "JSON"}
        ),
        timeout=30,
    )
    assert response.status_code == 200
    assert response.json()["transport"] == "JSON"


def test_a_refused_request_body_is_drained_and_the_connection_kept(
    gcs_server: GcsServer, gcs_bucket: str
) -> None:
    body = bytes(3 * Q + 5)
    refused = f"PUT /nowhere HTTP/1.1\r\nHost: h\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    follow_up = f"GET /storage/v1/b/{gcs_bucket} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    raw = _exchange(gcs_server, refused + body + follow_up.encode(), half_close=False)
    assert raw.startswith(b"HTTP/1.1 404 ")
    assert raw.count(b"HTTP/1.1 200 OK") == 1
