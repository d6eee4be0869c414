"""The real google-cloud-storage client round-trips against the endpoint."""

from __future__ import annotations

import base64
import hashlib
import io

import google_crc32c
import pytest
from google.api_core import exceptions
from google.cloud import storage  # type: ignore[import-untyped]
from google.resumable_media.requests import ResumableUpload

from faultnet.gcs import UPLOAD_QUANTUM, GcsServer
from faultnet.gcs.clients import anonymous_client


def _crc32c(data: bytes) -> str:
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


def _pattern(size: int) -> bytes:
    return bytes(i * 7 % 251 for i in range(size))


def test_bucket_create_get_and_list(storage_client: storage.Client) -> None:
    storage_client.bucket("alpha").create()
    assert storage_client.get_bucket("alpha").name == "alpha"
    assert [b.name for b in storage_client.list_buckets()] == ["alpha"]
    with pytest.raises(exceptions.Conflict):
        storage_client.bucket("alpha").create()
    with pytest.raises(exceptions.NotFound):
        storage_client.get_bucket("missing")


def test_multipart_upload_round_trips_with_metadata(
    storage_client: storage.Client, gcs_bucket: str, gcs_server: GcsServer
) -> None:
    blob = storage_client.bucket(gcs_bucket).blob("dir/sub/hello.txt")
    blob.metadata = {"owner": "rup"}
    blob.upload_from_string(b"hello world", content_type="text/plain")

    assert blob.download_as_bytes() == b"hello world"
    blob.reload()
    assert blob.size == 11
    assert blob.content_type == "text/plain"
    assert blob.crc32c == _crc32c(b"hello world")
    assert blob.md5_hash == base64.b64encode(hashlib.md5(b"hello world").digest()).decode()
    assert blob.metadata == {"owner": "rup"}
    data, resource = gcs_server.store.get_object(gcs_bucket, "dir/sub/hello.txt")
    assert data == b"hello world"
    assert resource["generation"] == str(blob.generation)


def test_resumable_upload_with_chunk_size(
    storage_client: storage.Client, gcs_bucket: str, gcs_server: GcsServer
) -> None:
    payload = _pattern(3 * UPLOAD_QUANTUM + 12345)
    blob = storage_client.bucket(gcs_bucket).blob("big.bin", chunk_size=UPLOAD_QUANTUM)
    # From a stream of unknown size the client uses a resumable upload (else multipart).
    blob.upload_from_file(io.BytesIO(payload))
    assert [s.finalized for s in gcs_server.store.sessions()] == [True]

    assert gcs_server.store.get_object(gcs_bucket, "big.bin")[0] == payload
    assert blob.download_as_bytes() == payload
    assert blob.download_as_bytes(start=10, end=19) == payload[10:20]


def test_list_with_prefix_and_delimiter_then_delete(
    storage_client: storage.Client, gcs_bucket: str
) -> None:
    bucket = storage_client.bucket(gcs_bucket)
    for name in ("a/1", "a/2", "a/b/3", "c"):
        bucket.blob(name).upload_from_string(name.encode())

    assert [b.name for b in storage_client.list_blobs(gcs_bucket)] == ["a/1", "a/2", "a/b/3", "c"]
    listing = storage_client.list_blobs(gcs_bucket, prefix="a/", delimiter="/")
    assert [b.name for b in listing] == ["a/1", "a/2"]
    assert listing.prefixes == {"a/b/"}
    paged = storage_client.list_blobs(gcs_bucket, max_results=10, page_size=1)
    assert [b.name for b in paged] == ["a/1", "a/2", "a/b/3", "c"]

    bucket.blob("a/1").delete()
    assert [b.name for b in storage_client.list_blobs(gcs_bucket)] == ["a/2", "a/b/3", "c"]
    with pytest.raises(exceptions.NotFound):
        bucket.blob("a/1").delete()


def test_generation_preconditions(storage_client: storage.Client, gcs_bucket: str) -> None:
    blob = storage_client.bucket(gcs_bucket).blob("obj")
    blob.upload_from_string(b"first", if_generation_match=0)
    with pytest.raises(exceptions.PreconditionFailed):
        blob.upload_from_string(b"second", if_generation_match=0)
    blob.reload()
    blob.upload_from_string(b"second", if_generation_match=blob.generation)
    assert blob.download_as_bytes() == b"second"


def test_create_resumable_upload_session_then_resumable_media(
    storage_client: storage.Client, gcs_bucket: str, gcs_server: GcsServer
) -> None:
    payload = _pattern(2 * UPLOAD_QUANTUM + 1)
    blob = storage_client.bucket(gcs_bucket).blob("session.bin")
    session_url = blob.create_resumable_upload_session(size=len(payload))
    assert [s.total_size for s in gcs_server.store.sessions()] == [len(payload)]

    transport = storage_client._http
    upload_url = f"{gcs_server.url}/upload/storage/v1/b/{gcs_bucket}/o?uploadType=resumable"
    # google.resumable_media ships no type hints.
    upload = ResumableUpload(upload_url, UPLOAD_QUANTUM)  # type: ignore[no-untyped-call]
    stream = io.BytesIO(payload)
    upload.initiate(  # type: ignore[no-untyped-call]
        transport, stream, {"name": "media.bin"}, "application/octet-stream"
    )
    while not upload.finished:
        upload.transmit_next_chunk(transport)  # type: ignore[no-untyped-call]
    assert gcs_server.store.get_object(gcs_bucket, "media.bin")[0] == payload
    assert session_url.startswith(gcs_server.url)


def test_without_md5_objects_carry_only_crc32c(gcs_bucket: str) -> None:
    with GcsServer(compute_md5=False) as server:
        server.store.create_bucket(gcs_bucket)
        client = anonymous_client(server.url)
        blob = client.bucket(gcs_bucket).blob("obj", chunk_size=UPLOAD_QUANTUM)
        payload = _pattern(UPLOAD_QUANTUM + 1)
        blob.upload_from_file(io.BytesIO(payload))
        assert blob.download_as_bytes() == payload
        blob.reload()
        assert (blob.crc32c, blob.md5_hash) == (_crc32c(payload), None)
