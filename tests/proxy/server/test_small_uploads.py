"""Small objects through OPEN_UPLOAD, WRITE_AT and COMPLETE: one GCS request, no session.

An upload whose declared size is below its first chunk can have no chunk due before COMPLETE,
so the proxy starts no resumable session for it and stores it with one multipart request at
COMPLETE. Its token then resumes nothing (no byte of it is durable before the object is):
another instance starts it again from byte 0, unless it was aborted or completed meanwhile.
Version-1 clients get this too; it changes nothing on the wire.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable

import google_crc32c
import trio

from faultnet.gcs import GcsServer
from protocol import (
    Abort,
    Ack,
    AttachUpload,
    Complete,
    Completed,
    Error,
    ErrorCode,
    OpenUpload,
    UploadOpened,
)
from proxy.server import ProxyServer
from proxy.server.settings import KiB
from tests.proxy.conftest import RawClient

Connect = Callable[..., Awaitable[RawClient]]
StartProxy = Callable[..., contextlib.AbstractAsyncContextManager[ProxyServer]]

SMALL = 100 * KiB  # within the test settings' one_request_limit (128 KiB)


async def wait_for_credit(client: RawClient, end: int) -> None:
    with trio.fail_after(10):
        while client.credit is None or client.credit.window_end < end:
            await client.receive()


async def test_a_small_upload_opens_no_session_and_is_stored_at_complete(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str, gcs_server: GcsServer
) -> None:
    data = os.urandom(SMALL)
    client = await raw_client(proxy_server)  # version 1: nothing on the wire changes
    await client.open(gcs_bucket, "small.bin", expected_size=len(data))
    await wait_for_credit(client, len(data))
    await client.write(0, data)
    assert gcs_server.store.sessions() == []
    await client.send(Complete(len(data), google_crc32c.value(data)))
    with trio.fail_after(10):
        completed = await client.reply(Completed)
    assert (completed.size, completed.crc32c) == (len(data), google_crc32c.value(data))
    assert completed.md5 is not None  # one request, not a compose: GCS gives an MD5
    stored = proxy_server.backend.client.bucket(gcs_bucket).blob("small.bin")
    assert stored.download_as_bytes() == data
    assert gcs_server.store.sessions() == []


async def test_another_instance_starts_it_again_from_byte_zero(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str
) -> None:
    key = os.urandom(32)
    data = os.urandom(SMALL)
    async with start_proxy(token_key=key) as one, start_proxy(token_key=key) as two:
        first = await raw_client(one, versions=(1, 2))
        opened = await first.open(gcs_bucket, "moved.bin", expected_size=len(data))
        await first.write(0, data[: len(data) // 2])
        await first.aclose()  # the client moves to another instance (as after a crash)
        second = await raw_client(two, versions=(1, 2))
        await second.send(AttachUpload(opened.token))
        attached = await second.reply(UploadOpened)
        assert (attached.resumed, attached.committed_offset) == (True, 0)
        await wait_for_credit(second, len(data))
        await second.write(0, data)
        await second.send(Complete(len(data), google_crc32c.value(data)))
        with trio.fail_after(10):
            await second.reply(Completed)
        stored = two.backend.client.bucket(gcs_bucket).blob("moved.bin").download_as_bytes()
        assert stored == data
        generation = two.backend.client.bucket(gcs_bucket).get_blob("moved.bin").generation
        # Completed: the token never writes again. Wherever it is attached (here the first
        # instance, which still holds its copy), other bytes are refused by GCS at COMPLETE:
        # the generation pinned at the open has moved.
        stale = await raw_client(one, versions=(1, 2))
        await stale.send(AttachUpload(opened.token))
        await stale.reply(UploadOpened)
        await wait_for_credit(stale, len(data))
        await stale.write(0, os.urandom(len(data)))
        await stale.send(Complete(len(data)))
        with trio.fail_after(10):
            assert (await stale.reply(Error)).code is ErrorCode.PRECONDITION_FAILED
        blob = two.backend.client.bucket(gcs_bucket).get_blob("moved.bin")
        assert blob.generation == generation


async def test_a_small_upload_stored_before_its_answer_was_lost_completes_elsewhere(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str
) -> None:
    # The first instance stores the object, but the client never hears COMPLETED (the
    # instance went away first, as in a drain). Attached to another instance, the same
    # bytes complete with the object already there: the client is told it succeeded.
    key = os.urandom(32)
    data = os.urandom(SMALL)
    crc = google_crc32c.value(data)
    async with start_proxy(token_key=key) as one, start_proxy(token_key=key) as two:
        first = await raw_client(one, versions=(1, 2))
        opened = await first.open(gcs_bucket, "lost-answer.bin", expected_size=len(data))
        await wait_for_credit(first, len(data))
        await first.write(0, data)
        await first.send(Complete(len(data), crc))
        with trio.fail_after(10):
            first_answer = await first.reply(Completed)
        await first.aclose()  # as if the answer had been lost with the connection
        stored = one.backend.client.bucket(gcs_bucket).get_blob("lost-answer.bin")
        assert stored.generation == first_answer.generation
        second = await raw_client(two, versions=(1, 2))
        await second.send(AttachUpload(opened.token))
        assert (await second.reply(UploadOpened)).resumed
        await wait_for_credit(second, len(data))
        await second.write(0, data)
        await second.send(Complete(len(data), crc))
        with trio.fail_after(10):
            completed = await second.reply(Completed)
        assert (completed.generation, completed.size, completed.crc32c) == (
            stored.generation,
            len(data),
            crc,
        )


async def test_an_aborted_small_upload_is_never_written_from_its_token(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str
) -> None:
    key = os.urandom(32)
    async with start_proxy(token_key=key) as one, start_proxy(token_key=key) as two:
        client = await raw_client(one, versions=(1, 2))
        await client.send(OpenUpload(gcs_bucket, "aborted.bin", expected_size=SMALL))
        opened = await client.reply(UploadOpened)
        await client.send(Abort())
        await client.reply(Ack)
        other = await raw_client(two, versions=(1, 2))
        await other.send(AttachUpload(opened.token))
        refused = await other.reply(Error)
        assert refused.code is ErrorCode.ABORTED
        assert two.backend.client.bucket(gcs_bucket).get_blob("aborted.bin") is None


async def test_up_to_the_limit_the_first_window_holds_the_whole_object(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str, gcs_server: GcsServer
) -> None:
    # 3 MiB: several frames and chunks' worth, but declared within one_request_limit.
    data = os.urandom(3 * 1024 * KiB + 5)
    async with start_proxy(one_request_limit=8 * 1024 * KiB) as proxy:
        client = await raw_client(proxy, versions=(1, 2))
        opened = await client.open(gcs_bucket, "whole.bin", expected_size=len(data))
        assert opened.window_end is not None
        assert opened.window_end >= len(data)  # everything may be sent at once
        for offset in range(0, len(data), 256 * KiB):
            ack = await client.write(offset, data[offset : offset + 256 * KiB])
            assert ack.committed_offset == 0  # nothing durable before COMPLETE
        assert gcs_server.store.sessions() == []
        await client.send(Complete(len(data), google_crc32c.value(data)))
        with trio.fail_after(10):
            completed = await client.reply(Completed)
        assert completed.md5 is not None
        stored = proxy.backend.client.bucket(gcs_bucket).blob("whole.bin").download_as_bytes()
        assert stored == data
