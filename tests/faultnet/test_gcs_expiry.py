"""Sessions expire after a TTL (with their files), and a cancelled session is gone."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from faultnet.gcs import UPLOAD_QUANTUM, GcsServer
from faultnet.gcs.clients import start_resumable_upload

Q = UPLOAD_QUANTUM


def _put(uri: str, content_range: str, body: bytes = b"") -> requests.Response:
    return requests.put(uri, data=body, headers={"Content-Range": content_range}, timeout=30)


def _session_bytes_on_disk(data_dir: Path) -> int:
    total = 0
    for path in (data_dir / "sessions").iterdir():
        with contextlib.suppress(FileNotFoundError):  # expired while we looked
            total += path.stat().st_size
    return total


def _wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(params=["memory", "disk"])
def data_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path | None:
    return tmp_path / "data" if request.param == "disk" else None


@pytest.fixture
def short_lived(data_dir: Path | None) -> Iterator[GcsServer]:
    with GcsServer(data_dir=data_dir, session_ttl=0.4) as server:
        server.store.create_bucket("bkt")
        yield server


def test_sessions_expire_in_progress_or_finished(
    short_lived: GcsServer, data_dir: Path | None
) -> None:
    pending = start_resumable_upload(short_lived.url, "bkt", "pending")
    assert _put(pending, f"bytes 0-{Q - 1}/*", b"p" * Q).status_code == 308
    finished = start_resumable_upload(short_lived.url, "bkt", "finished")
    assert _put(finished, "bytes 0-3/4", b"done").status_code == 200
    assert _put(finished, "bytes */*").status_code == 200  # answered with the object

    assert _wait_until(lambda: short_lived.store.sessions() == [], seconds=5)
    assert _put(pending, "bytes */*").status_code == 404
    assert _put(pending, f"bytes {Q}-{2 * Q - 1}/*", b"q" * Q).status_code == 404
    assert _put(finished, "bytes */*").status_code == 404
    # The object a session made is the bucket's, and stays.
    assert short_lived.store.get_object("bkt", "finished")[0] == b"done"
    if data_dir is not None:
        assert list((data_dir / "sessions").iterdir()) == []


def test_abandoned_uploads_keep_disk_use_bounded(tmp_path: Path) -> None:
    """120 uploads of 256 KiB (30 MiB) abandoned over ~2.4 s; a 0.4 s TTL keeps few."""
    ttl, rounds, per_round, pause = 0.4, 24, 5, 0.1
    # Live at most: what arrives in a TTL plus a sweep interval plus one round, padded.
    bound = int((ttl + ttl / 4 + pause) / pause + 2) * per_round * Q
    peak = 0
    with GcsServer(data_dir=tmp_path, session_ttl=ttl) as server:
        server.store.create_bucket("bkt")
        with requests.Session() as http:
            for round_number in range(rounds):
                for index in range(per_round):
                    uri = start_resumable_upload(
                        server.url, "bkt", f"abandoned-{round_number}-{index}", http=http
                    )
                    chunk = {"Content-Range": f"bytes 0-{Q - 1}/*"}
                    response = http.put(uri, data=b"x" * Q, headers=chunk, timeout=30)
                    assert response.status_code == 308
                peak = max(peak, _session_bytes_on_disk(tmp_path))
                time.sleep(pause)
        assert peak <= bound < rounds * per_round * Q // 2, (peak, bound)
        assert _wait_until(lambda: _session_bytes_on_disk(tmp_path) == 0, seconds=5)
        assert server.store.sessions() == []


def test_at_start_expired_sessions_and_orphan_files_are_removed(tmp_path: Path) -> None:
    with GcsServer(data_dir=tmp_path) as server:
        server.store.create_bucket("bkt")
        uri = start_resumable_upload(server.url, "bkt", "old")
        assert _put(uri, f"bytes 0-{Q - 1}/*", b"o" * Q).status_code == 308
    orphan = tmp_path / "sessions" / ("0" * 32 + ".part")
    orphan.write_bytes(b"a part file no session owns")
    time.sleep(0.3)

    restarted = GcsServer(data_dir=tmp_path, session_ttl=0.2)  # loaded, not yet serving
    try:
        assert restarted.store.sessions() == []
        assert list((tmp_path / "sessions").iterdir()) == []
    finally:
        restarted.stop()


def test_a_live_session_survives_a_restart_within_its_ttl(tmp_path: Path) -> None:
    with GcsServer(data_dir=tmp_path, session_ttl=60) as server:
        server.store.create_bucket("bkt")
        uri = start_resumable_upload(server.url, "bkt", "obj")
        assert _put(uri, f"bytes 0-{Q - 1}/*", b"o" * Q).status_code == 308
    with GcsServer(data_dir=tmp_path, session_ttl=60) as server:
        assert [s.persisted_size for s in server.store.sessions()] == [Q]


def test_delete_on_a_session_uri_cancels_it(short_lived: GcsServer, data_dir: Path | None) -> None:
    uri = start_resumable_upload(short_lived.url, "bkt", "obj")
    assert _put(uri, f"bytes 0-{Q - 1}/*", b"c" * Q).status_code == 308
    assert requests.delete(uri, timeout=30).status_code == 499
    assert short_lived.store.sessions() == []
    assert _put(uri, f"bytes {Q}-{2 * Q - 1}/*", b"c" * Q).status_code == 404
    assert requests.delete(uri, timeout=30).status_code == 404
    assert short_lived.store.list_objects("bkt") == []
    if data_dir is not None:
        assert list((data_dir / "sessions").iterdir()) == []


def test_gcs_server_refuses_a_ttl_that_is_not_positive() -> None:
    command = [sys.executable, "-m", "proxy.cli", "gcs-server", "--session-ttl", "0"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert finished.returncode == 2
    assert "--session-ttl" in finished.stderr
