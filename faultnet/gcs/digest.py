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

__all__ = ["RunningDigest", "decode_crc32c", "encode_crc32c", "encode_md5"]

_CRC_SLICE = 1 << 20


def encode_crc32c(value: int) -> str:
    """GCS's form of a CRC32C: base64 of the big-endian 32-bit value."""
    return base64.b64encode(value.to_bytes(4, "big")).decode()


def decode_crc32c(encoded: str) -> int:
    """The value of a CRC32C in GCS's form (see :func:`encode_crc32c`)."""
    return int.from_bytes(base64.b64decode(encoded), "big")


def encode_md5(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


class RunningDigest:
    """The CRC32C and MD5 of everything passed to :meth:`update`, in order.

    Blocks are hashed by a worker thread that exists only while there is something to
    hash, so an abandoned session holds no thread. Not for concurrent use: one session
    (under its lock) feeds it. ``md5=False`` skips MD5, which costs several times more CPU
    than everything else ingest does (GCS itself omits MD5 for composite objects).
    """

    def __init__(self, *, md5: bool = True) -> None:
        self._crc32c = 0
        self._md5 = hashlib.md5() if md5 else None
        self._blocks: queue.SimpleQueue[bytes | memoryview] = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._pending = 0  # blocks queued and not yet hashed
        self._worker: threading.Thread | None = None

    def update(self, block: bytes | memoryview) -> None:
        """Queue ``block`` for hashing; it must not change afterwards."""
        with self._idle:
            self._pending += 1
            worker = None
            if self._worker is None:
                worker = self._worker = threading.Thread(
                    target=self._hash_blocks, name="gcs-digest", daemon=True
                )
        self._blocks.put(block)
        if worker is not None:
            worker.start()

    def _hash_blocks(self) -> None:
        while True:
            block = memoryview(self._blocks.get())
            # google-crc32c reads only ``bytes`` and releases the GIL from 1 MiB on; the
            # copies, made a slice at a time, hold the GIL only briefly.
            for start in range(0, block.nbytes, _CRC_SLICE):
                piece = bytes(block[start : start + _CRC_SLICE])
                self._crc32c = google_crc32c.extend(self._crc32c, piece)
            if self._md5 is not None:
                self._md5.update(block)
            with self._idle:
                self._pending -= 1
                if not self._pending:
                    self._worker = None  # the next update starts a new worker
                    self._idle.notify_all()
                    return

    def digests_with(self, tail: bytes | memoryview) -> tuple[str, str | None]:
        """(crc32c, md5), GCS-encoded, of everything so far plus ``tail`` (not kept).

        Waits for queued blocks to be hashed. The MD5 is None if it is not computed.
        """
        self.wait()
        crc32c = google_crc32c.extend(self._crc32c, bytes(tail))
        if self._md5 is None:
            return encode_crc32c(crc32c), None
        md5 = self._md5.copy()
        md5.update(tail)
        return encode_crc32c(crc32c), encode_md5(md5.digest())

    def wait(self) -> None:
        """Return once every queued block is hashed and the worker is ending."""
        with self._idle:
            self._idle.wait_for(lambda: not self._pending)
