"""Clients that break the protocol get an error frame and a closed connection, nothing more.

Frames no honest client Connection would send are forged with a second, mirrored pair of
Connections: that keeps every test on the public protocol API instead of hand-built bytes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable
from typing import Any

import google_crc32c
import trio
from google.cloud import storage  # type: ignore[import-untyped]

from protocol import (
    PROTOCOL_VERSION,
    Complete,
    Completed,
    Connection,
    ConnectionClosed,
    Error,
    ErrorCode,
    Hello,
    OpenUpload,
    Ping,
    Pong,
    Reply,
    Request,
    Role,
    UploadOpened,
    Welcome,
    WriteAt,
)
from protocol._codec import decode_body
from protocol._spec import HEADER_SIZE, HEADER_STRUCT, FrameType
from proxy.server import ProxyServer
from proxy.server.settings import MiB
from tests.proxy.conftest import RawClient
from tests.proxy.server.test_uploads import send_range

Connect = Callable[..., Awaitable[RawClient]]
StartProxy = Callable[..., contextlib.AbstractAsyncContextManager[ProxyServer]]


class Forger:
    """A client Connection paired with a server Connection in memory.

    It produces the bytes an honest client would send after the same exchange, but with any
    frame size, so tests can send a real server frames no honest client would.
    """

    def __init__(self, max_frame_size: int = 4 * MiB) -> None:
        self.client = Connection(Role.CLIENT, max_frame_size=max_frame_size)
        self.server = Connection(Role.SERVER, max_frame_size=max_frame_size)

    def request(self, event: Request, answer: Callable[[Any], Reply] | None = None) -> bytes:
        data = self.client.send_bytes(event)
        if answer is not None:
            self.server.receive_data(data)
            self.client.receive_data(self.server.send_bytes(answer(self.server.next_event())))
            self.client.next_event()
        return data

    def hello(self) -> bytes:
        return self.request(
            Hello((PROTOCOL_VERSION,), self.client.max_frame_size), self.server.welcome
        )

    def open(self, bucket: str, name: str) -> bytes:
        return self.request(
            OpenUpload(bucket, name), lambda event: UploadOpened(event.seq, b"t", 0, False)
        )


class LenientPeer:
    """A raw connection whose incoming frames are decoded one by one, without a Connection.

    A Connection would rightly refuse replies to requests it never sent; the tests here
    send forged frames, so they read the answers with the codec alone.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._received = bytearray()
        self._eof = False

    @classmethod
    async def connect(cls, server: ProxyServer) -> LenientPeer:
        return cls(await trio.open_tcp_stream(*server.address))

    async def send(self, frame: bytes) -> None:
        await self.stream.send_all(frame)

    async def reply(self) -> Reply | None:
        """The next frame from the server, or ``None`` once it has closed."""
        with trio.fail_after(10):
            while True:
                if len(self._received) >= HEADER_SIZE:
                    fields = HEADER_STRUCT.unpack(self._received[:HEADER_SIZE])
                    frame_type, seq, size = fields[2], fields[4], fields[5]
                    if len(self._received) >= HEADER_SIZE + size:
                        body = bytes(self._received[HEADER_SIZE : HEADER_SIZE + size])
                        del self._received[: HEADER_SIZE + size]
                        reply = decode_body(FrameType(frame_type), seq, body)
                        assert isinstance(reply, Reply)
                        return reply
                if self._eof:
                    return None
                try:
                    chunk = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    chunk = b""
                self._eof = not chunk
                self._received += chunk

    async def refusal(self) -> Error:
        """The last frame before the server closed, which must be an Error saying why."""
        last = None
        while (reply := await self.reply()) is not None:
            last = reply
        assert isinstance(last, Error), f"expected an Error before the close, got {last!r}"
        await self.stream.aclose()
        return last


async def _assert_refused(client: RawClient, code: ErrorCode) -> None:
    error = await client.error()
    assert error.code is code, error
    await client.closed()


async def test_garbage_is_refused_while_eight_uploads_finish(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str, storage_client: storage.Client
) -> None:
    objects = {f"neighbour-{index}.bin": os.urandom(MiB + index * 1000) for index in range(8)}
    results: dict[str, int] = {}

    async def upload(name: str, data: bytes) -> None:
        client = await raw_client(proxy_server)
        await client.open(gcs_bucket, name)
        await send_range(client, data, 0, len(data))
        await client.send(Complete(len(data), google_crc32c.value(data)))
        results[name] = (await client.reply(Completed)).crc32c

    async def vandal() -> None:
        client = await raw_client(proxy_server)
        await client.send_raw(os.urandom(4096))
        error = await client.error()
        assert error.code in (ErrorCode.MALFORMED_FRAME, ErrorCode.CORRUPT_HEADER), error
        await client.closed()

    async with trio.open_nursery() as nursery:
        for name, data in objects.items():
            nursery.start_soon(upload, name, data)
        nursery.start_soon(vandal)

    for name, data in objects.items():
        assert results[name] == google_crc32c.value(data)
        blob = storage_client.bucket(gcs_bucket).blob(name)
        assert await trio.to_thread.run_sync(blob.download_as_bytes) == data


async def test_garbage_before_hello_is_refused(
    proxy_server: ProxyServer, raw_client: Connect
) -> None:
    client = await raw_client(proxy_server, hello=False)
    await client.send_raw(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
    error = await client.error()
    assert error.code in (ErrorCode.CORRUPT_HEADER, ErrorCode.MALFORMED_FRAME)
    await client.closed()


async def test_frame_over_the_limit_is_refused_from_its_header(
    proxy_server: ProxyServer, gcs_bucket: str
) -> None:
    forger = Forger()
    peer = await LenientPeer.connect(proxy_server)
    await peer.send(forger.hello())
    assert isinstance(await peer.reply(), Welcome)
    await peer.send(forger.open(gcs_bucket, "too-big.bin"))
    assert isinstance(await peer.reply(), UploadOpened)
    oversized = forger.request(WriteAt(0, bytes(MiB)))

    # Only the header goes out: the server must refuse before waiting for the payload.
    await peer.send(oversized[: HEADER_SIZE + 16])

    assert (await peer.refusal()).code is ErrorCode.FRAME_TOO_LARGE


async def test_wrong_sequence_number_is_refused(proxy_server: ProxyServer) -> None:
    forger = Forger()
    peer = await LenientPeer.connect(proxy_server)
    await peer.send(forger.hello())
    assert isinstance(await peer.reply(), Welcome)
    forger.request(Ping(1))
    skipped = forger.request(Ping(2))  # seq 3, while the server expects 2

    await peer.send(skipped)

    assert (await peer.refusal()).code is ErrorCode.BAD_SEQUENCE


async def test_write_before_open_is_refused(proxy_server: ProxyServer) -> None:
    bound = Forger()
    bound.hello()
    bound.open("b", "o")
    write = bound.request(WriteAt(0, b"x" * 10))  # seq 3
    idle = Forger()
    peer = await LenientPeer.connect(proxy_server)
    await peer.send(idle.hello())
    assert isinstance(await peer.reply(), Welcome)
    await peer.send(idle.request(Ping(0)))
    assert isinstance(await peer.reply(), Pong)

    await peer.send(write)  # seq 3 is right; only the state is wrong

    assert (await peer.refusal()).code is ErrorCode.UNEXPECTED_FRAME


async def test_write_outside_credit_is_refused_and_closed(
    proxy_server: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    client = await raw_client(proxy_server)
    await client.open(gcs_bucket, "greedy.bin")
    while client.credit is None:
        await client.receive()
    beyond = client.credit.window_end

    await client.send(WriteAt(beyond - 10, b"z" * 100))
    await _assert_refused(client, ErrorCode.OUTSIDE_CREDIT)


async def test_silent_client_is_dropped_after_the_handshake_timeout(
    start_proxy: StartProxy, raw_client: Connect
) -> None:
    async with start_proxy(handshake_timeout=0.3) as server:
        client = await raw_client(server, hello=False)
        await client.send_raw(b"\xabRU")  # a slowloris: three bytes, then nothing
        with trio.fail_after(10):
            # Told why (HANDSHAKE_TIMEOUT, which a peer that sent no Hello hears as version
            # 1's IDLE_TIMEOUT), then closed; logged as one info line, not a crash.
            error = await client.error()
            assert error.code is ErrorCode.IDLE_TIMEOUT
            assert error.reply_to == 0
            assert isinstance(await client.receive(), ConnectionClosed)
