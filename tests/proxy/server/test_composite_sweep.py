"""A composite upload whose process is killed leaves temporaries; ``rup sweep`` removes them.

The crash is real: a child process uploads segments into the strict endpoint and is killed
with SIGKILL before it completes, so nothing of its own clean-up runs. ``rup sweep`` runs as
a user would run it, as a child process, and is judged by what it prints and what the
bucket holds afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from faultnet.gcs import GcsServer
from faultnet.gcs.clients import anonymous_client

BUCKET = "bkt"

# Uploads two full segments and half of a third, says so, then waits to be killed.
_CRASHING_UPLOAD = textwrap.dedent(
    """
    import os, sys, trio
    from faultnet.gcs.clients import anonymous_client
    from reliablewriter import CompositeSettings, WriterSettings, open_composite_writer

    SEGMENT = 256 * 1024
    async def main() -> None:
        bucket = anonymous_client(sys.argv[1]).bucket("bkt")
        writer_settings = WriterSettings(
            min_chunk_size=SEGMENT, max_chunk_size=SEGMENT, buffer_limit=SEGMENT
        )
        settings = CompositeSettings(
            segment_size=SEGMENT, parallel_segments=3, writer=writer_settings
        )
        async with open_composite_writer(bucket, "big", settings, upload_id="crashed") as w:
            await w.write_at(0, os.urandom(2 * SEGMENT + SEGMENT // 2))
            with trio.fail_after(20):  # then exit with an error, and the test fails
                while len(list(bucket.list_blobs(prefix=".rup/tmp/"))) < 2:
                    await trio.sleep(0.01)  # until both full segments are objects
            print("segments written", flush=True)
            await trio.sleep_forever()

    trio.run(main)
    """
)


@pytest.fixture
def server() -> Iterator[GcsServer]:
    with GcsServer() as server:
        server.store.create_bucket(BUCKET)
        yield server


def _names(server: GcsServer) -> list[str]:
    return sorted(blob.name for blob in anonymous_client(server.url).list_blobs(BUCKET))


def _sweep(server: GcsServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RUP_GCS_ACCESS_TOKEN": ""}
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "sweep", f"gs://{BUCKET}", "--gcs-endpoint",
         server.url, *args],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip


def test_a_killed_upload_leaves_temporaries_that_rup_sweep_removes(server: GcsServer) -> None:
    anonymous_client(server.url).bucket(BUCKET).blob("keep/me").upload_from_string(b"mine")
    upload = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_UPLOAD, server.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert upload.stdout is not None
        assert upload.stdout.readline() == "segments written\n", upload.stderr
    finally:
        upload.send_signal(signal.SIGKILL)
        upload.wait(timeout=30)
        if upload.stdout is not None:
            upload.stdout.close()
        if upload.stderr is not None:
            upload.stderr.close()
    left = [name for name in _names(server) if name.startswith(".rup/tmp/")]
    assert left == [".rup/tmp/crashed/0", ".rup/tmp/crashed/1"]
    assert "big" not in _names(server)

    # Too recent for a sweep of day-old uploads: nothing is touched.
    recent = _sweep(server, "--older-than", "24h")
    assert recent.returncode == 0, recent.stderr
    assert recent.stdout.splitlines() == ["removed 0 objects of 0 interrupted uploads"]

    dry = _sweep(server, "--older-than", "0s", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[-1] == "would remove 2 objects of 1 interrupted uploads"
    assert [n for n in _names(server) if n.startswith(".rup/tmp/")] == left

    swept = _sweep(server, "--older-than", "0s")
    assert swept.returncode == 0, swept.stderr
    lines = swept.stdout.splitlines()
    assert [line.split(" (")[0] for line in lines[:-1]] == [
        f"removed gs://{BUCKET}/{name}" for name in left
    ]
    assert lines[-1] == "removed 2 objects of 1 interrupted uploads"
    assert _names(server) == ["keep/me"]  # nothing outside the temporary prefix


def test_rup_sweep_refuses_a_location_that_is_not_a_bucket(server: GcsServer) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "sweep", "bucket", "--older-than", "1h",
         "--gcs-endpoint", server.url],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "gs://BUCKET" in result.stderr
