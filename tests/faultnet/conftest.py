"""Fixtures for the strict GCS endpoint's tests: one endpoint per store implementation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from faultnet.gcs import GcsServer


@pytest.fixture(params=["memory", "disk"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GcsServer]:
    """An endpoint with a bucket ``bkt``, in memory and (a second run) on disk."""
    data_dir = tmp_path / "data" if request.param == "disk" else None
    with GcsServer(data_dir=data_dir) as running:
        running.store.create_bucket("bkt")
        yield running


@pytest.fixture(params=["memory", "disk"])
def gcs_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GcsServer]:
    """The shared fixture's endpoint, here run on each store: they must behave the same."""
    data_dir = tmp_path / "gcs-data" if request.param == "disk" else None
    with GcsServer(data_dir=data_dir) as running:
        yield running


@pytest.fixture
def gcs_endpoint(gcs_server: GcsServer) -> GcsServer:
    """This directory's endpoint, for the plugin's fixtures (``gcs_bucket``, ``gcs_client``)."""
    return gcs_server
