"""CRC32C of a concatenation from the CRC32Cs of its parts, without reading the bytes again.

CRC32C is linear over GF(2): crc(A + B) = shift(crc(A), len(B)) ^ crc(B), where shift appends
len(B) zero bytes' worth of polynomial multiplication (zlib's crc32_combine, for the
Castagnoli polynomial). The shift for a given length is a 32x32 bit matrix, built once per
length in O(log length) squarings and cached as four byte-indexed tables, so combining is a
handful of lookups: cheap enough to do once per frame.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Final

__all__ = ["crc32c_combine"]

_POLYNOMIAL: Final = 0x82F63B78  # Castagnoli, bit-reversed


def _times(matrix: list[int], vector: int) -> int:
    result, row = 0, 0
    while vector:
        if vector & 1:
            result ^= matrix[row]
        vector >>= 1
        row += 1
    return result


def _square(matrix: list[int]) -> list[int]:
    return [_times(matrix, column) for column in matrix]


@lru_cache(maxsize=64)
def _shift_tables(length: int) -> tuple[tuple[int, ...], ...]:
    """Four 256-entry tables; XOR of the lookups of a CRC's bytes shifts it by `length` bytes."""
    # The operator for one zero bit, then squared up to one zero byte (8 bits).
    operator = [_POLYNOMIAL] + [1 << row for row in range(31)]
    for _ in range(3):
        operator = _square(operator)
    shift = [1 << row for row in range(32)]  # identity
    while length:
        if length & 1:
            shift = [_times(operator, column) for column in shift]
        length >>= 1
        if length:
            operator = _square(operator)
    return tuple(
        tuple(_times(shift, value << (8 * byte)) for value in range(256)) for byte in range(4)
    )


def crc32c_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """The CRC32C of A + B, given crc32c(A), crc32c(B) and len(B)."""
    if not length_b:
        return crc_a
    t0, t1, t2, t3 = _shift_tables(length_b)
    shifted = (
        t0[crc_a & 0xFF] ^ t1[(crc_a >> 8) & 0xFF] ^ t2[(crc_a >> 16) & 0xFF] ^ t3[crc_a >> 24]
    )
    return shifted ^ crc_b
