"""Composite uploads (protocol section 14) end to end: the client library, the real proxy made
to store every upload of known size as 256 KiB segments, and the strict GCS endpoint.

Every test checks the object GCS ends up with, byte for byte, and that the temporary namespace
(``.rup/tmp/``) is empty afterwards. Faults are real: a connection reset by faultnet partway
through a segment, a temporary object deleted in GCS underneath the upload.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import google_crc32c
import pytest
import trio
from google.cloud import storage  # type: ignore[import-untyped]

from faultnet.counters import FaultCounters
from faultnet.gcs import GcsServer
from faultnet.plan import FaultPlan
from faultnet.pytest_plugin import RetryTestFactory
from faultnet.stream import open_tcp_stream
from protocol import ErrorCode, FrameType
from protocol._spec import HEADER_STRUCT
from proxy.client import (
    ClientSettings,
    CompositeUpload,
    Connector,
    RetryPolicy,
    UploadOptions,
    UploadProgress,
    UploadResult,
    UploadState,
    connect_upload,
    upload_file,
)
from proxy.server import ProxyServer, serve_in_background
from proxy.server.backend import Backend, TargetKind
from proxy.server.settings import CompositeMode, CompositePolicy, ServerSettings
from tests.proxy.client.test_behaviour import FakeProxy

KiB = 1024
MiB = 1024 * KiB
SEGMENT = 256 * KiB
TEMP_PREFIX = ".rup/tmp/"

StartProxy = Callable[..., contextlib.AbstractAsyncContextManager[ProxyServer]]

SETTINGS = ClientSettings(
    connections=3,
    frame_size=64 * KiB,
    reply_timeout=20.0,
    retry=RetryPolicy(deadline=10.0, initial_delay=0.01, max_delay=0.2),
)


@pytest.fixture
async def composite_proxy(start_proxy: StartProxy) -> AsyncIterator[ProxyServer]:
    policy = CompositePolicy(mode=CompositeMode.ALWAYS, segment_size=SEGMENT, parallel_segments=4)
    async with start_proxy(composite=policy) as server:
        yield server


@pytest.fixture
def payload(tmp_path: Path) -> Callable[[int], tuple[Path, bytes]]:
    def make(size: int) -> tuple[Path, bytes]:
        data = os.urandom(size)
        path = tmp_path / f"payload-{size}.bin"
        path.write_bytes(data)
        return path, data

    return make


async def stored(client: storage.Client, bucket: str, name: str) -> storage.Blob:
    """The object's metadata and bytes (``blob._payload``-free: downloaded afresh)."""
    blob = await trio.to_thread.run_sync(client.bucket(bucket).get_blob, name)
    assert blob is not None, f"gs://{bucket}/{name} was not stored"
    return blob


async def temporaries(client: storage.Client, bucket: str) -> list[str]:
    def names() -> list[str]:
        return [blob.name for blob in client.list_blobs(bucket, prefix=TEMP_PREFIX)]

    return await trio.to_thread.run_sync(names)


async def check_object(
    client: storage.Client, bucket: str, name: str, data: bytes, *, composite: bool
) -> None:
    blob = await stored(client, bucket, name)
    assert await trio.to_thread.run_sync(blob.download_as_bytes) == data
    assert (blob.md5_hash is None) is composite
    assert (blob.component_count is not None and blob.component_count > 1) is composite
    assert await temporaries(client, bucket) == []


def connector_with(plan_for: Callable[[int], FaultPlan], counters: FaultCounters) -> Connector:
    """Connections numbered from 0 in the order the client opens them, each given its plan."""
    indexes = itertools.count()

    async def connect(host: str, port: int) -> trio.abc.Stream:
        index = next(indexes)
        return await open_tcp_stream(
            host, port, plan=plan_for(index), index=index, counters=counters
        )

    return connect


async def test_a_file_is_stored_as_segments_in_parallel_and_composed(
    composite_proxy: ProxyServer,
    gcs_bucket: str,
    storage_client: storage.Client,
    payload: Callable[[int], tuple[Path, bytes]],
) -> None:
    path, data = payload(2 * MiB + 12345)  # 9 segments, the last one short
    snapshots: list[UploadProgress] = []
    options = UploadOptions(
        proxy=composite_proxy.address, settings=SETTINGS, progress=snapshots.append
    )
    result = await upload_file(path, f"gs://{gcs_bucket}/composed", options)
    assert result.composite
    assert result.segments == 9
    assert result.md5 is None
    assert (result.size, result.crc32c) == (len(data), google_crc32c.value(data))
    assert result.connections == 3  # min(connections, parallel_segments)
    assert result.bytes_sent == len(data)  # every byte once
    assert result.reconnects == 0
    # the progress counts the whole object, over every segment
    assert snapshots[-1].total == len(data)
    assert snapshots[-1].bytes_sent == len(data)
    assert max(s.connections for s in snapshots) == 3
    assert [s.bytes_sent for s in snapshots] == sorted(s.bytes_sent for s in snapshots)
    await check_object(storage_client, gcs_bucket, "composed", data, composite=True)


async def test_a_stream_of_declared_size_is_cut_into_segments_as_it_is_written(
    composite_proxy: ProxyServer, gcs_bucket: str, storage_client: storage.Client
) -> None:
    data = os.urandom(5 * SEGMENT + 1000)
    options = UploadOptions(
        proxy=composite_proxy.address,
        # a buffer smaller than a segment: the writer waits for segments to commit
        settings=dataclasses.replace(SETTINGS, stream_buffer=128 * KiB),
        expected_size=len(data),
    )
    async with connect_upload(f"gs://{gcs_bucket}/stream", options) as upload:
        assert isinstance(upload, CompositeUpload)
        for start in range(0, len(data), 100_000):  # chunks that straddle segments
            await upload.write(data[start : start + 100_000])
        result = await upload.complete()
    assert result.segments == 6
    assert result.bytes_sent == len(data)
    await check_object(storage_client, gcs_bucket, "stream", data, composite=True)


@pytest.mark.parametrize("source", ["file", "stream"])
async def test_a_connection_reset_partway_through_a_segment_is_resumed_with_its_token(
    composite_proxy: ProxyServer,
    gcs_bucket: str,
    storage_client: storage.Client,
    payload: Callable[[int], tuple[Path, bytes]],
    source: str,
) -> None:
    # Connections 0-2 are the open's slots (one opens, the others close once it is
    # composite); 3-5 are the first segments'. Connection 4 is reset 100 KiB into its
    # segment, in the middle of a frame. A stream's segment keeps what the proxy has not
    # committed, so it resumes as a file's does.
    path, data = payload(2 * MiB)
    counters = FaultCounters()
    reset = FaultPlan.parse("seed=1; reset_peer:up(after=100k)")
    faulted = SETTINGS.connections + 1
    connector = connector_with(lambda index: reset if index == faulted else FaultPlan(), counters)
    options = UploadOptions(
        proxy=composite_proxy.address,
        settings=SETTINGS,
        connector=connector,
        expected_size=len(data),
    )
    async with connect_upload(f"gs://{gcs_bucket}/reset", options) as upload:
        if source == "file":
            await upload.send_file(path)
        else:
            for start in range(0, len(data), 64 * KiB):
                await upload.write(data[start : start + 64 * KiB])
        result = await upload.complete()
    assert counters.as_dict()["faults"] == {"reset_peer": 1}
    assert result.reconnects == 1
    assert result.resent_bytes_by_cause.get("connection_lost", 0) > 0
    assert result.restarts == 0  # the segment went on, not from its first byte
    await check_object(storage_client, gcs_bucket, "reset", data, composite=True)


@pytest.mark.parametrize(
    "compose_on",
    [
        "another proxy",
        "the same proxy",
    ],
)
async def test_a_segment_deleted_before_compose_is_stored_again(
    start_proxy: StartProxy,
    gcs_bucket: str,
    storage_client: storage.Client,
    payload: Callable[[int], tuple[Path, bytes]],
    compose_on: str,
) -> None:
    # Once every segment is in GCS (the next connection is Compose's), segment 0 is deleted
    # underneath: Compose answers Incomplete, and the client stores it again. From then on the
    # connections go to the proxy named (two proxies share a key, as behind a load balancer).
    path, data = payload(4 * SEGMENT)
    deleted: list[str] = []
    policy = CompositePolicy(mode=CompositeMode.ALWAYS, segment_size=SEGMENT)
    async with start_proxy(composite=policy) as first, start_proxy(composite=policy) as second:
        later = second if compose_on == "another proxy" else first

        async def connect(host: str, port: int) -> trio.abc.Stream:
            names = await temporaries(storage_client, gcs_bucket)
            segments = [name for name in names if name.rsplit("/", 1)[-1].isdigit()]
            if not deleted and len(segments) == 4:
                first_segment = next(name for name in segments if name.endswith("/0"))
                bucket = storage_client.bucket(gcs_bucket)
                await trio.to_thread.run_sync(bucket.delete_blob, first_segment)
                deleted.append(first_segment)
            proxy = later if deleted else first
            return await trio.open_tcp_stream(*proxy.address)

        options = UploadOptions(proxy=first.address, settings=SETTINGS, connector=connect)
        result = await upload_file(path, f"gs://{gcs_bucket}/restored", options)
    assert len(deleted) == 1
    assert result.errors_by_code.get(ErrorCode.MISSING_RANGES.name) == 1
    assert result.resent_bytes_by_cause.get("proxy_lost") == SEGMENT
    assert result.bytes_sent == len(data) + SEGMENT
    await check_object(storage_client, gcs_bucket, "restored", data, composite=True)


async def test_abort_discards_the_segments_and_stores_nothing(
    composite_proxy: ProxyServer, gcs_bucket: str, storage_client: storage.Client
) -> None:
    one_segment_in_gcs = trio.Event()

    def progress(snapshot: UploadProgress) -> None:
        if snapshot.committed >= SEGMENT:
            one_segment_in_gcs.set()

    options = UploadOptions(
        proxy=composite_proxy.address,
        settings=SETTINGS,
        expected_size=8 * SEGMENT,
        progress=progress,
    )
    async with connect_upload(f"gs://{gcs_bucket}/discarded", options) as upload:
        for _ in range(3 * SEGMENT // (64 * KiB)):
            await upload.write(os.urandom(64 * KiB))  # segments are being stored meanwhile
        with trio.fail_after(10):
            await one_segment_in_gcs.wait()
        await upload.abort()
    assert upload.state is UploadState.ABORTED
    blob = storage_client.bucket(gcs_bucket).blob("discarded")
    assert not await trio.to_thread.run_sync(blob.exists)
    # the segments are gone; only the marker that refuses the token stays, for its lifetime
    assert [n for n in await temporaries(storage_client, gcs_bucket) if n[-1].isdigit()] == []


async def test_single_session_gives_an_ordinary_upload_with_an_md5(
    composite_proxy: ProxyServer,
    gcs_bucket: str,
    storage_client: storage.Client,
    payload: Callable[[int], tuple[Path, bytes]],
) -> None:
    path, data = payload(1 * MiB + 5)
    options = UploadOptions(proxy=composite_proxy.address, settings=SETTINGS, single_session=True)
    result = await upload_file(path, f"gs://{gcs_bucket}/single", options)
    assert not result.composite
    assert result.segments == 0
    assert result.md5 is not None
    await check_object(storage_client, gcs_bucket, "single", data, composite=False)


async def test_a_version_2_proxy_gets_an_ordinary_upload(
    payload: Callable[[int], tuple[Path, bytes]],
) -> None:
    # A proxy from before composite uploads: OpenUpload goes without single_session, the
    # reply is UploadOpened, and nothing else changes.
    proxy = FakeProxy()
    proxy.versions = (1, 2)
    path, data = payload(1 * MiB)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, proxy.handle, 0)
        port = listeners[0].socket.getsockname()[1]
        options = UploadOptions(proxy=("127.0.0.1", port), settings=SETTINGS)
        result = await upload_file(path, "gs://bkt/old-proxy", options)
        nursery.cancel_scope.cancel()
    assert set(proxy.agreed) == {2}
    assert result.segments == 0
    assert bytes(proxy.data) == data


async def test_an_empty_file_is_one_empty_segment(
    composite_proxy: ProxyServer,
    gcs_bucket: str,
    storage_client: storage.Client,
    payload: Callable[[int], tuple[Path, bytes]],
) -> None:
    path, _ = payload(0)
    options = UploadOptions(proxy=composite_proxy.address, settings=SETTINGS)
    result = await upload_file(path, f"gs://{gcs_bucket}/empty", options)
    assert (result.size, result.crc32c, result.segments) == (0, 0, 1)
    blob = await stored(storage_client, gcs_bucket, "empty")
    assert await trio.to_thread.run_sync(blob.download_as_bytes) == b""
    assert await temporaries(storage_client, gcs_bucket) == []


async def test_a_composite_upload_resumed_from_its_token_stores_only_what_is_missing(
    composite_proxy: ProxyServer,
    gcs_bucket: str,
    storage_client: storage.Client,
    payload: Callable[[int], tuple[Path, bytes]],
) -> None:
    # The first run stops once some segments are stored. A rerun given its token attaches
    # (COMPOSITE_OPENED), takes every segment as stored with the file's CRC32C, and the first
    # COMPOSE names the missing ones: only those are sent again, into the same upload.
    path, data = payload(6 * SEGMENT)
    url = f"gs://{gcs_bucket}/rerun"
    options = UploadOptions(
        proxy=composite_proxy.address, settings=SETTINGS, expected_size=len(data)
    )
    left: list[str] = []
    with trio.CancelScope() as first_run:
        async with connect_upload(url, options) as upload:
            await upload.send_file(path)
            for _ in range(500):  # until a segment is stored: at most 5 s
                left = await temporaries(storage_client, gcs_bucket)
                if left:
                    break
                await trio.sleep(0.01)
            first_run.cancel()
    assert upload.state is UploadState.DETACHED
    assert left
    result = await upload_file(path, url, dataclasses.replace(options, token=upload.token))
    assert result.segments == 6
    assert result.bytes_sent <= len(data) - len(left) * SEGMENT
    blob = await stored(storage_client, gcs_bucket, "rerun")
    assert await trio.to_thread.run_sync(blob.download_as_bytes) == data
    assert await temporaries(storage_client, gcs_bucket) == []  # the same upload, composed


async def test_segments_move_to_another_proxy_when_theirs_is_killed(
    start_proxy: StartProxy,
    gcs_bucket: str,
    storage_client: storage.Client,
    payload: Callable[[int], tuple[Path, bytes]],
) -> None:
    # Two proxies share a key (the settings are shared). The first dies abruptly with
    # segments half written: their connections fail over to the second, attach with each
    # segment's own token and go on from what GCS holds; the second composes.
    path, data = payload(6 * MiB)
    policy = CompositePolicy(mode=CompositeMode.ALWAYS, segment_size=1 * MiB)
    halfway, finished = trio.Event(), trio.Event()
    results: list[UploadResult] = []

    def progress(snapshot: UploadProgress) -> None:
        if snapshot.bytes_received >= 2 * MiB + 512 * KiB:
            halfway.set()

    async with start_proxy(host="127.0.0.2", composite=policy) as second:
        port = second.address[1]
        options = UploadOptions(
            proxy=f"127.0.0.1:{port},127.0.0.2:{port}", settings=SETTINGS, progress=progress
        )

        async def upload() -> None:
            results.append(await upload_file(path, f"gs://{gcs_bucket}/moved", options))
            finished.set()

        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as first_life:
                async with start_proxy(host="127.0.0.1", port=port, composite=policy):
                    nursery.start_soon(upload)
                    await halfway.wait()
                    first_life.cancel()  # abrupt: its connections die with it
            with trio.fail_after(30):
                await finished.wait()
        resumed = second.metrics.registry.get_sample_value("rup_uploads_resumed_total")

    (result,) = results
    assert result.segments == 6
    assert result.reconnects >= 1
    assert (resumed or 0) >= 1  # segments went on from what GCS held...
    assert result.restarts == 0  # ...and none started again from its first byte
    await check_object(storage_client, gcs_bucket, "moved", data, composite=True)


class CompleteReplyLost(trio.abc.Stream):
    """A connection whose reply to the client's first ``COMPLETE`` never arrives: it breaks
    once the segment that Complete stored is in GCS (``stored_yet`` says so)."""

    def __init__(self, inner: trio.abc.Stream, stored_yet: Callable[[], Awaitable[bool]]):
        self._inner = inner
        self._stored_yet = stored_yet
        self._upstream = bytearray()
        self.complete_sent = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)
        self._upstream += data
        while len(self._upstream) >= HEADER_STRUCT.size:
            fields = HEADER_STRUCT.unpack_from(self._upstream)
            frame_type, payload_size = fields[2], fields[5]
            if len(self._upstream) < HEADER_STRUCT.size + payload_size:
                break
            del self._upstream[: HEADER_STRUCT.size + payload_size]
            self.complete_sent = self.complete_sent or frame_type == FrameType.COMPLETE

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self._inner.receive_some(max_bytes)
        if not self.complete_sent:
            return data
        for _ in range(500):  # the reply (in data) is dropped; at most 5 s
            if await self._stored_yet():
                break
            await trio.sleep(0.01)
        await trio.aclose_forcefully(self._inner)
        raise trio.BrokenResourceError("the reply to COMPLETE was lost")

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_a_segment_whose_complete_reply_was_lost_is_found_stored_by_another_proxy(
    start_proxy: StartProxy,
    gcs_bucket: str,
    storage_client: storage.Client,
    payload: Callable[[int], tuple[Path, bytes]],
) -> None:
    # One worker, so segments go one at a time. Connection 0 opens the upload; connection 1
    # stores segment 0 on the first proxy, whose Completed is lost. The reconnect goes to the
    # second proxy, which finds the segment's session finished in GCS: the Complete sent
    # again is answered, and nothing is sent twice.
    path, data = payload(3 * SEGMENT)
    policy = CompositePolicy(mode=CompositeMode.ALWAYS, segment_size=SEGMENT)
    indexes = itertools.count()
    lost: list[CompleteReplyLost] = []

    async def segment_0_stored() -> bool:
        return any(name.endswith("/0") for name in await temporaries(storage_client, gcs_bucket))

    async with start_proxy(composite=policy) as first, start_proxy(composite=policy) as second:

        async def connect(host: str, port: int) -> trio.abc.Stream:
            index = next(indexes)
            proxy = first if index < 2 else second
            stream = await trio.open_tcp_stream(*proxy.address)
            if index == 1:
                lost.append(CompleteReplyLost(stream, segment_0_stored))
                return lost[-1]
            return stream

        options = UploadOptions(
            proxy=first.address,
            settings=dataclasses.replace(SETTINGS, connections=1),
            connector=connect,
        )
        result = await upload_file(path, f"gs://{gcs_bucket}/reply-lost", options)
    assert lost[0].complete_sent
    assert result.reconnects == 1
    assert result.errors_by_code == {}
    assert result.bytes_sent == len(data)  # segment 0 was not sent again
    await check_object(storage_client, gcs_bucket, "reply-lost", data, composite=True)


async def test_a_segment_whose_gcs_session_is_lost_is_stored_again(
    proxy_settings: ServerSettings,
    gcs_server: GcsServer,
    gcs_retry_test: RetryTestFactory,
    gcs_bucket: str,
    storage_client: storage.Client,
    payload: Callable[[int], tuple[Path, bytes]],
) -> None:
    # GCS takes a segment's bytes up to 768 KiB, then answers 410 and forgets the session:
    # bytes the proxy had committed are held nowhere, so that segment's upload fails, and the
    # client stores the segment again from its first byte.
    faults = gcs_retry_test({"storage.objects.insert": ["return-410-after-768K"]})
    policy = CompositePolicy(mode=CompositeMode.ALWAYS, segment_size=1 * MiB)
    settings = dataclasses.replace(proxy_settings, composite=policy)
    path, data = payload(2 * MiB + 300 * KiB)
    backend = Backend(faults.client, TargetKind.EMBEDDED, gcs_server.url)
    async with serve_in_background(settings, backend) as server:
        options = UploadOptions(proxy=server.address, settings=SETTINGS)
        result = await upload_file(path, f"gs://{gcs_bucket}/session-lost", options)
    assert faults.completed()
    assert result.segments == 3
    assert result.restarts == 1  # the one segment, from its first byte
    # The failure may answer more than one request of that segment in flight (a write and
    # the Complete): counted each time, but the segment starts over once.
    assert set(result.errors_by_code) == {ErrorCode.GCS_ERROR.name}
    assert result.resent_bytes_by_cause.get(ErrorCode.GCS_ERROR.name.lower(), 0) >= 768 * KiB
    assert result.bytes_sent >= len(data) + 768 * KiB
    await check_object(storage_client, gcs_bucket, "session-lost", data, composite=True)
