"""StreamChecksum: every byte once, in order, whatever kind of buffer holds it."""

from __future__ import annotations

import base64
import hashlib
import os

import google_crc32c
import pytest

from reliablewriter import ChecksumMode
from reliablewriter.buffer import KnownCrc
from reliablewriter.checksum import (
    StreamChecksum,
    crc32c_to_b64,
    normalize_crc32c,
)


def test_mixed_buffers_and_overlapping_feeds_count_each_byte_once() -> None:
    data = os.urandom(700 * 1024)
    checksum = StreamChecksum(ChecksumMode.BOTH)
    whole_bytes = memoryview(data[:1000])  # the fast path: a view of a whole bytes object
    checksum.extend(0, [whole_bytes])
    # A feed that starts below the offset reached skips what was already counted.
    checksum.extend(500, [memoryview(bytearray(data[500:300_000]))])
    checksum.extend(300_000, [memoryview(data)[300_000:]])
    assert checksum.offset == len(data)
    assert checksum.crc32c == crc32c_to_b64(google_crc32c.value(data))
    assert checksum.md5 == base64.b64encode(hashlib.md5(data).digest()).decode()


def test_a_stream_that_did_not_start_at_zero_has_no_checksum() -> None:
    checksum = StreamChecksum(ChecksumMode.CRC32C, start=1024)
    checksum.extend(1024, [memoryview(b"tail")])
    assert checksum.crc32c is None
    assert checksum.md5 is None


def test_a_gap_is_refused() -> None:
    checksum = StreamChecksum(ChecksumMode.CRC32C)
    with pytest.raises(ValueError, match="unseen"):
        checksum.extend(1, [memoryview(b"x")])


def test_mode_none_computes_nothing() -> None:
    checksum = StreamChecksum(ChecksumMode.NONE)
    checksum.extend(0, [memoryview(b"abc")])
    assert checksum.crc32c is None
    assert checksum.offset == 3


def test_crc32c_forms() -> None:
    value = google_crc32c.value(b"hello")
    text = crc32c_to_b64(value)
    assert normalize_crc32c(value) == text
    assert normalize_crc32c(text) == text
    with pytest.raises(ValueError, match="4 bytes"):
        normalize_crc32c(base64.b64encode(b"12345").decode())
    with pytest.raises(ValueError, match="32 bits"):
        normalize_crc32c(2**32)


# Issue 13 #5: the object's CRC32C combined from CRC32Cs the caller already verified (the
# combining itself is crcmath's, tested in tests/crcmath).


def test_known_crcs_are_combined_and_never_read() -> None:
    data = os.urandom(300_000)
    parts = [data[:1000], data[1000:250_000], data[250_000:]]
    checksum = StreamChecksum(ChecksumMode.CRC32C)
    checksum.extend(
        0,
        [
            KnownCrc(google_crc32c.value(parts[0]), len(parts[0])),
            memoryview(parts[1]),  # one part without a known CRC32C: read
            KnownCrc(google_crc32c.value(parts[2]), len(parts[2])),
        ],
    )
    assert checksum.offset == len(data)
    assert checksum.bytes_read == len(parts[1])
    assert checksum.crc32c == crc32c_to_b64(google_crc32c.value(data))
    # Pieces already covered are skipped whole, as views are.
    checksum.extend(1000, [memoryview(parts[1]), KnownCrc(0, len(parts[2]))])
    assert checksum.crc32c == crc32c_to_b64(google_crc32c.value(data))


def test_a_known_crc_cannot_stand_in_for_bytes_md5_must_read() -> None:
    checksum = StreamChecksum(ChecksumMode.BOTH)
    with pytest.raises(ValueError, match="MD5 must read"):
        checksum.extend(0, [KnownCrc(google_crc32c.value(b"abc"), 3)])
    partial = StreamChecksum(ChecksumMode.CRC32C)
    partial.extend(0, [memoryview(b"a")])
    with pytest.raises(ValueError, match="cannot skip part"):
        partial.extend(0, [KnownCrc(google_crc32c.value(b"abc"), 3)])
