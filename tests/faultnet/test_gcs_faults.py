"""Scripted faults (storage-testbench's retry-test API, plus rup's own) apply exactly."""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import requests
from google.cloud import storage  # type: ignore[import-untyped]

from faultnet.gcs import UPLOAD_QUANTUM, GcsServer
from faultnet.gcs.clients import anonymous_client, start_resumable_upload

Q = UPLOAD_QUANTUM
KIB = 1024
INSERT = "storage.objects.insert"
GET = "storage.objects.get"


def _pattern(size: int) -> bytes:
    return bytes((i * 13 + 5) % 256 for i in range(size))


def _put(
    session_uri: str, content_range: str, body: bytes = b"", test_id: str | None = None
) -> requests.Response:
    headers = {"Content-Range": content_range}
    if test_id is not None:
        headers["x-retry-test-id"] = test_id
    return requests.put(session_uri, data=body, headers=headers, timeout=30)


def _persisted(session_uri: str) -> int:
    response = _put(session_uri, "bytes */*")
    assert response.status_code == 308
    stored = response.headers.get("Range")
    return 0 if stored is None else int(stored.removeprefix("bytes=0-")) + 1


def _raw_exchange(server: GcsServer, request: bytes) -> bytes:
    """Send one request and read until the server closes the connection."""
    with socket.create_connection(server.address, timeout=30) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _raw_request(method: str, uri: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    parts = urlsplit(uri)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers, body


@pytest.fixture
def session_uri(gcs_server: GcsServer, gcs_bucket: str) -> str:
    return start_resumable_upload(gcs_server.url, gcs_bucket, "obj")


# -- the retry-test API -----------------------------------------------------------------


def test_retry_test_api_round_trip(gcs_server: GcsServer) -> None:
    created = requests.post(
        f"{gcs_server.url}/retry_test",
        json={"instructions": {INSERT: ["return-503", "return-reset-connection"]}},
        timeout=30,
    )
    assert created.status_code == 200
    document = created.json()
    assert document["instructions"] == {INSERT: ["return-503", "return-reset-connection"]}
    assert document["completed"] is False
    test_url = f"{gcs_server.url}/retry_test/{document['id']}"
    assert requests.get(test_url, timeout=30).json() == document
    listed = requests.get(f"{gcs_server.url}/retry_tests", timeout=30).json()
    assert listed == {"retry_test": [document]}
    assert requests.delete(test_url, timeout=30).status_code == 200
    assert requests.get(test_url, timeout=30).status_code == 404


@pytest.mark.parametrize(
    "instructions",
    [
        {INSERT: ["return-sometimes"]},
        {"storage.objects.rewrite": ["return-503"]},
        {INSERT: "return-503"},
        {},
    ],
)
def test_retry_test_api_rejects_what_it_does_not_understand(
    gcs_server: GcsServer, instructions: object
) -> None:
    response = requests.post(
        f"{gcs_server.url}/retry_test", json={"instructions": instructions}, timeout=30
    )
    assert response.status_code == 400


def test_instructions_apply_once_each_in_order(gcs_server: GcsServer, gcs_bucket: str) -> None:
    test_id = gcs_server.create_retry_test({"storage.buckets.get": ["return-503", "return-429"]})
    url = f"{gcs_server.url}/storage/v1/b/{gcs_bucket}"
    headers = {"x-retry-test-id": test_id}
    codes = [requests.get(url, headers=headers, timeout=30).status_code for _ in range(3)]
    assert codes == [503, 429, 200]
    assert gcs_server.retry_tests.get(test_id)["completed"] is True
    # Requests without the header never see the faults.
    other = gcs_server.create_retry_test({"storage.buckets.get": ["return-503"]})
    assert requests.get(url, timeout=30).status_code == 200
    assert gcs_server.retry_tests.get(other)["instructions"] == {
        "storage.buckets.get": ["return-503"]
    }


# -- storage-testbench's faults ---------------------------------------------------------


def test_return_503_on_a_chunk_stores_nothing(gcs_server: GcsServer, session_uri: str) -> None:
    test_id = gcs_server.create_retry_test({INSERT: ["return-503"]})
    response = _put(session_uri, f"bytes 0-{Q - 1}/*", _pattern(Q), test_id)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == 503
    assert _persisted(session_uri) == 0


def test_return_503_after_nk_stores_exactly_n_kib(gcs_server: GcsServer, session_uri: str) -> None:
    test_id = gcs_server.create_retry_test({INSERT: ["return-503-after-512K"]})
    payload = _pattern(4 * Q)
    # The first chunk ends before 512 KiB: the instruction waits.
    assert _put(session_uri, f"bytes 0-{Q - 1}/*", payload[:Q], test_id).status_code == 308
    response = _put(session_uri, f"bytes {Q}-{3 * Q - 1}/*", payload[Q : 3 * Q], test_id)
    assert response.status_code == 503
    assert _persisted(session_uri) == 512 * KIB
    assert gcs_server.retry_tests.get(test_id)["completed"] is True
    final = _put(session_uri, f"bytes {2 * Q}-{4 * Q - 1}/{4 * Q}", payload[2 * Q :], test_id)
    assert final.status_code == 200


def test_return_reset_connection_sends_rst_and_stores_nothing(
    gcs_server: GcsServer, session_uri: str
) -> None:
    test_id = gcs_server.create_retry_test({INSERT: ["return-reset-connection"] * 2})
    request = _raw_request(
        "PUT",
        session_uri,
        {"Content-Range": "bytes 0-99/*", "x-retry-test-id": test_id},
        b"x" * 100,
    )
    with pytest.raises(ConnectionResetError):  # an RST, not an orderly close
        _raw_exchange(gcs_server, request)
    with pytest.raises(requests.ConnectionError, match=r"reset|aborted"):
        _put(session_uri, f"bytes 0-{Q - 1}/*", _pattern(Q), test_id)
    assert _persisted(session_uri) == 0


def test_return_broken_stream_cuts_a_download_after_4_bytes(
    gcs_server: GcsServer, gcs_bucket: str
) -> None:
    gcs_server.store.insert_object(gcs_bucket, "obj", _pattern(10_000))
    test_id = gcs_server.create_retry_test({GET: ["return-broken-stream"]})
    uri = f"{gcs_server.url}/download/storage/v1/b/{gcs_bucket}/o/obj?alt=media"
    raw = _raw_exchange(gcs_server, _raw_request("GET", uri, {"x-retry-test-id": test_id}))
    status, headers, body = _split_response(raw)
    assert (status, headers["content-length"], body) == (200, "10000", _pattern(4))


def test_return_broken_stream_after_nk_on_download(gcs_server: GcsServer, gcs_bucket: str) -> None:
    gcs_server.store.insert_object(gcs_bucket, "obj", _pattern(100 * KIB))
    test_id = gcs_server.create_retry_test({GET: ["return-broken-stream-after-10K"]})
    uri = f"{gcs_server.url}/storage/v1/b/{gcs_bucket}/o/obj?alt=media"
    raw = _raw_exchange(gcs_server, _raw_request("GET", uri, {"x-retry-test-id": test_id}))
    assert _split_response(raw)[2] == _pattern(10 * KIB)


def test_broken_stream_final_chunk_creates_the_object_then_cuts_the_response(
    gcs_server: GcsServer, gcs_bucket: str, session_uri: str
) -> None:
    test_id = gcs_server.create_retry_test({INSERT: ["return-broken-stream-final-chunk-after-10B"]})
    payload = _pattern(Q + 3)
    # Not the final chunk: the instruction waits.
    assert _put(session_uri, f"bytes 0-{Q - 1}/*", payload[:Q], test_id).status_code == 308
    final = _raw_request(
        "PUT",
        session_uri,
        {"Content-Range": f"bytes {Q}-{Q + 2}/{Q + 3}", "x-retry-test-id": test_id},
        payload[Q:],
    )
    status, headers, body = _split_response(_raw_exchange(gcs_server, final))
    assert status == 200
    assert len(body) == 10
    assert int(headers["content-length"]) > 10
    assert gcs_server.store.get_object(gcs_bucket, "obj")[0] == payload
    # The client's recovery: a status query reports the object.
    assert _put(session_uri, "bytes */*").status_code == 200


class _ControlledSleep:
    """A stand-in for ``time.sleep`` that parks the stalled request until released."""

    def __init__(self) -> None:
        self.requested: list[float] = []
        self.stalled = threading.Event()
        self.release = threading.Event()

    def __call__(self, seconds: float) -> None:
        self.requested.append(seconds)
        self.stalled.set()
        assert self.release.wait(60), "test never released the stall"


@pytest.fixture
def controlled_sleep() -> _ControlledSleep:
    return _ControlledSleep()


@pytest.fixture
def stalling_server(controlled_sleep: _ControlledSleep) -> Iterator[GcsServer]:
    with GcsServer(sleep=controlled_sleep) as server:
        server.store.create_bucket("bkt")
        yield server
    controlled_sleep.release.set()


def test_stall_after_nk_on_upload_holds_exactly_n_kib_during_the_stall(
    stalling_server: GcsServer, controlled_sleep: _ControlledSleep
) -> None:
    uri = start_resumable_upload(stalling_server.url, "bkt", "obj")
    test_id = stalling_server.create_retry_test({INSERT: ["stall-for-7s-after-300K"]})
    payload = _pattern(2 * Q + 10)
    with ThreadPoolExecutor(1) as pool:
        stalled = pool.submit(
            _put, uri, f"bytes 0-{len(payload) - 1}/{len(payload)}", payload, test_id
        )
        assert controlled_sleep.stalled.wait(60)
        # Meanwhile the session holds exactly the bytes before the stall point, and
        # other requests are served.
        assert _persisted(uri) == 300 * KIB
        assert controlled_sleep.requested == [7.0]
        controlled_sleep.release.set()
        assert stalled.result().status_code == 200
    assert stalling_server.store.get_object("bkt", "obj")[0] == payload


def test_stall_after_nk_on_download(
    stalling_server: GcsServer, controlled_sleep: _ControlledSleep
) -> None:
    stalling_server.store.insert_object("bkt", "obj", _pattern(50 * KIB))
    test_id = stalling_server.create_retry_test({GET: ["stall-for-3s-after-20K"]})
    uri = f"{stalling_server.url}/storage/v1/b/bkt/o/obj?alt=media"
    with socket.create_connection(stalling_server.address, timeout=30) as sock:
        sock.sendall(_raw_request("GET", uri, {"x-retry-test-id": test_id}))
        assert controlled_sleep.stalled.wait(60)
        received = b""
        while len(body := received.partition(b"\r\n\r\n")[2]) < 20 * KIB:
            received += sock.recv(65536)
        assert body == _pattern(20 * KIB)  # and nothing more while the stall lasts
        controlled_sleep.release.set()
        while chunk := sock.recv(65536):
            received += chunk
    assert received.partition(b"\r\n\r\n")[2] == _pattern(50 * KIB)
    assert controlled_sleep.requested == [3.0]


# -- rup's own faults -------------------------------------------------------------------


def test_short_range_stores_and_reports_n_kib_less(
    gcs_server: GcsServer, gcs_bucket: str, session_uri: str
) -> None:
    test_id = gcs_server.create_retry_test({INSERT: ["return-308-short-range-256K"]})
    payload = _pattern(4 * Q + 1)
    response = _put(session_uri, f"bytes 0-{len(payload) - 1}/{len(payload)}", payload, test_id)
    # Even the final chunk: it answers 308 and the object does not exist yet.
    assert response.status_code == 308
    assert response.headers["Range"] == f"bytes=0-{4 * Q + 1 - 256 * KIB - 1}"
    assert _persisted(session_uri) == 3 * Q + 1
    assert gcs_server.store.list_objects(gcs_bucket) == []
    rest = _put(session_uri, f"bytes {3 * Q + 1}-{4 * Q}/{4 * Q + 1}", payload[3 * Q + 1 :])
    assert rest.status_code == 200
    assert gcs_server.store.get_object(gcs_bucket, "obj")[0] == payload


def test_range_regression_reports_less_than_acknowledged_without_storing(
    gcs_server: GcsServer, session_uri: str
) -> None:
    test_id = gcs_server.create_retry_test({INSERT: ["return-range-regression"]})
    payload = _pattern(3 * Q)
    # Nothing acknowledged yet: the lie waits.
    assert _put(session_uri, f"bytes 0-{2 * Q - 1}/*", payload[: 2 * Q], test_id).status_code == 308
    lie = _put(session_uri, f"bytes {2 * Q}-{3 * Q - 1}/*", payload[2 * Q :], test_id)
    assert lie.status_code == 308
    assert lie.headers["Range"] == f"bytes=0-{Q - 1}"
    assert _persisted(session_uri) == 2 * Q  # the truth did not change


def test_return_410_expires_the_session(gcs_server: GcsServer, session_uri: str) -> None:
    test_id = gcs_server.create_retry_test({INSERT: ["return-410"]})
    assert _put(session_uri, f"bytes 0-{Q - 1}/*", _pattern(Q), test_id).status_code == 410
    assert _put(session_uri, "bytes */*").status_code == 404


# -- with the real client ---------------------------------------------------------------


def _client_with_retry_test(server: GcsServer, test_id: str) -> storage.Client:
    http = requests.Session()
    http.headers["x-retry-test-id"] = test_id
    return anonymous_client(server.url, http=http)


def test_client_retries_through_scripted_503s(gcs_server: GcsServer, gcs_bucket: str) -> None:
    test_id = gcs_server.create_retry_test(
        {INSERT: ["return-503", "return-503-after-512K"], GET: ["return-503"]}
    )
    client = _client_with_retry_test(gcs_server, test_id)
    payload = _pattern(4 * Q + 17)
    blob = client.bucket(gcs_bucket).blob("obj", chunk_size=Q)
    fast_retry = storage.retry.DEFAULT_RETRY.with_delay(0.01, 0.02)
    # From a stream of unknown size the client uses a resumable upload (else multipart).
    blob.upload_from_file(io.BytesIO(payload), retry=fast_retry)
    assert gcs_server.retry_tests.get(test_id)["instructions"] == {INSERT: [], GET: ["return-503"]}
    assert blob.download_as_bytes(retry=fast_retry) == payload
    assert gcs_server.retry_tests.get(test_id)["completed"] is True


def test_return_broken_stream_on_a_chunk_stores_it_then_cuts_the_response(
    gcs_server: GcsServer, session_uri: str
) -> None:
    test_id = gcs_server.create_retry_test({INSERT: ["return-broken-stream"]})
    request = _raw_request(
        "PUT",
        session_uri,
        {"Content-Range": f"bytes 0-{Q - 1}/*", "x-retry-test-id": test_id},
        _pattern(Q),
    )
    status, _, body = _split_response(_raw_exchange(gcs_server, request))
    assert (status, body) == (308, b"")  # a 308 has no body: only the head got out
    assert _persisted(session_uri) == Q
