"""WriteAt frames whose data CRC the sender already knows (the combining arithmetic is
crcmath's, tested in tests/crcmath)."""

from __future__ import annotations

import google_crc32c
import pytest

from protocol import PayloadCrcError, WriteAt
from tests.protocol.helpers import ReceivedWrite, bound_pair, drain, merge_writes


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
