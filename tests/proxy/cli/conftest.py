"""Fixtures for the ``rup upload`` tests: their own state directory, and a proxy in a thread."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from faultnet.gcs import GcsServer
from proxy.server.settings import ServerSettings
from tests.proxy.cli.proxy_thread import AUTH_TOKEN, proxy_in_thread


@pytest.fixture(autouse=True)
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Resume records go to the test's own state dir, never the user's."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state" / "rup"


@pytest.fixture
def proxy_address(gcs_server: GcsServer) -> Iterator[str]:
    """A proxy that wants bearer token AUTH_TOKEN, served from a background thread."""
    settings = ServerSettings(auth_tokens=(AUTH_TOKEN,), shutdown_grace=0.5)
    with proxy_in_thread(gcs_server, settings) as proxy:
        yield proxy.address
