"""Completing a composite upload from GCS alone: segments uploaded by different writers
(as different proxy instances would), found by name, checked, composed, cleaned up."""

from __future__ import annotations

import google_crc32c
import pytest

from reliablewriter import (
    ChecksumMismatchError,
    IncompleteObjectError,
    NonRetryableHTTPError,
    WriterSettings,
    open_writer,
)
from reliablewriter.composite import (
    DEFAULT_TEMP_PREFIX,
    CompositeSettings,
    complete_from_temporaries,
    temporary_name,
)

from .conftest import KiB, Target, payload

SEGMENT = 256 * KiB


async def _upload_segment(
    target: Target, settings: WriterSettings, upload_id: str, index: int, data: bytes
) -> None:
    """What the instance that received segment ``index`` does: upload it under its name."""
    piece = data[index * SEGMENT : (index + 1) * SEGMENT]
    name = temporary_name(DEFAULT_TEMP_PREFIX, upload_id, index)
    async with open_writer(target.bucket, name, settings, if_generation_match=0) as writer:
        await writer.write_at(0, piece)
        await writer.complete(len(piece))


def _temporaries(target: Target) -> list[str]:
    return [name for name in target.object_names() if name.startswith(DEFAULT_TEMP_PREFIX)]


async def test_segments_from_different_writers_complete_anywhere(
    target: Target, settings: WriterSettings
) -> None:
    data = payload(3 * SEGMENT + 11)
    composite = CompositeSettings(segment_size=SEGMENT, writer=settings)
    for index in (2, 0, 3):  # out of order, each by its own writer
        await _upload_segment(target, settings, "u", index, data)

    with pytest.raises(IncompleteObjectError) as caught:
        await complete_from_temporaries(
            target.bucket, "obj", composite, upload_id="u", total_size=len(data)
        )
    assert caught.value.missing == ((SEGMENT, 2 * SEGMENT),)  # segment 1: the client resends it
    assert len(_temporaries(target)) == 3  # nothing deleted: the upload goes on

    await _upload_segment(target, settings, "u", 1, data)
    info = await complete_from_temporaries(
        target.bucket,
        "obj",
        composite,
        upload_id="u",
        total_size=len(data),
        crc32c=int(google_crc32c.value(data)),
        if_generation_match=0,
    )
    assert target.read("obj") == data
    assert (info.size, info.md5_hash, info.resource["componentCount"]) == (len(data), None, 4)
    assert _temporaries(target) == []


async def test_a_segment_of_the_wrong_size_counts_as_missing(
    target: Target, settings: WriterSettings
) -> None:
    data = payload(2 * SEGMENT)
    composite = CompositeSettings(segment_size=SEGMENT, writer=settings)
    await _upload_segment(target, settings, "u", 0, data)
    short = temporary_name(DEFAULT_TEMP_PREFIX, "u", 1)
    target.bucket.blob(short).upload_from_string(data[SEGMENT:-1])  # one byte short
    with pytest.raises(IncompleteObjectError) as caught:
        await complete_from_temporaries(
            target.bucket, "obj", composite, upload_id="u", total_size=len(data)
        )
    assert caught.value.missing == ((SEGMENT, 2 * SEGMENT),)


async def test_a_wrong_crc32c_or_a_failed_precondition_composes_nothing_and_cleans_up(
    target: Target, settings: WriterSettings
) -> None:
    data = payload(2 * SEGMENT)
    composite = CompositeSettings(segment_size=SEGMENT, writer=settings)
    for index in (0, 1):
        await _upload_segment(target, settings, "bad", index, data)
    with pytest.raises(ChecksumMismatchError):
        await complete_from_temporaries(
            target.bucket, "obj", composite, upload_id="bad", total_size=len(data), crc32c=7
        )
    assert target.object_names() == []

    target.bucket.blob("taken").upload_from_string(b"here first")
    for index in (0, 1):
        await _upload_segment(target, settings, "late", index, data)
    with pytest.raises(NonRetryableHTTPError) as refused:
        await complete_from_temporaries(
            target.bucket,
            "taken",
            composite,
            upload_id="late",
            total_size=len(data),
            if_generation_match=0,
        )
    assert refused.value.status == 412
    assert target.object_names() == ["taken"]
