"""Fixtures for proxy tests: a real proxy on loopback, writing to the strict GCS endpoint.

* ``proxy_settings``: small windows, chunks and timeouts so tests stay fast; override the
  fixture (or use ``start_proxy(**changes)``) for anything else.
* ``proxy_backend``: the shared ``gcs_server`` (tests/conftest.py) as the proxy's GCS.
* ``proxy_server``: a :class:`proxy.server.ProxyServer` running in the test's nursery.
* ``start_proxy``: ``async with start_proxy(**setting_changes) as server`` for tests that
  need more than one proxy, or one that restarts.
* ``raw_client``: ``await raw_client(server)`` gives a :class:`RawClient`, a protocol-level
  client with no retries and no cleverness, for testing what the server does with exactly
  the frames a test sends.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
import trio

from faultnet.gcs import GcsServer
from faultnet.gcs.clients import anonymous_client
from protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Ack,
    Connection,
    ConnectionClosed,
    Credit,
    Error,
    Event,
    Hello,
    OpenUpload,
    Reply,
    Role,
    UploadOpened,
    Welcome,
    WriteAt,
)
from proxy.server import ProxyServer, serve_in_background
from proxy.server.backend import Backend, TargetKind
from proxy.server.settings import KiB, MiB, ServerSettings
from reliablewriter import RetryPolicy, WriterSettings

ReplyT = TypeVar("ReplyT", bound=Reply)

__all__ = ["RawClient"]


@pytest.fixture
def proxy_settings() -> ServerSettings:
    return ServerSettings(
        max_frame_size=256 * KiB,
        upload_buffer_limit=4 * MiB,
        min_upload_window=1 * MiB,
        total_buffer_limit=64 * MiB,
        # Objects of a few MiB exercise resumable sessions here (restarts, resends, credit);
        # tests/proxy/server/test_small_uploads.py is where small objects go in one request.
        one_request_limit=128 * KiB,
        handshake_timeout=5.0,
        idle_timeout=30.0,
        upload_idle_timeout=30.0,
        complete_timeout=10.0,
        result_retention=30.0,
        shutdown_grace=0.5,
        writer=WriterSettings(
            min_chunk_size=256 * KiB,
            max_chunk_size=1 * MiB,
            buffer_limit=4 * MiB,
            retry=RetryPolicy(initial_delay=0.01, max_delay=0.2, deadline=30.0),
            progress_timeout=10.0,
        ),
    )


@pytest.fixture
def proxy_backend(gcs_server: GcsServer) -> Backend:
    return Backend(anonymous_client(gcs_server.url), TargetKind.EMBEDDED, gcs_server.url)


@pytest.fixture
def start_proxy(
    proxy_settings: ServerSettings, proxy_backend: Backend
) -> Callable[..., contextlib.AbstractAsyncContextManager[ProxyServer]]:
    @contextlib.asynccontextmanager
    async def start(**changes: Any) -> AsyncIterator[ProxyServer]:
        settings = dataclasses.replace(proxy_settings, **changes)
        async with serve_in_background(settings, proxy_backend) as server:
            yield server

    return start


@pytest.fixture
async def proxy_server(
    start_proxy: Callable[..., contextlib.AbstractAsyncContextManager[ProxyServer]],
) -> AsyncIterator[ProxyServer]:
    async with start_proxy() as server:
        yield server


class RawClient:
    """Speaks the protocol over one connection, exactly as told, for server tests."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.protocol = Connection(Role.CLIENT)
        #: the latest Credit the server sent, if any
        self.credit: Credit | None = None

    async def send(self, event: Event) -> int:
        """Send ``event``; returns the seq it went out with."""
        frames = self.protocol.send(event)
        await self.stream.send_all(b"".join(frames))
        return self.protocol.last_sent_seq

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self) -> Event:
        """The next event from the server (``ConnectionClosed`` once it closed)."""
        while True:
            event = self.protocol.next_event()
            if event is not NEED_DATA:
                if isinstance(event, Credit):
                    self.credit = event
                return event
            try:
                data = await self.stream.receive_some(64 * KiB)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            self.protocol.receive_data(data)

    async def reply(self, kind: type[ReplyT]) -> ReplyT:
        """The next reply that is not an unsolicited Credit; it must be a ``kind``."""
        while True:
            event = await self.receive()
            if isinstance(event, Credit) and kind is not Credit:
                continue
            assert isinstance(event, kind), f"expected {kind.__name__}, got {event!r}"
            return event

    async def error(self) -> Error:
        return await self.reply(Error)

    async def closed(self) -> None:
        """Wait until the server has closed the connection, skipping what comes before."""
        with trio.fail_after(10):
            while not isinstance(await self.receive(), ConnectionClosed):
                pass

    async def hello(
        self, auth: str = "", *, versions: tuple[int, ...] = (PROTOCOL_VERSION,)
    ) -> Welcome:
        await self.send(Hello(versions, 256 * KiB, auth=auth, client_name="test"))
        return await self.reply(Welcome)

    async def open(self, bucket: str, name: str, **options: Any) -> UploadOpened:
        await self.send(OpenUpload(bucket, name, **options))
        return await self.reply(UploadOpened)

    async def write(self, offset: int, data: bytes) -> Ack:
        """One WriteAt, answered before returning (pipelining is the client library's job)."""
        seq = await self.send(WriteAt(offset, data))
        ack = await self.reply(Ack)
        assert ack.reply_to == seq
        return ack

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


@pytest.fixture
async def raw_client() -> AsyncIterator[Callable[..., Awaitable[RawClient]]]:
    clients: list[RawClient] = []

    async def connect(
        server: ProxyServer,
        *,
        hello: bool = True,
        auth: str = "",
        versions: tuple[int, ...] = (PROTOCOL_VERSION,),
    ) -> RawClient:
        host, port = server.address
        client = RawClient(await trio.open_tcp_stream(host, port))
        clients.append(client)
        if hello:
            await client.hello(auth, versions=versions)
        return client

    yield connect
    for client in clients:
        await client.aclose()
