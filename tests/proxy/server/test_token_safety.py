"""Attacks with upload tokens, performed for real: replays, forgeries, foreign keys.

Each test plays the attacker through real sockets against real proxies and the strict GCS
endpoint, then checks what GCS holds: a token must never write an object again after its
upload was aborted or completed (on any proxy sharing the key), and no token, however
forged, may make the proxy send a request anywhere but its configured endpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import google_crc32c
import trio
from google.cloud import storage  # type: ignore[import-untyped]

from faultnet.gcs import GcsServer
from faultnet.gcs.clients import anonymous_client
from protocol import (
    SUPPORTED_VERSIONS,
    Abort,
    Ack,
    AttachUpload,
    Complete,
    Completed,
    Error,
    ErrorCode,
    Hello,
    OpenUpload,
    UploadOpened,
    Welcome,
)
from proxy.server import ProxyServer, serve_in_background
from proxy.server.backend import Backend, TargetKind
from proxy.server.settings import KiB, ServerSettings
from proxy.server.tokens import TokenCodec
from tests.proxy.conftest import RawClient
from tests.proxy.server.test_uploads import send_range

Connect = Callable[..., Awaitable[RawClient]]
StartProxy = Callable[..., contextlib.AbstractAsyncContextManager[ProxyServer]]


async def _connect(raw_client: Connect, server: ProxyServer) -> RawClient:
    """A raw client that speaks every protocol version this codebase knows (so the server
    answers with version 2's codes, TOKEN_NOT_RESUMABLE and UPLOAD_FINISHED)."""
    client = await raw_client(server, hello=False)
    await client.send(Hello(SUPPORTED_VERSIONS, 256 * KiB, client_name="attacker"))
    await client.reply(Welcome)
    return client


def _exists(client: storage.Client, bucket: str, name: str) -> bool:
    return bool(client.bucket(bucket).blob(name).exists())


async def test_a_token_aborted_on_one_proxy_cannot_write_through_another(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str, storage_client: storage.Client
) -> None:
    key = os.urandom(32)
    data = os.urandom(600 * KiB)
    async with start_proxy(token_key=key) as first, start_proxy(token_key=key) as second:
        owner = await _connect(raw_client, first)
        opened = await owner.open(gcs_bucket, "aborted.bin")
        await send_range(owner, data, 0, 300 * KiB)
        await owner.send(Abort())
        await owner.reply(Ack)

        thief = await _connect(raw_client, second)
        for _ in range(2):  # a retry is refused the same way
            await thief.send(AttachUpload(opened.token))
            refusal = await thief.error()
            assert refusal.code is ErrorCode.UPLOAD_FINISHED, refusal
            assert not refusal.retryable

    assert not await trio.to_thread.run_sync(_exists, storage_client, gcs_bucket, "aborted.bin")


@contextlib.asynccontextmanager
async def _proxy_on_disk(
    settings: ServerSettings, data_dir: Path
) -> AsyncIterator[tuple[ProxyServer, GcsServer]]:
    """A proxy writing to an on-disk endpoint that lives exactly as long as the block."""
    with GcsServer(data_dir=data_dir) as gcs:
        backend = Backend(anonymous_client(gcs.url), TargetKind.EMBEDDED, gcs.url)
        async with serve_in_background(settings, backend) as proxy:
            yield proxy, gcs


async def test_a_completed_token_replayed_after_the_endpoint_restarted_changes_nothing(
    proxy_settings: ServerSettings, raw_client: Connect, tmp_path: Path
) -> None:
    settings = dataclasses.replace(proxy_settings, token_key=os.urandom(32))
    original = os.urandom(700 * KiB)
    async with _proxy_on_disk(settings, tmp_path / "gcs") as (proxy, gcs):
        gcs.store.create_bucket("replay")
        owner = await _connect(raw_client, proxy)
        opened = await owner.open("replay", "kept.bin")
        await send_range(owner, original, 0, len(original))
        await owner.send(Complete(len(original), google_crc32c.value(original)))
        completed = await owner.reply(Completed)

    # The endpoint (and the proxy) restarted; the attacker replays the token with new bytes.
    forged = os.urandom(len(original))
    async with _proxy_on_disk(settings, tmp_path / "gcs") as (proxy, gcs):
        attacker = await _connect(raw_client, proxy)
        await attacker.send(AttachUpload(opened.token))
        answer = await attacker.receive()
        if isinstance(answer, UploadOpened):
            # Attached to the finished upload: it holds every byte already, and a Complete
            # with other content is refused; the object is not written again.
            assert answer.committed_offset == len(original)
            await attacker.send(Complete(len(forged), google_crc32c.value(forged)))
            refusal = await attacker.reply(Error)
            assert refusal.code is ErrorCode.CHECKSUM_MISMATCH, refusal
        else:
            assert isinstance(answer, Error), answer
            assert answer.code is ErrorCode.UPLOAD_FINISHED, answer
        reader = anonymous_client(gcs.url)
        blob = await trio.to_thread.run_sync(reader.bucket("replay").get_blob, "kept.bin")
        stored = await trio.to_thread.run_sync(blob.download_as_bytes)

    assert int(blob.generation) == completed.generation
    assert stored == original


class _Listener:
    """A raw TCP listener standing in for the attacker's host: it records who came."""

    def __init__(self) -> None:
        self.connections = 0
        self.received = b""

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        with trio.move_on_after(5):
            while chunk := await stream.receive_some(4096):
                self.received += chunk


async def test_a_forged_token_pointing_at_another_host_sends_nothing_there(
    proxy_settings: ServerSettings,
    proxy_backend: Backend,
    raw_client: Connect,
    gcs_bucket: str,
) -> None:
    key = os.urandom(32)
    settings = dataclasses.replace(proxy_settings, token_key=key)
    attacker = _Listener()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(attacker.serve)
        elsewhere = f"http://127.0.0.1:{port}/upload/storage/v1/b/{gcs_bucket}/o"
        # The attacker knows the key (the worst case) and seals what it likes.
        codec = TokenCodec(key, lifetime=3600.0)
        now = time.time()
        forgeries = [
            dataclasses.replace(
                codec.issue(
                    upload_id=f"forged{index}",
                    bucket=gcs_bucket,
                    name="stolen.bin",
                    session_ref=reference,
                    content_type="application/octet-stream",
                    metadata=(),
                    expected_size=None,
                    if_generation_match=0,
                ),
                created_at=now,
            )
            for index, reference in enumerate(
                [
                    f"{elsewhere}?uploadType=resumable&upload_id=x",
                    f"//127.0.0.1:{port}/x",
                    f"x@127.0.0.1:{port}",
                    "x&upload_id=y#",
                ]
            )
        ]
        async with serve_in_background(settings, proxy_backend) as proxy:
            for ticket in forgeries:
                client = await _connect(raw_client, proxy)
                await client.send(AttachUpload(codec.seal(ticket)))
                refusal = await client.error()
                assert refusal.code is ErrorCode.TOKEN_NOT_RESUMABLE, refusal
            await trio.sleep(0.3)  # anything that was going to connect has done so
        nursery.cancel_scope.cancel()

    assert attacker.connections == 0
    assert attacker.received == b""


async def test_a_tampered_token_is_not_resumable_rather_than_an_auth_failure(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    owner = await _connect(raw_client, proxy_server)
    opened = await owner.open(gcs_bucket, "tampered.bin")
    tampered = bytearray(opened.token)
    tampered[-1] ^= 0x01

    intruder = await _connect(raw_client, proxy_server)
    await intruder.send(AttachUpload(bytes(tampered)))
    refusal = await intruder.error()

    assert refusal.code is ErrorCode.TOKEN_NOT_RESUMABLE
    assert refusal.message == (
        "this proxy cannot resume that upload: it restarted with another key, "
        "or the token is damaged"
    )


async def test_a_doomed_precondition_fails_at_the_open_before_any_byte(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str, storage_client: storage.Client
) -> None:
    blob = storage_client.bucket(gcs_bucket).blob("present.bin")
    await trio.to_thread.run_sync(blob.upload_from_string, b"live")
    client = await _connect(raw_client, proxy_server)
    for wrong in (0, blob.generation + 1):
        await client.send(OpenUpload(gcs_bucket, "present.bin", if_generation_match=wrong))
        refusal = await client.reply(Error)  # no UploadOpened, so no credit for any byte
        assert refusal.code is ErrorCode.PRECONDITION_FAILED, refusal
        assert str(blob.generation) in refusal.message
    opened = await client.open(gcs_bucket, "present.bin", if_generation_match=blob.generation)
    assert opened.token


async def test_the_token_pins_the_generation_it_may_replace(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str, storage_client: storage.Client
) -> None:
    # No precondition asked for: the upload may still only replace what was live when it
    # opened (nothing). Another writer creating the object meanwhile wins; GCS refuses ours.
    data = os.urandom(300 * KiB)
    client = await _connect(raw_client, proxy_server)
    await client.open(gcs_bucket, "raced.bin")
    await send_range(client, data, 0, len(data))
    other = storage_client.bucket(gcs_bucket).blob("raced.bin")
    await trio.to_thread.run_sync(other.upload_from_string, b"the other writer")

    await client.send(Complete(len(data)))
    refusal = await client.reply(Error)

    assert refusal.code is ErrorCode.PRECONDITION_FAILED, refusal
    assert await trio.to_thread.run_sync(other.download_as_bytes) == b"the other writer"
