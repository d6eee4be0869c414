"""Choosing the GCS target: real GCS, a given endpoint, or the embedded one (memory or disk)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.server.backend import GcsTarget, TargetKind, open_backend


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
    target = GcsTarget(data_dir=tmp_path / "gcs")
    with open_backend(target) as backend:
        assert backend.kind is TargetKind.EMBEDDED
        backend.bucket("fresh-bucket").blob("kept.txt").upload_from_string(b"still here")

    with open_backend(target) as backend:
        blob = backend.bucket("fresh-bucket").blob("kept.txt")
        assert blob.download_as_bytes() == b"still here"
