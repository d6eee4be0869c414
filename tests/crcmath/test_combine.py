"""crc32c_combine: the CRC32C of a concatenation from its parts', checked against google-crc32c."""

from __future__ import annotations

import google_crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crcmath import crc32c_combine, crc32c_of_suffix


@settings(deadline=None, max_examples=200)
@given(
    first=st.binary(max_size=3000),
    second=st.binary(max_size=3000),
    zeros=st.integers(0, 3 * 2**20),
)
def test_combining_the_crcs_of_two_parts_gives_the_crc_of_the_whole(
    first: bytes, second: bytes, zeros: int
) -> None:
    # A run of zeros as well, so lengths well past the examples' own sizes are covered.
    second += bytes(zeros % 70_000)
    combined = crc32c_combine(google_crc32c.value(first), google_crc32c.value(second), len(second))
    assert combined == google_crc32c.value(first + second)


def test_combining_large_parts() -> None:
    first, second = bytes(range(256)) * 700, b"\xa5" * (1 << 20)
    combined = crc32c_combine(google_crc32c.value(first), google_crc32c.value(second), len(second))
    assert combined == google_crc32c.value(first + second)


@pytest.mark.parametrize("length", [1, 255, 4099, 1 << 20])
def test_a_length_combined_again_and_again_still_gives_the_crc_of_the_whole(length: int) -> None:
    # From the fourth use on, a length is shifted by lookup tables instead of multiplication.
    # Extending any CRC32C over zeros is the same shift plus the zeros' CRC32C, so the CRCs
    # b * 0x01010101 hold every byte value in every position: every entry of every table.
    zeros = bytes(length)
    second = (bytes(range(251)) * (length // 251 + 1))[:length]
    for byte in range(256):
        crc_a = byte * 0x01010101
        shifted = google_crc32c.extend(crc_a, zeros) ^ google_crc32c.value(zeros)
        expected = shifted ^ google_crc32c.value(second)
        assert crc32c_combine(crc_a, google_crc32c.value(second), length) == expected
    first = b"\x00\x80" * 300
    combined = crc32c_combine(google_crc32c.value(first), google_crc32c.value(second), length)
    assert combined == google_crc32c.value(first + second)


def test_an_empty_second_part_changes_nothing() -> None:
    assert crc32c_combine(0x12345678, 0, 0) == 0x12345678


def test_a_negative_length_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        crc32c_combine(1, 2, -1)


@settings(deadline=None, max_examples=200)
@given(first=st.binary(max_size=3000), second=st.binary(max_size=3000))
def test_the_crc_of_a_suffix_comes_from_the_whole_and_the_prefix(
    first: bytes, second: bytes
) -> None:
    whole, prefix = google_crc32c.value(first + second), google_crc32c.value(first)
    assert crc32c_of_suffix(whole, prefix, len(second)) == google_crc32c.value(second)
