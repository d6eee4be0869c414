"""On-disk finalize survives a SIGKILL after every step: real processes, real signals.

``rup gcs-server --data-dir`` runs as a subprocess with ``RUP_GCS_CRASH_AT=<step>``, which
makes it SIGKILL itself right after that step of finalizing an upload. A second process on
the same directory must then show either the old object and a live session holding every
byte, or the new object and a finished session; and a resent final chunk (with its
CRC32C) must succeed either way.
"""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import google_crc32c
import pytest
import requests

from faultnet.gcs import UPLOAD_QUANTUM
from faultnet.gcs.clients import start_resumable_upload
from faultnet.gcs.disk import CRASH_AT_ENV, CRASH_STEPS

Q = UPLOAD_QUANTUM
OLD = b"the generation being replaced"


def _pattern(size: int) -> bytes:
    return bytes((i * 31 + 7) % 256 for i in range(size))


@contextmanager
def _gcs_server(
    data_dir: Path, *, crash_at: str | None = None
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    env = {key: value for key, value in os.environ.items() if key != CRASH_AT_ENV}
    if crash_at is not None:
        env[CRASH_AT_ENV] = crash_at
    command = [sys.executable, "-m", "proxy.cli", "gcs-server", "--data-dir", str(data_dir)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:")
            yield process, url
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)


def _put(uri: str, content_range: str, body: bytes = b"", **headers: str) -> requests.Response:
    headers["Content-Range"] = content_range
    return requests.put(uri, data=body, headers=headers, timeout=30)


def _on(url: str, session_uri: str) -> str:
    """The same session URI on the server at ``url`` (a restarted server has a new port)."""
    return url + "/" + session_uri.split("/", 3)[3]


def _crc32c(data: bytes) -> str:
    return base64.b64encode(google_crc32c.value(data).to_bytes(4, "big")).decode()


@pytest.mark.parametrize("step", CRASH_STEPS)
def test_a_kill_at_any_step_of_finalize_leaves_a_consistent_store(
    tmp_path: Path, step: str
) -> None:
    payload = _pattern(Q + 5)
    final_range = f"bytes {Q}-{Q + 4}/{Q + 5}"
    with _gcs_server(tmp_path, crash_at=step) as (process, url):
        assert requests.post(f"{url}/storage/v1/b", json={"name": "bkt"}, timeout=30).ok
        old = requests.post(
            f"{url}/upload/storage/v1/b/bkt/o",
            params={"uploadType": "media", "name": "obj"},
            data=OLD,
            timeout=30,
        ).json()
        uri = start_resumable_upload(url, "bkt", "obj")
        assert _put(uri, f"bytes 0-{Q - 1}/*", payload[:Q]).status_code == 308
        with pytest.raises(requests.ConnectionError):
            _put(uri, final_range, payload[Q:])
        assert process.wait(timeout=30) == -signal.SIGKILL

    published = CRASH_STEPS.index(step) >= CRASH_STEPS.index("object-published")
    with _gcs_server(tmp_path) as (_, url):
        media = f"{url}/download/storage/v1/b/bkt/o/obj"
        seen = requests.get(media, params={"alt": "media"}, timeout=30)
        status = _put(_on(url, uri), "bytes */*")
        if published:
            assert seen.content == payload
            assert status.status_code == 200
            assert status.json()["size"] == str(len(payload))
        else:
            assert seen.content == OLD
            assert seen.headers["X-Goog-Generation"] == old["generation"]
            # Every byte, the tail included, was on disk: nothing more, nothing less.
            assert (status.status_code, status.headers["Range"]) == (308, f"bytes=0-{Q + 4}")

        retry = _put(
            _on(url, uri), final_range, payload[Q:], **{"X-Goog-Hash": f"crc32c={_crc32c(payload)}"}
        )
        assert retry.status_code == 200, retry.text
        assert retry.json()["crc32c"] == _crc32c(payload)
        expected_md5 = base64.b64encode(hashlib.md5(payload).digest()).decode()
        assert retry.json()["md5Hash"] == expected_md5
        assert requests.get(media, params={"alt": "media"}, timeout=30).content == payload

    # One object, whose data file holds its bytes and nothing else; no session bytes left.
    data_files = [p for p in (tmp_path / "buckets").glob("*/*") if p.suffix != ".json"]
    assert [p.stat().st_size for p in data_files] == [len(payload)]
    assert list((tmp_path / "sessions").glob("*.part")) == []
    assert list((tmp_path / "tmp").iterdir()) == []


def test_an_unknown_crash_step_is_refused(tmp_path: Path) -> None:
    env = {**os.environ, CRASH_AT_ENV: "no-such-step"}
    command = [sys.executable, "-m", "proxy.cli", "gcs-server", "--data-dir", str(tmp_path)]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert finished.returncode != 0
    assert CRASH_AT_ENV in finished.stderr
