"""CRC32C arithmetic that google-crc32c lacks: the CRC32C of a concatenation from its parts'.

CRC32C is affine over GF(2): crc(A + B) = shift(crc(A), len(B)) ^ crc(B), where the shift
multiplies by x^(8·len(B)) modulo the Castagnoli polynomial (the pre- and post-inversions
cancel), as zlib's ``crc32_combine`` does for CRC-32. The factor takes O(log length)
multiplications from a table of x^(2^k) (zlib's ``x2nmodp``), about 0.2 ms in Python, and is
cached per length; applying it is one more multiplication (about 4 µs). A length used again
and again (a stream's full frames) also gets four byte-indexed tables after its third use,
so combining is four lookups (about 0.4 µs): cheap enough to do once per frame. The tables
cost about 0.3 ms, so a length seen only a few times (the last frame of each of many files)
never pays for them.

A package of its own, importing nothing else of rup's, so that ``protocol`` and
``reliablewriter``, which are independent of each other by contract (pyproject's
import-linter), can both use it.
"""

from ._combine import crc32c_combine, crc32c_of_suffix

__all__ = ["crc32c_combine", "crc32c_of_suffix"]
