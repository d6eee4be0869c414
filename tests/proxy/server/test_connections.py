"""Connection-level behaviour: corrupt payloads, pings, idle connections and idle uploads."""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import struct
from collections.abc import Awaitable, Callable

import trio
from google.cloud import storage  # type: ignore[import-untyped]

from protocol import (
    Ack,
    AttachUpload,
    Complete,
    Completed,
    ConnectionClosed,
    Error,
    ErrorCode,
    Ping,
    Pong,
    StatusQuery,
    UploadOpened,
    WriteAt,
)
from protocol import Status as StatusReply
from proxy.server import ProxyServer
from proxy.server.settings import KiB, MiB
from proxy.server.uploads import UploadState
from tests.proxy.conftest import RawClient
from tests.proxy.server.test_uploads import send_range

Connect = Callable[..., Awaitable[RawClient]]
StartProxy = Callable[..., contextlib.AbstractAsyncContextManager[ProxyServer]]


async def test_corrupt_payload_is_refused_and_the_connection_goes_on(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    data = os.urandom(256 * KiB)
    client = await raw_client(proxy_server)
    await client.open(gcs_bucket, "corrupt.bin")
    frame = bytearray(b"".join(client.protocol.send(WriteAt(0, data))))
    frame[-1] ^= 0xFF  # the payload's last byte: the header (and its CRC) stay intact

    await client.send_raw(bytes(frame))
    error = await client.error()

    assert error.code is ErrorCode.BAD_CRC
    assert error.retryable
    assert error.reply_to == client.protocol.last_sent_seq
    await client.send(StatusQuery())
    assert (await client.reply(StatusReply)).received == ()  # nothing of it was kept
    await client.write(0, data)  # the same frame again, intact this time
    await client.send(Complete(len(data)))
    assert (await client.reply(Completed)).size == len(data)


async def test_ping_is_answered_with_its_nonce(
    proxy_server: ProxyServer, raw_client: Connect
) -> None:
    client = await raw_client(proxy_server)
    seq = await client.send(Ping(424242))
    pong = await client.reply(Pong)
    assert (pong.reply_to, pong.nonce) == (seq, 424242)


async def test_idle_connection_is_told_and_closed(
    start_proxy: StartProxy, raw_client: Connect
) -> None:
    async with start_proxy(idle_timeout=0.5) as server:
        client = await raw_client(server)
        with trio.fail_after(10):
            # The timeout counts from the last byte: 1.2 s of pings, never idle for 0.5 s
            for nonce in range(6):
                await trio.sleep(0.2)
                await client.send(Ping(nonce))
                assert (await client.reply(Pong)).nonce == nonce
            error = await client.error()
        assert error.code is ErrorCode.IDLE_TIMEOUT
        assert error.reply_to == 0
        assert isinstance(await client.receive(), ConnectionClosed)


async def test_idle_upload_is_released_and_resumes_from_its_token(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str
) -> None:
    data = os.urandom(MiB + 5)
    async with start_proxy(upload_idle_timeout=0.3) as server:
        client = await raw_client(server)
        opened = await client.open(gcs_bucket, "idle.bin")
        await send_range(client, data, 0, 512 * KiB)
        (upload,) = server.registry.uploads()
        await client.aclose()  # nobody attached from here on
        with trio.fail_after(10):
            await upload.wait_finished()
        assert upload.state is UploadState.RELEASED

        again = await raw_client(server)
        await again.send(AttachUpload(opened.token))
        attached = await again.reply(UploadOpened)
        assert attached.resumed
        await send_range(again, data, attached.committed_offset, len(data))
        await again.send(Complete(len(data)))
        assert (await again.reply(Completed)).size == len(data)


async def test_attached_connection_keeps_an_upload_from_going_idle(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str
) -> None:
    async with start_proxy(upload_idle_timeout=0.2) as server:
        client = await raw_client(server)
        await client.open(gcs_bucket, "kept.bin")
        await trio.sleep(0.6)
        await client.send(StatusQuery())
        reply = await client.receive()
        while not isinstance(reply, StatusReply | Error):
            reply = await client.receive()
        assert isinstance(reply, StatusReply), reply


async def test_a_client_that_resets_mid_frame_leaves_its_upload_to_resume(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str, storage_client: storage.Client
) -> None:
    data = os.urandom(MiB + 7)
    client = await raw_client(proxy_server)
    opened = await client.open(gcs_bucket, "reset.bin", expected_size=len(data))
    await send_range(client, data, 0, 256 * KiB)
    frame = b"".join(client.protocol.send(WriteAt(256 * KiB, data[256 * KiB : 512 * KiB])))
    await client.send_raw(frame[: len(frame) // 2])
    # SO_LINGER 0: the close sends a reset, which the proxy reads as an error, not an EOF
    assert isinstance(client.stream, trio.SocketStream)
    client.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await client.aclose()

    again = await raw_client(proxy_server)
    await again.send(AttachUpload(opened.token))
    attached = await again.reply(UploadOpened)
    await send_range(again, data, attached.committed_offset, len(data))
    await again.send(Complete(len(data)))
    with trio.fail_after(30):
        assert (await again.reply(Completed)).size == len(data)
    stored = storage_client.bucket(gcs_bucket).blob("reset.bin").download_as_bytes()
    assert stored == data


async def test_a_frame_whose_data_trickles_in_is_read_whole_and_never_idle(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str, storage_client: storage.Client
) -> None:
    data = os.urandom(250 * KiB)
    async with start_proxy(idle_timeout=0.5) as server:
        client = await raw_client(server)
        await client.open(gcs_bucket, "trickle.bin", expected_size=len(data))
        frame = b"".join(client.protocol.send(WriteAt(0, data)))
        # 1.2 s for the frame's data, in 7 pieces: never 0.5 s without a byte
        cuts = [0, 40, 50 * KiB, 51 * KiB, 120 * KiB, 200 * KiB, 249 * KiB, len(frame)]
        with trio.fail_after(10):
            for begin, end in itertools.pairwise(cuts):
                await client.send_raw(frame[begin:end])
                await trio.sleep(0.2)
            assert (await client.reply(Ack)).committed_offset >= 0
            await client.send(Complete(len(data)))
            assert (await client.reply(Completed)).size == len(data)
    stored = storage_client.bucket(gcs_bucket).blob("trickle.bin").download_as_bytes()
    assert stored == data


async def test_a_client_that_stops_partway_through_a_frames_data_is_told_idle(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str
) -> None:
    async with start_proxy(idle_timeout=0.5) as server:
        client = await raw_client(server)
        await client.open(gcs_bucket, "stalled.bin")
        frame = b"".join(client.protocol.send(WriteAt(0, os.urandom(100 * KiB))))
        await client.send_raw(frame[: len(frame) // 2])
        with trio.fail_after(10):
            error = await client.error()
        assert error.code is ErrorCode.IDLE_TIMEOUT
        (upload,) = server.registry.uploads()
        assert upload.received_ranges() == ()  # nothing of the cut frame was kept
