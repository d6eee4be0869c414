"""CRC32C combination, and WriteAt frames whose data CRC the sender already knows."""

from __future__ import annotations

import google_crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import PayloadCrcError, WriteAt, crc32c_combine
from tests.protocol.helpers import ReceivedWrite, bound_pair, drain, merge_writes


@settings(deadline=None, max_examples=200)
@given(first=st.binary(max_size=3000), second=st.binary(max_size=3000))
def test_combining_the_crcs_of_two_parts_gives_the_crc_of_the_whole(
    first: bytes, second: bytes
) -> None:
    combined = crc32c_combine(google_crc32c.value(first), google_crc32c.value(second), len(second))
    assert combined == google_crc32c.value(first + second)


def test_combining_large_parts() -> None:
    first, second = bytes(range(256)) * 700, b"\xa5" * (1 << 20)
    combined = crc32c_combine(google_crc32c.value(first), google_crc32c.value(second), len(second))
    assert combined == google_crc32c.value(first + second)


@pytest.mark.parametrize("length", [1, 255, 4099, 1 << 20])
def test_a_length_combined_again_and_again_still_gives_the_crc_of_the_whole(length: int) -> None:
    # From the fourth use on, a length is shifted by lookup tables instead of multiplication
    second = (bytes(range(251)) * (length // 251 + 1))[:length]
    for first in (b"", b"a", bytes(range(256)), b"\xff" * 1000, b"\x00\x80" * 300):
        for _ in range(2):
            combined = crc32c_combine(
                google_crc32c.value(first), google_crc32c.value(second), length
            )
            assert combined == google_crc32c.value(first + second)


def test_a_given_data_crc_makes_the_same_frame() -> None:
    data = b"some bytes " * 1000
    computed, _ = bound_pair()
    given_crc, _ = bound_pair()
    frame = b"".join(computed.send(WriteAt(42, data)))
    assert b"".join(given_crc.send(WriteAt(42, data, google_crc32c.value(data)))) == frame


def test_a_wrong_data_crc_is_refused_by_the_receiver() -> None:
    client, server = bound_pair()
    data = b"x" * 5000
    for buffer in client.send(WriteAt(0, data, google_crc32c.value(data) ^ 1)):
        server.receive_data(buffer)
    with pytest.raises(PayloadCrcError, match="payload CRC32C mismatch"):
        drain(server)
    # the frame alone is refused; the connection goes on
    for buffer in client.send(WriteAt(0, data, google_crc32c.value(data))):
        server.receive_data(buffer)
    assert merge_writes(drain(server)) == [ReceivedWrite(4, 0, data)]
