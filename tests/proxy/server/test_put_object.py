"""PUT_OBJECT (protocol version 2): a whole small object in one exchange, through a raw socket.

The proxy stores it with one multipart request (its faults are tested in
tests/reliablewriter/test_one_request.py); here: what the client is told, what GCS holds,
that the connection stays usable and that pipelined requests are each answered once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable

import google_crc32c
import trio

from protocol import (
    Completed,
    Connection,
    ErrorCode,
    Hello,
    OpenUpload,
    Ping,
    Pong,
    PutObject,
    Role,
    Welcome,
)
from protocol._spec import HEADER_SIZE
from proxy.server import ProxyServer
from proxy.server.settings import KiB, MiB, ServerSettings
from tests.proxy.conftest import RawClient

Connect = Callable[..., Awaitable[RawClient]]
StartProxy = Callable[..., contextlib.AbstractAsyncContextManager[ProxyServer]]

V2 = (1, 2)


def _read(server: ProxyServer, bucket: str, name: str) -> bytes:
    data: bytes = server.backend.client.bucket(bucket).blob(name).download_as_bytes()
    return data


async def test_a_whole_object_is_stored_in_one_exchange_and_the_connection_stays_idle(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    client = await raw_client(proxy_server, versions=V2)
    data = os.urandom(40 * KiB)
    crc = google_crc32c.value(data)
    seq = await client.send(
        PutObject(gcs_bucket, "small.txt", data, content_type="text/plain",
                  metadata=(("k", "v"),), if_generation_match=0, crc32c=crc)
    )  # fmt: skip
    with trio.fail_after(10):
        completed = await client.reply(Completed)
    assert completed.reply_to == seq
    assert (completed.size, completed.crc32c) == (len(data), crc)
    assert completed.generation > 0
    assert _read(proxy_server, gcs_bucket, "small.txt") == data
    blob = proxy_server.backend.client.bucket(gcs_bucket).get_blob("small.txt")
    assert (blob.content_type, blob.metadata) == ("text/plain", {"k": "v"})
    assert proxy_server.registry.uploads() == []  # no upload, no token, nothing to expire
    await client.send(Ping(7))
    assert (await client.reply(Pong)).nonce == 7


async def test_pipelined_put_objects_are_each_answered_once(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    client = await raw_client(proxy_server, versions=V2)
    objects = {f"many/{index}": os.urandom(index * 100) for index in range(12)}
    sent = {}
    for name, data in objects.items():
        sent[await client.send(PutObject(gcs_bucket, name, data))] = name
    with trio.fail_after(20):
        replies = [await client.reply(Completed) for _ in objects]
    assert sorted(reply.reply_to for reply in replies) == sorted(sent)
    for reply in replies:
        assert reply.size == len(objects[sent[reply.reply_to]])
    for name, data in objects.items():
        assert _read(proxy_server, gcs_bucket, name) == data


async def test_a_crc32c_that_is_not_the_bytes_is_a_checksum_mismatch_and_stores_nothing(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    client = await raw_client(proxy_server, versions=V2)
    data = b"twelve bytes"
    await client.send(PutObject(gcs_bucket, "bad.bin", data, crc32c=google_crc32c.value(data) ^ 1))
    error = await client.error()
    assert error.code is ErrorCode.CHECKSUM_MISMATCH
    assert proxy_server.backend.client.bucket(gcs_bucket).get_blob("bad.bin") is None


async def test_a_precondition_that_does_not_hold_is_refused_and_the_object_kept(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    client = await raw_client(proxy_server, versions=V2)
    await client.send(PutObject(gcs_bucket, "once.bin", b"first"))
    await client.reply(Completed)
    await client.send(PutObject(gcs_bucket, "once.bin", b"second", if_generation_match=0))
    error = await client.error()
    assert error.code is ErrorCode.PRECONDITION_FAILED
    assert not error.retryable
    assert _read(proxy_server, gcs_bucket, "once.bin") == b"first"


async def test_a_name_gcs_refuses_is_an_invalid_request(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    client = await raw_client(proxy_server, versions=V2)
    await client.send(PutObject(gcs_bucket, "..", b"x"))
    assert (await client.error()).code is ErrorCode.INVALID_REQUEST
    await client.send(Ping(1))
    assert (await client.reply(Pong)).nonce == 1


async def test_an_open_of_a_name_gcs_refuses_is_an_invalid_request_as_a_put_object_is(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    for versions, code in ((V2, ErrorCode.INVALID_REQUEST), ((1,), ErrorCode.GCS_ERROR)):
        client = await raw_client(proxy_server, versions=versions)
        await client.send(OpenUpload(gcs_bucket, ".."))
        with trio.fail_after(10):
            error = await client.error()
        assert error.code is code
        assert not error.retryable


async def test_an_object_outside_the_allow_list_is_forbidden(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str
) -> None:
    async with start_proxy(allowed_prefixes=("public/",)) as server:
        client = await raw_client(server, versions=V2)
        await client.send(PutObject(gcs_bucket, "private/x", b"x"))
        assert (await client.error()).code is ErrorCode.FORBIDDEN
        await client.send(PutObject(gcs_bucket, "public/x", b"x"))
        assert (await client.reply(Completed)).size == 1


async def _hello_for_big_frames(client: RawClient, frame_size: int) -> int:
    """Negotiate ``frame_size`` (the RawClient's own Hello offers 256 KiB); the agreed size."""
    client.protocol = Connection(Role.CLIENT, max_frame_size=frame_size)
    await client.send(Hello(V2, frame_size, client_name="test"))
    return (await client.reply(Welcome)).max_frame_size


def _reserved(server: ProxyServer) -> float:
    return server.metrics.registry.get_sample_value("rup_buffer_reserved_bytes") or 0.0


async def _until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not condition():  # noqa: ASYNC110 - the budget has no event for it
            await trio.sleep(0.01)


async def test_an_object_of_8_mib_is_one_put_object_with_the_default_frame_size(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str
) -> None:
    frame_size = ServerSettings().max_frame_size
    async with start_proxy(max_frame_size=frame_size) as server:
        client = await raw_client(server, hello=False)
        assert await _hello_for_big_frames(client, 8 * MiB) == 8 * MiB
        data = os.urandom(8 * MiB)
        crc = google_crc32c.value(data)
        await client.send(PutObject(gcs_bucket, "eight.bin", data, crc32c=crc))
        with trio.fail_after(20):
            assert (await client.reply(Completed)).size == 8 * MiB
        assert _read(server, gcs_bucket, "eight.bin") == data
        assert _reserved(server) == 0


async def test_a_put_object_is_paid_for_before_its_payload_is_read_and_repaid_if_cut_off(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str
) -> None:
    # The protocol buffers a PUT_OBJECT whole: without paying at its header, a crowd of
    # half-sent objects would hold memory no budget counts.
    async with start_proxy(max_frame_size=8 * MiB) as proxy_server:
        await _cut_off_put_object(proxy_server, raw_client, gcs_bucket)


async def _cut_off_put_object(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    client = await raw_client(proxy_server, hello=False)
    await _hello_for_big_frames(client, 8 * MiB)
    frame = b"".join(client.protocol.send(PutObject(gcs_bucket, "half.bin", os.urandom(6 * MiB))))
    await client.send_raw(frame[: len(frame) // 2])
    await _until(lambda: _reserved(proxy_server) >= 6 * MiB)
    await client.aclose()  # the rest never comes
    await _until(lambda: _reserved(proxy_server) == 0)
    assert proxy_server.backend.client.bucket(gcs_bucket).get_blob("half.bin") is None


async def test_a_put_object_larger_than_a_clients_share_is_too_busy_before_it_is_read(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str
) -> None:
    async with start_proxy(
        max_frame_size=8 * MiB, total_buffer_limit=4 * MiB, client_buffer_share=0.5
    ) as server:
        client = await raw_client(server, hello=False)
        await _hello_for_big_frames(client, 8 * MiB)
        frame = b"".join(client.protocol.send(PutObject(gcs_bucket, "big.bin", bytes(3 * MiB))))
        await client.send_raw(frame[: HEADER_SIZE + 1024])  # the header, and a little
        with trio.fail_after(10):
            error = await client.error()
        assert (error.code, error.retryable) == (ErrorCode.TOO_BUSY, True)
        await client.closed()
        assert _reserved(server) == 0
        # The proxy is unharmed: an object within the share is stored.
        other = await raw_client(server, versions=V2)
        await other.send(PutObject(gcs_bucket, "fits.bin", b"x" * 1000))
        assert (await other.reply(Completed)).size == 1000


async def test_a_put_object_waits_for_budget_to_come_back_then_is_stored(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str
) -> None:
    async with start_proxy(
        max_frame_size=8 * MiB,
        total_buffer_limit=8 * MiB,
        client_buffer_share=1.0,
        budget_wait=30.0,
    ) as server:
        holder = await raw_client(server, hello=False)
        await _hello_for_big_frames(holder, 8 * MiB)
        held = b"".join(holder.protocol.send(PutObject(gcs_bucket, "held.bin", bytes(5 * MiB))))
        await holder.send_raw(held[: HEADER_SIZE + 1024])
        await _until(lambda: _reserved(server) >= 5 * MiB)
        client = await raw_client(server, hello=False)
        await _hello_for_big_frames(client, 8 * MiB)
        data = os.urandom(4 * MiB)
        async with trio.open_nursery() as nursery:
            # Sent in the background: the proxy reads none of it until it has paid.
            nursery.start_soon(client.send, PutObject(gcs_bucket, "waited.bin", data))
            await trio.sleep(0.5)
            assert _reserved(server) < 9 * MiB  # the second object is not paid yet: no room
            await holder.aclose()  # its budget comes back, and the waiting object is read
        with trio.fail_after(20):
            assert (await client.reply(Completed)).size == len(data)
        assert _read(server, gcs_bucket, "waited.bin") == data
