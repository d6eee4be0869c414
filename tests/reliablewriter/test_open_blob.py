"""``open_blob``: google-cloud-storage's BlobWriter behaviours, on ReliableWriter.

The tests named after BlobWriter's mirror ``tests/unit/test_fileio.py``
(``TestBlobWriterBinary``) and ``tests/system/test_fileio.py`` of googleapis/python-storage;
each says which. They run against the strict endpoint, not a mock.
"""

from __future__ import annotations

import gc
import io
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from google.cloud import storage  # type: ignore[import-untyped]

from faultnet.gcs.errors import GcsApiError
from reliablewriter import (
    BlobFile,
    NonRetryableHTTPError,
    ResumeHandle,
    RetriesExhaustedError,
    RetryPolicy,
    WriterSettings,
    open_blob,
    open_blocking_writer,
)
from reliablewriter.buffer import stable_view

from .conftest import KiB, MiB, Target, payload

Faulty = Callable[[str], Target]

CHUNK = 256 * KiB
FAST_RETRY = RetryPolicy(max_attempts=8, deadline=20.0, initial_delay=0.01, max_delay=0.05)


def _blob(target: Target, name: str = "obj") -> storage.Blob:
    return target.bucket.blob(name)


def test_attributes(target: Target) -> None:
    # Mirrors TestBlobWriterBinary.test_attributes and test_seek_fails: writable only,
    # and seek() raises io.UnsupportedOperation.
    with open_blob(_blob(target), "wb", chunk_size=CHUNK) as f:
        assert isinstance(f, io.BufferedIOBase)
        assert f.writable()
        assert not f.readable()
        assert not f.seekable()
        with pytest.raises(io.UnsupportedOperation):
            f.seek(0)
        f.write(b"x")


def test_write_then_close(target: Target) -> None:
    # Mirrors TestBlobWriterBinary.test_write: a write under chunk_size sends nothing,
    # a write over it sends whole chunks, tell() counts every byte, close() finalizes.
    data = payload(3 * CHUNK + 100)
    f = open_blob(_blob(target), "wb", chunk_size=CHUNK, content_type="text/plain")
    f.write(data[:4])
    assert f.stats.chunks == 0
    f.write(data[4 : 3 * CHUNK])
    f.write(data[3 * CHUNK :])
    assert f.tell() == len(data)
    f.close()
    assert f.closed
    assert f.result is not None
    assert f.result.size == len(data)
    assert f.stats.chunks == 4  # three whole chunks, then the last 100 bytes
    assert target.read("obj") == data
    assert target.bucket.get_blob("obj").content_type == "text/plain"


def test_the_last_chunk_is_what_remains(target: Target) -> None:
    # Mirrors TestBlobWriterBinary.test_write's final write: one byte past the chunks
    # goes as a last chunk of one byte, and no byte is sent twice.
    data = payload(2 * CHUNK + 1)
    with open_blob(_blob(target), "wb", chunk_size=CHUNK) as f:
        f.write(data)
    assert f.stats.chunks == 3
    assert f.stats.bytes_sent == len(data)
    assert target.read("obj") == data


def test_an_empty_object(target: Target) -> None:
    # Mirrors the system test's zero-byte upload: closing without writing stores an
    # empty object.
    with open_blob(_blob(target), "wb", chunk_size=CHUNK) as f:
        assert f.tell() == 0
    assert f.result is not None
    assert f.result.size == 0
    assert target.read("obj") == b""


def test_a_write_after_close_raises(target: Target) -> None:
    # Mirrors TestBlobReaderBinary/TestBlobWriterBinary close semantics (io's): any I/O on
    # a closed file raises ValueError; close() is idempotent.
    f = open_blob(_blob(target), "wb", chunk_size=CHUNK)
    f.write(b"abc")
    f.close()
    f.close()
    with pytest.raises(ValueError, match="closed file"):
        f.write(b"more")
    with pytest.raises(ValueError, match="closed file"):
        f.tell()
    assert target.read("obj") == b"abc"


def test_if_generation_match(target: Target) -> None:
    # Mirrors the upload_kwargs of TestBlobWriterBinary.test_write and the system test
    # test_blobwriter_and_blobreader's preconditions: if_generation_match reaches GCS,
    # which refuses a write against the wrong generation and takes the right one.
    with open_blob(_blob(target), "wb", chunk_size=CHUNK, if_generation_match=0) as f:
        f.write(b"first")
    assert f.result is not None
    generation = f.result.generation
    with pytest.raises(NonRetryableHTTPError) as refused:
        open_blob(_blob(target), "wb", chunk_size=CHUNK, if_generation_match=0)
    assert refused.value.status == 412
    with open_blob(_blob(target), "wb", chunk_size=CHUNK, if_generation_match=generation) as f:
        f.write(b"second")
    assert target.read("obj") == b"second"


def test_rejects_invalid_arguments(target: Target) -> None:
    # Mirrors TestBlobWriterBinary.test_rejects_invalid_kwargs.
    with pytest.raises(ValueError, match="mode"):
        open_blob(_blob(target), "w")
    with pytest.raises(ValueError, match="chunk_size"):
        open_blob(_blob(target), "wb", chunk_size=1000)
    with pytest.raises(ValueError, match="checksum"):
        open_blob(_blob(target), "wb", checksum="sha1")
    assert target.object_names() == []


def test_one_reused_bytearray_for_every_write(target: Target) -> None:
    """io's promise: the caller may reuse its buffer as soon as write() returns."""
    source = payload(24 * 64 * KiB)
    piece = bytearray(64 * KiB)
    with open_blob(_blob(target), "wb", chunk_size=CHUNK) as f:
        for start in range(0, len(source), len(piece)):
            piece[:] = source[start : start + len(piece)]
            f.write(piece)
            f.write(memoryview(piece)[:0])  # an empty view of it, for good measure
    piece[:] = bytes(len(piece))  # changed after close: must not matter either
    assert target.read("obj") == source


def test_writelines_and_flush(target: Target) -> None:
    lines = [b"one\n", bytearray(b"two\n"), memoryview(b"three\n")]
    with open_blob(_blob(target), "wb", chunk_size=CHUNK) as f:
        f.writelines(lines)
        f.flush()  # accepted and does nothing (BlobWriter raises without ignore_flush)
    assert target.read("obj") == b"one\ntwo\nthree\n"


def test_an_exception_inside_with_aborts(target: Target) -> None:
    # BlobWriter deletes the session when its block raises; so does on_error="abort".
    session_uris: list[str] = []

    def write_then_fail() -> None:
        with open_blob(_blob(target), "wb", chunk_size=CHUNK) as f:
            f.write(payload(3 * CHUNK))
            session_uris.append(f.resume_handle.session_uri)
            raise RuntimeError("the producer failed")

    with pytest.raises(RuntimeError, match="the producer failed"):
        write_then_fail()
    assert target.object_names() == []
    with pytest.raises(GcsApiError) as gone:
        target.strict.store.session(session_uris[0].rsplit("upload_id=", 1)[1])
    assert gone.value.status == 404


def test_a_reset_through_faultnet_is_survived(faulty_target: Faulty) -> None:
    target = faulty_target("reset_peer:up(after=300k)")
    data = payload(4 * CHUNK + 5)
    with open_blob(_blob(target), "wb", chunk_size=CHUNK, retry=FAST_RETRY) as f:
        f.write(data)
    assert target.counters.faults_applied("reset_peer") >= 1
    assert f.stats.retries_by_cause["connection"] >= 1
    assert target.read("obj") == data


def test_retry_none_means_no_retries(target: Target) -> None:
    # BlobWriter's retry=None: the first failure is final.
    target.script("return-503")
    with pytest.raises(RetriesExhaustedError, match="last cause: http-503") as failed:
        open_blob(_blob(target), "wb", chunk_size=CHUNK, retry=None)
    assert failed.value.attempts == 1


_RESUME_IN_ANOTHER_PROCESS = """
import sys
from faultnet.gcs.clients import anonymous_client
from reliablewriter import ResumeHandle, open_blob

url, data_path = sys.argv[1], sys.argv[2]
handle = ResumeHandle.from_json(sys.stdin.read())
data = open(data_path, "rb").read()
blob = anonymous_client(url).bucket(handle.bucket).blob(handle.name)
with open_blob(blob, "wb", chunk_size=256 * 1024, resume=handle) as f:
    start = f.tell()
    f.write(data[start:])
print(start)
"""


def test_keep_on_error_then_resume_in_another_process(target: Target, tmp_path: Path) -> None:
    """on_error="keep" leaves the session; another process continues from the handle."""
    data = payload(5 * CHUNK + 3)
    (tmp_path / "data").write_bytes(data)

    def write_then_fail() -> None:
        with open_blob(_blob(target), "wb", chunk_size=CHUNK, on_error="keep") as f:
            handles.append(f)
            f.write(data[: 3 * CHUNK + 10])
            raise RuntimeError("the producer failed")

    handles: list[BlobFile] = []
    with pytest.raises(RuntimeError):
        write_then_fail()
    handle = handles[0].resume_handle
    assert handle.committed_offset % CHUNK == 0
    assert 0 < handle.committed_offset <= 3 * CHUNK
    assert target.object_names() == []
    resumed = subprocess.run(
        [sys.executable, "-c", _RESUME_IN_ANOTHER_PROCESS, target.url, str(tmp_path / "data")],
        input=handle.to_json(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert int(resumed.stdout) == handle.committed_offset
    assert handle.session_uri not in resumed.stderr
    assert target.read("obj") == data


def test_the_blocking_writer_takes_a_reused_bytearray(
    target: Target, settings: WriterSettings
) -> None:
    """Issue 16's finding: 24 writes of one reused 1 MiB bytearray through
    open_blocking_writer ended in a CRC32C refusal; now each write is copied once."""
    source = payload(24 * MiB)
    piece = bytearray(MiB)
    with open_blocking_writer(target.bucket, "obj", settings) as writer:
        for start in range(0, len(source), MiB):
            piece[:] = source[start : start + MiB]
            writer.write(piece)
    assert target.read("obj") == source


def test_bytes_are_held_and_mutable_buffers_copied() -> None:
    data = b"immutable"
    assert stable_view(data).obj is data
    assert stable_view(memoryview(data)[2:]).obj is data
    mutable = bytearray(b"mutable")
    view = stable_view(mutable)
    mutable[:] = b"changed"
    assert bytes(view) == b"mutable"
    assert bytes(stable_view(memoryview(mutable).toreadonly())) == b"changed"
    assert stable_view(memoryview(mutable).toreadonly()).obj is not mutable


def test_a_resume_handle_is_checked_when_read() -> None:
    handle = ResumeHandle("bkt", "obj", 5, "http://secret/upload?upload_id=x")
    assert ResumeHandle.from_json(handle.to_json()) == handle
    assert "secret" not in repr(handle)
    for broken in (
        "{}",
        "[]",
        "not json",
        '{"bucket": "b", "name": "o", "committed_offset": -1, "session_uri": "u"}',
    ):
        with pytest.raises(ValueError, match="resume handle"):
            ResumeHandle.from_json(broken)


def test_a_file_dropped_unclosed_is_kept_not_finalized(target: Target) -> None:
    # io's finalizer would close() and so store a partial object; BlobFile keeps it.
    f = open_blob(_blob(target), "wb", chunk_size=CHUNK)
    f.write(payload(CHUNK + 10))
    session_id = f.resume_handle.session_uri.rsplit("upload_id=", 1)[1]
    del f
    gc.collect()
    assert target.object_names() == []
    target.strict.store.session(session_id)  # still there: raises GcsApiError if not
