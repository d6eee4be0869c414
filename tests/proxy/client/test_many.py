"""Many objects: one-request uploads on pooled connections, and upload_many's outcomes.

Against the real proxy and the strict GCS endpoint over loopback; each test reads the objects
back. The version-1 fallback is driven against the scripted proxy of test_behaviour.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from google.cloud import storage  # type: ignore[import-untyped]

from faultnet.gcs import GcsServer
from faultnet.plan import FaultPlan
from faultnet.stream import open_tcp_stream
from protocol import ErrorCode
from proxy.client import (
    ClientSettings,
    Connector,
    RetryPolicy,
    UploadError,
    UploadOptions,
    UploadRejectedError,
    UploadResult,
    blocking,
    open_connection_pool,
    put_bytes,
    put_file,
    upload_many,
)
from proxy.server import ProxyServer
from proxy.server.settings import ServerSettings
from tests.proxy.cli.proxy_thread import proxy_in_thread
from tests.proxy.client.test_behaviour import FakeProxy

KiB = 1024
MiB = 1024 * KiB

SETTINGS = ClientSettings(
    frame_size=256 * KiB,
    reply_timeout=20.0,
    retry=RetryPolicy(deadline=10.0, initial_delay=0.01, max_delay=0.2),
)


@pytest.fixture
def files(tmp_path: Path) -> Callable[[int, int], list[tuple[Path, bytes]]]:
    def make(count: int, size: int) -> list[tuple[Path, bytes]]:
        made = []
        for index in range(count):
            data = os.urandom(size)
            path = tmp_path / f"f{size}-{index}.bin"
            path.write_bytes(data)
            made.append((path, data))
        return made

    return make


def read_back(client: storage.Client, bucket: str, name: str) -> bytes:
    data: bytes = client.bucket(bucket).blob(name).download_as_bytes()
    return data


async def test_small_objects_share_a_bounded_pool_of_connections(
    proxy_server: ProxyServer,
    gcs_bucket: str,
    storage_client: storage.Client,
    files: Callable[[int, int], list[tuple[Path, bytes]]],
) -> None:
    made = files(24, 4 * KiB)
    options = UploadOptions(proxy=proxy_server.address, settings=SETTINGS)
    pairs = [(path, f"gs://{gcs_bucket}/small/{i}") for i, (path, _) in enumerate(made)]
    async with open_connection_pool(options, max_size=3) as pool:
        outcomes = await upload_many(pairs, options, concurrency=6, pool=pool)
        assert pool.connections_opened <= 3  # reused: not one connection per object
        assert (pool.version or 0) >= 2
    for index, ((_, data), outcome) in enumerate(zip(made, outcomes, strict=True)):
        assert isinstance(outcome, UploadResult), outcome
        assert outcome.size == len(data)
        stored = await trio.to_thread.run_sync(
            read_back, storage_client, gcs_bucket, f"small/{index}"
        )
        assert stored == data


async def test_one_failure_does_not_stop_the_others(
    proxy_server: ProxyServer,
    gcs_bucket: str,
    storage_client: storage.Client,
    files: Callable[[int, int], list[tuple[Path, bytes]]],
    tmp_path: Path,
) -> None:
    """A precondition that fails, a missing file and a name GCS refuses each end only their
    own object; a large one beside them goes over its own connections."""
    (small, small_data), (taken, _) = files(2, 10 * KiB)
    ((large, large_data),) = files(1, 3 * MiB + 5)
    options = UploadOptions(proxy=proxy_server.address, settings=SETTINGS, if_generation_match=0)
    first = await put_file_once(proxy_server, taken, f"gs://{gcs_bucket}/taken")
    assert first.size == 10 * KiB
    pairs = [
        (small, f"gs://{gcs_bucket}/ok"),
        (taken, f"gs://{gcs_bucket}/taken"),  # exists already: ifGenerationMatch=0 fails
        (tmp_path / "missing.bin", f"gs://{gcs_bucket}/missing"),
        (small, f"gs://{gcs_bucket}/bad\nname"),
        (large, f"gs://{gcs_bucket}/large"),
    ]
    done: list[int] = []
    outcomes = await upload_many(
        pairs, options, concurrency=3, on_done=lambda index, _: done.append(index)
    )
    assert sorted(done) == list(range(len(pairs)))
    ok, precondition, missing, bad_name, large_outcome = outcomes
    assert isinstance(ok, UploadResult)
    assert isinstance(precondition, UploadError)
    assert precondition.code == ErrorCode.PRECONDITION_FAILED
    assert isinstance(missing, UploadError)
    assert "missing.bin" in missing.message
    assert isinstance(bad_name, UploadError)
    assert "control characters" in bad_name.message
    assert isinstance(large_outcome, UploadResult)
    assert large_outcome.connections == 4
    assert await trio.to_thread.run_sync(read_back, storage_client, gcs_bucket, "ok") == small_data
    assert (
        await trio.to_thread.run_sync(read_back, storage_client, gcs_bucket, "large") == large_data
    )


async def put_file_once(server: ProxyServer, path: Path, url: str) -> UploadResult:
    options = UploadOptions(proxy=server.address, settings=SETTINGS)
    async with open_connection_pool(options) as pool:
        return await put_file(pool, path, url, options)


async def test_idle_connections_are_closed_and_reopened_lazily(
    proxy_server: ProxyServer,
    gcs_bucket: str,
    files: Callable[[int, int], list[tuple[Path, bytes]]],
) -> None:
    (path, _), (other, _) = files(2, KiB)
    options = UploadOptions(proxy=proxy_server.address, settings=SETTINGS)
    async with open_connection_pool(options, idle_timeout=0.2) as pool:
        await put_file(pool, path, f"gs://{gcs_bucket}/a", options)
        assert (pool.idle, pool.size, pool.connections_opened) == (1, 1, 1)
        await trio.sleep(1.0)  # idle timeout 0.2 s, looked at every 0.05 s
        assert (pool.idle, pool.size) == (0, 0)
        await put_file(pool, other, f"gs://{gcs_bucket}/b", options)
        assert pool.connections_opened == 2


async def test_a_version_1_proxy_gets_open_write_complete(
    files: Callable[[int, int], list[tuple[Path, bytes]]],
) -> None:
    proxy = FakeProxy()
    proxy.versions = (1,)
    ((path, data),) = files(1, 4 * KiB)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        options = UploadOptions(
            proxy=("127.0.0.1", port),
            settings=dataclasses.replace(SETTINGS, frame_size=64 * KiB),
        )
        (outcome,) = await upload_many([(path, "gs://bkt/o")], options)
        nursery.cancel_scope.cancel()
    assert isinstance(outcome, UploadResult), outcome
    assert outcome.connections == 1  # one frame's worth: no more connections than frames
    assert proxy.connections == 2  # the one that learnt the version, and the upload's
    assert proxy.opened is not None
    assert proxy.opened.name == "o"
    assert bytes(proxy.data) == data
    assert set(proxy.agreed) == {1}


def test_blocking_upload_many(
    gcs_server: GcsServer, files: Callable[[int, int], list[tuple[Path, bytes]]]
) -> None:
    gcs_server.store.create_bucket("many")
    made = files(5, 2 * KiB)
    with proxy_in_thread(gcs_server, ServerSettings(shutdown_grace=0.5)) as proxy:
        options = UploadOptions(proxy=proxy.address, settings=SETTINGS)
        outcomes = blocking.upload_many(
            [(path, f"gs://many/{i}") for i, (path, _) in enumerate(made)], options, concurrency=2
        )
    assert [o.size for o in outcomes if isinstance(o, UploadResult)] == [2 * KiB] * 5


def loses_the_first_reply(server: ProxyServer) -> Connector:
    """Connection 0 is reset as the first byte after its Welcome arrives, so the reply to the
    request it carries next is lost (after the proxy acted on it); later connections are clean."""
    # header, reply_to, version, max_frame_size, then the server's name as text
    welcome = 28 + 8 + 1 + 4 + 2 + len(server.settings.server_name.encode())
    plan = FaultPlan.parse(f"reset_peer:down(after={welcome + 1})")  # in the next reply
    indexes = itertools.count()

    async def connect(host: str, port: int) -> trio.abc.Stream:
        index = next(indexes)
        return await open_tcp_stream(
            host, port, plan=plan if index == 0 else FaultPlan(), index=index
        )

    return connect


@pytest.mark.parametrize(
    "precondition", [None, 0], ids=["no-precondition", "if-generation-match-0"]
)
async def test_a_lost_reply_to_a_one_request_upload(
    proxy_server: ProxyServer,
    gcs_bucket: str,
    storage_client: storage.Client,
    files: Callable[[int, int], list[tuple[Path, bytes]]],
    precondition: int | None,
) -> None:
    """Without a precondition the object is sent again (the same bytes, stored again); with
    ifGenerationMatch=0 the resend is refused, and the error says the lost attempt may have
    stored it, since the client cannot tell."""
    ((path, data),) = files(1, 8 * KiB)
    options = UploadOptions(
        proxy=proxy_server.address,
        settings=SETTINGS,
        connector=loses_the_first_reply(proxy_server),
        if_generation_match=precondition,
    )
    url = f"gs://{gcs_bucket}/lost"
    async with open_connection_pool(options) as pool:
        if precondition is None:
            result = await put_file(pool, path, url, options)
            assert result.reconnects == 1
            assert result.size == len(data)
        else:
            with pytest.raises(UploadError) as refused:
                await put_file(pool, path, url, options)
            assert refused.value.code == ErrorCode.PRECONDITION_FAILED
            assert "may have stored" in refused.value.message
        assert pool.connections_opened == 2
    assert await trio.to_thread.run_sync(read_back, storage_client, gcs_bucket, "lost") == data


def _gcs_requests(server: ProxyServer) -> dict[str, float]:
    """GCS requests the proxy made so far, by HTTP method."""
    counts: dict[str, float] = {}
    for family in server.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "rup_gcs_request_duration_seconds_count":
                method = sample.labels["method"]
                counts[method] = counts.get(method, 0.0) + sample.value
    return counts


async def test_files_up_to_8_mib_are_one_put_object_with_the_default_settings(
    start_proxy: Callable[..., contextlib.AbstractAsyncContextManager[ProxyServer]],
    gcs_bucket: str,
    storage_client: storage.Client,
    files: Callable[[int, int], list[tuple[Path, bytes]]],
) -> None:
    # rup serve's default frame size and the client's default PutObject limit go together:
    # every file a one-request upload would store goes as one exchange, with no lookup.
    frame_size = ServerSettings().max_frame_size
    assert frame_size >= ClientSettings().put_object_limit == 8 * MiB
    ((medium, medium_data),) = files(1, 3 * MiB)
    ((large, large_data),) = files(1, 8 * MiB + 1)
    settings = dataclasses.replace(ClientSettings(), retry=SETTINGS.retry)
    async with start_proxy(max_frame_size=frame_size) as server:
        options = UploadOptions(proxy=server.address, settings=settings)
        async with open_connection_pool(options) as pool:
            # the proxy's first object in a bucket costs a lookup of the bucket too
            await put_file(pool, medium, f"gs://{gcs_bucket}/first", options)
            before = _gcs_requests(server)
            result = await put_file(pool, medium, f"gs://{gcs_bucket}/medium", options)
            after = _gcs_requests(server)
            made = {m: after[m] - before.get(m, 0.0) for m in after if after[m] > before.get(m, 0)}
            assert made == {"POST": 1.0}
            assert result.connections == 1
            # One byte more is a resumable upload, in WriteAt frames of frame_size.
            large_result = await put_file(pool, large, f"gs://{gcs_bucket}/large", options)
    frames = -(-(8 * MiB + 1) // settings.frame_size)
    assert large_result.connections == min(frames, settings.connections) > 1
    assert read_back(storage_client, gcs_bucket, "medium") == medium_data
    assert read_back(storage_client, gcs_bucket, "large") == large_data


async def test_a_file_with_a_precondition_goes_whole_only_if_it_fits_one_write_frame(
    start_proxy: Callable[..., contextlib.AbstractAsyncContextManager[ProxyServer]],
    gcs_bucket: str,
    storage_client: storage.Client,
    files: Callable[[int, int], list[tuple[Path, bytes]]],
) -> None:
    # A lost reply to a PutObject with a precondition cannot be settled by the client; an
    # upload's token can. So with one, only what fits a WriteAt frame goes whole.
    settings = dataclasses.replace(ClientSettings(), retry=SETTINGS.retry)
    ((small, _),) = files(1, 100 * KiB)
    ((medium, medium_data),) = files(1, settings.frame_size + MiB)  # under the PutObject limit
    assert settings.frame_size + MiB < settings.put_object_limit
    async with start_proxy(max_frame_size=ServerSettings().max_frame_size) as server:
        options = UploadOptions(proxy=server.address, settings=settings, if_generation_match=0)
        async with open_connection_pool(options) as pool:
            await put_file(pool, small, f"gs://{gcs_bucket}/first", options)  # the bucket lookup
            before = _gcs_requests(server)
            await put_file(pool, small, f"gs://{gcs_bucket}/small", options)
            between = _gcs_requests(server)
            await put_file(pool, medium, f"gs://{gcs_bucket}/medium", options)
            after = _gcs_requests(server)
    assert between.get("GET", 0.0) == before.get("GET", 0.0)  # one PutObject: no lookup
    assert after.get("GET", 0.0) > between.get("GET", 0.0)  # an upload: its generation lookup
    assert read_back(storage_client, gcs_bucket, "medium") == medium_data


async def test_an_upload_error_in_a_pools_block_comes_out_as_itself(
    start_proxy: Callable[..., contextlib.AbstractAsyncContextManager[ProxyServer]],
    gcs_bucket: str,
) -> None:
    # Not grouped by the pool's nursery: a caller's `except UploadError` must see it.
    async with start_proxy(allowed_prefixes=("public/",)) as server:
        options = UploadOptions(proxy=server.address, settings=SETTINGS)
        with pytest.raises(UploadRejectedError) as refused:
            async with open_connection_pool(options) as pool:
                await put_bytes(pool, b"x", f"gs://{gcs_bucket}/private/x", options)
    assert refused.value.code is ErrorCode.FORBIDDEN
