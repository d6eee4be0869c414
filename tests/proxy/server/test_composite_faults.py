"""Composite uploads (docs/protocol.md section 14) when things go wrong, served for real.

A raw version-3 client drives a real proxy over sockets; GCS faults are scripted on the
strict endpoint (storage-testbench's retry-test API: each instruction applies once, and a
test checks that it did), and objects vanish underneath through another GCS client. Every
test then judges what GCS holds: the object byte for byte or nothing, and no temporary left
behind but, after a discard, the marker every instance consults.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import google_crc32c
import pytest
import trio
from google.cloud import storage  # type: ignore[import-untyped]

from faultnet.gcs import GcsServer
from faultnet.pytest_plugin import RetryTestFactory
from protocol import (
    Ack,
    Complete,
    Completed,
    Compose,
    Discard,
    Error,
    ErrorCode,
    Incomplete,
    OpenSegment,
    WriteAt,
)
from proxy.server import ProxyServer, serve_in_background
from proxy.server.backend import Backend, TargetKind
from proxy.server.settings import CompositeMode, CompositePolicy, KiB, MiB, ServerSettings
from tests.proxy.conftest import RawClient
from tests.proxy.server.test_composite import (
    answer,
    bind_segment,
    open_composite,
    piece_of,
    store_segment,
    temporaries,
)
from tests.proxy.server.test_uploads import FRAME, send_range

Connect = Callable[..., Awaitable[RawClient]]
StartProxy = Callable[..., contextlib.AbstractAsyncContextManager[ProxyServer]]

V3 = (1, 2, 3)
SEGMENT = 256 * KiB
#: segments large enough to need a resumable session of several chunks
LARGE_SEGMENT = 1 * MiB
PREFIX = CompositePolicy().temp_prefix


def policy(segment_size: int = SEGMENT, **changes: Any) -> CompositePolicy:
    return CompositePolicy(mode=CompositeMode.ALWAYS, segment_size=segment_size, **changes)


@contextlib.asynccontextmanager
async def proxy_with_faults(
    settings: ServerSettings, client: storage.Client, endpoint: GcsServer
) -> AsyncIterator[ProxyServer]:
    """A proxy whose every GCS request carries ``client``'s retry-test header."""
    backend = Backend(client, TargetKind.EMBEDDED, endpoint.url)
    async with serve_in_background(settings, backend) as server:
        yield server


def stored(client: storage.Client, bucket: str, name: str) -> bytes | None:
    blob = client.bucket(bucket).get_blob(name)
    return None if blob is None else bytes(blob.download_as_bytes())


async def compose(client: RawClient, data: bytes, token: bytes) -> Any:
    return await answer(client, Compose(len(data), google_crc32c.value(data), token))


# --- GCS faults, scripted on the endpoint ------------------------------------------------


async def test_a_segment_whose_session_is_lost_fails_and_is_stored_again(
    proxy_settings: ServerSettings,
    gcs_server: GcsServer,
    gcs_retry_test: RetryTestFactory,
    raw_client: Connect,
    gcs_bucket: str,
    storage_client: storage.Client,
) -> None:
    # GCS stores the segment's bytes up to 768 KiB, then answers 410 and forgets the
    # session. Part of the segment was committed already (the client saw it in its
    # credit), so those bytes are no longer held anywhere: the segment fails, and the
    # client opens it again, which starts it over in a new session.
    faults = gcs_retry_test({"storage.objects.insert": ["return-410-after-768K"]})
    settings = dataclasses.replace(proxy_settings, composite=policy(LARGE_SEGMENT))
    data = os.urandom(LARGE_SEGMENT + 300 * KiB)
    first = piece_of(data, 0, LARGE_SEGMENT)
    async with proxy_with_faults(settings, faults.client, gcs_server) as server:
        client = await raw_client(server, versions=V3)
        token = await open_composite(client, gcs_bucket, "lost.bin", len(data), LARGE_SEGMENT)
        await bind_segment(client, token, 0)
        with trio.fail_after(10):
            await send_range(client, first, 0, 512 * KiB)
            while client.credit is None or client.credit.committed_offset == 0:
                await client.receive()  # the first chunk is in GCS
        # The rest and the COMPLETE, pipelined: the session is lost while they are on
        # their way, so any of them may be the one the failure answers.
        for offset in range(512 * KiB, len(first), FRAME):
            await client.send(WriteAt(offset, first[offset : offset + FRAME]))
        await client.send(Complete(len(first), google_crc32c.value(first)))
        with trio.fail_after(10):
            while not isinstance(failed := await client.receive(), Error):
                assert not isinstance(failed, Completed), failed
        assert failed.code is ErrorCode.GCS_ERROR, failed
        assert faults.completed()
        assert temporaries(storage_client, gcs_bucket) == []

        again = await raw_client(server, versions=V3)
        await store_segment(again, token, 0, data, LARGE_SEGMENT)
        await store_segment(again, token, 1, data, LARGE_SEGMENT)
        completed = await compose(again, data, token)
    assert isinstance(completed, Completed), completed
    assert (completed.size, completed.md5) == (len(data), None)
    assert stored(storage_client, gcs_bucket, "lost.bin") == data
    assert temporaries(storage_client, gcs_bucket) == []


@pytest.mark.parametrize(
    "fault", ["return-503", "return-broken-stream"], ids=["503-retried", "response-lost"]
)
async def test_a_failed_or_unanswered_compose_still_completes_once(
    proxy_settings: ServerSettings,
    gcs_server: GcsServer,
    gcs_retry_test: RetryTestFactory,
    raw_client: Connect,
    gcs_bucket: str,
    storage_client: storage.Client,
    fault: str,
) -> None:
    # A 503 is sent again. A compose GCS applied but whose answer was cut is refused by
    # the pinned precondition when sent again; the object holds the expected size and
    # CRC32C, so it is this upload's, and COMPOSE is answered COMPLETED all the same.
    faults = gcs_retry_test({"storage.objects.compose": [fault]})
    settings = dataclasses.replace(proxy_settings, composite=policy())
    data = os.urandom(2 * SEGMENT + 5)
    async with proxy_with_faults(settings, faults.client, gcs_server) as server:
        client = await raw_client(server, versions=V3)
        token = await open_composite(client, gcs_bucket, "composed.bin", len(data))
        for index in range(3):
            await store_segment(client, token, index, data)
        completed = await compose(client, data, token)
    assert isinstance(completed, Completed), completed
    assert faults.completed()
    blob = storage_client.bucket(gcs_bucket).get_blob("composed.bin")
    assert (completed.generation, completed.crc32c) == (
        blob.generation,
        google_crc32c.value(data),
    )
    assert blob.component_count == 3
    assert blob.download_as_bytes() == data
    assert temporaries(storage_client, gcs_bucket) == []


# --- objects vanishing, and discards racing segments -------------------------------------


@pytest.mark.parametrize("resend_on", ["another proxy", "the same proxy"])
async def test_a_temporary_deleted_before_compose_is_named_then_stored_again(
    start_proxy: StartProxy,
    raw_client: Connect,
    gcs_bucket: str,
    storage_client: storage.Client,
    resend_on: str,
) -> None:
    data = os.urandom(3 * SEGMENT)
    key = os.urandom(32)
    async with (
        start_proxy(composite=policy(), token_key=key) as one,
        start_proxy(composite=policy(), token_key=key) as two,
    ):
        client = await raw_client(one, versions=V3)
        token = await open_composite(client, gcs_bucket, "victim.bin", len(data))
        for index in range(3):
            await store_segment(client, token, index, data)
        upload_id = _upload_of(storage_client, gcs_bucket)
        storage_client.bucket(gcs_bucket).delete_blob(f"{PREFIX}{upload_id}/1")

        missing = await compose(client, data, token)
        assert isinstance(missing, Incomplete), missing
        assert missing.missing == ((SEGMENT, 2 * SEGMENT),)
        assert missing.committed_offset == SEGMENT
        assert stored(storage_client, gcs_bucket, "victim.bin") is None
        # Nothing was deleted: the two segments still stored are not sent again.
        assert len(temporaries(storage_client, gcs_bucket)) == 2

        resender = await raw_client(two if resend_on == "another proxy" else one, versions=V3)
        await store_segment(resender, token, 1, data)
        completed = await compose(resender, data, token)
    assert isinstance(completed, Completed), completed
    assert stored(storage_client, gcs_bucket, "victim.bin") == data
    assert temporaries(storage_client, gcs_bucket) == []


def _upload_of(client: storage.Client, bucket: str) -> str:
    """The id of the one composite upload with temporaries in ``bucket``."""
    ids = {name[len(PREFIX) :].split("/")[0] for name in temporaries(client, bucket)}
    assert len(ids) == 1, ids
    return ids.pop()


async def test_discard_while_segments_are_in_flight_on_other_connections(
    start_proxy: StartProxy,
    raw_client: Connect,
    gcs_bucket: str,
    storage_client: storage.Client,
) -> None:
    data = os.urandom(2 * LARGE_SEGMENT + 3 * LARGE_SEGMENT // 2)
    async with start_proxy(composite=policy(LARGE_SEGMENT)) as server:
        opener = await raw_client(server, versions=V3)
        token = await open_composite(opener, gcs_bucket, "discarded.bin", len(data), LARGE_SEGMENT)
        await store_segment(opener, token, 0, data, LARGE_SEGMENT)
        # Segments 1 and 2 are half written, on connections of their own, their first
        # chunks already in GCS sessions.
        writers = [await raw_client(server, versions=V3) for _ in range(2)]
        for index, writer in enumerate(writers, start=1):
            piece = piece_of(data, index, LARGE_SEGMENT)
            await bind_segment(writer, token, index)
            with trio.fail_after(10):
                await send_range(writer, piece, 0, len(piece) // 2)
                while writer.credit is None or writer.credit.committed_offset == 0:
                    await writer.receive()

        assert isinstance(await answer(opener, Discard(token)), Ack)

        # The segments in flight were aborted: their connections cannot finish them.
        for index, writer in enumerate(writers, start=1):
            piece = piece_of(data, index, LARGE_SEGMENT)
            refused = await answer(writer, Complete(len(piece), google_crc32c.value(piece)))
            assert isinstance(refused, Error), refused
            assert refused.code is ErrorCode.ABORTED
        # ...and the token never writes again, on any connection.
        later = await raw_client(server, versions=V3)
        for request in (OpenSegment(1, token), Compose(len(data), None, token)):
            refused = await answer(later, request)
            assert isinstance(refused, Error), refused
            assert refused.code is ErrorCode.ABORTED
    assert stored(storage_client, gcs_bucket, "discarded.bin") is None
    assert [name.rsplit("/", 1)[1] for name in temporaries(storage_client, gcs_bucket)] == [
        "discarded"
    ]


# --- the server's own sweep ------------------------------------------------------------


async def test_the_sweep_removes_abandoned_temporaries_and_leaves_live_ones(
    start_proxy: StartProxy,
    raw_client: Connect,
    gcs_bucket: str,
    storage_client: storage.Client,
) -> None:
    # Tokens live 3 s, so an upload whose newest temporary is older than that can never be
    # written or composed again: the server sweeps it (every 0.1 s here), and a discarded
    # upload's marker with it. An upload still storing segments keeps its own.
    lifetime = 3.0
    data = os.urandom(2 * SEGMENT)
    async with start_proxy(composite=policy(sweep_interval=0.1), token_lifetime=lifetime) as server:
        client = await raw_client(server, versions=V3)
        before_abandoned = time.time()
        abandoned = await open_composite(client, gcs_bucket, "abandoned.bin", len(data))
        await store_segment(client, abandoned, 0, data)
        discarded = await open_composite(client, gcs_bucket, "discarded.bin", len(data))
        await store_segment(client, discarded, 0, data)
        assert isinstance(await answer(client, Discard(discarded)), Ack)
        left_behind = temporaries(storage_client, gcs_bucket)
        assert sorted(name.rsplit("/", 1)[1] for name in left_behind) == ["0", "discarded"]

        await trio.sleep(lifetime / 2)
        live = await open_composite(client, gcs_bucket, "live.bin", len(data))
        await store_segment(client, live, 0, data)
        live_segment = sorted(set(temporaries(storage_client, gcs_bucket)) - set(left_behind))
        assert len(live_segment) == 1

        with trio.fail_after(lifetime + 5):
            while set(left_behind) & set(temporaries(storage_client, gcs_bucket)):  # noqa: ASYNC110 - GCS has no event
                await trio.sleep(0.05)
        # Not before the newest of them was older than a token's lifetime (GCS keeps
        # creation times to the millisecond).
        assert time.time() - before_abandoned >= lifetime - 0.001
        assert temporaries(storage_client, gcs_bucket) == live_segment

        await store_segment(client, live, 1, data)
        completed = await compose(client, data, live)
    assert isinstance(completed, Completed), completed
    assert stored(storage_client, gcs_bucket, "live.bin") == data
    assert temporaries(storage_client, gcs_bucket) == []
