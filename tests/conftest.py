"""Fixtures shared by every test directory: a running strict GCS endpoint and clients for it.

They are the faultnet pytest plugin's (``faultnet.pytest_plugin``), which every suite that
installs rup gets: ``gcs_endpoint``, ``gcs_bucket``, ``gcs_client``. rup's tests also call
the endpoint and the client by the names they had before the plugin.
"""

from __future__ import annotations

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
def storage_client(gcs_client: storage.Client) -> storage.Client:
    """An anonymous google-cloud-storage client pointed at :func:`gcs_server`."""
    return gcs_client
