"""Hostile clients, each attack performed for real through raw sockets (issue 11).

Every test here plays the attacker with bytes on a socket, then checks three things: the
attacker is told clearly (or cut off), the proxy's memory stays within what it is allowed,
and honest clients beside it are served.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable

import google_crc32c
import pytest
import trio
import trio.testing
from google.cloud import storage  # type: ignore[import-untyped]

from protocol import (
    MAX_LISTED_RANGES,
    Abort,
    Ack,
    Complete,
    Completed,
    Connection,
    Credit,
    Error,
    ErrorCode,
    Hello,
    OpenUpload,
    Ping,
    Pong,
    Reply,
    Role,
    Status,
    StatusQuery,
    UploadOpened,
    WriteAt,
)
from protocol._spec import HEADER_SIZE
from proxy.server import ProxyServer
from proxy.server.budget import window_cost
from proxy.server.logging import RedactingFormatter
from proxy.server.settings import MiB, ServerSettings
from tests.proxy.conftest import RawClient
from tests.proxy.server.test_uploads import send_range

Connect = Callable[..., Awaitable[RawClient]]
StartProxy = Callable[..., contextlib.AbstractAsyncContextManager[ProxyServer]]

LATEST = (1, 2)


def _reserved(server: ProxyServer) -> float:
    return server.metrics.registry.get_sample_value("rup_buffer_reserved_bytes") or 0.0


async def answer(client: RawClient) -> Reply:
    """The next frame from the server that is not a Credit."""
    while True:
        event = await client.receive()
        if not isinstance(event, Credit):
            assert isinstance(event, Reply), event
            return event


async def _credit_end(client: RawClient) -> int:
    while client.credit is None:
        await client.receive()
    return client.credit.window_end


async def fragment(
    client: RawClient, data: bytes, writes: int, *, batch: int = 32
) -> list[ErrorCode]:
    """Write ``writes`` one-byte pieces of ``data`` at odd offsets, highest first, inside the
    window; returns the error codes the refused ones got (each write is answered)."""
    end = await _credit_end(client)
    offsets = [end - 1 - 2 * index for index in range(writes)]
    refused: list[ErrorCode] = []
    for start in range(0, writes, batch):
        sent = {}
        for offset in offsets[start : start + batch]:
            seq = await client.send(WriteAt(offset, data[offset : offset + 1]))
            sent[seq] = offset
        for _ in sent:
            reply = await answer(client)
            assert isinstance(reply, Ack | Error), reply
            assert reply.reply_to in sent
            if isinstance(reply, Error):
                refused.append(reply.code)
    return refused


@pytest.mark.parametrize(
    ("versions", "code"), [(LATEST, ErrorCode.FRAGMENT_LIMIT), ((1,), ErrorCode.TOO_BUSY)]
)
async def test_tiny_out_of_order_writes_hit_the_fragment_limit_and_the_upload_goes_on(
    proxy_server: ProxyServer,
    raw_client: Connect,
    gcs_bucket: str,
    storage_client: storage.Client,
    proxy_settings: ServerSettings,
    versions: tuple[int, ...],
    code: ErrorCode,
) -> None:
    data = os.urandom(MiB)
    client = await raw_client(proxy_server, versions=versions)
    await client.open(gcs_bucket, f"fragmented-v{versions[-1]}.bin")

    refused = await fragment(client, data, 600)

    # The pieces past what the window pays for are refused, each with a clear error that
    # leaves the connection and the upload usable.
    assert refused
    assert set(refused) == {code}
    (upload,) = proxy_server.registry.uploads()
    assert upload.writer.buffered_cost <= window_cost(proxy_settings.writer, upload.window)
    await client.send(Ping(7))
    assert (await client.reply(Pong)).nonce == 7
    await client.send(StatusQuery())
    status = await client.reply(Status)
    assert 1 < len(status.received) <= MAX_LISTED_RANGES

    # The honest bytes still make a whole object (the pieces already held were right).
    await send_range(client, data, 0, len(data))
    await client.send(Complete(len(data), google_crc32c.value(data)))
    assert (await client.reply(Completed)).size == len(data)
    blob = storage_client.bucket(gcs_bucket).blob(f"fragmented-v{versions[-1]}.bin")
    assert await trio.to_thread.run_sync(blob.download_as_bytes) == data


async def test_a_budget_squatter_cannot_lock_out_other_clients(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str
) -> None:
    async with start_proxy(
        auth_tokens=("squatter-secret", "honest-secret"),
        total_buffer_limit=16 * MiB,
        upload_buffer_limit=4 * MiB,
        budget_wait=0.2,
    ) as server:
        # Squatting by holding: uploads opened on connections kept open, no data sent, until
        # the squatter's share is spent.
        holders: list[RawClient] = []
        while True:
            holder = await raw_client(server, auth="squatter-secret")
            await holder.send(OpenUpload(gcs_bucket, f"squat-held-{len(holders)}.bin"))
            reply = await answer(holder)
            if isinstance(reply, Error):
                assert reply.code is ErrorCode.TOO_BUSY
                break
            holders.append(holder)
            assert len(holders) < 64, "the squatter's share never ran out"
        assert _reserved(server) <= server.settings.client_buffer_limit

        # Squatting by leaving: many opens, then the connection goes; nothing stays reserved.
        for holder in holders:
            await holder.aclose()
        for index in range(40):
            leaver = await raw_client(server, auth="squatter-secret")
            await leaver.open(gcs_bucket, f"squat-left-{index}.bin")
            await leaver.aclose()
        with trio.fail_after(5):
            while _reserved(server) > 0:  # noqa: ASYNC110 - the server has no event for it
                await trio.sleep(0.01)

        # Meanwhile an honest client opens and finishes uploads without waiting.
        for index in range(3):
            honest = await raw_client(server, auth="honest-secret")
            with trio.fail_after(5):
                await honest.open(gcs_bucket, f"honest-{index}.bin")
                data = os.urandom(MiB + index)
                await send_range(honest, data, 0, len(data))
                await honest.send(Complete(len(data), google_crc32c.value(data)))
                assert (await honest.reply(Completed)).size == len(data)


async def _open_socket(server: ProxyServer) -> trio.SocketStream:
    return await trio.open_tcp_stream(*server.address)


async def _closed_after(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes (within 10 s); then ``stream`` is closed."""
    received = b""
    with trio.fail_after(10):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                chunk = b""
            if not chunk:
                await stream.aclose()
                return received
            received += chunk


def _partial_hello(payload: int = 60 * 1024) -> bytes:
    """A Hello's header announcing ``payload`` bytes, and none of them: a slowloris."""
    frame = Connection(Role.CLIENT).send_bytes(Hello((1, 2), 256 * 1024, auth="x" * payload))
    return frame[:HEADER_SIZE]


async def test_a_preauth_flood_is_capped_and_cannot_lock_out_a_new_client(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str
) -> None:
    async with start_proxy(
        max_preauth_connections=20, preauth_read_limit=4096, handshake_timeout=30.0
    ) as server:
        flood = [await _open_socket(server) for _ in range(20)]
        for stream in flood:
            await stream.send_all(_partial_hello())
        await trio.testing.wait_all_tasks_blocked()

        # A 21st connection gets in, and its Hello is answered: the one that waited longest
        # for its own Hello makes room (told TOO_MANY_CONNECTIONS, as version 1's TOO_BUSY).
        newcomer = await raw_client(server)
        dropped = Connection(Role.CLIENT)
        dropped.receive_data(await _closed_after(flood[0]))
        error = dropped.next_event()
        assert isinstance(error, Error)
        assert error.code is ErrorCode.TOO_BUSY
        assert "wait for a Hello" in error.message

        # A Hello may not take more than the pre-auth limit: 60 KiB of it is refused.
        greedy = await _open_socket(server)
        whole = Connection(Role.CLIENT).send_bytes(Hello((1,), 256 * 1024, auth="y" * 60_000))
        await greedy.send_all(whole[:8192])
        told = Connection(Role.CLIENT)
        told.receive_data(await _closed_after(greedy))
        error = told.next_event()
        assert isinstance(error, Error)
        assert error.code is ErrorCode.FRAME_TOO_LARGE

        # The newcomer is served while the rest of the flood still waits.
        await newcomer.open(gcs_bucket, "during-the-flood.bin")
        data = os.urandom(300_000)
        await send_range(newcomer, data, 0, len(data))
        await newcomer.send(Complete(len(data), google_crc32c.value(data)))
        assert (await newcomer.reply(Completed)).size == len(data)
        assert server.connection_count == 1 + 19
        for stream in flood[1:]:
            await stream.aclose()


async def test_total_connections_are_capped(start_proxy: StartProxy, raw_client: Connect) -> None:
    async with start_proxy(max_connections=3) as server:
        for _ in range(3):
            await raw_client(server)
        fourth = await raw_client(server, hello=False)
        error = await fourth.error()
        assert error.code is ErrorCode.TOO_BUSY
        assert "as many connections" in error.message
        await fourth.closed()


async def test_uploads_are_counted_per_bearer_token_not_per_address(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str
) -> None:
    async with start_proxy(
        auth_tokens=("alice-secret", "bob-secret"), max_uploads_per_client=1
    ) as server:
        alice = await raw_client(server, auth="alice-secret")
        await alice.open(gcs_bucket, "alice.bin")
        alice_again = await raw_client(server, auth="alice-secret")
        await alice_again.send(OpenUpload(gcs_bucket, "alice-2.bin"))
        assert (await alice_again.error()).code is ErrorCode.TOO_BUSY
        # Bob shares alice's address (loopback), not her count.
        bob = await raw_client(server, auth="bob-secret")
        assert (await bob.open(gcs_bucket, "bob.bin")).token


@pytest.mark.parametrize(
    ("presented", "message"),
    [("", "no bearer token sent"), ("not-the-secret", "bearer token not accepted")],
)
async def test_an_unauthenticated_client_is_told_which_way_it_failed(
    start_proxy: StartProxy, raw_client: Connect, presented: str, message: str
) -> None:
    async with start_proxy(auth_tokens=("the-secret",)) as server:
        client = await raw_client(server, hello=False)
        await client.send(Hello((1,), 256 * 1024, auth=presented))
        error = await client.error()
        assert error.code is ErrorCode.UNAUTHENTICATED
        assert error.message == message
        await client.closed()


async def test_an_open_that_queued_for_memory_is_logged(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # Room for one 1 MiB window per client (its cost is a little more than 1 MiB).
    async with start_proxy(total_buffer_limit=4 * MiB, budget_wait=10.0) as server:
        first = await raw_client(server)
        await first.open(gcs_bucket, "holds-the-room.bin")
        second = await raw_client(server)
        await second.send(OpenUpload(gcs_bucket, "waits-for-it.bin"))
        with trio.move_on_after(1.2):
            pytest.fail(f"answered while the room was held: {await answer(second)}")
        await first.send(Abort())
        await first.reply(Ack)
        with trio.fail_after(5):
            assert isinstance(await answer(second), UploadOpened)
    waited = [r.getMessage() for r in caplog.records if "budget-waited" in r.getMessage()]
    assert len(waited) == 1, waited
    assert float(waited[0].split("seconds=")[1].split()[0]) >= 1.2, waited


async def test_control_characters_in_names_are_escaped_in_the_logs(
    proxy_server: ProxyServer,
    raw_client: Connect,
    gcs_bucket: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    client = await raw_client(proxy_server)
    await client.open(gcs_bucket, "evil\x1b[31mred\x07\u2028name.bin")
    formatter = RedactingFormatter()
    lines = [formatter.format(record) for record in caplog.records] + [
        record.getMessage() for record in caplog.records
    ]
    opened = [line for line in lines if "upload-opened" in line]
    assert opened
    for line in lines:
        assert line.isprintable() or "\n" in line, repr(line)
        assert "\x1b" not in line
        assert "\x07" not in line
    assert any("1b[31mred" in line for line in opened), opened  # escaped, not dropped


async def test_a_slowloris_is_told_and_logged_in_one_line(
    start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with start_proxy(handshake_timeout=0.2) as server:
        streams = [await _open_socket(server) for _ in range(5)]
        for stream in streams:
            await stream.send_all(b"\xabRU")
        for stream in streams:
            told = Connection(Role.CLIENT)
            told.receive_data(await _closed_after(stream))
            error = told.next_event()
            assert isinstance(error, Error)
            assert error.code is ErrorCode.IDLE_TIMEOUT  # HANDSHAKE_TIMEOUT, as version 1 says it
    timeouts = [r for r in caplog.records if "handshake-timeout" in r.getMessage()]
    assert len(timeouts) == 5
    assert all(r.levelno == logging.INFO and not r.exc_info for r in timeouts)
    assert not [r for r in caplog.records if "crash" in r.getMessage()]
