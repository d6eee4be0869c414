"""Composite uploads (docs/protocol.md section 14), served to raw version-3 clients.

Every test drives the server through real sockets and checks what GCS holds afterwards:
the composed object, and nothing left in the temporary namespace.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import google_crc32c
import pytest
import trio
from google.cloud import storage  # type: ignore[import-untyped]

from protocol import (
    Ack,
    AttachUpload,
    Complete,
    Completed,
    Compose,
    CompositeOpened,
    Discard,
    Error,
    ErrorCode,
    Incomplete,
    OpenSegment,
    OpenUpload,
    UploadOpened,
)
from proxy.server import ProxyServer
from proxy.server.settings import CompositeMode, CompositePolicy, KiB, SettingsError
from tests.proxy.conftest import RawClient
from tests.proxy.server.test_uploads import send_range

Connect = Callable[..., Awaitable[RawClient]]
StartProxy = Callable[..., contextlib.AbstractAsyncContextManager[ProxyServer]]

SEGMENT = 256 * KiB
V3 = (1, 2, 3)
ALWAYS = CompositePolicy(mode=CompositeMode.ALWAYS, segment_size=SEGMENT)


@pytest.fixture
async def composite_proxy(start_proxy: StartProxy) -> AsyncIterator[ProxyServer]:
    async with start_proxy(composite=ALWAYS) as server:
        yield server


async def open_composite(
    client: RawClient, bucket: str, name: str, size: int, segment_size: int = SEGMENT
) -> bytes:
    await client.send(OpenUpload(bucket, name, expected_size=size))
    with trio.fail_after(10):
        opened = await client.reply(CompositeOpened)
    assert (opened.segment_size, opened.parallel_segments) == (
        segment_size,
        ALWAYS.parallel_segments,
    )
    return opened.token


def piece_of(data: bytes, index: int, segment_size: int = SEGMENT) -> bytes:
    return data[index * segment_size : (index + 1) * segment_size]


async def bind_segment(client: RawClient, token: bytes, index: int) -> None:
    client.credit = None
    await client.send(OpenSegment(index, token))
    with trio.fail_after(10):
        await client.reply(UploadOpened)


async def store_segment(
    client: RawClient, token: bytes, index: int, data: bytes, segment_size: int = SEGMENT
) -> Completed:
    """Segment ``index`` of ``data`` through OPEN_SEGMENT, writes and COMPLETE."""
    piece = piece_of(data, index, segment_size)
    await bind_segment(client, token, index)
    with trio.fail_after(10):
        await send_range(client, piece, 0, len(piece))
    completed = await answer(client, Complete(len(piece), google_crc32c.value(piece)))
    assert isinstance(completed, Completed), completed
    assert (completed.size, completed.crc32c) == (len(piece), google_crc32c.value(piece))
    return completed


async def answer(client: RawClient, request: Any) -> Any:
    """The reply to ``request`` (skipping unsolicited frames)."""
    seq = await client.send(request)
    with trio.fail_after(15):
        while True:
            event = await client.receive()
            if getattr(event, "reply_to", 0) == seq:
                return event


def temporaries(client: storage.Client, bucket: str) -> list[str]:
    listed = client.bucket(bucket).list_blobs(prefix=ALWAYS.temp_prefix)
    return sorted(blob.name for blob in listed)


async def test_segments_over_two_connections_compose_into_the_object(
    composite_proxy: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    data = os.urandom(2 * SEGMENT + 100 * KiB)
    crc = google_crc32c.value(data)
    first = await raw_client(composite_proxy, versions=V3)
    second = await raw_client(composite_proxy, versions=V3)
    token = await open_composite(first, gcs_bucket, "composite.bin", len(data))
    await store_segment(first, token, 0, data)
    await store_segment(second, token, 2, data)
    # Segment 1 is missing: COMPOSE names its bytes, in object offsets, and deletes nothing.
    missing = await answer(first, Compose(len(data), crc, token))
    assert isinstance(missing, Incomplete)
    assert missing.missing == ((SEGMENT, 2 * SEGMENT),)
    assert missing.committed_offset == SEGMENT
    await store_segment(second, token, 1, data)
    completed = await answer(second, Compose(len(data), crc, token))
    assert isinstance(completed, Completed)
    assert (completed.size, completed.crc32c, completed.md5) == (len(data), crc, None)
    blob = composite_proxy.backend.client.bucket(gcs_bucket).get_blob("composite.bin")
    assert blob.download_as_bytes() == data
    assert blob.component_count == 3
    assert temporaries(composite_proxy.backend.client, gcs_bucket) == []
    # Idempotent: the same COMPLETED again, and the token never writes a segment again.
    again = await answer(first, Compose(len(data), crc, token))
    assert isinstance(again, Completed)
    assert (again.generation, again.size, again.crc32c) == (completed.generation, len(data), crc)
    late = await answer(first, OpenSegment(1, token))
    assert isinstance(late, Error)
    assert late.code is ErrorCode.UPLOAD_FINISHED


async def test_another_instance_composes_and_answers_a_repeated_compose(
    start_proxy: StartProxy, raw_client: Connect, gcs_bucket: str
) -> None:
    key = os.urandom(32)
    data = os.urandom(SEGMENT + 1)
    crc = google_crc32c.value(data)
    async with (
        start_proxy(composite=ALWAYS, token_key=key) as one,
        start_proxy(composite=ALWAYS, token_key=key) as two,
    ):
        on_one = await raw_client(one, versions=V3)
        on_two = await raw_client(two, versions=V3)
        token = await open_composite(on_one, gcs_bucket, "spread.bin", len(data))
        await store_segment(on_one, token, 0, data)
        await store_segment(on_two, token, 1, data)
        completed = await answer(on_two, Compose(len(data), crc, token))
        assert isinstance(completed, Completed)
        # The first instance never composed it: it reads the object back from GCS.
        repeated = await answer(on_one, Compose(len(data), crc, token))
        assert isinstance(repeated, Completed)
        assert (repeated.generation, repeated.crc32c) == (completed.generation, crc)
        stored = one.backend.client.bucket(gcs_bucket).blob("spread.bin").download_as_bytes()
        assert stored == data


async def test_discard_deletes_the_segments_and_ends_the_token_everywhere(
    composite_proxy: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    data = os.urandom(2 * SEGMENT)
    client = await raw_client(composite_proxy, versions=V3)
    token = await open_composite(client, gcs_bucket, "discarded.bin", len(data))
    await store_segment(client, token, 0, data)
    assert isinstance(await answer(client, Discard(token)), Ack)
    for request in (OpenSegment(1, token), Compose(len(data), None, token)):
        refused = await answer(client, request)
        assert isinstance(refused, Error)
        assert refused.code is ErrorCode.ABORTED
    # Only the marker that tells every instance stays, until the sweep removes it.
    left = temporaries(composite_proxy.backend.client, gcs_bucket)
    assert [name.rsplit("/", 1)[1] for name in left] == ["discarded"]
    assert composite_proxy.backend.client.bucket(gcs_bucket).get_blob("discarded.bin") is None


async def test_a_wrong_checksum_stores_nothing_and_is_final(
    composite_proxy: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    data = os.urandom(SEGMENT + 7)
    client = await raw_client(composite_proxy, versions=V3)
    token = await open_composite(client, gcs_bucket, "wrong.bin", len(data))
    for index in (0, 1):
        await store_segment(client, token, index, data)
    right = google_crc32c.value(data)
    for crc in (right ^ 1, right):
        refused = await answer(client, Compose(len(data), crc, token))
        assert isinstance(refused, Error)
        assert refused.code is ErrorCode.CHECKSUM_MISMATCH
    assert composite_proxy.backend.client.bucket(gcs_bucket).get_blob("wrong.bin") is None


@pytest.mark.parametrize(
    ("versions", "wish"), [((1, 2), False), (V3, True)], ids=["version-2", "single-session"]
)
async def test_who_gets_one_session_whatever_the_policy(
    composite_proxy: ProxyServer,
    raw_client: Connect,
    gcs_bucket: str,
    versions: tuple[int, ...],
    wish: bool,
) -> None:
    client = await raw_client(composite_proxy, versions=versions)
    await client.send(OpenUpload(gcs_bucket, "plain.bin", expected_size=1, single_session=wish))
    await client.reply(UploadOpened)


async def test_the_temporary_namespace_is_not_writable_by_clients(
    composite_proxy: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    client = await raw_client(composite_proxy, versions=V3)
    refused = await answer(client, OpenUpload(gcs_bucket, f"{ALWAYS.temp_prefix}x/0"))
    assert isinstance(refused, Error)
    assert refused.code is ErrorCode.FORBIDDEN


async def test_a_segment_index_past_the_end_is_refused(
    composite_proxy: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    client = await raw_client(composite_proxy, versions=V3)
    token = await open_composite(client, gcs_bucket, "short.bin", SEGMENT)
    refused = await answer(client, OpenSegment(1, token))
    assert isinstance(refused, Error)
    assert refused.code is ErrorCode.INVALID_REQUEST


async def test_consecutive_missing_segments_are_listed_as_one_range(
    composite_proxy: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    data = os.urandom(3 * SEGMENT + 1)
    client = await raw_client(composite_proxy, versions=V3)
    token = await open_composite(client, gcs_bucket, "gaps.bin", len(data))
    await store_segment(client, token, 0, data)
    missing = await answer(client, Compose(len(data), google_crc32c.value(data), token))
    assert isinstance(missing, Incomplete)
    assert missing.missing == ((SEGMENT, len(data)),)  # segments 1, 2 and 3, joined


async def test_the_composite_token_attaches_again_for_a_version_3_client_only(
    composite_proxy: ProxyServer, raw_client: Connect, gcs_bucket: str
) -> None:
    # A rerun that kept only the token: COMPOSITE_OPENED again, the connection stays unbound
    # (a COMPOSE then says what is missing); ABORTED once discarded.
    client = await raw_client(composite_proxy, versions=V3)
    token = await open_composite(client, gcs_bucket, "again.bin", 2 * SEGMENT)
    again = await answer(client, AttachUpload(token))
    assert isinstance(again, CompositeOpened)
    assert (again.token, again.segment_size) == (token, SEGMENT)
    older = await raw_client(composite_proxy, versions=(1, 2))
    refused = await answer(older, AttachUpload(token))
    assert isinstance(refused, Error)
    assert refused.code is ErrorCode.INVALID_REQUEST
    assert isinstance(await answer(client, Discard(token)), Ack)
    gone = await answer(client, AttachUpload(token))
    assert isinstance(gone, Error)
    assert gone.code is ErrorCode.ABORTED


@pytest.mark.parametrize(
    ("changes", "refusal"),
    [
        ({"segment_size": 0}, "segment_size must be a positive multiple"),
        ({"segment_size": 100 * KiB}, "segment_size must be a positive multiple"),
        ({"parallel_segments": 0}, "parallel_segments must be at least 1"),
        ({"parallel_segments": 0x10000}, "at most 65535"),  # COMPOSITE_OPENED's u16
        ({"temp_prefix": "tmp"}, "temp_prefix must end with '/'"),
        ({"threshold": -1}, "threshold must not be negative"),
        ({"sweep_interval": 0}, "sweep interval must be positive"),
    ],
)
def test_a_composite_policy_the_writer_or_the_wire_cannot_use_is_refused(
    changes: dict[str, Any], refusal: str
) -> None:
    with pytest.raises(SettingsError, match=refusal):
        CompositePolicy(**changes)
