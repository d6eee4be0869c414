"""Resumable upload sessions follow GCS's rules, byte for byte."""

from __future__ import annotations

import base64
import hashlib
import socket
import weakref
from collections.abc import Iterator
from urllib.parse import urlsplit

import google_crc32c
import pytest
import requests

from faultnet.gcs import UPLOAD_QUANTUM, GcsServer
from faultnet.gcs.clients import start_resumable_upload
from faultnet.gcs.model import Preconditions, SessionInfo

Q = UPLOAD_QUANTUM


def _pattern(size: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) % 256 for i in range(size))


def _put(
    session_uri: str, content_range: str, body: bytes = b"", **headers: str
) -> requests.Response:
    return requests.put(
        session_uri,
        data=body,
        headers={"Content-Range": content_range, **headers},
        timeout=30,
    )


def _persisted(session_uri: str) -> int:
    """The stored size, from a status query; fails if the upload is final."""
    response = _put(session_uri, "bytes */*")
    assert response.status_code == 308
    stored = response.headers.get("Range")
    return 0 if stored is None else int(stored.removeprefix("bytes=0-")) + 1


def _send_raw(server: GcsServer, data: bytes) -> bytes:
    """Send ``data``, half-close, and read until the server closes: it has acted by then."""
    with socket.create_connection(server.address, timeout=30) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _raw_put_head(session_uri: str, content_range: str, content_length: int) -> bytes:
    parts = urlsplit(session_uri)
    return (
        f"PUT {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Range: {content_range}\r\nContent-Length: {content_length}\r\n\r\n"
    ).encode()


@pytest.fixture
def session_uri(gcs_server: GcsServer, gcs_bucket: str) -> str:
    return start_resumable_upload(gcs_server.url, gcs_bucket, "obj")


def test_fresh_session_status_query_has_no_range_header(session_uri: str) -> None:
    response = _put(session_uri, "bytes */*")
    assert response.status_code == 308
    assert "Range" not in response.headers


def test_aligned_chunk_is_acknowledged_exactly(session_uri: str) -> None:
    response = _put(session_uri, f"bytes 0-{Q - 1}/*", _pattern(Q))
    assert response.status_code == 308
    assert response.headers["Range"] == f"bytes=0-{Q - 1}"
    assert _persisted(session_uri) == Q


def test_unaligned_non_final_chunk_keeps_only_the_aligned_prefix(session_uri: str) -> None:
    response = _put(session_uri, f"bytes 0-{Q + 999}/*", _pattern(Q + 1000))
    assert response.status_code == 308
    assert response.headers["Range"] == f"bytes=0-{Q - 1}"


def test_overlapping_resend_stores_only_new_bytes_without_comparing(
    gcs_server: GcsServer, gcs_bucket: str, session_uri: str
) -> None:
    original = _pattern(2 * Q + 10, seed=1)
    assert _put(session_uri, f"bytes 0-{Q - 1}/*", original[:Q]).status_code == 308
    # The resend's first Q bytes differ: GCS ignores them, it does not compare.
    resend = _pattern(Q, seed=99) + original[Q:]
    response = _put(session_uri, f"bytes 0-{len(original) - 1}/{len(original)}", resend)
    assert response.status_code == 200
    assert gcs_server.store.get_object(gcs_bucket, "obj")[0] == original


def test_chunk_starting_past_the_stored_offset_is_refused(session_uri: str) -> None:
    assert _put(session_uri, f"bytes 0-{Q - 1}/*", _pattern(Q)).status_code == 308
    response = _put(session_uri, f"bytes {Q + 1}-{2 * Q}/*", _pattern(Q))
    assert response.status_code == 400
    assert _persisted(session_uri) == Q


def test_body_length_must_match_the_content_range(session_uri: str) -> None:
    response = _put(session_uri, f"bytes 0-{Q - 1}/*", _pattern(Q - 1))
    assert response.status_code == 400
    assert _persisted(session_uri) == 0


def test_final_chunk_answers_with_object_metadata(session_uri: str) -> None:
    payload = _pattern(Q + 5)
    assert _put(session_uri, f"bytes 0-{Q - 1}/*", payload[:Q]).status_code == 308
    response = _put(session_uri, f"bytes {Q}-{Q + 4}/{Q + 5}", payload[Q:])

    assert response.status_code == 200
    resource = response.json()
    crc = google_crc32c.value(payload).to_bytes(4, "big")
    assert resource["size"] == str(Q + 5)
    assert resource["crc32c"] == base64.b64encode(crc).decode()
    assert resource["md5Hash"] == base64.b64encode(hashlib.md5(payload).digest()).decode()
    assert int(resource["generation"]) > 0
    # Once final, a status query answers 200 with the same object.
    again = _put(session_uri, "bytes */*")
    assert again.status_code == 200
    assert again.json()["generation"] == resource["generation"]


def test_status_query_with_matching_total_finalizes(
    gcs_server: GcsServer, gcs_bucket: str, session_uri: str
) -> None:
    assert _put(session_uri, f"bytes 0-{Q - 1}/*", _pattern(Q)).status_code == 308
    assert _put(session_uri, "bytes */*").status_code == 308
    response = _put(session_uri, f"bytes */{Q}")
    assert response.status_code == 200
    assert response.json()["size"] == str(Q)
    assert gcs_server.store.get_object(gcs_bucket, "obj")[0] == _pattern(Q)


def test_empty_object(gcs_server: GcsServer, gcs_bucket: str, session_uri: str) -> None:
    response = _put(session_uri, "bytes */0")
    assert response.status_code == 200
    assert gcs_server.store.get_object(gcs_bucket, "obj")[0] == b""


def test_total_must_not_change(session_uri: str) -> None:
    assert _put(session_uri, f"bytes 0-{Q - 1}/{3 * Q}", _pattern(Q)).status_code == 308
    assert _put(session_uri, f"bytes {Q}-{2 * Q - 1}/{4 * Q}", _pattern(Q)).status_code == 400


def test_declared_length_is_enforced(gcs_server: GcsServer, gcs_bucket: str) -> None:
    uri = start_resumable_upload(
        gcs_server.url, gcs_bucket, "obj", headers={"X-Upload-Content-Length": "10"}
    )
    assert _put(uri, "bytes 0-10/11", _pattern(11)).status_code == 400
    assert _put(uri, "bytes 0-9/10", _pattern(10)).status_code == 200


def test_delete_answers_499_and_forgets_the_session(
    gcs_server: GcsServer, session_uri: str
) -> None:
    assert _put(session_uri, f"bytes 0-{Q - 1}/*", _pattern(Q)).status_code == 308
    assert requests.delete(session_uri, timeout=30).status_code == 499
    assert _put(session_uri, "bytes */*").status_code == 404
    assert requests.delete(session_uri, timeout=30).status_code == 404
    assert gcs_server.store.sessions() == []


def test_unknown_upload_id_is_404(gcs_server: GcsServer, gcs_bucket: str) -> None:
    uri = f"{gcs_server.url}/upload/storage/v1/b/{gcs_bucket}/o?uploadType=resumable&upload_id=x"
    assert _put(uri, "bytes */*").status_code == 404
    assert _put(uri, "bytes 0-0/1", b"x").status_code == 404


@pytest.mark.parametrize(
    "content_range",
    ["bytes 0-9", "bytes=0-9/10", "bytes 9-0/10", "bytes 0-10/10", "bytes a-b/*", "0-9/*", ""],
)
def test_malformed_content_range_is_400(session_uri: str, content_range: str) -> None:
    response = _put(session_uri, content_range, _pattern(10))
    assert response.status_code == 400
    assert "error" in response.json()


def test_final_chunk_checksums_are_verified(
    gcs_server: GcsServer, gcs_bucket: str, session_uri: str
) -> None:
    payload = _pattern(1000)
    good_crc = base64.b64encode(google_crc32c.value(payload).to_bytes(4, "big")).decode()
    good_md5 = base64.b64encode(hashlib.md5(payload).digest()).decode()
    wrong = _put(session_uri, "bytes 0-999/1000", payload, **{"x-goog-hash": "crc32c=AAAAAA=="})
    assert wrong.status_code == 400
    assert gcs_server.store.list_objects(gcs_bucket) == []
    assert _persisted(session_uri) == 0  # a refused final chunk stores nothing
    wrong_md5 = _put(session_uri, "bytes 0-999/1000", payload, **{"x-goog-hash": "md5=AAAA"})
    assert wrong_md5.status_code == 400

    right = _put(
        session_uri,
        "bytes 0-999/1000",
        payload,
        **{"x-goog-hash": f"crc32c={good_crc},md5={good_md5}"},
    )
    assert right.status_code == 200
    assert right.json()["crc32c"] == good_crc


def test_if_generation_match_is_checked_at_start_and_at_finalize(
    gcs_server: GcsServer, gcs_bucket: str
) -> None:
    uri = start_resumable_upload(
        gcs_server.url, gcs_bucket, "obj", query={"ifGenerationMatch": "0"}
    )
    assert _put(uri, f"bytes 0-{Q - 1}/*", _pattern(Q)).status_code == 308
    gcs_server.store.insert_object(gcs_bucket, "obj", b"someone else")

    assert _put(uri, f"bytes {Q}-{Q}/{Q + 1}", b"!").status_code == 412
    assert gcs_server.store.get_object(gcs_bucket, "obj")[0] == b"someone else"
    with pytest.raises(requests.HTTPError, match="412"):
        start_resumable_upload(gcs_server.url, gcs_bucket, "obj", query={"ifGenerationMatch": "0"})


@pytest.mark.parametrize(
    ("granularity", "sent", "kept"),
    [(Q, 2 * Q + 1000, 2 * Q), (Q, Q - 1, 0), (0, 2 * Q + 1000, 0), (1000, 2500, 2000)],
)
def test_chunk_cut_off_partway_keeps_a_granular_prefix(
    gcs_bucket: str, granularity: int, sent: int, kept: int
) -> None:
    with GcsServer(chunk_persist_granularity=granularity) as server:
        server.store.create_bucket(gcs_bucket)
        uri = start_resumable_upload(server.url, gcs_bucket, "obj")
        payload = _pattern(4 * Q)
        head = _raw_put_head(uri, f"bytes 0-{len(payload) - 1}/{len(payload)}", len(payload))
        assert _send_raw(server, head + payload[:sent]) == b""  # nobody left to answer
        assert _persisted(uri) == kept
        response = _put(uri, f"bytes {kept}-{len(payload) - 1}/{len(payload)}", payload[kept:])
        assert response.status_code == 200
        assert server.store.get_object(gcs_bucket, "obj")[0] == payload


def test_chunked_transfer_encoding_body(
    gcs_server: GcsServer, gcs_bucket: str, session_uri: str
) -> None:
    payload = _pattern(Q + 77)

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(payload), 50_000):
            yield payload[start : start + 50_000]

    response = requests.put(
        session_uri,
        data=pieces(),
        headers={"Content-Range": f"bytes 0-{len(payload) - 1}/{len(payload)}"},
        timeout=30,
    )
    assert response.status_code == 200
    assert gcs_server.store.get_object(gcs_bucket, "obj")[0] == payload


def test_put_without_content_range_uploads_everything(
    gcs_server: GcsServer, gcs_bucket: str, session_uri: str
) -> None:
    response = requests.put(session_uri, data=b"whole", timeout=30)
    assert response.status_code == 200
    assert gcs_server.store.get_object(gcs_bucket, "obj")[0] == b"whole"


@pytest.mark.parametrize("gcs_server", ["memory"], indirect=True)  # holds bodies
def test_a_small_new_tail_does_not_keep_its_whole_request_buffer(
    gcs_server: GcsServer, gcs_bucket: str
) -> None:
    session = gcs_server.store.create_session(
        gcs_bucket,
        "obj",
        content_type="application/octet-stream",
        metadata={},
        declared_size=None,
        preconditions=Preconditions(),
    )
    request_buffer = bytearray(4 * Q)
    with session.lock:
        session.append(memoryview(request_buffer)[: 3 * Q])  # most of it: kept as is
        session.append(memoryview(request_buffer)[3 * Q : 3 * Q + 10])  # a sliver: copied
    kept, copied = session.segments()
    assert kept.obj is request_buffer
    assert copied.obj is not request_buffer
    assert session.persisted_size == 3 * Q + 10


class _RequestBuffer(bytearray):
    """A request body the test can hold a weak reference to."""


@pytest.mark.parametrize("gcs_server", ["memory"], indirect=True)  # holds bodies
def test_a_finished_session_leaves_only_its_result_behind(
    gcs_server: GcsServer, gcs_bucket: str
) -> None:
    """A long-running endpoint must not grow with every upload it has finished."""
    store = gcs_server.store
    session = store.create_session(
        gcs_bucket,
        "obj",
        content_type="application/octet-stream",
        metadata={},
        declared_size=None,
        preconditions=Preconditions(),
    )
    upload_id = session.upload_id
    body = _RequestBuffer(_pattern(Q))
    with session.lock:
        session.append(memoryview(body))
        info = store.finalize_session(session, memoryview(b"tail"))
    session_gone, body_gone = weakref.ref(session), weakref.ref(body)
    del session, body
    assert session_gone() is None

    # What answers the status query now is rebuilt from the result alone.
    finished = store.session(upload_id)
    assert finished.result == info
    assert finished.persisted_size == Q + 4
    assert finished.segments() == ()
    assert store.sessions() == [SessionInfo(gcs_bucket, "obj", Q + 4, Q + 4, finalized=True)]
    # The object held the bytes; once it is gone, nothing does.
    assert body_gone() is not None
    store.delete_object(gcs_bucket, "obj")
    assert body_gone() is None
    assert store.session(upload_id).result == info


def test_a_status_query_on_a_finished_session_answers_with_the_object(
    gcs_server: GcsServer, gcs_bucket: str, session_uri: str
) -> None:
    final = _put(session_uri, f"bytes 0-{Q - 1}/{Q}", _pattern(Q))
    assert final.status_code == 200
    for _ in range(2):
        again = _put(session_uri, "bytes */*")
        assert again.status_code == 200
        assert again.json() == final.json()
    # A resent final chunk is answered the same way, and stores nothing.
    assert _put(session_uri, f"bytes 0-{Q - 1}/{Q}", _pattern(Q, seed=1)).json() == final.json()
    assert gcs_server.store.get_object(gcs_bucket, "obj")[0] == _pattern(Q)
    assert [s.finalized for s in gcs_server.store.sessions()] == [True]
