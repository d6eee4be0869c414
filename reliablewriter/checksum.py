"""Whole-object checksums, extended once per byte, in object order, as data streams through."""

from __future__ import annotations

import base64
import hashlib

import google_crc32c

from .settings import ChecksumMode

__all__ = ["StreamChecksum", "crc32c_to_b64", "normalize_crc32c"]

# google-crc32c's C entry point parses its input with ``y#``, which takes only read-only
# buffers without a release hook: ``bytes`` yes, ``memoryview`` and ``bytearray`` no. A
# view over a whole ``bytes`` object is passed through as that object; anything else is
# hashed through short-lived copies of this size, so a chunk is never joined.
_COPY_PIECE = 256 * 1024


def crc32c_to_b64(value: int) -> str:
    """A CRC32C value in GCS's form: base64 of the four big-endian bytes."""
    return base64.b64encode(value.to_bytes(4, "big")).decode("ascii")


def normalize_crc32c(value: int | str) -> str:
    """Accept a CRC32C as an ``int`` or as GCS's base64 string; return the string."""
    if isinstance(value, int):
        if not 0 <= value < 2**32:
            raise ValueError(f"crc32c must fit in 32 bits, got {value}")
        return crc32c_to_b64(value)
    raw = base64.b64decode(value, validate=True)
    if len(raw) != 4:
        raise ValueError(f"crc32c must be 4 bytes of base64, got {value!r}")
    return value


class StreamChecksum:
    """The checksums of the bytes ``[0, offset)``, extended strictly in order.

    ``valid`` is false when the stream did not start at byte 0 (a resumed session): the
    bytes before it were never seen here, so there is no whole-object checksum to offer.
    """

    def __init__(self, mode: ChecksumMode, *, start: int = 0) -> None:
        self.mode = mode
        self.offset = start
        self.valid = start == 0
        self._crc: int | None = 0 if mode.crc32c else None
        self._md5 = hashlib.md5(usedforsecurity=False) if mode.md5 else None

    def extend(self, start: int, views: list[memoryview]) -> None:
        """Feed the bytes from ``start`` on; the part below :attr:`offset` is skipped.

        ``start`` must not lie beyond :attr:`offset`: a gap would make the checksum wrong.
        """
        if start > self.offset:
            raise ValueError(f"cannot checksum from {start}: bytes from {self.offset} unseen")
        for view in views:
            skip = self.offset - start
            start += len(view)
            if skip >= len(view):
                continue
            piece = view[skip:] if skip > 0 else view
            self._update(piece)
            self.offset += len(piece)

    def _update(self, view: memoryview) -> None:
        if self._md5 is not None:
            self._md5.update(view)
        if self._crc is None:
            return
        if isinstance(view.obj, bytes) and view.nbytes == len(view.obj):
            self._crc = google_crc32c.extend(self._crc, view.obj)
            return
        for begin in range(0, len(view), _COPY_PIECE):
            self._crc = google_crc32c.extend(self._crc, bytes(view[begin : begin + _COPY_PIECE]))

    @property
    def crc32c(self) -> str | None:
        """Base64 CRC32C of the bytes so far, if computed and valid."""
        if self._crc is None or not self.valid:
            return None
        return crc32c_to_b64(self._crc)

    @property
    def md5(self) -> str | None:
        """Base64 MD5 of the bytes so far, if computed and valid."""
        if self._md5 is None or not self.valid:
            return None
        return base64.b64encode(self._md5.digest()).decode("ascii")
