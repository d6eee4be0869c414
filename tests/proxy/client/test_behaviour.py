"""The client library against a scripted stand-in for the proxy, over real loopback sockets.

The stand-in speaks the protocol correctly (it is built on ``protocol.Connection``) and keeps
the object in memory, so each test can script one misbehaviour exactly -- a corrupt frame,
a connection cut partway through a frame, a restart that forgets unacknowledged bytes, a
going-away, a lie about the checksum -- and check what the client did about it. The real
proxy is exercised end to end in test_e2e_*.py.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import queue
import random
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import google_crc32c
import pytest
import trio

from protocol import (
    NEED_DATA,
    SUPPORTED_VERSIONS,
    Abort,
    Ack,
    AttachUpload,
    Complete,
    Completed,
    Connection,
    ConnectionClosed,
    Credit,
    Error,
    ErrorCode,
    GoingAway,
    Hello,
    Incomplete,
    OpenUpload,
    Reply,
    Role,
    Status,
    StatusQuery,
    UploadOpened,
    WriteAtData,
    WriteAtEnd,
    WriteAtStart,
)
from protocol.ranges import RangeSet
from proxy.cli.progress import status_line
from proxy.client import (
    ChecksumMismatchError,
    ClientSettings,
    ProxyUnreachableError,
    RetryPolicy,
    UploadError,
    UploadOptions,
    UploadProgress,
    UploadRejectedError,
    blocking,
    connect_upload,
    upload_file,
    upload_stream,
)

KiB = 1024
MiB = 1024 * KiB
FRAME = 64 * KiB


class FakeProxy:
    """One upload's worth of proxy: commits the contiguous prefix at once, and misbehaves on cue."""

    def __init__(self, *, window: int = 1 * MiB, auth: str = "") -> None:
        self.window = window
        self.auth = auth
        #: the protocol versions this proxy speaks: (1,) is a proxy from before version 2
        self.versions: tuple[int, ...] = SUPPORTED_VERSIONS
        #: the versions each connection agreed, in the order they said Hello
        self.agreed: list[int] = []
        #: on connections after the first, report a window that lags behind the real one (a
        #: slow connection's stale credit)
        self.stale_window_on_later_connections = False
        self.data = bytearray()
        self.received = RangeSet()
        self.committed = 0
        self.token = b"token-1"
        self.opened: OpenUpload | None = None
        self.resumed = False
        self.aborted = False
        self.connections = 0
        self.writes = 0
        #: connections that sent a second WriteAt before their first was answered
        self.pipelined = 0
        self.credit_violations: list[tuple[int, int]] = []
        # -- scripted faults ---------------------------------------------------------------
        #: answer BAD_CRC (once each) to WriteAts at these offsets
        self.corrupt_at: set[int] = set()
        #: answer TOO_BUSY (once each) to WriteAts at these offsets, as a version-1 proxy at
        #: its fragment cap does (FRAGMENT_LIMIT in version 2): only that frame was dropped
        self.busy_at: set[int] = set()
        #: drop the connection when the n-th WriteAt (1-based, all connections) begins
        self.cut_at_write: set[int] = set()
        #: send GoingAway after the n-th WriteAt and close soon after
        self.going_away_at_write: int | None = None
        #: forget unacknowledged data and drop every connection at the n-th WriteAt
        self.restart_at_write: int | None = None
        #: report this crc32c in Completed instead of the real one
        self.lie_crc32c: int | None = None
        #: report nothing committed beyond this (GCS holding back), so later bytes can be lost
        self.commit_limit: int | None = None
        #: at the first Complete, lose these acknowledged (uncommitted) bytes, as a restarted
        #: proxy would, and answer MISSING_RANGES
        self.lose_at_complete: tuple[int, int] | None = None
        #: how long a Complete that finds bytes missing waits before answering Incomplete,
        #: as a proxy waits its complete_timeout for bytes still on their way
        self.incomplete_after = 0.0
        #: never answer the StatusQuery of the first connection to attach, and answer later
        #: attaches only once that query has arrived
        self.hold_first_attached_status = False
        self.status_answered = trio.Event()
        self._first_status_arrived = trio.Event()
        self._attaches = 0
        self._scopes: set[trio.CancelScope] = set()

    @property
    def window_end(self) -> int:
        return self.committed + self.window

    def _store(self, offset: int, payload: bytes) -> None:
        end = offset + len(payload)
        if len(self.data) < end:
            self.data.extend(bytes(end - len(self.data)))
        for start, stop in self.received.missing(offset, end):  # first copy wins
            self.data[start:stop] = payload[start - offset : stop - offset]
        self.received.add(offset, end)
        head = self.received.first()
        if head is not None and head[0] == 0:
            self.committed = min(head[1], self.commit_limit or head[1])

    def drop_connections(self) -> None:
        for scope in self._scopes:
            scope.cancel()

    def _restart(self) -> None:
        self.received = RangeSet([(0, self.committed)] if self.committed else [])
        self.resumed = True
        for scope in self._scopes:
            scope.cancel()

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                await self._serve(stream)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away: that is what several tests are about
        finally:
            self._scopes.discard(scope)
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as nursery:
            await self._serve_requests(stream, nursery)
            nursery.cancel_scope.cancel()

    async def _serve_requests(self, stream: trio.SocketStream, nursery: trio.Nursery) -> None:
        conn = Connection(Role.SERVER, max_frame_size=FRAME, versions=self.versions)
        stale = self.stale_window_on_later_connections and self.connections > 1
        send_lock = trio.Lock()
        in_flight = 0
        held: list[int] = []  # the first Ack, held back until a second frame arrives
        holding = True
        going_away = False
        payload = bytearray()
        offset = 0
        attach_index = 0

        async def send(*replies: Reply) -> None:
            async with send_lock:
                await stream.send_all(b"".join(b"".join(conn.send(r)) for r in replies))

        def window_end() -> int:
            # lagging by half a window, as a credit held up on a slower connection is
            return (
                max(self.committed, self.window_end - self.window // 2)
                if stale
                else self.window_end
            )

        async def ack(*seqs: int) -> None:
            await send(
                *(Ack(seq, self.committed) for seq in seqs),
                Credit(0, self.committed, window_end()),
            )

        async def release_held() -> None:
            # A client that waits for each Ack would wait forever: answer it after a while.
            nonlocal holding
            await trio.sleep(0.3)
            if holding:
                holding = False
                await ack(*held)

        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                conn.receive_data(await stream.receive_some(256 * KiB))
                continue
            if isinstance(event, ConnectionClosed):
                return
            if isinstance(event, Hello):
                if event.auth != self.auth:
                    await send(Error(event.seq, ErrorCode.UNAUTHENTICATED, False, "bad token"))
                    return
                welcome = conn.welcome(event)
                self.agreed.append(welcome.version)
                await send(welcome)
            elif isinstance(event, OpenUpload):
                self.opened = event
                await send(
                    UploadOpened(event.seq, self.token, 0, False),
                    Credit(0, self.committed, self.window_end),
                )
            elif isinstance(event, AttachUpload):
                assert event.token == self.token
                self._attaches += 1
                attach_index = self._attaches
                if self.hold_first_attached_status and attach_index > 1:
                    await self._first_status_arrived.wait()
                await send(
                    UploadOpened(event.seq, self.token, self.committed, self.resumed, window_end()),
                    Credit(0, self.committed, window_end()),
                )
            elif isinstance(event, WriteAtStart):
                self.writes += 1
                in_flight += 1
                if event.offset + event.length > self.window_end or event.offset < 0:
                    self.credit_violations.append((event.offset, event.offset + event.length))
                if self.writes in self.cut_at_write:
                    return  # partway through the frame: its data never arrives
                if self.writes == self.restart_at_write:
                    self._restart()
                    return
                offset, payload = event.offset, bytearray()
            elif isinstance(event, WriteAtData):
                payload += event.data
            elif isinstance(event, WriteAtEnd):
                in_flight -= 1
                if offset in self.corrupt_at:
                    self.corrupt_at.discard(offset)
                    await send(Error(event.seq, ErrorCode.BAD_CRC, True, "payload crc mismatch"))
                    continue
                if offset in self.busy_at:
                    self.busy_at.discard(offset)
                    await send(Error(event.seq, ErrorCode.TOO_BUSY, True, "too many fragments"))
                    continue
                self._store(offset, bytes(payload))
                if not holding:
                    await ack(event.seq)
                elif not held:
                    held.append(event.seq)
                    nursery.start_soon(release_held)
                else:
                    holding = False
                    self.pipelined += 1
                    await ack(*held, event.seq)
                if self.writes == self.going_away_at_write and not going_away:
                    going_away = True
                    await send(GoingAway(0, "restarting"))
                if going_away and in_flight == 0 and not holding:
                    return
            elif isinstance(event, StatusQuery):
                if self.hold_first_attached_status and attach_index == 1:
                    self._first_status_arrived.set()
                    await trio.sleep_forever()
                self.status_answered.set()
                await send(Status(event.seq, self.committed, tuple(self.received), window_end()))
            elif isinstance(event, Complete):
                if self.lose_at_complete is not None:
                    self.received.remove(*self.lose_at_complete)
                    self.lose_at_complete = None
                if not self.received.contains(0, event.total_size):
                    await trio.sleep(self.incomplete_after)
                    missing = tuple(self.received.missing(0, event.total_size))
                    # a version-1 client gets Error(MISSING_RANGES) instead (send() sees to it)
                    await send(Incomplete(event.seq, self.committed, self.window_end, missing))
                    continue
                real = google_crc32c.value(bytes(self.data[: event.total_size]))
                crc = real if self.lie_crc32c is None else self.lie_crc32c
                await send(Completed(event.seq, 1, event.total_size, crc, None))
            elif isinstance(event, Abort):
                self.aborted = True
                await send(Ack(event.seq, self.committed))
            else:
                pytest.fail(f"unexpected {event!r}")


@pytest.fixture
async def fake_proxy() -> AsyncIterator[tuple[FakeProxy, tuple[str, int]]]:
    proxy = FakeProxy()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        yield proxy, ("127.0.0.1", port)
        nursery.cancel_scope.cancel()


@pytest.fixture
def payload_file(tmp_path: Path) -> Callable[[int], tuple[Path, bytes]]:
    def make(size: int) -> tuple[Path, bytes]:
        data = os.urandom(size)
        path = tmp_path / f"payload-{size}"
        path.write_bytes(data)
        return path, data

    return make


FAST = ClientSettings(
    frame_size=FRAME,
    frames_in_flight=4,
    reply_timeout=10.0,
    retry=RetryPolicy(deadline=5.0, initial_delay=0.001, max_delay=0.01),
)


def settings(connections: int, **changes: object) -> ClientSettings:
    return dataclasses.replace(FAST, connections=connections, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("connections", [1, 4])
async def test_file_arrives_whole_within_credit_and_pipelined(
    fake_proxy: tuple[FakeProxy, tuple[str, int]],
    payload_file: Callable[[int], tuple[Path, bytes]],
    connections: int,
) -> None:
    proxy, address = fake_proxy
    path, data = payload_file(3 * MiB + 12345)
    result = await upload_file(
        path, "gs://bkt/dir/obj", UploadOptions(proxy=address, settings=settings(connections))
    )
    assert bytes(proxy.data) == data
    assert result.size == len(data)
    assert result.crc32c == google_crc32c.value(data)
    assert proxy.opened is not None
    assert (proxy.opened.bucket, proxy.opened.name) == ("bkt", "dir/obj")
    assert proxy.opened.expected_size == len(data)
    assert proxy.credit_violations == []
    assert proxy.connections == connections
    assert proxy.pipelined >= 1  # frames are pipelined, not sent one by one
    assert result.reconnects == 0
    assert result.bytes_sent == len(data)  # nothing was sent twice


async def test_stream_keeps_a_bounded_buffer_and_arrives_whole(
    fake_proxy: tuple[FakeProxy, tuple[str, int]],
) -> None:
    proxy, address = fake_proxy
    data = os.urandom(2 * MiB + 777)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 10_000):  # sizes unrelated to frames
            yield data[start : start + 10_000]

    result = await upload_stream(
        chunks(),
        "gs://bkt/stream",
        UploadOptions(proxy=address, settings=settings(2, stream_buffer=4 * FRAME)),
    )
    assert bytes(proxy.data) == data
    assert result.size == len(data)
    assert proxy.opened is not None
    assert proxy.opened.expected_size is None


async def test_corrupt_frame_is_resent(
    fake_proxy: tuple[FakeProxy, tuple[str, int]],
    payload_file: Callable[[int], tuple[Path, bytes]],
) -> None:
    proxy, address = fake_proxy
    proxy.corrupt_at = {2 * FRAME, 9 * FRAME}
    path, data = payload_file(16 * FRAME)
    result = await upload_file(
        path, "gs://bkt/o", UploadOptions(proxy=address, settings=settings(2))
    )
    assert bytes(proxy.data) == data
    assert result.resent_bytes_by_cause == {"bad_crc": 2 * FRAME}
    assert result.errors_by_code == {"BAD_CRC": 2}
    assert result.reconnects == 0  # a payload CRC error does not cost the connection


async def test_a_frame_refused_as_busy_is_resent_on_the_same_connection(
    fake_proxy: tuple[FakeProxy, tuple[str, int]],
    payload_file: Callable[[int], tuple[Path, bytes]],
) -> None:
    # TOO_BUSY's scope is the frame (protocol's ERROR_SPECS): the frame is resent, and the
    # connection, which the proxy keeps, is kept too.
    proxy, address = fake_proxy
    proxy.busy_at = {3 * FRAME, 7 * FRAME}
    path, data = payload_file(12 * FRAME)
    options = UploadOptions(proxy=address, settings=settings(2))
    result = await upload_file(path, "gs://bkt/o", options)
    assert bytes(proxy.data) == data
    assert result.resent_bytes_by_cause == {"too_busy": 2 * FRAME}
    assert result.errors_by_code == {"TOO_BUSY": 2}
    assert result.reconnects == 0
    assert proxy.connections == 2


async def test_connection_cut_partway_through_a_frame_is_survived(
    fake_proxy: tuple[FakeProxy, tuple[str, int]],
    payload_file: Callable[[int], tuple[Path, bytes]],
) -> None:
    proxy, address = fake_proxy
    proxy.cut_at_write = {5, 20}
    path, data = payload_file(40 * FRAME)
    result = await upload_file(
        path, "gs://bkt/o", UploadOptions(proxy=address, settings=settings(4))
    )
    assert bytes(proxy.data) == data
    assert result.reconnects == 2
    assert result.resent_bytes_by_cause["connection_lost"] >= 2 * FRAME
    assert proxy.credit_violations == []


async def test_restart_that_forgets_unacknowledged_bytes_is_resumed(
    fake_proxy: tuple[FakeProxy, tuple[str, int]],
    payload_file: Callable[[int], tuple[Path, bytes]],
) -> None:
    proxy, address = fake_proxy
    proxy.restart_at_write = 12
    path, data = payload_file(32 * FRAME)
    result = await upload_file(
        path, "gs://bkt/o", UploadOptions(proxy=address, settings=settings(3))
    )
    assert bytes(proxy.data) == data
    assert result.reconnects == 3  # every connection was dropped once
    assert proxy.credit_violations == []


async def test_going_away_moves_to_a_new_connection(
    fake_proxy: tuple[FakeProxy, tuple[str, int]],
    payload_file: Callable[[int], tuple[Path, bytes]],
) -> None:
    proxy, address = fake_proxy
    proxy.going_away_at_write = 6
    path, data = payload_file(24 * FRAME)
    result = await upload_file(
        path, "gs://bkt/o", UploadOptions(proxy=address, settings=settings(1))
    )
    assert bytes(proxy.data) == data
    assert result.reconnects == 1
    assert proxy.connections == 2


async def test_going_away_reconnects_to_the_same_proxy_not_the_next_one(
    fake_proxy: tuple[FakeProxy, tuple[str, int]],
    payload_file: Callable[[int], tuple[Path, bytes]],
) -> None:
    # A going-away is a restart on its way: the same address will answer again. Only a proxy
    # that cannot be reached sends the slots to the next address.
    proxy, address = fake_proxy
    proxy.going_away_at_write = 6
    spare = FakeProxy()
    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, spare.handle, 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        spare_address = ("127.0.0.1", listeners[0].socket.getsockname()[1])
        path, data = payload_file(24 * FRAME)
        options = UploadOptions(proxy=[address, spare_address], settings=settings(1))
        result = await upload_file(path, "gs://bkt/o", options)
        nursery.cancel_scope.cancel()
    assert bytes(proxy.data) == data
    assert result.reconnects == 1
    assert proxy.connections == 2
    assert spare.connections == 0


async def test_a_window_smaller_than_a_frame_still_finishes(
    fake_proxy: tuple[FakeProxy, tuple[str, int]],
    payload_file: Callable[[int], tuple[Path, bytes]],
) -> None:
    proxy, address = fake_proxy
    proxy.window = 40 * KiB
    path, data = payload_file(300 * KiB)
    await upload_file(path, "gs://bkt/o", UploadOptions(proxy=address, settings=settings(4)))
    assert bytes(proxy.data) == data
    assert proxy.credit_violations == []


async def test_wrong_credentials_are_one_clear_error(
    fake_proxy: tuple[FakeProxy, tuple[str, int]],
    payload_file: Callable[[int], tuple[Path, bytes]],
) -> None:
    proxy, address = fake_proxy
    proxy.auth = "right"
    path, _ = payload_file(FRAME)
    with pytest.raises(UploadRejectedError) as caught:
        await upload_file(
            path, "gs://bkt/o", UploadOptions(proxy=address, auth="wrong", settings=settings(4))
        )
    assert caught.value.code == ErrorCode.UNAUTHENTICATED
    assert "right" not in str(caught.value)  # secrets never appear in messages
    assert "wrong" not in str(caught.value)


async def test_checksum_disagreement_is_reported(
    fake_proxy: tuple[FakeProxy, tuple[str, int]],
    payload_file: Callable[[int], tuple[Path, bytes]],
) -> None:
    proxy, address = fake_proxy
    proxy.lie_crc32c = 1234
    path, _ = payload_file(3 * FRAME)
    with pytest.raises(ChecksumMismatchError, match="crc32c"):
        await upload_file(path, "gs://bkt/o", UploadOptions(proxy=address, settings=settings(2)))


async def test_a_file_that_changes_during_the_upload_fails_it(
    fake_proxy: tuple[FakeProxy, tuple[str, int]],
    payload_file: Callable[[int], tuple[Path, bytes]],
) -> None:
    # The file's checksum is combined from its pieces' as they were read, so it would match
    # whatever mix of versions was sent: the change itself has to be noticed.
    proxy, address = fake_proxy
    path, _ = payload_file(8 * FRAME)

    def touch(progress: UploadProgress) -> None:
        if progress.bytes_sent:
            os.utime(path, ns=(0, 0))

    with pytest.raises(UploadError, match="file changed while it was being uploaded"):
        await upload_file(
            path, "gs://bkt/o", UploadOptions(proxy=address, settings=settings(2), progress=touch)
        )
    assert proxy.aborted  # never completed: the block was left with the error, which aborts


async def unused_port() -> int:
    with trio.socket.socket() as sock:  # a port that nothing listens on once it is closed
        await sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_unreachable_proxy_gives_up_after_the_policy() -> None:
    port = await unused_port()
    with pytest.raises(ProxyUnreachableError, match="cannot connect"):
        async with connect_upload(
            "gs://bkt/o",
            UploadOptions(
                proxy=("127.0.0.1", port),
                settings=settings(
                    2, retry=RetryPolicy(deadline=0.2, initial_delay=0.01, max_delay=0.05)
                ),
            ),
        ):
            pytest.fail("the upload cannot have opened")


async def test_retries_stop_at_the_deadline_not_after_a_number_of_attempts(
    mock_clock: trio.testing.MockClock,
) -> None:
    # Virtual time jumps once every task has waited 20 ms of real time: a refused loopback
    # connect answers far sooner, so only the backoff sleeps are skipped.
    mock_clock.autojump_threshold = 0.02
    port = await unused_port()
    policy = RetryPolicy(deadline=30.0, initial_delay=0.5, max_delay=4.0)
    seen: list[UploadProgress] = []
    started = trio.current_time()
    with pytest.raises(ProxyUnreachableError, match="s without progress") as caught:
        async with connect_upload(
            "gs://bkt/o",
            UploadOptions(
                proxy=("127.0.0.1", port),
                settings=settings(2, retry=policy),
                progress=seen.append,
            ),
        ):
            pytest.fail("the upload cannot have opened")
    waited = trio.current_time() - started
    assert policy.deadline <= waited <= policy.deadline + policy.max_delay
    assert "cannot connect to 127.0.0.1" in caught.value.message
    assert caught.value.code is None
    assert caught.value.retryable
    # a display is told, about once a second, how long the proxy has been unavailable
    waits = [snapshot.retrying_for for snapshot in seen if snapshot.retrying_for is not None]
    assert len(waits) >= policy.deadline - 2
    assert waits == sorted(waits)
    assert waits[-1] >= policy.deadline - 1
    assert status_line(seen[-1]) == f"proxy unavailable, retrying ({waits[-1]:.0f} s)"


def test_backoff_is_exponential_capped_and_jittered() -> None:
    policy = RetryPolicy(initial_delay=0.1, max_delay=2.0, multiplier=2.0)
    rng = random.Random(7)
    for attempt in range(1, 12):
        ceiling = min(2.0, 0.1 * 2.0 ** (attempt - 1))
        delays = [policy.delay(attempt, rng) for _ in range(200)]
        assert all(0.0 <= delay <= ceiling for delay in delays)
        assert max(delays) > ceiling * 0.8  # jitter spreads over the whole range
        assert min(delays) < ceiling * 0.2
    assert not policy.expired(119.9)
    assert RetryPolicy().expired(120.0)  # google-cloud-storage's default deadline


async def test_leaving_the_block_without_completing_aborts(
    fake_proxy: tuple[FakeProxy, tuple[str, int]],
) -> None:
    proxy, address = fake_proxy
    async with connect_upload(
        "gs://bkt/o", UploadOptions(proxy=address, settings=settings(2))
    ) as upload:
        await upload.write(b"x" * 1000)
    assert proxy.aborted


@pytest.fixture
def fake_proxy_in_thread() -> Iterator[tuple[FakeProxy, tuple[str, int]]]:
    """The stand-in served by its own trio loop in a thread, for the blocking API."""
    proxy = FakeProxy()
    ready: queue.Queue[tuple[int, trio.lowlevel.TrioToken, trio.Event]] = queue.Queue()

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            serve_tcp = functools.partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1")
            listeners = await nursery.start(serve_tcp)
            stop = trio.Event()
            port = listeners[0].socket.getsockname()[1]
            ready.put((port, trio.lowlevel.current_trio_token(), stop))
            await stop.wait()
            nursery.cancel_scope.cancel()

    thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
    thread.start()
    port, token, stop = ready.get(timeout=10)
    yield proxy, ("127.0.0.1", port)
    trio.from_thread.run_sync(stop.set, trio_token=token)
    thread.join(timeout=10)


def test_blocking_file_upload(
    fake_proxy_in_thread: tuple[FakeProxy, tuple[str, int]],
    payload_file: Callable[[int], tuple[Path, bytes]],
) -> None:
    proxy, address = fake_proxy_in_thread
    path, data = payload_file(5 * FRAME + 3)
    seen: list[UploadProgress] = []
    result = blocking.upload_file(
        path, "gs://bkt/o", UploadOptions(proxy=address, settings=settings(3), progress=seen.append)
    )
    assert bytes(proxy.data) == data
    assert result.size == len(data)
    assert seen[-1].bytes_received == len(data)


def test_blocking_file_upload_uses_the_connector(
    fake_proxy_in_thread: tuple[FakeProxy, tuple[str, int]],
    payload_file: Callable[[int], tuple[Path, bytes]],
) -> None:
    # The blocking upload_file once dropped ``connector`` on the floor.
    proxy, address = fake_proxy_in_thread
    path, data = payload_file(2 * FRAME + 1)
    dialled: list[tuple[str, int]] = []

    async def connect(host: str, port: int) -> trio.abc.Stream:
        dialled.append((host, port))
        return await trio.open_tcp_stream(host, port)

    options = UploadOptions(proxy=address, settings=settings(2), connector=connect)
    result = blocking.upload_file(path, "gs://bkt/o", options)
    assert bytes(proxy.data) == data
    assert result.size == len(data)
    assert dialled == [address, address]


def test_blocking_stream_upload(
    fake_proxy_in_thread: tuple[FakeProxy, tuple[str, int]],
) -> None:
    proxy, address = fake_proxy_in_thread
    data = os.urandom(3 * FRAME + 11)
    result = blocking.upload_stream(
        io.BytesIO(data), "gs://bkt/o", UploadOptions(proxy=address, settings=settings(2))
    )
    assert bytes(proxy.data) == data
    assert result.size == len(data)


async def test_missing_ranges_reported_after_the_retry_deadline_are_still_resent(
    fake_proxy: tuple[FakeProxy, tuple[str, int]],
    payload_file: Callable[[int], tuple[Path, bytes]],
) -> None:
    """A proxy that waits longer than the client's retry deadline before answering a
    Complete with the bytes it lacks (its complete_timeout; a predecessor that died had
    acknowledged them) has still answered: the deadline counts from that answer."""
    proxy, address = fake_proxy
    proxy.commit_limit = 4 * FRAME
    proxy.lose_at_complete = (5 * FRAME, 7 * FRAME)
    proxy.incomplete_after = 0.6
    path, data = payload_file(10 * FRAME)
    retry = RetryPolicy(deadline=0.4, initial_delay=0.001, max_delay=0.01)
    result = await upload_file(
        path, "gs://bkt/o", UploadOptions(proxy=address, settings=settings(2, retry=retry))
    )
    assert bytes(proxy.data) == data
    assert result.resent_bytes_by_cause == {"proxy_lost": 2 * FRAME}


@pytest.mark.parametrize("proxy_versions", [(1,), (1, 2)], ids=["v1-proxy", "v2-proxy"])
async def test_complete_answered_with_missing_ranges_resends_them(
    fake_proxy: tuple[FakeProxy, tuple[str, int]],
    payload_file: Callable[[int], tuple[Path, bytes]],
    proxy_versions: tuple[int, ...],
) -> None:
    """Version 2 answers Incomplete with the list, version 1 Error(MISSING_RANGES): either
    way the lost bytes, and only they, are sent again and the Complete repeated."""
    proxy, address = fake_proxy
    proxy.versions = proxy_versions
    proxy.commit_limit = 4 * FRAME
    proxy.lose_at_complete = (5 * FRAME, 7 * FRAME)
    path, data = payload_file(10 * FRAME)
    result = await upload_file(
        path, "gs://bkt/o", UploadOptions(proxy=address, settings=settings(2))
    )
    assert bytes(proxy.data) == data
    assert result.errors_by_code == {"MISSING_RANGES": 1}
    assert result.resent_bytes_by_cause == {"proxy_lost": 2 * FRAME}
    assert set(proxy.agreed) == {max(proxy_versions)}


async def test_a_stale_window_on_a_slower_connection_does_not_stall_the_upload(
    fake_proxy: tuple[FakeProxy, tuple[str, int]],
    payload_file: Callable[[int], tuple[Path, bytes]],
) -> None:
    """Every connection but the first reports a window lagging behind the first's: the client
    keeps the largest window seen on any connection and never writes outside the real one."""
    proxy, address = fake_proxy
    proxy.window = 2 * FRAME
    proxy.stale_window_on_later_connections = True
    path, data = payload_file(12 * FRAME)
    with trio.fail_after(20):
        result = await upload_file(
            path, "gs://bkt/o", UploadOptions(proxy=address, settings=settings(4))
        )
    assert bytes(proxy.data) == data
    assert result.size == len(data)
    assert proxy.credit_violations == []


class StallsOnceArmed(trio.abc.Stream):
    """A real connection whose sends stop for good once ``armed`` is set: an upstream stall.

    As with a kernel socket, closing the stream wakes a stalled send with
    :class:`trio.ClosedResourceError`.
    """

    def __init__(self, stream: trio.abc.Stream, armed: trio.Event) -> None:
        self._stream = stream
        self._armed = armed
        self._closed = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._armed.is_set():
            await self._closed.wait()
            raise trio.ClosedResourceError("the stream was closed while a send was stalled")
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        self._closed.set()
        await self._stream.aclose()


async def _upload_whose_complete_stalls(
    address: tuple[str, int], path: Path, size: int, client_settings: ClientSettings
) -> None:
    """Upload ``path``; every connection open once all bytes are acknowledged stalls."""
    armed = trio.Event()

    async def connect(host: str, port: int) -> trio.abc.Stream:
        stream = await trio.open_tcp_stream(host, port)
        return stream if armed.is_set() else StallsOnceArmed(stream, armed)

    def arm_when_all_acknowledged(progress: UploadProgress) -> None:
        if progress.bytes_received == size:
            armed.set()

    result = await upload_file(
        path,
        "gs://bkt/o",
        UploadOptions(
            proxy=address,
            settings=client_settings,
            connector=connect,
            progress=arm_when_all_acknowledged,
        ),
    )
    assert result.size == size


@pytest.mark.parametrize("connections", [1, 2])
async def test_a_complete_whose_send_times_out_is_sent_again_on_a_new_connection(
    fake_proxy: tuple[FakeProxy, tuple[str, int]],
    payload_file: Callable[[int], tuple[Path, bytes]],
    connections: int,
) -> None:
    # The Complete's write times out (reply_timeout) while its connection still looks
    # healthy: this once escaped as TooSlowError, then the abort on the way out tried that
    # same connection and raised "cannot send ABORT in state COMPLETING".
    proxy, address = fake_proxy
    path, data = payload_file(3 * FRAME + 5)
    client_settings = settings(connections, reply_timeout=1.0, complete_timeout=60.0)
    await _upload_whose_complete_stalls(address, path, len(data), client_settings)
    assert bytes(proxy.data) == data
    assert not proxy.aborted


async def test_a_complete_whose_connection_closes_under_its_send_is_sent_again(
    fake_proxy: tuple[FakeProxy, tuple[str, int]],
    payload_file: Callable[[int], tuple[Path, bytes]],
) -> None:
    # No reply within complete_timeout: the connection is closed while the Complete is
    # still being written, which once escaped from complete() as ClosedResourceError.
    proxy, address = fake_proxy
    path, data = payload_file(3 * FRAME + 5)
    client_settings = settings(1, reply_timeout=60.0, complete_timeout=0.5)
    await _upload_whose_complete_stalls(address, path, len(data), client_settings)
    assert bytes(proxy.data) == data
    assert not proxy.aborted


async def test_status_queries_answered_out_of_order_while_frames_are_acknowledged(
    fake_proxy: tuple[FakeProxy, tuple[str, int]],
) -> None:
    # Two connections attach and ask for Status; the first answer comes last, with Acks in
    # between. Each query's record of what was acknowledged meanwhile is its own (they
    # once were told apart by content, and the wrong one was removed: ValueError).
    proxy, address = fake_proxy
    proxy.hold_first_attached_status = True
    data = os.urandom(8 * FRAME)
    acknowledged = trio.Event()

    def note(progress: UploadProgress) -> None:
        if progress.bytes_received == len(data):
            acknowledged.set()

    async with connect_upload(
        "gs://bkt/o", UploadOptions(proxy=address, settings=settings(3), progress=note)
    ) as upload:
        with trio.fail_after(10):
            await proxy.status_answered.wait()
            await upload.write(data)
            await acknowledged.wait()
        proxy.drop_connections()  # the held-back Status never comes; its connection drops
        result = await upload.complete()
    assert bytes(proxy.data) == data
    assert result.size == len(data)
