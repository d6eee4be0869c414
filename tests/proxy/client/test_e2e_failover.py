"""Failover and fail-fast, end to end: the client library, real proxies, real sockets.

* Two proxies that share a token key: the one in use is killed halfway, and the client moves
  to the other and re-attaches with the token, whether it was given both addresses or one DNS
  name that resolves to both (a custom trio resolver stands in for DNS).
* Peers that cannot be a rup proxy end the upload within 2 s, with the reason in one line:
  an HTTP server on the port, and TLS against a plain proxy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from google.cloud import storage  # type: ignore[import-untyped]

from protocol import ErrorCode
from proxy.client import (
    ClientSettings,
    RetryPolicy,
    UploadError,
    UploadOptions,
    UploadProgress,
    UploadResult,
    upload_file,
    upload_stream,
)
from proxy.server import ProxyServer

KiB = 1024
MiB = 1024 * KiB

StartProxy = Callable[..., contextlib.AbstractAsyncContextManager[ProxyServer]]

SETTINGS = ClientSettings(
    frame_size=256 * KiB,
    reply_timeout=20.0,
    retry=RetryPolicy(deadline=20.0, initial_delay=0.01, max_delay=0.2),
)
#: what a name server would answer for this name: see ``TwoAddressResolver``
PROXY_NAME = "proxies.rup.test"


class TwoAddressResolver(trio.abc.HostnameResolver):
    """Resolves :data:`PROXY_NAME` to 127.0.0.1 then 127.0.0.2; any other name as usual."""

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[tuple[Any, ...]]:
        if host == PROXY_NAME.encode():
            return [
                (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, int(port or 0)))
                for ip in ("127.0.0.1", "127.0.0.2")
            ]
        return await trio.to_thread.run_sync(
            socket.getaddrinfo, host, port, family, type, proto, flags
        )

    async def getnameinfo(
        self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int
    ) -> tuple[str, str]:
        return await trio.to_thread.run_sync(socket.getnameinfo, sockaddr, flags)


async def stored(client: storage.Client, bucket: str, name: str) -> bytes:
    blob = client.bucket(bucket).blob(name)
    return await trio.to_thread.run_sync(blob.download_as_bytes)


@pytest.mark.parametrize("given_as", ["two addresses", "one dns name"])
async def test_the_upload_fails_over_to_a_second_proxy_sharing_the_key(
    start_proxy: StartProxy,
    gcs_bucket: str,
    storage_client: storage.Client,
    tmp_path: Path,
    given_as: str,
) -> None:
    data = os.urandom(12 * MiB)
    path = tmp_path / "payload"
    path.write_bytes(data)
    halfway, finished = trio.Event(), trio.Event()
    results: list[UploadResult] = []

    def progress(snapshot: UploadProgress) -> None:
        if snapshot.bytes_received >= 4 * MiB:
            halfway.set()

    async def upload(proxy: str) -> None:
        options = UploadOptions(
            proxy=proxy, settings=dataclasses.replace(SETTINGS, connections=3), progress=progress
        )
        results.append(await upload_file(path, f"gs://{gcs_bucket}/failover", options))
        finished.set()

    trio.socket.set_custom_hostname_resolver(TwoAddressResolver())
    # same key (the settings are shared), same port, two addresses; the first one dies.
    # The port is taken on 127.0.0.1 first and held until the first proxy binds it: a port
    # the system picked for 127.0.0.2 could meanwhile be the local end of any connection
    # from 127.0.0.1 (the tests' own, to the GCS endpoint), and EADDRINUSE fail the test.
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        async with start_proxy(host="127.0.0.2", port=port) as second:
            if given_as == "two addresses":
                target = f"127.0.0.1:{port},127.0.0.2:{port}"
            else:
                target = f"{PROXY_NAME}:{port}"
            async with trio.open_nursery() as nursery:
                with trio.CancelScope() as first_life:
                    held.close()
                    async with start_proxy(host="127.0.0.1", port=port):
                        nursery.start_soon(upload, target)
                        await halfway.wait()
                        first_life.cancel()  # abrupt: its connections die with it
                with trio.fail_after(60):
                    await finished.wait()
            resumed = second.metrics.registry.get_sample_value("rup_uploads_resumed_total")

    (result,) = results
    assert result.size == len(data)
    assert result.reconnects >= 3  # every connection moved over
    assert resumed == 1  # re-attached with the token, resuming from what GCS held
    assert await stored(storage_client, gcs_bucket, "failover") == data


async def answer_http(stream: trio.SocketStream) -> None:
    """A web server on the wrong port: whatever arrives gets a 400, then the door closes."""
    with contextlib.suppress(trio.BrokenResourceError):
        await stream.receive_some(4096)
        await stream.send_all(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
    await stream.aclose()


@contextlib.asynccontextmanager
async def http_server() -> AsyncIterator[tuple[str, int]]:
    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, answer_http, 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        yield listeners[0].socket.getsockname()[:2]
        nursery.cancel_scope.cancel()


async def test_a_peer_that_answers_http_ends_the_upload_at_once(tmp_path: Path) -> None:
    path = tmp_path / "payload"
    path.write_bytes(os.urandom(100 * KiB))
    slow_to_give_up = dataclasses.replace(SETTINGS, retry=RetryPolicy(deadline=120.0))
    async with http_server() as address:
        started = trio.current_time()
        with pytest.raises(UploadError) as caught:
            await upload_file(
                path, "gs://bkt/o", UploadOptions(proxy=address, settings=slow_to_give_up)
            )
    assert trio.current_time() - started < 2.0
    message = caught.value.message
    assert "\n" not in message
    assert f"{address[0]}:{address[1]} does not speak the rup protocol" in message
    assert "HTTP/1.1 400" in message


async def test_tls_against_a_plain_proxy_ends_the_upload_at_once(
    proxy_server: ProxyServer, tmp_path: Path
) -> None:
    path = tmp_path / "payload"
    path.write_bytes(os.urandom(100 * KiB))
    client_context = ssl.create_default_context()
    trustme.CA().configure_trust(client_context)
    slow_to_give_up = dataclasses.replace(SETTINGS, retry=RetryPolicy(deadline=120.0))
    options = UploadOptions(
        proxy=proxy_server.address, tls=client_context, settings=slow_to_give_up
    )
    started = trio.current_time()
    with pytest.raises(UploadError) as caught:
        await upload_file(path, "gs://bkt/o", options)
    assert trio.current_time() - started < 2.0
    message = caught.value.message
    assert "\n" not in message
    assert "TLS with 127.0.0.1" in message


async def test_a_certificate_the_client_does_not_trust_ends_the_upload_at_once(
    start_proxy: StartProxy, tmp_path: Path
) -> None:
    path = tmp_path / "payload"
    path.write_bytes(os.urandom(100 * KiB))
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    trustme.CA().configure_trust(client_context)  # another CA than the server's
    slow_to_give_up = dataclasses.replace(SETTINGS, retry=RetryPolicy(deadline=120.0))
    async with start_proxy(tls=server_context) as server:
        options = UploadOptions(proxy=server.address, tls=client_context, settings=slow_to_give_up)
        started = trio.current_time()
        with pytest.raises(UploadError, match="certificate not accepted"):
            await upload_file(path, "gs://bkt/o", options)
    assert trio.current_time() - started < 2.0


@pytest.mark.parametrize("source", ["file", "stream"])
async def test_a_proxy_back_with_another_key_makes_a_file_start_again_from_zero(
    start_proxy: StartProxy,
    gcs_bucket: str,
    storage_client: storage.Client,
    tmp_path: Path,
    source: str,
) -> None:
    # The restarted proxy cannot open the token. A file is whole on disk: the client opens a
    # new upload and sends it all again. A stream has dropped its committed bytes: it fails,
    # with TOKEN_NOT_RESUMABLE (not an authentication error).
    data = os.urandom(8 * MiB)
    path = tmp_path / "payload"
    path.write_bytes(data)
    halfway, done = trio.Event(), trio.Event()
    outcome: list[UploadResult | UploadError] = []

    def progress(snapshot: UploadProgress) -> None:
        if snapshot.committed >= 2 * MiB:
            halfway.set()

    async def upload(address: tuple[str, int]) -> None:
        options = UploadOptions(
            proxy=address, settings=dataclasses.replace(SETTINGS, connections=2), progress=progress
        )
        url = f"gs://{gcs_bucket}/again-{source}"
        try:
            if source == "file":
                outcome.append(await upload_file(path, url, options))
            else:
                outcome.append(await upload_stream(chunks(data), url, options))
        except UploadError as exc:
            outcome.append(exc)
        done.set()

    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as first_life:
            async with start_proxy() as first:
                address = first.address
                nursery.start_soon(upload, address)
                await halfway.wait()
                first_life.cancel()
        with trio.fail_after(60):
            async with start_proxy(port=address[1], token_key=os.urandom(32)):
                await done.wait()

    (result,) = outcome
    if source == "file":
        assert isinstance(result, UploadResult), result
        assert result.restarts == 1
        assert result.resent_bytes_by_cause["restarted"] >= 2 * MiB
        assert {"BAD_TOKEN", "TOKEN_NOT_RESUMABLE"} & set(result.errors_by_code)
        assert await stored(storage_client, gcs_bucket, "again-file") == data
    else:
        assert isinstance(result, UploadError)
        assert result.code is ErrorCode.TOKEN_NOT_RESUMABLE
        assert "cannot resume" in result.message


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 256 * KiB):
        await trio.lowlevel.checkpoint()
        yield data[start : start + 256 * KiB]
