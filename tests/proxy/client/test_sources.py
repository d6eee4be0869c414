"""FileSource: pieces read from a file, with their CRC32Cs and the file's."""

from __future__ import annotations

import os
from pathlib import Path

import google_crc32c
import trio

from proxy.client.sources import FileSource

KiB = 1024
FRAME = 256 * KiB


async def test_pieces_smaller_than_the_frames_read_ahead_come_from_memory(
    tmp_path: Path,
) -> None:
    data = os.urandom(4 * FRAME + 1000)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    source = FileSource(fd, len(data), FRAME)
    try:
        # A whole frame first, as an upload starts; its read reads ahead frame by frame.
        pieces = [(0, FRAME)]
        # Then smaller pieces, as after connections were cut: never across a frame
        # boundary (the ledger cuts pieces on the frame grid).
        offset = FRAME
        for size in (FRAME // 4, FRAME // 8, FRAME // 8, FRAME // 2, FRAME // 4, 3 * FRAME // 4):
            pieces.append((offset, offset + size))
            offset += size
        pieces += [(offset, offset + FRAME // 2), (offset + FRAME // 2, 4 * FRAME)]
        pieces.append((4 * FRAME, len(data)))
        first = await source.read(*pieces[0])
        path.write_bytes(bytes(len(data)))  # what is read from the file from now on: zeros
        received = [first] + [await source.read(*piece) for piece in pieces[1:]]
        for (start, end), (piece, crc) in zip(pieces, received, strict=True):
            # The original bytes: the first read read the whole file ahead, and the
            # smaller pieces are split from it, not read again.
            assert bytes(piece) == data[start:end]
            assert crc == google_crc32c.value(data[start:end])
    finally:
        source.close()
    await trio.lowlevel.checkpoint()
