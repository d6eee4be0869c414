"""The spec's (server) rules that the codec cannot enforce, each through a raw socket.

docs/protocol.md marks them **(server)**; the section each test checks is in its name.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

import google_crc32c
import trio

from protocol import (
    Ack,
    AttachUpload,
    Complete,
    Completed,
    ErrorCode,
    StatusQuery,
    WriteAt,
)
from proxy.server import ProxyServer
from proxy.server.settings import KiB
from tests.proxy.conftest import RawClient
from tests.proxy.server.test_uploads import send_range

Connect = Callable[..., Awaitable[RawClient]]


async def answer_to(client: RawClient, seq: int) -> ErrorCode | None:
    """The code of the Error answering request ``seq`` (None if it was not an Error),
    skipping what comes unsolicited (Credit, an upload's failure announced with reply_to 0)."""
    while True:
        event = await client.receive()
        if getattr(event, "reply_to", 0) == seq:
            return getattr(event, "code", None)


async def test_s8_a_zero_byte_write_is_acked_with_the_committed_offset_wherever_it_points(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    client = await raw_client(proxy_server, versions=(1, 2))
    await client.open(gcs_bucket, "empty-writes.bin")
    for offset in (0, 5, 2**40):  # inside, and far outside, the window
        seq = await client.send(WriteAt(offset, b""))
        with trio.fail_after(5):
            ack = await client.reply(Ack)
        assert (ack.reply_to, ack.committed_offset) == (seq, 0)


async def test_s9_an_overlapping_resend_with_other_bytes_is_acked_and_the_first_copy_wins(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    client = await raw_client(proxy_server, versions=(1, 2))
    await client.open(gcs_bucket, "first-copy.bin")
    data = os.urandom(64 * KiB)
    await send_range(client, data, 0, len(data))
    # The same range again with other bytes, and a write straddling the end of what is held.
    await client.write(1000, os.urandom(2000))
    tail = os.urandom(4 * KiB)
    await client.write(len(data) - 1000, data[-1000:] + tail)
    whole = data + tail
    await client.send(Complete(len(whole), google_crc32c.value(whole)))
    with trio.fail_after(10):
        completed = await client.reply(Completed)
    assert completed.size == len(whole)
    stored = proxy_server.backend.client.bucket(gcs_bucket).blob("first-copy.bin")
    assert stored.download_as_bytes() == whole


async def test_s9_a_checksum_mismatch_is_final_for_every_later_request(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    client = await raw_client(proxy_server, versions=(1, 2))
    opened = await client.open(gcs_bucket, "wrong-crc.bin")
    data = os.urandom(32 * KiB)
    await send_range(client, data, 0, len(data))
    right = google_crc32c.value(data)
    # The COMPLETE, then STATUS, a corrected COMPLETE, and an ATTACH from another
    # connection: each is answered with the same error.
    for request in (Complete(len(data), right ^ 1), StatusQuery(), Complete(len(data), right)):
        with trio.fail_after(10):
            assert (
                await answer_to(client, await client.send(request))
            ) is ErrorCode.CHECKSUM_MISMATCH
    other = await raw_client(proxy_server, versions=(1, 2))
    seq = await other.send(AttachUpload(opened.token))
    assert (await answer_to(other, seq)) is ErrorCode.CHECKSUM_MISMATCH
    assert proxy_server.backend.client.bucket(gcs_bucket).get_blob("wrong-crc.bin") is None
