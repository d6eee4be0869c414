"""Clients that break the protocol get an error frame and a closed connection, nothing more.

Frames no honest client Connection would send are forged with a second, mirrored pair of
Connections: that keeps every test on the public protocol API instead of hand-built bytes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import google_crc32c
import trio
from google.cloud import storage  # type: ignore[import-untyped]

from faultnet.gcs import GcsServer
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
from proxy.server.keys import generate_key_text
from proxy.server.settings import MiB
from tests.proxy.conftest import RawClient
from tests.proxy.server.processes import RupProcess, free_port, running
from tests.proxy.server.test_attacks import answer, fragment
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


#: the proxy's limits in the test below (rup serve flags), and what the proof allows on top
_TOTAL_BUFFER_MIB = 64
_PREAUTH_CONNECTIONS = 128
_PREAUTH_READ = 8192
_SLACK = 64 * MiB
#: one-byte writes the fragmenter sprays (on main, 100,000 of them cost 40 MiB of RSS)
_FRAGMENTS = 8_000


def _rss(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory (or, with ``VmHWM``, its peak since the last reset)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def _reset_peak_rss(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return False
    return True


async def _connect(address: tuple[str, int], auth: str) -> RawClient:
    """A connection through its Hello; like any client, it tries again if it was dropped
    to make room (a flood may fill the proxy's waiting room between connect and Hello)."""
    for _ in range(20):
        client = RawClient(await trio.open_tcp_stream(*address))
        await client.send(Hello((1, 2), 256 * 1024, auth=auth))
        reply = await answer(client)
        if isinstance(reply, Welcome):
            return client
        assert isinstance(reply, Error), reply
        assert reply.code in (ErrorCode.TOO_BUSY, ErrorCode.TOO_MANY_CONNECTIONS), reply
        await client.aclose()
    raise AssertionError("never got in")


async def test_garbage_is_refused_while_eight_uploads_finish(
    gcs_server: GcsServer, gcs_bucket: str, storage_client: storage.Client, tmp_path: Path
) -> None:
    """Eight honest uploads finish byte for byte while, at the same time, a vandal sends
    garbage, a fragmenter sprays tiny out-of-order writes, a squatter opens uploads (held
    and abandoned) to take the budget, and a flood of connections hold half-sent Hellos;
    the proxy (a real ``rup serve`` process) stays within its limits plus 64 MiB of RSS."""
    port = free_port()
    proxy = RupProcess(
        "proxy",
        ["serve", "--listen", f"127.0.0.1:{port}", "--gcs-endpoint", gcs_server.url,
         "--auth-token", "honest", "--auth-token", "squatter", "--auth-token", "fragmenter",
         "--auth-token", "vandal", "--total-buffer-mib", str(_TOTAL_BUFFER_MIB),
         "--upload-buffer-mib", "8", "--min-window-mib", "1", "--handshake-timeout", "20",
         "--max-preauth-connections", str(_PREAUTH_CONNECTIONS),
         "--preauth-read-bytes", str(_PREAUTH_READ), "--budget-wait", "0.5"],
        tmp_path,
        env={"RUP_TOKEN_KEY": generate_key_text()},
    )  # fmt: skip
    objects = {f"neighbour-{index}.bin": os.urandom(MiB + index * 1000) for index in range(8)}
    results: dict[str, int] = {}
    refused: dict[str, set[ErrorCode]] = {}
    attacks_done = trio.Event()
    flooded, squatting, fragmenting = trio.Event(), trio.Event(), trio.Event()
    with running(proxy.start()):
        address = await trio.to_thread.run_sync(proxy.listening_on)
        warm = await _connect(address, "honest")  # the code paths of an upload, loaded once
        await warm.open(gcs_bucket, "warm-up.bin")
        await warm.write(0, b"warm")
        await warm.send(Complete(4))
        await warm.reply(Completed)
        await warm.aclose()
        baseline = _rss(proxy.pid)
        peak_tracked = _reset_peak_rss(proxy.pid)
        samples = [baseline]
        honest = [await _connect(address, "honest") for _ in objects]  # in before the flood

        async def upload(client: RawClient, name: str, data: bytes) -> None:
            await client.open(gcs_bucket, name)
            await send_range(client, data, 0, len(data))
            await client.send(Complete(len(data), google_crc32c.value(data)))
            results[name] = (await client.reply(Completed)).crc32c
            await client.aclose()

        async def vandal() -> None:
            client = await _connect(address, "vandal")
            await client.send_raw(os.urandom(4096))
            error = await client.error()
            assert error.code in (ErrorCode.MALFORMED_FRAME, ErrorCode.CORRUPT_HEADER), error
            await client.closed()
            await client.aclose()

        async def fragmenter() -> None:
            data = os.urandom(MiB)
            client = await _connect(address, "fragmenter")
            await client.open(gcs_bucket, "fragments.bin")
            fragmenting.set()
            refused["fragmenter"] = set(await fragment(client, data, _FRAGMENTS, batch=64))
            await client.aclose()

        async def squatter() -> None:
            for index in range(60):  # opened and abandoned at once: nothing stays reserved
                client = await _connect(address, "squatter")
                await client.open(gcs_bucket, f"abandoned-{index}.bin")
                await client.aclose()
            held: list[RawClient] = []
            codes: set[ErrorCode] = set()
            for index in range(60):  # opened and held, no data sent, until the share is spent
                client = await _connect(address, "squatter")
                held.append(client)
                await client.send(OpenUpload(gcs_bucket, f"squat-{index}.bin"))
                reply = await answer(client)
                if isinstance(reply, Error):
                    codes.add(reply.code)
                    break
            refused["squatter"] = codes
            squatting.set()
            await attacks_done.wait()
            for client in held:
                await client.aclose()

        async def flood() -> None:
            streams = []
            half_hello = _half_hello(_PREAUTH_READ - 1024)
            for _ in range(2 * _PREAUTH_CONNECTIONS):
                stream = await trio.open_tcp_stream(*address)
                streams.append(stream)
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(half_hello)
            flooded.set()
            await attacks_done.wait()
            for stream in streams:
                await stream.aclose()

        async def sample_memory() -> None:
            while not attacks_done.is_set():
                samples.append(_rss(proxy.pid))
                await trio.sleep(0.02)

        with trio.fail_after(60):
            async with trio.open_nursery() as attackers:
                attackers.start_soon(sample_memory)
                attackers.start_soon(flood)
                attackers.start_soon(squatter)
                attackers.start_soon(fragmenter)
                attackers.start_soon(vandal)
                # The honest uploads start once every attack is under way.
                for started in (flooded, squatting, fragmenting):
                    await started.wait()
                async with trio.open_nursery() as neighbours:
                    for client, (name, data) in zip(honest, objects.items(), strict=True):
                        neighbours.start_soon(upload, client, name, data)
                samples.append(_rss(proxy.pid))
                attacks_done.set()
        peak = max(max(samples), _rss(proxy.pid, "VmHWM") if peak_tracked else 0)

    for name, data in objects.items():
        assert results[name] == google_crc32c.value(data)
        blob = storage_client.bucket(gcs_bucket).blob(name)
        assert await trio.to_thread.run_sync(blob.download_as_bytes) == data
    assert refused["fragmenter"] == {ErrorCode.FRAGMENT_LIMIT}
    assert refused["squatter"] == {ErrorCode.TOO_BUSY}
    limits = _TOTAL_BUFFER_MIB * MiB + _PREAUTH_CONNECTIONS * _PREAUTH_READ
    print(
        f"proxy RSS: baseline {baseline / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB"
        f" (+{(peak - baseline) / MiB:.1f} MiB; limits {limits / MiB:.1f} MiB + slack 64 MiB)"
    )
    assert peak - baseline <= limits + _SLACK


def _half_hello(sent: int) -> bytes:
    """The first ``sent`` bytes of a Hello announcing 60 KiB: held, never finished."""
    frame = Connection(Role.CLIENT).send_bytes(Hello((1, 2), 256 * 1024, auth="h" * 60_000))
    return frame[:sent]


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
