"""Uploads through the server, frame by frame: credit, acks, Complete, Abort, attach, resume."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable

import google_crc32c
import trio
from google.cloud import storage  # type: ignore[import-untyped]

from protocol import (
    Abort,
    Ack,
    AttachUpload,
    Complete,
    Completed,
    Credit,
    Error,
    ErrorCode,
    StatusQuery,
    UploadOpened,
    WriteAt,
)
from protocol import Status as StatusReply
from proxy.server import ProxyServer
from proxy.server.budget import window_cost
from proxy.server.settings import KiB, MiB
from proxy.server.uploads import UploadState
from tests.proxy.conftest import RawClient

Connect = Callable[..., Awaitable[RawClient]]
StartProxy = Callable[..., contextlib.AbstractAsyncContextManager[ProxyServer]]

FRAME = 128 * KiB


def _payload(size: int) -> bytes:
    return os.urandom(size)


async def send_range(client: RawClient, data: bytes, start: int, end: int) -> int:
    """Write ``data[start:end]`` in frames, waiting for credit; returns the last Ack's offset."""
    committed = 0
    offset = start
    while offset < end:
        stop = min(offset + FRAME, end)
        while client.credit is None or client.credit.window_end < stop:
            await client.receive()
        committed = (await client.write(offset, data[offset:stop])).committed_offset
        offset = stop
    return committed


def _stored(storage_client: storage.Client, bucket: str, name: str) -> bytes:
    return bytes(storage_client.bucket(bucket).blob(name).download_as_bytes())


async def test_single_connection_upload_lands_byte_for_byte(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str, storage_client: storage.Client
) -> None:
    data = _payload(10 * MiB + 12345)  # larger than the 4 MiB window: credit must move
    client = await raw_client(proxy_server)
    opened = await client.open(gcs_bucket, "one.bin", expected_size=len(data))
    assert opened.committed_offset == 0
    assert not opened.resumed

    await send_range(client, data, 0, len(data))
    await client.send(Complete(len(data), google_crc32c.value(data)))
    completed = await client.reply(Completed)

    assert completed.size == len(data)
    assert completed.crc32c == google_crc32c.value(data)
    assert await trio.to_thread.run_sync(_stored, storage_client, gcs_bucket, "one.bin") == data


async def test_second_complete_returns_the_same_result(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    data = _payload(300 * KiB)
    client = await raw_client(proxy_server)
    opened = await client.open(gcs_bucket, "twice.bin")
    await send_range(client, data, 0, len(data))
    await client.send(Complete(len(data)))
    first = await client.reply(Completed)

    again = await raw_client(proxy_server)
    await again.send(AttachUpload(opened.token))
    await again.reply(UploadOpened)
    seq = await again.send(Complete(len(data)))
    second = await again.reply(Completed)

    assert second.reply_to == seq
    assert (second.generation, second.size, second.crc32c, second.md5) == (
        first.generation,
        first.size,
        first.crc32c,
        first.md5,
    )


async def test_a_frame_resent_after_completion_is_acknowledged_not_refused(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    # A client can still have a frame in flight on one connection when its Complete
    # succeeds on another: the object holds those bytes, so the resend is answered
    # harmlessly rather than with INVALID_STATE, which would fail a finished upload.
    data = _payload(300 * KiB)
    client = await raw_client(proxy_server)
    opened = await client.open(gcs_bucket, "late.bin")
    await send_range(client, data, 0, len(data))
    await client.send(Complete(len(data)))
    await client.reply(Completed)

    late = await raw_client(proxy_server)
    await late.send(AttachUpload(opened.token))
    await late.reply(UploadOpened)
    ack = await late.write(FRAME, data[FRAME : 2 * FRAME])
    assert ack.committed_offset == len(data)

    # Beyond the object, a write is still a mistake.
    await late.send(WriteAt(offset=len(data), data=b"x"))
    refused = await late.reply(Error)
    assert refused.code == ErrorCode.INVALID_STATE


async def test_out_of_order_ranges_over_two_connections(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str, storage_client: storage.Client
) -> None:
    data = _payload(3 * MiB + 7)
    # A window that starts large enough for the whole object: a client writing out of
    # order must stay inside the window it was granted, and this one starts with the tail.
    async with start_proxy(min_upload_window=4 * MiB) as proxy_server:
        await _out_of_order(proxy_server, raw_client, gcs_bucket, storage_client, data)


async def _out_of_order(
    proxy_server: ProxyServer,
    raw_client: Connect,
    gcs_bucket: str,
    storage_client: storage.Client,
    data: bytes,
) -> None:
    first = await raw_client(proxy_server)
    opened = await first.open(gcs_bucket, "ooo.bin")
    second = await raw_client(proxy_server)
    await second.send(AttachUpload(opened.token))
    attached = await second.reply(UploadOpened)
    assert not attached.resumed

    middle = len(data) // 2
    # The second half first, on the other connection: it waits in the buffer for the head.
    await send_range(second, data, middle, len(data))
    await send_range(first, data, 0, middle)
    await first.send(Complete(len(data)))
    completed = await first.reply(Completed)

    assert completed.size == len(data)
    assert await trio.to_thread.run_sync(_stored, storage_client, gcs_bucket, "ooo.bin") == data


async def test_a_complete_waiting_for_bytes_is_answered_as_soon_as_they_arrive(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str
) -> None:
    # Smaller than the smallest chunk: no byte is sent to GCS before the Complete, so it is
    # the bytes' arrival itself, not a chunk's acknowledgement, that must wake it.
    data = _payload(200 * KiB)
    middle = len(data) // 2
    # The Complete could wait this long for the missing bytes: it must not, once they came.
    async with start_proxy(complete_timeout=30.0) as server:
        first = await raw_client(server)
        opened = await first.open(gcs_bucket, "late-bytes.bin")
        second = await raw_client(server)
        await second.send(AttachUpload(opened.token))
        await second.reply(UploadOpened)
        await send_range(first, data, middle, len(data))
        await first.send(Complete(len(data)))
        with trio.fail_after(5):
            await trio.sleep(0.2)  # the Complete is waiting by now
            await send_range(second, data, 0, middle)
            assert (await first.reply(Completed)).size == len(data)


async def test_resent_ranges_are_harmless(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str, storage_client: storage.Client
) -> None:
    data = _payload(2 * MiB)
    client = await raw_client(proxy_server)
    await client.open(gcs_bucket, "resend.bin")
    await send_range(client, data, 0, MiB)
    await send_range(client, data, 0, 2 * MiB)  # everything again, overlapping what went before
    await client.send(Complete(len(data)))
    await client.reply(Completed)

    assert await trio.to_thread.run_sync(_stored, storage_client, gcs_bucket, "resend.bin") == data


async def test_status_reports_received_ranges(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    data = _payload(512 * KiB)
    client = await raw_client(proxy_server)
    await client.open(gcs_bucket, "status.bin")
    await send_range(client, data, 256 * KiB, 512 * KiB)

    await client.send(StatusQuery())
    status = await client.reply(StatusReply)

    assert status.committed_offset == 0
    assert status.received == ((256 * KiB, 512 * KiB),)
    assert status.window_end >= 512 * KiB


async def test_complete_with_missing_ranges_names_them(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str
) -> None:
    data = _payload(600 * KiB)
    async with start_proxy(complete_timeout=0.5) as server:
        client = await raw_client(server)
        await client.open(gcs_bucket, "gaps.bin")
        await send_range(client, data, 0, 100 * KiB)
        await send_range(client, data, 200 * KiB, 600 * KiB)

        await client.send(Complete(len(data)))
        error = await client.error()

        assert error.code is ErrorCode.MISSING_RANGES
        assert f"[{100 * KiB}, {200 * KiB})" in error.message

        # The gap can still be filled, and a new Complete then succeeds.
        await send_range(client, data, 100 * KiB, 200 * KiB)
        await client.send(Complete(len(data)))
        assert (await client.reply(Completed)).size == len(data)


async def test_abort_racing_writes_fails_them_all_with_aborted(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str, storage_client: storage.Client
) -> None:
    data = _payload(2 * MiB)
    aborter = await raw_client(proxy_server)
    opened = await aborter.open(gcs_bucket, "aborted.bin")
    writers = [await raw_client(proxy_server) for _ in range(3)]
    for writer in writers:
        await writer.send(AttachUpload(opened.token))
        await writer.reply(UploadOpened)

    outcomes: list[type] = []

    async def keep_writing(client: RawClient, start: int) -> None:
        # Pipelined: frames go out without waiting for their replies.
        for offset in range(start, start + 512 * KiB, FRAME):
            with contextlib.suppress(trio.BrokenResourceError):
                await client.send(WriteAt(offset, data[offset : offset + FRAME]))
        for _ in range(4):
            reply = await client.receive()
            while isinstance(reply, Credit):
                reply = await client.receive()
            assert isinstance(reply, Ack | Error), reply
            outcomes.append(type(reply))
            if isinstance(reply, Error):
                assert reply.code is ErrorCode.ABORTED
                return

    (upload,) = proxy_server.registry.uploads()
    async with trio.open_nursery() as nursery:
        for index, writer in enumerate(writers):
            nursery.start_soon(keep_writing, writer, index * 512 * KiB)
        seq = await aborter.send(Abort())
        reply = await aborter.reply(Ack)
        assert reply.reply_to == seq
        # The reply came only once every task of the upload was gone.
        assert upload.finished
        assert upload.state is UploadState.ABORTED

    assert Error in outcomes or len(outcomes) == 12
    # Nothing more goes into the aborted upload, on any connection.
    await writers[0].send(StatusQuery())
    assert (await writers[0].error()).code in (ErrorCode.ABORTED, ErrorCode.UNEXPECTED_FRAME)
    blob = storage_client.bucket(gcs_bucket).blob("aborted.bin")
    assert not await trio.to_thread.run_sync(blob.exists)


async def test_upload_resumes_through_a_restarted_proxy(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str, storage_client: storage.Client
) -> None:
    data = _payload(5 * MiB + 99)
    key = os.urandom(32)
    async with start_proxy(token_key=key) as first:
        client = await raw_client(first)
        opened = await client.open(gcs_bucket, "restart.bin")
        await send_range(client, data, 0, 3 * MiB)
        # Wait until GCS holds some of it, so there is something to resume from.
        with trio.fail_after(20):
            while True:
                await client.send(StatusQuery())
                if (await client.reply(StatusReply)).committed_offset >= MiB:
                    break
                await trio.sleep(0.05)
        await client.aclose()

    async with start_proxy(token_key=key) as second:
        client = await raw_client(second)
        await client.send(AttachUpload(opened.token))
        attached = await client.reply(UploadOpened)
        assert attached.resumed
        assert MiB <= attached.committed_offset <= 3 * MiB
        assert attached.committed_offset % (256 * KiB) == 0

        await send_range(client, data, attached.committed_offset, len(data))
        await client.send(Complete(len(data), google_crc32c.value(data)))
        completed = await client.reply(Completed)

    assert completed.crc32c == google_crc32c.value(data)
    assert await trio.to_thread.run_sync(_stored, storage_client, gcs_bucket, "restart.bin") == data


async def test_shutdown_sends_going_away_and_leaves_upload_resumable(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str
) -> None:
    from protocol import GoingAway

    key = os.urandom(32)
    data = _payload(MiB)
    async with start_proxy(token_key=key) as server:
        client = await raw_client(server)
        opened = await client.open(gcs_bucket, "leaving.bin")
        await send_range(client, data, 0, 512 * KiB)
        server.shutdown()
        assert isinstance(await client.reply(GoingAway), GoingAway)

    async with start_proxy(token_key=key) as server:
        client = await raw_client(server)
        await client.send(AttachUpload(opened.token))
        attached = await client.reply(UploadOpened)
        assert attached.resumed
        await send_range(client, data, attached.committed_offset, len(data))
        await client.send(Complete(len(data)))
        assert (await client.reply(Completed)).size == len(data)


async def test_complete_with_a_wrong_size_is_refused_and_can_be_corrected(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    data = _payload(300 * KiB)
    client = await raw_client(proxy_server)
    await client.open(gcs_bucket, "sized.bin")
    await send_range(client, data, 0, len(data))

    await client.send(Complete(100 * KiB))  # fewer bytes than were written
    error = await client.error()
    assert error.code is ErrorCode.SIZE_MISMATCH

    await client.send(Complete(len(data)))
    assert (await client.reply(Completed)).size == len(data)


async def test_complete_after_a_restart_returns_the_finished_object(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str
) -> None:
    # The Completed reply was lost with the first proxy; the client asks again elsewhere.
    data = _payload(700 * KiB)
    key = os.urandom(32)
    async with start_proxy(token_key=key) as first:
        client = await raw_client(first)
        opened = await client.open(gcs_bucket, "finished.bin")
        await send_range(client, data, 0, len(data))
        await client.send(Complete(len(data)))
        completed = await client.reply(Completed)

    async with start_proxy(token_key=key) as second:
        client = await raw_client(second)
        await client.send(AttachUpload(opened.token))
        attached = await client.reply(UploadOpened)
        assert attached.committed_offset == len(data)
        await client.send(Complete(len(data)))
        again = await client.reply(Completed)

    assert (again.generation, again.size, again.crc32c) == (
        completed.generation,
        completed.size,
        completed.crc32c,
    )


async def test_a_window_never_grows_past_the_declared_size(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str, storage_client: storage.Client
) -> None:
    data = _payload(MiB + 300 * KiB)  # its whole window: 1.5 MiB (whole 256 KiB quanta)
    client = await raw_client(proxy_server)
    await client.open(gcs_bucket, "capped.bin", expected_size=len(data))
    reserved = proxy_server.metrics.registry.get_sample_value
    most = 0.0
    for start in range(0, len(data), FRAME):
        await send_range(client, data, start, min(start + FRAME, len(data)))
        most = max(most, reserved("rup_buffer_reserved_bytes") or 0.0)
    await client.send(Complete(len(data), google_crc32c.value(data)))
    assert (await client.reply(Completed)).size == len(data)

    writer = proxy_server.settings.writer
    # It grew from its first 1 MiB (half of that arrived), but only to what it must hold.
    assert window_cost(writer, MiB) < most <= window_cost(writer, MiB + 512 * KiB)
    assert _stored(storage_client, gcs_bucket, "capped.bin") == data
