"""Fixtures shared by every test directory: a running strict GCS endpoint and clients for it.

The endpoint is the one the faultnet pytest plugin (``faultnet.pytest_plugin``) gives every
suite that installs rup; rup's tests use it under the name they have always used.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import pytest

from faultnet.gcs import GcsServer

if TYPE_CHECKING:
    from google.cloud import storage  # type: ignore[import-untyped]


@pytest.fixture
def gcs_server(gcs_endpoint: GcsServer) -> GcsServer:
    """A fresh in-memory endpoint per test (it starts in about a millisecond)."""
    return gcs_endpoint


@pytest.fixture
def gcs_bucket(gcs_server: GcsServer) -> str:
    """The name of a new, empty bucket on :func:`gcs_server`."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    gcs_server.store.create_bucket(name)
    return name


@pytest.fixture
def storage_client(gcs_server: GcsServer) -> storage.Client:
    """An anonymous google-cloud-storage client pointed at :func:`gcs_server`."""
    from faultnet.gcs.clients import anonymous_client  # heavy import; only where needed

    return anonymous_client(gcs_server.url)
