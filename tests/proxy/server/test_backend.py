"""Choosing the GCS target: real GCS, a given endpoint, or the embedded one (memory or disk)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import requests
import trio

from faultnet.gcs import GcsServer
from faultnet.gcs.clients import anonymous_client
from faultnet.pytest_plugin import RetryTestFactory
from protocol import Complete, Completed, Error, ErrorCode, OpenUpload
from proxy.server import serve_in_background
from proxy.server.backend import (
    Backend,
    GcsTarget,
    SessionReferenceError,
    TargetKind,
    open_backend,
)
from proxy.server.settings import ServerSettings
from tests.proxy.conftest import RawClient

Connect = Callable[..., Awaitable[RawClient]]


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))


@pytest.mark.usefixtures("no_credentials")
def test_nothing_configured_means_the_embedded_endpoint() -> None:
    assert GcsTarget().resolve() is TargetKind.EMBEDDED


@pytest.mark.usefixtures("no_credentials")
def test_an_endpoint_wins_over_everything() -> None:
    assert GcsTarget(endpoint="http://127.0.0.1:1").resolve() is TargetKind.ENDPOINT


def test_application_default_credentials_mean_real_gcs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    config = tmp_path / "gcloud"
    config.mkdir()
    (config / "application_default_credentials.json").write_text("{}")
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(config))

    assert GcsTarget().resolve() is TargetKind.REAL
    assert GcsTarget(force_embedded=True).resolve() is TargetKind.EMBEDDED
    assert GcsTarget(data_dir=tmp_path).resolve() is TargetKind.EMBEDDED


def test_embedded_endpoint_creates_buckets_and_keeps_objects_on_disk(tmp_path: Path) -> None:
    target = GcsTarget(data_dir=tmp_path / "gcs", create_buckets=True)
    with open_backend(target) as backend:
        assert backend.kind is TargetKind.EMBEDDED
        backend.bucket("fresh-bucket").blob("kept.txt").upload_from_string(b"still here")

    with open_backend(target) as backend:
        blob = backend.bucket("fresh-bucket").blob("kept.txt")
        assert blob.download_as_bytes() == b"still here"


def test_only_the_in_memory_embedded_endpoint_creates_buckets_unless_asked(tmp_path: Path) -> None:
    assert GcsTarget(force_embedded=True).creates_buckets()
    assert not GcsTarget(data_dir=tmp_path).creates_buckets()
    assert not GcsTarget(endpoint="http://127.0.0.1:1").creates_buckets()
    assert GcsTarget(endpoint="http://127.0.0.1:1", create_buckets=True).creates_buckets()


def test_a_missing_bucket_is_not_created_unless_asked(gcs_server: GcsServer) -> None:
    backend = Backend(anonymous_client(gcs_server.url), TargetKind.ENDPOINT, gcs_server.url)
    assert not backend.bucket("never-made").exists()
    assert backend.live_generation("never-made", "x") == 0


def test_live_generation_is_zero_for_no_object_and_the_generation_otherwise(
    gcs_server: GcsServer, gcs_bucket: str
) -> None:
    backend = Backend(anonymous_client(gcs_server.url), TargetKind.ENDPOINT, gcs_server.url)
    assert backend.live_generation(gcs_bucket, "absent.bin") == 0
    blob = backend.bucket(gcs_bucket).blob("present.bin")
    blob.upload_from_string(b"x")
    assert backend.live_generation(gcs_bucket, "present.bin") == blob.generation > 0


ENDPOINT = "http://127.0.0.1:9000"
SESSION = f"{ENDPOINT}/upload/storage/v1/b/bkt/o?uploadType=resumable&upload_id=AbC-_9.x"


def _backend(url: str = ENDPOINT) -> Backend:
    return Backend(anonymous_client(url), TargetKind.ENDPOINT, url)


def test_a_session_is_kept_as_its_upload_id_and_rebuilt_at_the_current_endpoint() -> None:
    reference = _backend().session_reference("bkt", SESSION)
    assert reference == "AbC-_9.x"
    # The endpoint came back on another port: the session is found there.
    rebuilt = _backend("http://127.0.0.1:9555").session_uri("bkt", reference)
    assert rebuilt == (
        "http://127.0.0.1:9555/upload/storage/v1/b/bkt/o?uploadType=resumable&upload_id=AbC-_9.x"
    )


@pytest.mark.parametrize(
    "uri",
    [
        SESSION.replace("127.0.0.1:9000", "evil.example:80"),
        SESSION.replace("http:", "https:"),
        SESSION.replace("/b/bkt/", "/b/other/"),
        SESSION.replace("/upload/storage", "/storage"),
        SESSION.replace("upload_id=AbC-_9.x", "upload_id=a/b"),
        SESSION + "&upload_id=second",
        SESSION.replace("upload_id=", "id="),
    ],
)
def test_a_session_elsewhere_or_of_another_shape_is_refused(uri: str) -> None:
    with pytest.raises(SessionReferenceError) as info:
        _backend().session_reference("bkt", uri)
    assert "AbC" not in str(info.value)


@pytest.mark.parametrize(
    "reference", ["", "http://evil.example/x", "a b", "a&upload_id=b", "../../x", "x" * 1025]
)
def test_a_reference_that_is_not_an_upload_id_never_becomes_a_url(reference: str) -> None:
    with pytest.raises(SessionReferenceError):
        _backend().session_uri("bkt", reference)


def test_the_embedded_endpoint_refuses_requests_without_its_secret() -> None:
    target = GcsTarget(force_embedded=True, access_token="embedded-secret-1234")
    with open_backend(target) as backend:
        backend.bucket("guarded").blob("in.txt").upload_from_string(b"through the proxy")
        outsider = requests.get(f"{backend.url}/storage/v1/b/guarded/o/in.txt", timeout=10)
        wrong = requests.get(
            f"{backend.url}/storage/v1/b/guarded/o/in.txt",
            headers={"Authorization": "Bearer guess"},
            timeout=10,
        )
        assert (outsider.status_code, wrong.status_code) == (401, 401)
        assert b"through the proxy" not in outsider.content + wrong.content


def test_an_open_embedded_endpoint_serves_anyone() -> None:
    with open_backend(GcsTarget(force_embedded=True)) as backend:
        backend.bucket("open").blob("in.txt").upload_from_string(b"readable")
        reader = anonymous_client(backend.url)
        assert reader.bucket("open").blob("in.txt").download_as_bytes() == b"readable"


async def test_an_open_into_a_missing_bucket_is_refused_naming_the_bucket(
    gcs_server: GcsServer, proxy_settings: ServerSettings, raw_client: Connect
) -> None:
    backend = Backend(anonymous_client(gcs_server.url), TargetKind.ENDPOINT, gcs_server.url)
    async with serve_in_background(proxy_settings, backend) as server:
        client = await raw_client(server)
        await client.send(OpenUpload("no-such-bucket", "x.bin"))
        refusal = await client.reply(Error)

    assert refusal.code is ErrorCode.GCS_ERROR
    assert not refusal.retryable
    assert "no-such-bucket" in refusal.message
    assert not await trio.to_thread.run_sync(backend.bucket("no-such-bucket").exists)


async def test_credentials_that_cannot_read_objects_still_upload(
    gcs_server: GcsServer, proxy_settings: ServerSettings, raw_client: Connect, gcs_bucket: str
) -> None:
    # A create-only role answers the generation lookup with 403: the open goes on unpinned.
    http = requests.Session()
    http.headers["x-retry-test-id"] = gcs_server.create_retry_test(
        {"storage.objects.get": ["return-403"]}
    )
    backend = Backend(anonymous_client(gcs_server.url, http=http), TargetKind.ENDPOINT, "x")
    data = b"written by a role that cannot read"
    async with serve_in_background(proxy_settings, backend) as server:
        client = await raw_client(server)
        await client.open(gcs_bucket, "write-only.bin")
        await client.write(0, data)
        await client.send(Complete(len(data)))
        assert (await client.reply(Completed)).size == len(data)


async def test_a_failed_bucket_check_is_answered_at_once_and_the_next_open_goes_through(
    gcs_server: GcsServer,
    gcs_retry_test: RetryTestFactory,
    proxy_settings: ServerSettings,
    raw_client: Connect,
) -> None:
    # --create-buckets looks the bucket up first; GCS fails that lookup twice.
    faults = gcs_retry_test({"storage.buckets.get": ["return-503", "return-503"]})
    backend = Backend(faults.client, TargetKind.ENDPOINT, gcs_server.url, create_buckets=True)
    async with serve_in_background(proxy_settings, backend) as server:
        clients = [await raw_client(server) for _ in range(2)]
        refusals: list[Error] = []

        async def open_one(client: RawClient, name: str) -> None:
            await client.send(OpenUpload("made-on-demand", name))
            refusals.append(await client.reply(Error))

        # Each open is answered, neither held behind the other's lookup nor retried by the
        # library behind the client's back (whose pauses add up to seconds): the client
        # retries, as for any GCS error.
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for index, client in enumerate(clients):
                    nursery.start_soon(open_one, client, f"x{index}.bin")
        assert [(r.code, r.retryable) for r in refusals] == [(ErrorCode.GCS_ERROR, True)] * 2
        assert all("made-on-demand" in refusal.message for refusal in refusals)

        again = await raw_client(server)
        await again.open("made-on-demand", "x.bin")
    assert faults.completed()
    assert await trio.to_thread.run_sync(backend.bucket("made-on-demand").exists)
