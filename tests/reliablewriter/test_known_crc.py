"""Issue 13 #5: the object's CRC32C is combined from CRC32Cs the caller already verified.

The proxy checks every frame's CRC32C on arrival; handing it to the writer spares a second
pass over every byte. ``stats.bytes_checksummed`` counts the bytes the writer still read.
A wrong CRC32C from the caller can never make a wrong object: GCS checks the final one.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import google_crc32c
import pytest

from reliablewriter import (
    ChecksumMismatchError,
    ChecksumMode,
    NonRetryableHTTPError,
    WriterSettings,
    WriterStats,
    open_writer,
)
from reliablewriter.buffer import JOIN_LIMIT, SMALL_PIECE
from reliablewriter.checksum import crc32c_to_b64

from .conftest import KiB, MiB, Target, payload

PIECE = 128 * KiB


def _pieces(data: bytes) -> list[tuple[int, bytes]]:
    return [(offset, data[offset : offset + PIECE]) for offset in range(0, len(data), PIECE)]


async def _upload_in_pieces(
    target: Target,
    name: str,
    settings: WriterSettings,
    data: bytes,
    *,
    known: Callable[[int], bool] = lambda index: True,
) -> WriterStats:
    """Write ``data`` in PIECE-sized writes, out of order within the first window, giving
    the CRC32C of those ``known`` picks by index; complete; check the object."""
    pieces = list(enumerate(_pieces(data)))
    random.Random(5).shuffle(pieces[:8])
    async with open_writer(target.bucket, name, settings) as writer:
        for index, (offset, piece) in pieces:
            crc = google_crc32c.value(piece) if known(index) else None
            await writer.write_at(offset, piece, crc32c=crc)
        info = await writer.complete(crc32c=google_crc32c.value(data))
    assert info.crc32c == crc32c_to_b64(google_crc32c.value(data))
    assert target.read(name) == data
    return writer.stats


async def test_known_crcs_are_combined_and_no_byte_is_read_again(
    strict_target: Target, settings: WriterSettings
) -> None:
    stats = await _upload_in_pieces(strict_target, "known", settings, payload(3 * MiB + 5))
    assert stats.bytes_checksummed == 0


async def test_bytes_without_a_known_crc_are_still_read(
    strict_target: Target, settings: WriterSettings
) -> None:
    data = payload(MiB + 100)
    stats = await _upload_in_pieces(
        strict_target, "mixed", settings, data, known=lambda index: index % 2 == 1
    )
    unknown = sum(len(piece) for index, (_, piece) in enumerate(_pieces(data)) if index % 2 == 0)
    assert stats.bytes_checksummed == unknown


async def test_md5_still_reads_every_byte(strict_target: Target, settings: WriterSettings) -> None:
    settings = dataclasses.replace(settings, checksum=ChecksumMode.BOTH)
    data = payload(600 * KiB)
    stats = await _upload_in_pieces(strict_target, "md5", settings, data)
    assert stats.bytes_checksummed == len(data)


async def test_a_staged_write_commits_with_its_frame_crc(
    strict_target: Target, settings: WriterSettings
) -> None:
    target = strict_target
    data = payload(700 * KiB)
    async with open_writer(target.bucket, "staged", settings) as writer:
        for offset, piece in _pieces(data):
            with writer.begin_write(offset, len(piece)) as staged:
                view = memoryview(piece)
                for cut in range(0, len(piece), 48 * KiB):  # as receive buffers deliver it
                    staged.feed(view[cut : cut + 48 * KiB])
                staged.commit(crc32c=google_crc32c.value(piece))
        await writer.complete(crc32c=google_crc32c.value(data))
    assert writer.stats.bytes_checksummed == 0
    assert target.read("staged") == data


async def test_a_wrong_known_crc_never_becomes_the_object(
    strict_target: Target, settings: WriterSettings
) -> None:
    target = strict_target
    data = payload(300 * KiB)
    wrong = google_crc32c.value(data) ^ 1
    # Without an expectation of the caller's, GCS refuses the final chunk's x-goog-hash.
    async with open_writer(target.bucket, "wrong", settings) as writer:
        await writer.write_at(0, data, crc32c=wrong)
        with pytest.raises(NonRetryableHTTPError, match="CRC32C") as refused:
            await writer.complete()
    assert refused.value.status == 400
    # With one, the mismatch is caught before the final chunk goes out.
    async with open_writer(target.bucket, "wrong", settings) as writer:
        await writer.write_at(0, data, crc32c=wrong)
        with pytest.raises(ChecksumMismatchError):
            await writer.complete(crc32c=google_crc32c.value(data))
    assert target.object_names() == []


async def test_a_payload_trickling_in_byte_by_byte_is_held_in_few_pieces(
    strict_target: Target, settings: WriterSettings
) -> None:
    target = strict_target
    data = payload(64 * KiB)
    async with open_writer(target.bucket, "trickle", settings) as writer:
        with writer.begin_write(0, len(data)) as staged:
            for position in range(len(data)):
                staged.feed(memoryview(data)[position : position + 1])
            staged.commit(crc32c=google_crc32c.value(data))
        assert writer.stats.fragments <= len(data) // (JOIN_LIMIT - SMALL_PIECE) + 1
        await writer.complete()
    assert target.read("trickle") == data
