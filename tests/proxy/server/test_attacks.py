"""Hostile clients, each attack performed for real through raw sockets (issue 11).

Every test here plays the attacker with bytes on a socket, then checks three things: the
attacker is told clearly (or cut off), the proxy's memory stays within what it is allowed,
and honest clients beside it are served.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable

import google_crc32c
import pytest
import trio
from google.cloud import storage  # type: ignore[import-untyped]

from protocol import (
    MAX_LISTED_RANGES,
    Ack,
    Complete,
    Completed,
    Credit,
    Error,
    ErrorCode,
    OpenUpload,
    Ping,
    Pong,
    Reply,
    Status,
    StatusQuery,
    WriteAt,
)
from proxy.server import ProxyServer
from proxy.server.budget import window_cost
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
