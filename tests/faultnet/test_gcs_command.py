"""``rup gcs-server`` from the command line."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from faultnet.gcs import GcsServer
from faultnet.gcs.clients import start_resumable_upload


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_gcs_server_serves_until_signalled(tmp_path: Path, stop_signal: signal.Signals) -> None:
    command = [
        sys.executable,
        "-m",
        "proxy.cli",
        "gcs-server",
        "--port",
        "0",
        "--data-dir",
        str(tmp_path),
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:")
            created = requests.post(f"{url}/storage/v1/b", json={"name": "cli"}, timeout=30)
            assert created.status_code == 200
        finally:
            process.send_signal(stop_signal)
            exit_code = process.wait(timeout=60)
    assert exit_code == 0
    with GcsServer(data_dir=tmp_path) as server:  # what it stored is there after a restart
        assert [bucket.name for bucket in server.store.list_buckets()] == ["cli"]


@pytest.mark.parametrize("no_md5", [False, True])
def test_no_md5_takes_effect(no_md5: bool) -> None:
    command = [sys.executable, "-m", "proxy.cli", "gcs-server", *(["--no-md5"] if no_md5 else [])]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().strip()
            requests.post(f"{url}/storage/v1/b", json={"name": "cli"}, timeout=30)
            media = requests.post(
                f"{url}/upload/storage/v1/b/cli/o",
                params={"uploadType": "media", "name": "obj"},
                data=b"payload",
                timeout=30,
            ).json()
            session = start_resumable_upload(url, "cli", "resumed")
            resumed = requests.put(session, data=b"payload", timeout=30).json()
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
    for resource in (media, resumed):
        assert resource["crc32c"] == "9ONpcA=="
        assert ("md5Hash" in resource) is not no_md5
