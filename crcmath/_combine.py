"""crc32c_combine, and the GF(2) arithmetic behind it (see the package's docstring)."""

from __future__ import annotations

from functools import lru_cache
from typing import Final

__all__ = ["crc32c_combine"]

# CRC32C's (Castagnoli) polynomial, bit-reversed: bit 31 holds x^0, as CRC registers do.
_POLYNOMIAL: Final = 0x82F63B78
_ONE: Final = 1 << 31  # the polynomial 1 (x^0) in that order
#: uses of one length before it gets lookup tables
_HOT_AFTER: Final = 3
#: lengths counted at most; the count starts over beyond (only a cache of what is hot)
_COUNTED_LENGTHS: Final = 4096


def _multiply(a: int, b: int) -> int:
    """a(x) · b(x) modulo the polynomial, both bit-reversed (zlib's ``multmodp``)."""
    product = 0
    bit = _ONE
    while a:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ _POLYNOMIAL if b & 1 else b >> 1
    return product


def _powers_of_x() -> tuple[int, ...]:
    """x^(2^k) modulo the polynomial, for k = 0 … 63: each the square of the one before."""
    powers = [_ONE >> 1]  # x^1
    for _ in range(63):
        powers.append(_multiply(powers[-1], powers[-1]))
    return tuple(powers)


_X_TO_2_TO_THE: Final = _powers_of_x()


@lru_cache(maxsize=1024)
def _shift_factor(length: int) -> int:
    """x^(8·length) modulo the polynomial: what appending ``length`` zero bytes multiplies a
    CRC by."""
    factor = _ONE
    k = 3  # 8 bits a byte: x^(8·length) = x^(2^3 · length)
    while length:
        if length & 1:
            factor = _multiply(_X_TO_2_TO_THE[k], factor)
        length >>= 1
        k += 1
    return factor


@lru_cache(maxsize=64)
def _shift_tables(length: int) -> tuple[tuple[int, ...], ...]:
    """Four 256-entry tables; the XOR of the lookups of a CRC's four bytes shifts it by
    ``length`` bytes.

    Shifting is linear over GF(2), so an entry is the XOR of the entries of its value's bits:
    8 multiplications a table instead of 256.
    """
    factor = _shift_factor(length)
    tables = []
    for byte in range(4):
        table = [0] * 256
        for bit in range(8):
            table[1 << bit] = _multiply(factor, 1 << (bit + 8 * byte))
        for value in range(3, 256):
            lowest_bit = value & -value
            if value != lowest_bit:
                table[value] = table[lowest_bit] ^ table[value ^ lowest_bit]
        tables.append(tuple(table))
    return tuple(tables)


_uses: dict[int, int] = {}


def crc32c_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """The CRC32C of A + B, from crc32c(A), crc32c(B) and len(B), without the bytes.

    Raises ValueError for a negative length.
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
        return _multiply(_shift_factor(length_b), crc_a) ^ crc_b
    t0, t1, t2, t3 = _shift_tables(length_b)
    shifted = (
        t0[crc_a & 0xFF] ^ t1[(crc_a >> 8) & 0xFF] ^ t2[(crc_a >> 16) & 0xFF] ^ t3[crc_a >> 24]
    )
    return shifted ^ crc_b


def crc32c_of_suffix(crc_whole: int, crc_prefix: int, length_suffix: int) -> int:
    """The CRC32C of B, from crc32c(A + B), crc32c(A) and len(B), without the bytes: the
    inverse of :func:`crc32c_combine` (the shifted crc32c(A) taken back out by XOR).

    Raises ValueError for a negative length.
    """
    return crc_whole ^ crc32c_combine(crc_prefix, 0, length_suffix)
