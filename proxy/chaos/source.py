"""The deterministic bytes of a generated object: any range regenerated from a key.

Object data is never stored: :class:`ObjectSource` regenerates any byte range from its key,
so the uploader streams it piece by piece and the verifier compares a download byte for
byte against what was sent, neither keeping a copy. ``rup chaos`` and ``rup demo`` both
upload these.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import google_crc32c

from reliablewriter import MiB

__all__ = ["ObjectSource", "SourceReader"]

#: bytes per generated block; a block is a rotation of one random buffer per object
_BLOCK: Final = 1 * MiB
#: distinct rotations, so no two blocks of an object are equal (a duplicated block shows)
_ROTATIONS: Final = 4096
_ROTATION_STEP: Final = 997  # prime to _ROTATIONS: every block index below it rotates apart


@dataclass(frozen=True)
class ObjectSource:
    """The deterministic bytes of one object: any range can be regenerated on demand."""

    key: str
    size: int

    def blocks(self, block_size: int = _BLOCK) -> Iterator[bytes]:
        """The whole object, in order, in pieces of at most ``block_size`` bytes."""
        reader = self.reader()
        for offset in range(0, self.size, block_size):
            yield reader.read(offset, block_size)

    def reader(self) -> SourceReader:
        """Random access to the object's bytes (holds one generated buffer, about 1 MiB)."""
        return SourceReader(self.size, _base_buffer(self.key, self.size))

    def crc32c(self) -> int:
        crc = 0
        for block in self.blocks():
            crc = google_crc32c.extend(crc, block)
        return crc


def _base_buffer(key: str, size: int) -> bytes:
    return random.Random(key).randbytes(min(_BLOCK, size) + _ROTATIONS)


class SourceReader:
    """Reads ranges of one :class:`ObjectSource` without regenerating its buffer each time."""

    def __init__(self, size: int, base: bytes) -> None:
        self._size = size
        self._base = base

    def read(self, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)``, clipped to the end of the object."""
        length = max(0, min(length, self._size - offset))
        pieces = []
        while length > 0:
            block, within = divmod(offset, _BLOCK)
            shift = (block * _ROTATION_STEP) % _ROTATIONS
            block_length = min(_BLOCK, self._size - block * _BLOCK)
            take = min(length, block_length - within)
            pieces.append(self._base[shift + within : shift + within + take])
            offset += take
            length -= take
        return b"".join(pieces)
