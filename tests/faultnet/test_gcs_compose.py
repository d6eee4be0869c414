"""Compose, as GCS does it, driven through google-cloud-storage's ``Blob.compose``."""

from __future__ import annotations

import base64
from pathlib import Path

import google_crc32c
import pytest
import requests
from google.api_core import exceptions
from google.cloud import storage  # type: ignore[import-untyped]

from faultnet.gcs import GcsServer
from faultnet.gcs.clients import anonymous_client


def _crc32c(data: bytes) -> str:
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


@pytest.fixture
def bucket(server: GcsServer) -> storage.Bucket:
    return anonymous_client(server.url).bucket("bkt")


def _upload(bucket: storage.Bucket, name: str, data: bytes) -> storage.Blob:
    blob = bucket.blob(name)
    blob.upload_from_string(data)
    return blob


def test_compose_concatenates_and_combines_the_crc32c(
    server: GcsServer, bucket: storage.Bucket
) -> None:
    parts = [b"first part ", b"", b"x" * 300_000, "and the last, in UTF-8: é".encode()]
    sources = [_upload(bucket, f"part/{i}", data) for i, data in enumerate(parts)]
    destination = bucket.blob("whole")
    destination.content_type = "text/plain"
    destination.metadata = {"made": "by compose"}
    destination.compose(sources)

    whole = b"".join(parts)
    assert destination.crc32c == _crc32c(whole)
    assert destination.md5_hash is None  # GCS gives composite objects no MD5
    assert destination.component_count == len(parts)
    assert destination.size == len(whole)
    assert destination.content_type == "text/plain"
    assert destination.metadata == {"made": "by compose"}
    assert bucket.blob("whole").download_as_bytes() == whole
    # The sources stay unless asked otherwise.
    assert sorted(b.name for b in bucket.list_blobs()) == [*(s.name for s in sources), "whole"]
    assert server.store.get_object("bkt", "whole")[0] == whole


def test_a_composite_counts_its_components(bucket: storage.Bucket) -> None:
    a, b, c = (_upload(bucket, name, name.encode() * 3) for name in "abc")
    first = bucket.blob("ab")
    first.compose([a, b])
    again = bucket.blob("abc")
    again.compose([first, c])
    assert again.component_count == 3
    assert again.download_as_bytes() == b"aaabbbccc"
    assert again.crc32c == _crc32c(b"aaabbbccc")


def test_compose_onto_itself_appends(bucket: storage.Bucket) -> None:
    log, more = _upload(bucket, "log", b"line 1\n"), _upload(bucket, "more", b"line 2\n")
    log.reload()
    log.compose([log, more], if_generation_match=log.generation)
    assert log.download_as_bytes() == b"line 1\nline 2\n"


def test_32_sources_is_the_limit(bucket: storage.Bucket) -> None:
    sources = [_upload(bucket, f"s{i:02}", bytes([i])) for i in range(33)]
    at_limit = bucket.blob("at-limit")
    at_limit.compose(sources[:32])
    assert at_limit.download_as_bytes() == bytes(range(32))
    with pytest.raises(exceptions.BadRequest):
        bucket.blob("over").compose(sources)
    assert not bucket.blob("over").exists()


def test_a_missing_source_or_generation_is_404(bucket: storage.Bucket) -> None:
    present = _upload(bucket, "present", b"here")
    present.reload()
    with pytest.raises(exceptions.NotFound):
        bucket.blob("out").compose([present, bucket.blob("absent")])
    stale = bucket.blob("present", generation=present.generation + 1)
    with pytest.raises(exceptions.NotFound):
        bucket.blob("out").compose([stale])
    pinned = bucket.blob("present", generation=present.generation)
    bucket.blob("out").compose([pinned])
    assert bucket.blob("out").download_as_bytes() == b"here"


def test_preconditions_on_sources_and_destination_are_412(bucket: storage.Bucket) -> None:
    source = _upload(bucket, "source", b"data")
    source.reload()
    with pytest.raises(exceptions.PreconditionFailed):
        bucket.blob("out").compose([source], if_source_generation_match=[source.generation + 1])
    bucket.blob("out").compose([source], if_source_generation_match=[source.generation])

    existing = bucket.blob("out")
    existing.reload()
    with pytest.raises(exceptions.PreconditionFailed):
        bucket.blob("out").compose([source], if_generation_match=0)
    replaced = bucket.blob("out")
    replaced.compose([source, source], if_generation_match=existing.generation)
    assert replaced.generation > existing.generation
    assert replaced.download_as_bytes() == b"datadata"


def test_delete_source_objects(bucket: storage.Bucket) -> None:
    sources = [_upload(bucket, f"tmp/{i}", bytes([65 + i]) * 2) for i in range(3)]
    bucket.blob("final").compose(sources, delete_source_objects=True)
    assert [b.name for b in bucket.list_blobs()] == ["final"]
    assert bucket.blob("final").download_as_bytes() == b"AABBCC"


def test_a_compose_that_fails_is_retried_safely(server: GcsServer) -> None:
    """With ifGenerationMatch a compose is idempotent, so the client retries a 503."""
    test_id = server.create_retry_test({"storage.objects.compose": ["return-503"]})
    with requests.Session() as http:
        http.headers["x-retry-test-id"] = test_id
        bucket = anonymous_client(server.url, http=http).bucket("bkt")
        sources = [_upload(bucket, name, name.encode()) for name in ("one", "two")]
        destination = bucket.blob("both")
        destination.compose(sources, if_generation_match=0)
    assert destination.download_as_bytes() == b"onetwo"
    assert server.retry_tests.get(test_id)["completed"] is True


@pytest.mark.parametrize(
    ("document", "status"),
    [
        ({}, 400),
        ({"sourceObjects": []}, 400),
        ({"sourceObjects": [{"generation": "1"}]}, 400),
        ({"sourceObjects": [{"name": "s", "generation": "one"}]}, 400),
        ({"sourceObjects": [{"name": ".."}]}, 400),
        ({"sourceObjects": [{"name": "s"}], "destination": {"metadata": {"k": "v" * 9000}}}, 400),
    ],
)
def test_malformed_compose_requests_are_400(
    server: GcsServer, bucket: storage.Bucket, document: dict[str, object], status: int
) -> None:
    _upload(bucket, "s", b"data")
    response = requests.post(
        f"{server.url}/storage/v1/b/bkt/o/out/compose", json=document, timeout=30
    )
    assert response.status_code == status
    assert not bucket.blob("out").exists()


def test_a_composite_survives_a_restart(tmp_path: Path) -> None:
    with GcsServer(data_dir=tmp_path) as server:
        server.store.create_bucket("bkt")
        bucket = anonymous_client(server.url).bucket("bkt")
        sources = [_upload(bucket, name, name.encode()) for name in ("one", "two")]
        bucket.blob("both").compose(sources)
    with GcsServer(data_dir=tmp_path) as server:
        blob = anonymous_client(server.url).bucket("bkt").get_blob("both")
        assert (blob.component_count, blob.crc32c, blob.md5_hash) == (2, _crc32c(b"onetwo"), None)
        assert blob.download_as_bytes() == b"onetwo"
