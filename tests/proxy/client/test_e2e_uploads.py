"""End to end: the client library, the real proxy and the strict GCS endpoint, over loopback.

Every test checks the object GCS ends up with, byte for byte. Server-side protocol
violations (bad sequence numbers, frames over the limit, tampered tokens, Complete with
missing ranges, Abort racing raw WriteAts) are covered frame by frame in test_server_*.py;
these tests drive the same situations through the library, the way users meet them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import google_crc32c
import pytest
import trio
import trustme
from google.cloud import storage  # type: ignore[import-untyped]

from faultnet.counters import FaultCounters
from faultnet.plan import FaultPlan
from faultnet.stream import open_tcp_stream
from protocol import ErrorCode
from proxy.client import (
    ClientSettings,
    Connector,
    RetryPolicy,
    Upload,
    UploadOptions,
    UploadProgress,
    UploadRejectedError,
    UploadState,
    connect_upload,
    upload_file,
    upload_stream,
)
from proxy.server import ProxyServer

KiB = 1024
MiB = 1024 * KiB

StartProxy = Callable[..., contextlib.AbstractAsyncContextManager[ProxyServer]]

SETTINGS = ClientSettings(
    frame_size=256 * KiB,
    frames_in_flight=4,
    reply_timeout=20.0,
    retry=RetryPolicy(deadline=10.0, initial_delay=0.01, max_delay=0.2),
)


def client_settings(connections: int) -> ClientSettings:
    return dataclasses.replace(SETTINGS, connections=connections)


@pytest.fixture
def payload(tmp_path: Path) -> Callable[[int], tuple[Path, bytes]]:
    def make(size: int) -> tuple[Path, bytes]:
        data = os.urandom(size)
        path = tmp_path / f"payload-{size}.bin"
        path.write_bytes(data)
        return path, data

    return make


async def stored(client: storage.Client, bucket: str, name: str) -> bytes:
    blob = client.bucket(bucket).blob(name)
    return await trio.to_thread.run_sync(blob.download_as_bytes)


def faulty_connector(plan: FaultPlan, counters: FaultCounters) -> Connector:
    indexes = itertools.count()

    async def connect(host: str, port: int) -> trio.abc.Stream:
        return await open_tcp_stream(host, port, plan=plan, index=next(indexes), counters=counters)

    return connect


@pytest.mark.parametrize("connections", [1, 4, 16])
async def test_file_over_n_connections(
    proxy_server: ProxyServer,
    gcs_bucket: str,
    storage_client: storage.Client,
    payload: Callable[[int], tuple[Path, bytes]],
    connections: int,
) -> None:
    path, data = payload(6 * MiB + 4321)
    result = await upload_file(
        path,
        f"gs://{gcs_bucket}/n/{connections}",
        UploadOptions(proxy=proxy_server.address, settings=client_settings(connections)),
    )
    assert result.size == len(data)
    assert result.crc32c == google_crc32c.value(data)
    assert result.reconnects == 0
    assert result.bytes_sent == len(data)  # without faults, not one byte twice
    assert await stored(storage_client, gcs_bucket, f"n/{connections}") == data


async def test_stream_of_unknown_length(
    proxy_server: ProxyServer, gcs_bucket: str, storage_client: storage.Client
) -> None:
    data = os.urandom(5 * MiB + 99)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 100_000):
            await trio.lowlevel.checkpoint()
            yield data[start : start + 100_000]

    settings = dataclasses.replace(client_settings(3), stream_buffer=2 * MiB)
    result = await upload_stream(
        chunks(),
        f"gs://{gcs_bucket}/stream",
        UploadOptions(proxy=proxy_server.address, settings=settings),
    )
    assert result.size == len(data)
    assert await stored(storage_client, gcs_bucket, "stream") == data


async def test_connections_killed_partway_through_frames(
    proxy_server: ProxyServer,
    gcs_bucket: str,
    storage_client: storage.Client,
    payload: Callable[[int], tuple[Path, bytes]],
) -> None:
    # Resets land at byte counts that are not frame boundaries, so frames are cut in half;
    # one in three connections is also delayed and sliced into short writes.
    plan = FaultPlan.parse(
        "seed=3; reset_peer:up(after=1300k)~0.6; slicer:up(size=3000,variation=1000)~0.3"
    )
    counters = FaultCounters()
    path, data = payload(8 * MiB)
    result = await upload_file(
        path,
        f"gs://{gcs_bucket}/cut",
        UploadOptions(
            proxy=proxy_server.address,
            settings=client_settings(4),
            connector=faulty_connector(plan, counters),
        ),
    )
    faults = counters.as_dict()["faults"]
    assert faults.get("reset_peer", 0) >= 1
    assert result.reconnects == faults["reset_peer"]
    assert result.resent_bytes_by_cause.get("connection_lost", 0) > 0
    assert await stored(storage_client, gcs_bucket, "cut") == data


async def test_a_link_that_cuts_every_connection_before_a_whole_frame_still_makes_progress(
    start_proxy: Callable[..., contextlib.AbstractAsyncContextManager[ProxyServer]],
    gcs_bucket: str,
    storage_client: storage.Client,
    payload: Callable[[int], tuple[Path, bytes]],
) -> None:
    # Every connection is reset after 700 KiB, well short of one 2 MiB frame: frames cut
    # short are resent whole, so only smaller pieces can ever get through.
    plan = FaultPlan.parse("seed=4; reset_peer:up(after=700k)")
    counters = FaultCounters()
    path, data = payload(3 * MiB)
    settings = dataclasses.replace(client_settings(2), frame_size=2 * MiB)
    async with start_proxy(max_frame_size=2 * MiB) as server:
        result = await upload_file(
            path,
            f"gs://{gcs_bucket}/cut-short",
            UploadOptions(
                proxy=server.address,
                settings=settings,
                connector=faulty_connector(plan, counters),
            ),
        )
    assert counters.as_dict()["faults"]["reset_peer"] >= 2
    assert result.resent_bytes_by_cause["connection_lost"] > 0
    assert await stored(storage_client, gcs_bucket, "cut-short") == data


async def test_corrupted_payload_is_resent(
    proxy_server: ProxyServer,
    gcs_bucket: str,
    storage_client: storage.Client,
    payload: Callable[[int], tuple[Path, bytes]],
) -> None:
    # Frames are 256 KiB of payload after 36 bytes of header and offset, so bytes 600k and
    # 1800k of the one connection land inside payloads: the proxy sees two payload CRC
    # mismatches (not broken headers), answers BAD_CRC and keeps the connection.
    plan = FaultPlan.parse("seed=1; corrupt:up(at=600k); corrupt:up(at=1800k)")
    counters = FaultCounters()
    path, data = payload(4 * MiB)
    result = await upload_file(
        path,
        f"gs://{gcs_bucket}/crc",
        UploadOptions(
            proxy=proxy_server.address,
            settings=client_settings(1),
            connector=faulty_connector(plan, counters),
        ),
    )
    assert counters.as_dict()["faults"]["corrupt"] == 2
    assert result.errors_by_code == {"BAD_CRC": 2}
    assert result.resent_bytes_by_cause == {"bad_crc": 2 * 256 * KiB}
    assert result.reconnects == 0
    assert await stored(storage_client, gcs_bucket, "crc") == data


async def test_upload_survives_a_proxy_restart(
    start_proxy: StartProxy,
    gcs_bucket: str,
    storage_client: storage.Client,
    payload: Callable[[int], tuple[Path, bytes]],
) -> None:
    path, data = payload(16 * MiB)
    halfway, finished = trio.Event(), trio.Event()
    results: list[Any] = []

    def progress(snapshot: UploadProgress) -> None:
        if snapshot.bytes_received >= 6 * MiB:
            halfway.set()

    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as first_life:
            async with start_proxy() as first:
                address = first.address

                async def upload() -> None:
                    results.append(
                        await upload_file(
                            path,
                            f"gs://{gcs_bucket}/restart",
                            UploadOptions(
                                proxy=address, settings=client_settings(4), progress=progress
                            ),
                        )
                    )
                    finished.set()

                nursery.start_soon(upload)
                await halfway.wait()
                first_life.cancel()  # abrupt: connections die, uncommitted buffers are lost
        # same key (shared settings), same port: what a restarted instance looks like
        async with start_proxy(port=address[1]) as second:
            await finished.wait()
            resumed = second.metrics.registry.get_sample_value("rup_uploads_resumed_total")

    (result,) = results
    assert result.size == len(data)
    assert result.reconnects >= 4
    assert resumed == 1
    assert await stored(storage_client, gcs_bucket, "restart") == data


async def test_wrong_bearer_token_is_one_clear_error(
    start_proxy: StartProxy, gcs_bucket: str, payload: Callable[[int], tuple[Path, bytes]]
) -> None:
    path, _ = payload(KiB)
    async with start_proxy(auth_tokens=("sesame",)) as server:
        with pytest.raises(UploadRejectedError) as caught:
            await upload_file(
                path,
                f"gs://{gcs_bucket}/denied",
                UploadOptions(proxy=server.address, auth="guess", settings=client_settings(4)),
            )
        assert caught.value.code is ErrorCode.UNAUTHENTICATED
        assert "sesame" not in str(caught.value)
        assert "guess" not in str(caught.value)
        result = await upload_file(
            path,
            f"gs://{gcs_bucket}/allowed",
            UploadOptions(proxy=server.address, auth="sesame", settings=client_settings(2)),
        )
        assert result.size == KiB


async def test_precondition_failure_is_reported_with_its_code(
    proxy_server: ProxyServer, gcs_bucket: str, payload: Callable[[int], tuple[Path, bytes]]
) -> None:
    path, _ = payload(300 * KiB)
    url = f"gs://{gcs_bucket}/once"
    options = UploadOptions(
        proxy=proxy_server.address, if_generation_match=0, settings=client_settings(2)
    )
    upload = functools.partial(upload_file, path, url, options)
    await upload()
    with pytest.raises(UploadRejectedError) as caught:
        await upload()
    assert caught.value.code is ErrorCode.PRECONDITION_FAILED


async def test_abort_racing_writes_leaves_no_object(
    proxy_server: ProxyServer, gcs_bucket: str, storage_client: storage.Client
) -> None:
    async with connect_upload(
        f"gs://{gcs_bucket}/aborted",
        UploadOptions(proxy=proxy_server.address, settings=client_settings(4)),
    ) as upload:
        for _ in range(12):
            await upload.write(os.urandom(256 * KiB))  # slots are sending while we abort
        await upload.abort()
    blob = storage_client.bucket(gcs_bucket).blob("aborted")
    assert not await trio.to_thread.run_sync(blob.exists)


async def test_eight_uploads_finish_while_a_client_sends_garbage(
    proxy_server: ProxyServer, gcs_bucket: str, storage_client: storage.Client
) -> None:
    objects = {f"neighbour-{i}": os.urandom(MiB + i * 4099) for i in range(8)}

    async def upload(name: str, data: bytes) -> None:
        async def chunks() -> AsyncIterator[bytes]:
            yield data

        await upload_stream(
            chunks(),
            f"gs://{gcs_bucket}/{name}",
            UploadOptions(proxy=proxy_server.address, settings=client_settings(2)),
        )

    async def vandal() -> None:
        for _ in range(20):
            stream = await trio.open_tcp_stream(*proxy_server.address)
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(os.urandom(2048))
                while await stream.receive_some(4096):
                    pass  # the proxy answers with an Error, then closes
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        for name, data in objects.items():
            nursery.start_soon(upload, name, data)
        nursery.start_soon(vandal)
    for name, data in objects.items():
        assert await stored(storage_client, gcs_bucket, name) == data


async def test_tls_over_four_connections(
    start_proxy: StartProxy,
    gcs_bucket: str,
    storage_client: storage.Client,
    payload: Callable[[int], tuple[Path, bytes]],
) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    path, data = payload(3 * MiB + 1)
    async with start_proxy(tls=server_context) as server:
        result = await upload_file(
            path,
            f"gs://{gcs_bucket}/tls",
            UploadOptions(proxy=server.address, tls=client_context, settings=client_settings(4)),
        )
    assert result.size == len(data)
    assert await stored(storage_client, gcs_bucket, "tls") == data


async def test_a_stalled_connection_is_abandoned_and_its_frames_resent(
    proxy_server: ProxyServer,
    gcs_bucket: str,
    storage_client: storage.Client,
    payload: Callable[[int], tuple[Path, bytes]],
) -> None:
    # With seed 0 the first connection stops receiving (Acks, Credit) after 300 bytes, forever,
    # and the next one is clean. With one connection nothing else can report progress: the
    # client must notice within reply_timeout, reconnect, and carry on from the Status.
    plan = FaultPlan.parse("seed=0; stall:down(after=300)~0.4")
    counters = FaultCounters()
    path, data = payload(4 * MiB)
    settings = dataclasses.replace(client_settings(1), reply_timeout=1.0)
    result = await upload_file(
        path,
        f"gs://{gcs_bucket}/stalled",
        UploadOptions(
            proxy=proxy_server.address,
            settings=settings,
            connector=faulty_connector(plan, counters),
        ),
    )
    assert counters.as_dict()["faults"]["stall"] == 1
    assert result.reconnects == 1
    assert await stored(storage_client, gcs_bucket, "stalled") == data


async def test_empty_file_and_empty_stream(
    proxy_server: ProxyServer,
    gcs_bucket: str,
    storage_client: storage.Client,
    payload: Callable[[int], tuple[Path, bytes]],
) -> None:
    path, _ = payload(0)

    async def nothing() -> AsyncIterator[bytes]:
        no_chunks: tuple[bytes, ...] = ()
        for chunk in no_chunks:
            yield chunk

    options = UploadOptions(proxy=proxy_server.address, settings=SETTINGS)
    from_file = await upload_file(path, f"gs://{gcs_bucket}/empty-file", options)
    from_stream = await upload_stream(nothing(), f"gs://{gcs_bucket}/empty-stream", options)
    assert from_file.size == from_stream.size == 0
    assert from_file.crc32c == from_stream.crc32c == 0
    assert await stored(storage_client, gcs_bucket, "empty-file") == b""
    assert await stored(storage_client, gcs_bucket, "empty-stream") == b""


@pytest.mark.parametrize("source", ["file", "stream"])
async def test_a_cancelled_upload_is_resumed_from_another_run_with_its_token(
    proxy_server: ProxyServer,
    gcs_bucket: str,
    storage_client: storage.Client,
    payload: Callable[[int], tuple[Path, bytes]],
    source: str,
) -> None:
    # The first run is cancelled halfway (as Ctrl-C would stop it): nothing is aborted, and a
    # second run given the token sends only what the proxy lacks. A stream is given again
    # from its first byte; what GCS already holds of it is dropped, not sent.
    path, data = payload(8 * MiB)
    url = f"gs://{gcs_bucket}/resumed-{source}"
    halfway = trio.Event()

    def progress(snapshot: UploadProgress) -> None:
        if snapshot.bytes_received >= 3 * MiB:
            halfway.set()

    async def give_data(upload: Upload) -> None:
        if source == "file":
            await upload.send_file(path)
        else:
            for start in range(0, len(data), 256 * KiB):
                await upload.write(data[start : start + 256 * KiB])

    options = UploadOptions(proxy=proxy_server.address, settings=client_settings(2))
    with trio.CancelScope() as first_run:
        async with connect_upload(url, dataclasses.replace(options, progress=progress)) as upload:
            token = upload.token
            async with trio.open_nursery() as nursery:
                nursery.start_soon(give_data, upload)
                await halfway.wait()
                first_run.cancel()
    assert token is not None
    assert upload.state is UploadState.DETACHED
    held = sum(end - start for start, end in upload.confirmed_ranges())
    assert held >= 3 * MiB

    async with connect_upload(url, dataclasses.replace(options, token=token)) as resumed:
        assert resumed.token == token  # the same upload, not a new one
        await give_data(resumed)
        result = await resumed.complete()
    assert result.bytes_sent <= len(data) - held + 1 * MiB  # at most one window more
    assert await stored(storage_client, gcs_bucket, f"resumed-{source}") == data
