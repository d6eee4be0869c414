"""``rup upload`` against a proxy that makes uploads composite: segments by default, one
session with ``--single-session``. The command runs its own trio loop, so the proxy runs in a
thread of its own."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from faultnet.gcs import GcsServer
from proxy.cli.main import main
from proxy.server.settings import CompositeMode, CompositePolicy, ServerSettings
from tests.proxy.cli.proxy_thread import proxy_in_thread, stored

KiB = 1024
SEGMENT = 256 * KiB


@pytest.fixture
def composite_proxy_address(
    gcs_server: GcsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # never the user's records
    policy = CompositePolicy(mode=CompositeMode.ALWAYS, segment_size=SEGMENT)
    with proxy_in_thread(gcs_server, ServerSettings(composite=policy, shutdown_grace=0.5)) as proxy:
        yield proxy.address


@pytest.mark.parametrize(
    ("flags", "segments", "has_md5"), [([], 5, False), (["--single-session"], 0, True)]
)
def test_upload_is_composite_unless_one_session_is_asked_for(
    composite_proxy_address: str,
    gcs_server: GcsServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    segments: int,
    has_md5: bool,
) -> None:
    data = os.urandom(4 * SEGMENT + 99)
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    argv = ["upload", str(path), "gs://cmd/obj", "--proxy", composite_proxy_address, "--json"]
    assert main([*argv, *flags]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["segments"] == segments
    assert (summary["md5"] is not None) is has_md5
    assert summary["size"] == len(data)
    assert stored(gcs_server, "cmd", "obj") == data
