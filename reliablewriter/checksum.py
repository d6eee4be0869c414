"""Whole-object checksums, extended once per byte, in object order, as data streams through.

Bytes whose CRC32C the caller already verified (a frame's, checked on arrival) are not
read again: :func:`crc32c_combine` (crcmath's, re-exported) appends their CRC32C to the
object's, in about 0.4 us for a length seen again and again, such as a proxy's full frames.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

import google_crc32c

from crcmath import crc32c_combine

from .buffer import KnownCrc
from .settings import ChecksumMode

__all__ = ["StreamChecksum", "crc32c_combine", "crc32c_to_b64", "normalize_crc32c"]

# google-crc32c's C entry point parses its input with ``y#``, which takes only read-only
# buffers without a release hook: ``bytes`` yes, ``memoryview`` and ``bytearray`` no. A
# view over a whole ``bytes`` object is passed through as that object; anything else is
# hashed through short-lived copies of this size, so a chunk is never joined.
_COPY_PIECE = 256 * 1024


def crc32c_to_b64(value: int) -> str:
    """A CRC32C value in GCS's form: base64 of the four big-endian bytes."""
    return base64.b64encode(value.to_bytes(4, "big")).decode("ascii")


def crc32c_from_b64(value: str) -> int:
    """GCS's base64 form of a CRC32C as its value."""
    return int.from_bytes(base64.b64decode(value), "big")


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
        #: Bytes read to checksum them (bytes covered by a known CRC32C are not read).
        self.bytes_read = 0
        self._crc: int | None = 0 if mode.crc32c else None
        self._md5 = hashlib.md5(usedforsecurity=False) if mode.md5 else None

    def extend(self, start: int, pieces: Sequence[memoryview | KnownCrc]) -> None:
        """Feed the bytes from ``start`` on; the part below :attr:`offset` is skipped.

        A :class:`~reliablewriter.buffer.KnownCrc` stands for bytes whose CRC32C the
        caller verified: it is combined in, not read (only without MD5, which needs the
        bytes), and cannot be skipped in part. ``start`` must not lie beyond
        :attr:`offset`: a gap would make the checksum wrong.
        """
        if start > self.offset:
            raise ValueError(f"cannot checksum from {start}: bytes from {self.offset} unseen")
        for piece in pieces:
            skip = self.offset - start
            length = piece.length if isinstance(piece, KnownCrc) else len(piece)
            start += length
            if skip >= length:
                continue
            if isinstance(piece, KnownCrc):
                if self._md5 is not None:
                    raise ValueError("a known CRC32C cannot stand in for bytes MD5 must read")
                if skip > 0:
                    raise ValueError("cannot skip part of the bytes one known CRC32C covers")
                if self._crc is not None:
                    self._crc = crc32c_combine(self._crc, piece.crc32c, length)
            else:
                self._update(piece[skip:] if skip > 0 else piece)
            self.offset += length - skip

    def _update(self, view: memoryview) -> None:
        if self._md5 is not None or self._crc is not None:
            self.bytes_read += len(view)
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
