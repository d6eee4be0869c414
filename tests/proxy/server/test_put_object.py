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

from protocol import Completed, ErrorCode, OpenUpload, Ping, Pong, PutObject
from proxy.server import ProxyServer
from proxy.server.settings import KiB
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
