"""CRC32C and MD5 of an upload, computed beside the ingest rather than in its way.

Hashing 1 GiB takes MD5 well over a second, too slow for the connection thread (it
would cap one upload near 600 MB/s) and too slow to do all at once when the final chunk
arrives (the client would wait seconds for its 200). So each session's blocks go to a
worker thread of its own, which hashes them in order while more arrive; both hash
functions release the GIL on large buffers, so this runs on another core. Finalizing
then only waits for the last few blocks.
"""

from __future__ import annotations

import base64
import hashlib
import queue
import threading

import google_crc32c

__all__ = ["RunningDigest", "encode_crc32c", "encode_md5"]


def encode_crc32c(value: int) -> str:
    """GCS's form of a CRC32C: base64 of the big-endian 32-bit value."""
    return base64.b64encode(value.to_bytes(4, "big")).decode()


def encode_md5(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


class RunningDigest:
    """The CRC32C and MD5 of everything passed to :meth:`update`, in order.

    Blocks are hashed on a worker thread, started on the first update and ended by
    :meth:`close`. Not for concurrent use: one session (under its lock) feeds it.
    ``md5=False`` skips MD5, which costs several times more CPU than everything else
    ingest does (GCS itself omits MD5 for composite objects).
    """

    def __init__(self, *, md5: bool = True) -> None:
        self._crc32c = 0
        self._md5 = hashlib.md5() if md5 else None
        self._blocks: queue.SimpleQueue[bytes | memoryview | None] = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._pending = 0
        self._worker: threading.Thread | None = None

    def update(self, block: bytes | memoryview) -> None:
        """Queue ``block`` for hashing; it must not change afterwards."""
        if self._worker is None:
            self._worker = threading.Thread(
                target=self._hash_blocks, name="gcs-digest", daemon=True
            )
            self._worker.start()
        with self._idle:
            self._pending += 1
        self._blocks.put(block)

    def _hash_blocks(self) -> None:
        while (block := self._blocks.get()) is not None:
            # google-crc32c reads only ``bytes``; the copy is cheap next to the hashing.
            self._crc32c = google_crc32c.extend(self._crc32c, bytes(block))
            if self._md5 is not None:
                self._md5.update(block)
            with self._idle:
                self._pending -= 1
                if not self._pending:
                    self._idle.notify_all()

    def digests_with(self, tail: bytes | memoryview) -> tuple[str, str | None]:
        """(crc32c, md5), GCS-encoded, of everything so far plus ``tail`` (not kept).

        Waits for queued blocks to be hashed. The MD5 is None if it is not computed.
        """
        with self._idle:
            self._idle.wait_for(lambda: not self._pending)
        crc32c = google_crc32c.extend(self._crc32c, bytes(tail))
        if self._md5 is None:
            return encode_crc32c(crc32c), None
        md5 = self._md5.copy()
        md5.update(tail)
        return encode_crc32c(crc32c), encode_md5(md5.digest())

    def close(self) -> None:
        """End the worker thread (after it has hashed what is queued)."""
        worker, self._worker = self._worker, None
        if worker is not None:
            self._blocks.put(None)
            worker.join()
