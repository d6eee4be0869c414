"""``open_blob``: a drop-in for google-cloud-storage's ``blob.open("wb")``.

Switching is one line::

    with blob.open("wb", chunk_size=8 * MiB) as f:                  # BlobWriter
    with reliablewriter.open_blob(blob, "wb", chunk_size=8 * MiB) as f:  # this

The file is an :class:`io.BufferedIOBase` on a
:class:`~reliablewriter.BlockingWriter` (a trio writer in a thread of its own), so it
survives what the writer survives: resets, stalls, transient statuses, lost responses,
with CRC32C checked end to end.

Buffers: ``bytes`` are held without copying until GCS acknowledges them; anything
mutable (a reused ``bytearray``, a ``memoryview`` of one) is copied once in ``write``,
so the caller may reuse it as soon as ``write`` returns, as :mod:`io` promises.
BlobWriter copies every byte at least three times (into its buffer, out of it, into the
request).

Leaving the ``with`` block by an exception: ``on_error="abort"`` (the default, what
BlobWriter does) cancels the session and nothing is stored; ``on_error="keep"`` leaves
the session resumable, and :attr:`BlobFile.resume_handle` tells another process how to
continue (``open_blob(blob, "wb", resume=handle)``, then write from
:meth:`~BlobFile.tell`). :meth:`BlobFile.keep` does the same without an exception. A
file dropped unclosed is kept, not finalized.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Literal

from google.api_core import retry as api_retry
from google.cloud import storage  # type: ignore[import-untyped]
from google.cloud.storage.retry import (  # type: ignore[import-untyped]
    DEFAULT_RETRY,
    ConditionalRetryPolicy,
)

from .blocking import BlockingWriter
from .buffer import stable_view
from .errors import WriterClosedError
from .handle import ResumeHandle
from .results import ObjectInfo, WriterStats
from .settings import CHUNK_QUANTUM, ChecksumMode, MiB, RetryPolicy, WriterSettings

__all__ = ["BlobFile", "open_blob"]

#: Writes shorter than this are gathered and handed to the writer's thread together.
BATCH = 1024 * 1024
#: BlobWriter's default chunk size (google.cloud.storage.fileio.DEFAULT_CHUNK_SIZE).
DEFAULT_CHUNK_SIZE = 40 * MiB

_CHECKSUMS: dict[str | None, ChecksumMode] = {
    "crc32c": ChecksumMode.CRC32C,
    "auto": ChecksumMode.CRC32C,
    "md5": ChecksumMode.MD5,
    None: ChecksumMode.NONE,
}

OnError = Literal["abort", "keep"]


class BlobFile(io.BufferedIOBase):
    """A write-only binary file whose :meth:`close` finalizes the object.

    ``flush`` is accepted and does nothing: GCS takes only whole chunks before the last,
    so nothing can be pushed early (BlobWriter raises unless ``ignore_flush=True``).
    """

    def __init__(self, writer: BlockingWriter, bucket_name: str, on_error: OnError) -> None:
        super().__init__()
        self._writer = writer
        self._bucket_name = bucket_name
        self._on_error = on_error
        self._handle: ResumeHandle | None = None
        # Small writes wait here (held or copied as write() promises) and go over to the
        # writer's thread together: one hop per BATCH bytes instead of one per write.
        self._pending: list[memoryview] = []
        self._pending_bytes = 0

    # --- io.BufferedIOBase ------------------------------------------------------------

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        """Bytes written so far (on a resumed upload: from the committed offset)."""
        self._check_open()
        return self._writer.position + self._pending_bytes

    def write(self, data: Any) -> int:
        """Append ``data`` (bytes-like); ``bytes`` are held, mutable buffers copied once.

        Writes shorter than :data:`BATCH` are gathered and handed over together once they
        add up to it (or on flush/close); nothing is joined or copied for that.
        """
        self._check_open()
        view = stable_view(data)
        if len(view) >= BATCH and not self._pending:
            return self._writer.write(view)
        self._pending.append(view)
        self._pending_bytes += len(view)
        if self._pending_bytes >= BATCH:
            self._hand_over()
        return len(view)

    def _hand_over(self) -> None:
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        if pending:
            self._writer.write_many(pending)

    def writelines(self, lines: Iterable[Any]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        """Hand gathered small writes to the writer (GCS still takes whole chunks only)."""
        self._check_open()
        self._hand_over()

    def close(self) -> None:
        """Finalize the object (idempotent). If that fails, the session stays resumable."""
        if self.closed:
            return
        try:
            self._hand_over()
            self._writer.close()
        finally:
            super().close()

    def abort(self) -> None:
        """Cancel the session: nothing is stored. The file is closed."""
        if self.closed:
            return
        self._pending, self._pending_bytes = [], 0
        try:
            self._writer.abort()
        finally:
            super().close()

    def keep(self) -> ResumeHandle:
        """Stop without finalizing or cancelling; returns the :attr:`resume_handle`."""
        if not self.closed:
            try:
                self._hand_over()
            finally:
                self._writer.detach()
                super().close()
            # The worker has stopped, so the committed offset is final.
            self._handle = ResumeHandle.of(self._bucket_name, self._writer.writer)
        return self.resume_handle

    def __del__(self) -> None:
        # io's finalizer would close(), finalizing a partial object: keep it resumable.
        # A finalizer must not raise (at interpreter exit the writer's run may be gone).
        if not self.closed:
            with contextlib.suppress(Exception):
                self.keep()

    # --- what the upload became -------------------------------------------------------

    @property
    def result(self) -> ObjectInfo | None:
        """The finished object's metadata once closed (else None)."""
        return self._writer.result

    @property
    def stats(self) -> WriterStats:
        return self._writer.stats

    @property
    def resume_handle(self) -> ResumeHandle:
        """How another process continues this upload; available while it is unfinished."""
        if self._handle is not None:
            return self._handle
        if self.closed:
            raise WriterClosedError("the upload is finished or aborted")
        return ResumeHandle.of(self._bucket_name, self._writer.writer)

    def __enter__(self) -> BlobFile:
        self._check_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        elif self._on_error == "keep":
            self.keep()
        else:
            self.abort()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file.")


def open_blob(
    blob: storage.Blob,
    mode: str = "wb",
    *,
    chunk_size: int | None = None,
    content_type: str | None = None,
    if_generation_match: int | None = None,
    retry: RetryPolicy | api_retry.Retry | ConditionalRetryPolicy | None = DEFAULT_RETRY,
    checksum: str | None = "crc32c",
    on_error: OnError = "abort",
    resume: ResumeHandle | None = None,
    settings: WriterSettings | None = None,
) -> BlobFile:
    """Open ``blob`` for writing, as ``blob.open("wb", ...)`` does, on ReliableWriter.

    ``chunk_size`` (a multiple of 256 KiB; default ``blob.chunk_size`` or BlobWriter's
    40 MiB) is every chunk's size but the last; the writer holds at most two chunks.
    ``content_type`` defaults to the blob's. ``retry``: a :class:`RetryPolicy`,
    google-api-core's ``Retry`` or storage's ``ConditionalRetryPolicy`` (the timeout
    becomes the deadline without progress), or None for no retries. ``checksum``:
    "crc32c" (default, also "auto"), "md5", or None;
    GCS verifies it at finalization. ``settings`` replaces everything chunk- and
    retry-shaped at once. ``resume`` continues an upload from a :class:`ResumeHandle`:
    :meth:`BlobFile.tell` starts at GCS's committed offset, and the caller writes from
    there.
    """
    if mode != "wb":
        raise ValueError(f"open_blob writes binary objects: mode must be 'wb', not {mode!r}")
    if on_error not in ("abort", "keep"):
        raise ValueError(f"on_error must be 'abort' or 'keep', not {on_error!r}")
    if checksum not in _CHECKSUMS:
        raise ValueError(f"checksum must be 'crc32c', 'auto', 'md5' or None, not {checksum!r}")
    if settings is None:
        settings = _settings_like_blob_writer(
            chunk_size or blob.chunk_size or DEFAULT_CHUNK_SIZE, retry, _CHECKSUMS[checksum]
        )
    if resume is not None and (resume.bucket, resume.name) != (blob.bucket.name, blob.name):
        raise ValueError("the resume handle is for another object")
    writer = BlockingWriter(
        blob.bucket,
        blob.name,
        settings,
        content_type=content_type or blob.content_type or "application/octet-stream",
        if_generation_match=if_generation_match,
        session_uri=None if resume is None else resume.session_uri,
    )
    writer.position = writer.writer.committed_offset
    return BlobFile(writer, str(blob.bucket.name), on_error)


def _settings_like_blob_writer(
    chunk_size: int,
    retry: RetryPolicy | api_retry.Retry | ConditionalRetryPolicy | None,
    checksum: ChecksumMode,
) -> WriterSettings:
    if chunk_size <= 0 or chunk_size % CHUNK_QUANTUM:
        raise ValueError(f"chunk_size must be a positive multiple of {CHUNK_QUANTUM}")
    if retry is None:
        policy = RetryPolicy(max_attempts=1)
    elif isinstance(retry, RetryPolicy):
        policy = retry
    else:
        # A ConditionalRetryPolicy wraps a Retry: the writer's retries are always safe
        # (each request says where its bytes go), so the condition does not apply.
        inner = getattr(retry, "retry_policy", retry)
        timeout = getattr(inner, "timeout", None)
        policy = RetryPolicy() if timeout is None else RetryPolicy(deadline=float(timeout))
    return WriterSettings(
        min_chunk_size=chunk_size,
        max_chunk_size=chunk_size,
        # Two chunks: one on the wire while the caller fills the next.
        buffer_limit=2 * chunk_size,
        retry=policy,
        checksum=checksum,
    )
