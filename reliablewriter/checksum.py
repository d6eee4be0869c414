"""Whole-object checksums, extended once per byte, in object order, as data streams through.

Bytes whose CRC32C the caller already verified (a frame's, checked on arrival) are not
read again: :func:`crc32c_combine` appends their CRC32C to the object's. A length combined
again and again (a proxy's full frames, one per MiB) gets four byte-indexed tables, as in
protocol/_crc.py: combining is then four lookups instead of a 32-step multiplication
(0.5 us instead of 4.5, in the sending thread, holding the GIL). The tables cost about
0.1 ms, so a length seen only a few times (the last frame of each object) never pays for them.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from functools import lru_cache
from typing import Final

import google_crc32c

from .buffer import KnownCrc
from .settings import ChecksumMode

__all__ = ["StreamChecksum", "crc32c_combine", "crc32c_to_b64", "normalize_crc32c"]

# CRC32C's (Castagnoli) polynomial, bit-reversed: bit 31 holds x^0, as CRC registers do.
_POLY: Final = 0x82F63B78
_ONE: Final = 1 << 31  # the polynomial 1 (x^0) in that order
#: uses of one length before it gets lookup tables
_HOT_AFTER: Final = 3
#: lengths counted at most; the count starts over beyond (only a cache of what is hot)
_COUNTED_LENGTHS: Final = 4096


def _multiply(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC32C polynomial, both in reflected bit order."""
    product = 0
    bit = _ONE
    while a:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return product


def _powers_of_x() -> tuple[int, ...]:
    """x^(2^k) mod P for k = 0..63: each the square of the one before."""
    powers = [_ONE >> 1]  # x^1
    for _ in range(63):
        powers.append(_multiply(powers[-1], powers[-1]))
    return tuple(powers)


_X_TO_2_TO_THE: Final = _powers_of_x()


@lru_cache(maxsize=256)
def _shift_for(length: int) -> int:
    """x^(8 * length) mod P: what appending ``length`` zero bytes multiplies a CRC by.

    Cached by length, since an upload's frames mostly share a few lengths.
    """
    shift = _ONE
    k = 3  # 8 * length = length * 2^3
    while length:
        if length & 1:
            shift = _multiply(_X_TO_2_TO_THE[k], shift)
        length >>= 1
        k += 1
    return shift


@lru_cache(maxsize=64)
def _shift_tables(length: int) -> tuple[tuple[int, ...], ...]:
    """Four 256-entry tables; the XOR of the lookups of a CRC's four bytes is that CRC
    times x^(8 * length) mod P.

    Multiplying is linear over GF(2), so an entry is the XOR of the entries of its value's
    bits: 8 multiplications a table instead of 256.
    """
    shift = _shift_for(length)
    tables = []
    for byte in range(4):
        table = [0] * 256
        for bit in range(8):
            table[1 << bit] = _multiply(shift, 1 << (bit + 8 * byte))
        for value in range(3, 256):
            lowest_bit = value & -value
            if value != lowest_bit:
                table[value] = table[lowest_bit] ^ table[value ^ lowest_bit]
        tables.append(tuple(table))
    return tuple(tables)


_uses: dict[int, int] = {}


def crc32c_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """CRC32C of A + B from crc32c(A), crc32c(B) and len(B), without reading the bytes.

    CRC32C is affine over GF(2): crc(A + B) = crc(A) * x^(8 len(B)) mod P xor crc(B)
    (the pre- and post-inversions cancel), as in zlib's ``crc32_combine``.
    """
    if length_b < 0:
        raise ValueError(f"length must not be negative, got {length_b}")
    if not length_b:
        return crc_a
    uses = _uses.get(length_b, 0)
    if uses < _HOT_AFTER:
        if len(_uses) >= _COUNTED_LENGTHS:
            _uses.clear()
        _uses[length_b] = uses + 1
        return _multiply(_shift_for(length_b), crc_a) ^ crc_b
    t0, t1, t2, t3 = _shift_tables(length_b)
    shifted = (
        t0[crc_a & 0xFF] ^ t1[(crc_a >> 8) & 0xFF] ^ t2[(crc_a >> 16) & 0xFF] ^ t3[crc_a >> 24]
    )
    return shifted ^ crc_b


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
