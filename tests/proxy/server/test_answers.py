"""Every request gets an answer (issue 12's server bugs), each checked through a raw socket
by a client that knows nothing of rup's client library."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable

import google_crc32c
import trio
from google.cloud import storage  # type: ignore[import-untyped]

from protocol import (
    MAX_MESSAGE_SIZE,
    Ack,
    AttachUpload,
    Complete,
    Completed,
    Credit,
    ErrorCode,
    Incomplete,
    OpenUpload,
    Ping,
    Pong,
    Status,
    StatusQuery,
    UploadOpened,
    WriteAt,
)
from proxy.server import ProxyServer
from proxy.server.settings import KiB, MiB
from tests.proxy.conftest import RawClient
from tests.proxy.server.test_uploads import send_range

Connect = Callable[..., Awaitable[RawClient]]
StartProxy = Callable[..., contextlib.AbstractAsyncContextManager[ProxyServer]]

LATEST = (1, 2)


def _sample(server: ProxyServer, name: str) -> float:
    return server.metrics.registry.get_sample_value(name) or 0.0


async def _still_talking(client: RawClient) -> None:
    await client.send(Ping(42))
    assert (await client.reply(Pong)).nonce == 42


async def test_an_open_whose_token_would_be_too_large_is_refused_before_anything_exists(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    metadata = tuple((f"k{index}", "v") for index in range(6000))  # about 48 KB
    for versions, code in ((LATEST, ErrorCode.INVALID_REQUEST), ((1,), ErrorCode.GCS_ERROR)):
        client = await raw_client(proxy_server, versions=versions)
        await client.send(OpenUpload(gcs_bucket, "heavy.bin", metadata=metadata))
        with trio.fail_after(5):
            error = await client.error()
        assert error.code is code
        assert "token" in error.message
        await _still_talking(client)
    assert not proxy_server.registry.uploads()
    assert _sample(proxy_server, "rup_active_uploads") == 0
    assert _sample(proxy_server, "rup_buffer_reserved_bytes") == 0


async def test_an_error_quoting_a_huge_or_hostile_name_still_encodes(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    client = await raw_client(proxy_server, versions=LATEST)
    for name in ("n" * 60_000, "\x1b[2J" + "x" * 3000):  # too long for a token; for GCS
        await client.send(OpenUpload(gcs_bucket, name))
        with trio.fail_after(5):
            error = await client.error()
        assert error.code in (ErrorCode.INVALID_REQUEST, ErrorCode.GCS_ERROR)
        assert len(error.message.encode()) <= MAX_MESSAGE_SIZE
        assert error.message.isprintable()
        await _still_talking(client)


async def test_a_write_past_the_declared_size_is_a_size_mismatch_not_a_credit_violation(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    client = await raw_client(proxy_server)
    await client.open(gcs_bucket, "declared.bin", expected_size=100)
    await client.send(WriteAt(90, b"z" * 20))
    error = await client.error()
    assert error.code is ErrorCode.SIZE_MISMATCH
    assert not error.retryable
    await _still_talking(client)  # a wrong request, not a broken connection
    data = os.urandom(100)
    await client.write(0, data)
    await client.send(Complete(100, google_crc32c.value(data)))
    assert (await client.reply(Completed)).size == 100


async def test_a_complete_with_missing_bytes_is_answered_at_once_with_the_list(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str, storage_client: storage.Client
) -> None:
    data = os.urandom(600 * KiB)
    async with start_proxy(complete_timeout=0.0) as server:
        client = await raw_client(server, versions=LATEST)
        await client.open(gcs_bucket, "holes.bin")
        await send_range(client, data, 0, 100 * KiB)
        await send_range(client, data, 200 * KiB, 300 * KiB)

        started = trio.current_time()
        await client.send(Complete(len(data), google_crc32c.value(data)))
        incomplete = await client.reply(Incomplete)
        assert trio.current_time() - started < 2
        assert incomplete.missing == ((100 * KiB, 200 * KiB), (300 * KiB, 600 * KiB))

        # The connection stayed bound: send what is missing, then complete again.
        for start, end in incomplete.missing:
            await send_range(client, data, start, end)
        await client.send(Complete(len(data), google_crc32c.value(data)))
        assert (await client.reply(Completed)).size == len(data)

        # A version-1 client gets MISSING_RANGES, which its table says is not retryable.
        old = await raw_client(server)
        await old.open(gcs_bucket, "holes-v1.bin")
        await send_range(old, data, 0, 100 * KiB)
        await old.send(Complete(len(data)))
        error = await old.error()
        assert error.code is ErrorCode.MISSING_RANGES
        assert not error.retryable
        assert f"[{100 * KiB}, {len(data)})" in error.message


async def test_window_end_never_goes_down_on_any_connection_under_concurrent_writers(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str, storage_client: storage.Client
) -> None:
    data = os.urandom(6 * MiB)
    async with start_proxy(min_upload_window=MiB, upload_buffer_limit=2 * MiB) as server:
        first = await raw_client(server, versions=LATEST)
        opened = await first.open(gcs_bucket, "four-ways.bin")
        clients = [first]
        for _ in range(3):
            other = await raw_client(server, versions=LATEST)
            await other.send(AttachUpload(opened.token))
            await other.reply(UploadOpened)
            clients.append(other)
        seen: list[list[int]] = [[] for _ in clients]
        frame = 64 * KiB

        async def writer(index: int, client: RawClient) -> None:
            # Frames dealt round-robin: each connection waits for credit from any of them.
            offsets = range(index * frame, len(data), frame * len(clients))
            for offset in offsets:
                stop = min(offset + frame, len(data))
                while client.credit is None or client.credit.window_end < stop:
                    event = await client.receive()
                    if isinstance(event, Credit):
                        seen[index].append(event.window_end)
                await client.send(WriteAt(offset, data[offset:stop]))
                while isinstance(reply := await client.receive(), Credit):
                    seen[index].append(reply.window_end)
                assert isinstance(reply, Ack), reply
                await client.send(StatusQuery())
                status = await client.reply(Status)
                seen[index].append(status.window_end)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for index, client in enumerate(clients):
                    nursery.start_soon(writer, index, client)
        await first.send(Complete(len(data), google_crc32c.value(data)))
        assert (await first.reply(Completed)).size == len(data)

    for window_ends in seen:
        assert window_ends
        assert window_ends == sorted(window_ends), window_ends
    assert max(max(ends) for ends in seen) > 2 * MiB  # the window did move (and grow)
