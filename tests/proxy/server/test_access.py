"""Who may talk to the proxy and write where: bearer auth, TLS, tokens, allow-lists, limits."""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Awaitable, Callable

import trio
import trustme

from protocol import (
    PROTOCOL_VERSION,
    AttachUpload,
    Complete,
    Completed,
    ErrorCode,
    Hello,
    OpenUpload,
    UploadOpened,
)
from proxy.server import ProxyServer
from proxy.server.budget import window_cost
from proxy.server.settings import MiB, ServerSettings
from tests.proxy.conftest import RawClient
from tests.proxy.server.test_uploads import send_range

Connect = Callable[..., Awaitable[RawClient]]
StartProxy = Callable[..., contextlib.AbstractAsyncContextManager[ProxyServer]]


async def test_wrong_bearer_token_is_refused_and_closed(
    start_proxy: StartProxy, raw_client: Connect
) -> None:
    async with start_proxy(auth_tokens=("right-token", "other-token")) as server:
        client = await raw_client(server, hello=False)
        await client.send(Hello((PROTOCOL_VERSION,), 256 * 1024, auth="wrong-token"))
        error = await client.error()
        assert error.code is ErrorCode.UNAUTHENTICATED
        assert "wrong-token" not in error.message
        await client.closed()


async def test_missing_bearer_token_is_refused(
    start_proxy: StartProxy, raw_client: Connect
) -> None:
    async with start_proxy(auth_tokens=("right-token",)) as server:
        client = await raw_client(server, hello=False)
        await client.send(Hello((PROTOCOL_VERSION,), 256 * 1024))
        assert (await client.error()).code is ErrorCode.UNAUTHENTICATED


async def test_any_configured_bearer_token_is_accepted(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str
) -> None:
    async with start_proxy(auth_tokens=("right-token", "other-token")) as server:
        client = await raw_client(server, auth="other-token")
        opened = await client.open(gcs_bucket, "authed.bin")
        assert opened.token


async def test_tampered_upload_token_is_refused(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    owner = await raw_client(proxy_server)
    opened = await owner.open(gcs_bucket, "tampered.bin")
    tampered = bytearray(opened.token)
    tampered[len(tampered) // 2] ^= 0x40

    intruder = await raw_client(proxy_server)
    await intruder.send(AttachUpload(bytes(tampered)))
    error = await intruder.error()

    assert error.code is ErrorCode.BAD_TOKEN
    # A refused attach leaves the connection usable: a genuine token still works.
    await intruder.send(AttachUpload(opened.token))
    await intruder.reply(type(opened))


async def test_token_from_a_proxy_with_another_key_is_refused(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str
) -> None:
    async with start_proxy(token_key=os.urandom(32)) as first:
        opened = await (await raw_client(first)).open(gcs_bucket, "foreign.bin")
    async with start_proxy(token_key=os.urandom(32)) as second:
        client = await raw_client(second)
        await client.send(AttachUpload(opened.token))
        assert (await client.error()).code is ErrorCode.BAD_TOKEN


async def test_allow_lists_refuse_other_buckets_and_prefixes(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str
) -> None:
    async with start_proxy(allowed_buckets=(gcs_bucket,), allowed_prefixes=("ok/",)) as server:
        client = await raw_client(server)
        await client.send(OpenUpload("some-other-bucket", "ok/x"))
        assert (await client.error()).code is ErrorCode.FORBIDDEN
        await client.send(OpenUpload(gcs_bucket, "elsewhere/x"))
        assert (await client.error()).code is ErrorCode.FORBIDDEN
        assert (await client.open(gcs_bucket, "ok/x")).token


async def test_exhausted_buffer_budget_answers_too_busy_and_recovers(
    start_proxy: StartProxy,
    raw_client: Connect,
    gcs_bucket: str,
    proxy_settings: ServerSettings,
) -> None:
    async with start_proxy(
        upload_buffer_limit=2 * MiB,
        min_upload_window=1 * MiB,
        # three minimum windows and the overhead of their pieces, all for one client
        total_buffer_limit=3 * window_cost(proxy_settings.writer, MiB),
        client_buffer_share=1.0,
        budget_wait=0.2,
    ) as server:
        # A burst shares the pool: windows shrink to the minimum, then the pool is gone.
        holders = [await raw_client(server) for _ in range(3)]
        for index, holder in enumerate(holders):
            await holder.open(gcs_bucket, f"budget-{index}.bin")
        late = await raw_client(server)
        await late.send(OpenUpload(gcs_bucket, "budget-late.bin"))
        error = await late.error()
        assert error.code is ErrorCode.TOO_BUSY
        assert error.retryable

        data = os.urandom(MiB)
        await send_range(holders[0], data, 0, len(data))
        await holders[0].send(Complete(len(data)))
        await holders[0].reply(Completed)
        # The finished upload gave its window back.
        assert (await late.open(gcs_bucket, "budget-late.bin")).token


async def test_a_new_upload_waits_for_budget_to_come_back(
    start_proxy: StartProxy,
    raw_client: Connect,
    gcs_bucket: str,
    proxy_settings: ServerSettings,
) -> None:
    async with start_proxy(
        upload_buffer_limit=1 * MiB,
        min_upload_window=1 * MiB,
        total_buffer_limit=window_cost(proxy_settings.writer, MiB),
        client_buffer_share=1.0,
    ) as server:
        holder = await raw_client(server)
        await holder.open(gcs_bucket, "holder.bin")
        waiter = await raw_client(server)
        await waiter.send(OpenUpload(gcs_bucket, "waiter.bin"))  # no budget left: it waits

        data = os.urandom(512 * 1024)
        await send_range(holder, data, 0, len(data))
        await holder.send(Complete(len(data)))
        await holder.reply(Completed)

        with trio.fail_after(10):
            assert (await waiter.reply(UploadOpened)).token


async def test_uploads_per_client_are_limited(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str
) -> None:
    async with start_proxy(max_uploads_per_client=1) as server:
        first = await raw_client(server)
        opened = await first.open(gcs_bucket, "mine.bin")
        second = await raw_client(server)
        await second.send(OpenUpload(gcs_bucket, "another.bin"))
        error = await second.error()
        assert error.code is ErrorCode.TOO_BUSY
        assert "1 uploads open" in error.message
        # Attaching to the upload the client already has is not a new upload.
        await second.send(AttachUpload(opened.token))
        assert not (await second.reply(UploadOpened)).resumed


async def test_connections_per_client_are_limited(
    start_proxy: StartProxy, raw_client: Connect
) -> None:
    async with start_proxy(max_connections_per_client=2) as server:
        await raw_client(server)
        await raw_client(server)
        third = await raw_client(server, hello=False)
        error = await third.error()
        assert error.code is ErrorCode.TOO_BUSY
        await third.closed()


def _tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    return server_context, client_context


async def test_tls_upload_end_to_end(start_proxy: StartProxy, gcs_bucket: str) -> None:
    server_context, client_context = _tls_contexts()
    data = os.urandom(MiB + 3)
    async with start_proxy(tls=server_context) as server:
        host, port = server.address
        stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=client_context)
        client = RawClient(stream)
        try:
            await client.hello()
            await client.open(gcs_bucket, "tls.bin")
            await send_range(client, data, 0, len(data))
            await client.send(Complete(len(data)))
            assert (await client.reply(Completed)).size == len(data)
        finally:
            await client.aclose()


async def test_plain_tcp_client_cannot_talk_to_a_tls_server(
    start_proxy: StartProxy, raw_client: Connect
) -> None:
    server_context, _ = _tls_contexts()
    async with start_proxy(tls=server_context, handshake_timeout=2.0) as server:
        client = await raw_client(server, hello=False)
        await client.send(Hello((PROTOCOL_VERSION,), 256 * 1024))
        with trio.fail_after(10):
            while chunk := await _receive_or_eof(client.stream):
                assert b"\xabRUP" not in chunk  # whatever comes back is TLS, never a frame


async def _receive_or_eof(stream: trio.abc.Stream) -> bytes:
    try:
        return bytes(await stream.receive_some(65536))
    except trio.BrokenResourceError:
        return b""
