"""rup's pytest fixtures in another project's test suite (``pip install`` rup: no conftest).

    pytest examples/test_with_rup_fixtures.py

A fault plan breaks every HTTP connection after 300 KiB of request bytes: a plain upload,
whose every retry starts again from byte 0, gives up; ReliableWriter resumes and finishes.
"""

import pytest
from google.api_core.exceptions import RetryError
from google.cloud.storage.retry import DEFAULT_RETRY

from reliablewriter import WriterSettings, open_blocking_writer

DATA = bytes(range(256)) * 4096  # 1 MiB
CUT = "reset_peer:up(after=300k)"
CHUNKS = WriterSettings(min_chunk_size=256 * 1024, max_chunk_size=256 * 1024)


def test_a_plain_upload_gives_up(gcs_bucket, faulty_gcs_client):
    blob = faulty_gcs_client(CUT).bucket(gcs_bucket).blob("plain")
    with pytest.raises(RetryError):
        blob.upload_from_string(DATA, retry=DEFAULT_RETRY.with_timeout(1.0))


def test_reliablewriter_gets_through(gcs_bucket, faulty_gcs_client, gcs_client):
    bucket = faulty_gcs_client(CUT).bucket(gcs_bucket)
    with open_blocking_writer(bucket, "reliable", CHUNKS) as writer:
        writer.write(DATA)
    assert gcs_client.bucket(gcs_bucket).blob("reliable").download_as_bytes() == DATA
