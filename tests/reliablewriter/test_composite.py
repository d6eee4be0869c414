"""Composite uploads: parallel segments composed into one object, and every way it can fail.

Faults are real: the strict endpoint's scripted instructions (503s, lost sessions, responses
cut after the request was applied) and objects deleted underneath through its API.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable
from typing import Any

import google_crc32c
import pytest
import trio

from reliablewriter import (
    ChecksumMismatchError,
    IncompleteObjectError,
    NonRetryableHTTPError,
    ObjectInfo,
    SessionLostError,
    WriterAbortedError,
    WriterSettings,
)
from reliablewriter.compose import ComposeStep, compose_tree
from reliablewriter.composite import (
    DEFAULT_TEMP_PREFIX,
    CompositeSettings,
    CompositeWriter,
    open_composite_writer,
    temporary_name,
)

from .conftest import KiB, MiB, Target, payload

SEGMENT = 256 * KiB


def _composite(settings: WriterSettings, *, parallel: int = 2) -> CompositeSettings:
    return CompositeSettings(segment_size=SEGMENT, parallel_segments=parallel, writer=settings)


def _crc(data: bytes) -> int:
    return int(google_crc32c.value(data))


def _b64(value: int) -> str:
    return base64.b64encode(value.to_bytes(4, "big")).decode()


def _temporaries(target: Target) -> list[str]:
    return [name for name in target.object_names() if name.startswith(DEFAULT_TEMP_PREFIX)]


async def _write_in_pieces(writer: CompositeWriter, data: bytes, piece: int = 64 * KiB) -> None:
    for offset in range(0, len(data), piece):
        await writer.write_at(offset, data[offset : offset + piece])


async def _upload(
    target: Target, name: str, data: bytes, settings: CompositeSettings, **options: Any
) -> ObjectInfo:
    """Write ``data`` in pieces and complete it (checking the caller's CRC32C ``crc``)."""
    crc = options.pop("crc", _crc(data))
    async with open_composite_writer(target.bucket, name, settings, **options) as writer:
        await _write_in_pieces(writer, data)
        return await writer.complete(len(data), crc)


# --- the compose plan ---------------------------------------------------------------------


def test_up_to_32_sources_take_one_compose() -> None:
    sources = [f"s{i}" for i in range(32)]
    assert compose_tree(sources, "out", lambda level, i: f"c{level}.{i}") == [
        ComposeStep("out", tuple(sources), final=True)
    ]


def test_more_sources_make_a_tree_of_32_at_most_in_order() -> None:
    sources = [f"s{i}" for i in range(32 * 32 + 5)]
    steps = compose_tree(sources, "out", lambda level, i: f"c{level}.{i}")
    assert all(len(step.sources) <= 32 for step in steps)
    assert [step.final for step in steps] == [False] * (len(steps) - 1) + [True]
    # Expanding every intermediate back into its sources gives the sources in order.
    made = {step.destination: step.sources for step in steps}

    def expand(name: str) -> list[str]:
        return [leaf for part in made[name] for leaf in expand(part)] if name in made else [name]

    assert expand("out") == sources
    # 33 groups of level 0; at level 1 the 33rd is alone and carried up as it is.
    assert steps[-1].sources == ("c1.0", "c0.32")


# --- uploads that succeed -----------------------------------------------------------------


async def test_segments_compose_into_the_object_with_the_combined_crc32c(
    target: Target, settings: WriterSettings
) -> None:
    data = payload(3 * SEGMENT + 100 * KiB)
    async with open_composite_writer(
        target.bucket, "big", _composite(settings), content_type="text/plain",
        metadata={"k": "v"}, if_generation_match=0,
    ) as writer:  # fmt: skip
        await _write_in_pieces(writer, data)
        info = await writer.complete(len(data), _crc(data))
    assert target.read("big") == data
    assert (info.size, info.crc32c, info.md5_hash) == (len(data), _b64(_crc(data)), None)
    assert info.resource["componentCount"] == 4
    assert (info.content_type, dict(info.metadata)) == ("text/plain", {"k": "v"})
    assert _temporaries(target) == []


async def test_writes_in_any_order_from_many_tasks(
    target: Target, settings: WriterSettings
) -> None:
    data = payload(5 * SEGMENT)
    pieces = list(range(0, len(data), 32 * KiB))
    random.Random(5).shuffle(pieces)
    async with open_composite_writer(
        target.bucket, "shuffled", _composite(settings, parallel=3)
    ) as writer:
        # Each task writes its share in order; together they are out of order.
        async with trio.open_nursery() as nursery:
            for share in range(4):
                mine = sorted(pieces[share::4])

                async def write(mine: list[int] = mine) -> None:
                    for offset in mine:
                        await writer.write_at(offset, data[offset : offset + 32 * KiB])

                nursery.start_soon(write)
        # A resend of bytes already composed into a finished segment is harmless.
        await writer.write_at(0, data[: 64 * KiB])
        info = await writer.complete(len(data))
    assert target.read("shuffled") == data
    assert info.resource["componentCount"] == 5


async def test_more_than_32_segments_compose_as_a_tree(
    target: Target, settings: WriterSettings
) -> None:
    data = payload(34 * SEGMENT + 1)
    async with open_composite_writer(
        target.bucket, "tree", _composite(settings, parallel=4)
    ) as writer:
        await _write_in_pieces(writer, data, piece=SEGMENT)
        info = await writer.complete(len(data), _crc(data))
    assert target.read("tree") == data
    assert info.resource["componentCount"] == 35
    assert _temporaries(target) == []


async def test_an_empty_object(target: Target, settings: WriterSettings) -> None:
    async with open_composite_writer(target.bucket, "empty", _composite(settings)) as writer:
        info = await writer.complete(0, 0)
    assert (info.size, target.read("empty")) == (0, b"")
    assert _temporaries(target) == []


async def test_a_gap_is_reported_and_the_upload_carries_on(
    target: Target, settings: WriterSettings
) -> None:
    data = payload(2 * SEGMENT)
    async with open_composite_writer(target.bucket, "gap", _composite(settings)) as writer:
        await writer.write_at(0, data[: 100 * KiB])
        await writer.write_at(200 * KiB, data[200 * KiB :])
        with pytest.raises(IncompleteObjectError) as caught:
            await writer.complete(len(data))
        assert caught.value.missing == ((100 * KiB, 200 * KiB),)
        await writer.write_at(100 * KiB, data[100 * KiB : 200 * KiB])
        await writer.complete(len(data))
    assert target.read("gap") == data


# --- faults -------------------------------------------------------------------------------


async def test_a_segment_whose_chunk_fails_is_retried(
    target: Target, settings: WriterSettings
) -> None:
    target.script("return-503", "return-reset-connection", "return-503-after-128K")
    data = payload(3 * SEGMENT)
    async with open_composite_writer(target.bucket, "flaky", _composite(settings)) as writer:
        await _write_in_pieces(writer, data)
        await writer.complete(len(data), _crc(data))
    assert target.script_done()
    assert target.read("flaky") == data
    assert _temporaries(target) == []


async def test_connections_reset_under_every_segment_still_make_the_object(
    faulty_target: Callable[[str], Target], settings: WriterSettings
) -> None:
    """Network faults on the GCS leg (faultnet's HTTP transport): every connection,
    segments' and composes' alike, is reset once 300 KiB have gone up it, so a connection
    carries at most one whole chunk and the next is cut partway and sent again."""
    target = faulty_target("reset_peer:up(after=300k)")  # every connection, in turn
    data = payload(4 * SEGMENT + 3)
    info = await _upload(target, "reset", data, _composite(settings, parallel=3))
    assert target.counters.faults_applied("reset_peer") >= 1, target.counters
    assert (target.read("reset"), info.size) == (data, len(data))
    assert _temporaries(target) == []


async def test_a_segment_session_lost_before_its_first_byte_is_restarted(
    target: Target, settings: WriterSettings
) -> None:
    target.script("return-410-after-0K")
    data = payload(2 * SEGMENT + 9)
    info = await _upload(target, "restarted", data, _composite(settings, parallel=1))
    assert target.script_done()
    assert (target.read("restarted"), info.size) == (data, len(data))
    assert _temporaries(target) == []


async def test_more_than_1024_components_is_refused_before_anything_is_sent(
    target: Target, settings: WriterSettings
) -> None:
    async with open_composite_writer(target.bucket, "huge", _composite(settings)) as writer:
        with pytest.raises(ValueError, match="1024 components"):
            await writer.write_at(1024 * SEGMENT, b"x")
    assert target.object_names() == []


async def test_a_segment_session_lost_fails_clearly_and_leaves_nothing(
    target: Target, settings: WriterSettings
) -> None:
    # The session is lost after its first chunk was committed: its bytes are gone from
    # the writer, so the segment cannot be rebuilt here. A clear error, never a wrong object.
    target.script("return-410-after-768K")
    data = payload(2 * MiB + 5)
    composite = CompositeSettings(segment_size=1 * MiB, parallel_segments=1, writer=settings)
    with pytest.raises(SessionLostError):
        await _upload(target, "lost", data, composite)
    assert "lost" not in target.object_names()
    assert _temporaries(target) == []


@pytest.mark.parametrize("fault", ["return-503", "return-reset-connection", "return-broken-stream"])
async def test_a_failed_or_unanswered_compose_is_retried_or_settled(
    target: Target, settings: WriterSettings, fault: str
) -> None:
    """A 503 is retried; a compose applied but unanswered (broken stream) reads back as
    ours, though the precondition now refuses it, and counts as success."""
    test_id = target.strict.create_retry_test({"storage.objects.compose": [fault]})
    target.http.headers["x-retry-test-id"] = test_id
    data = payload(2 * SEGMENT + 7)
    async with open_composite_writer(
        target.bucket, "composed", _composite(settings), if_generation_match=0
    ) as writer:
        await _write_in_pieces(writer, data)
        info = await writer.complete(len(data), _crc(data))
    assert target.strict.retry_tests.get(test_id)["completed"] is True
    assert target.read("composed") == data
    live = target.strict.store.get_object(target.bucket_name, "composed")[1]
    assert info.generation == int(live["generation"])
    assert _temporaries(target) == []


async def test_a_temporary_deleted_underneath_is_a_clear_error(
    target: Target, settings: WriterSettings
) -> None:
    data = payload(2 * SEGMENT + 5)

    async def upload_losing_the_first_segment() -> None:
        async with open_composite_writer(
            target.bucket, "victim", _composite(settings), upload_id="u1"
        ) as writer:
            await _write_in_pieces(writer, data[: 2 * SEGMENT])
            first = temporary_name(DEFAULT_TEMP_PREFIX, "u1", 0)
            with trio.fail_after(10):
                while first not in target.object_names():  # noqa: ASYNC110 - GCS has no event
                    await trio.sleep(0.01)
            target.bucket.delete_blob(first)
            await writer.write_at(2 * SEGMENT, data[2 * SEGMENT :])
            await writer.complete(len(data))

    with pytest.raises(NonRetryableHTTPError) as caught:
        await upload_losing_the_first_segment()
    assert caught.value.status == 404
    assert "victim" not in target.object_names()
    assert _temporaries(target) == []


async def test_the_destination_precondition_fails_and_cleans_up(
    target: Target, settings: WriterSettings
) -> None:
    target.bucket.blob("taken").upload_from_string(b"already here")
    data = payload(2 * SEGMENT)
    with pytest.raises(NonRetryableHTTPError) as caught:
        await _upload(target, "taken", data, _composite(settings), if_generation_match=0)
    assert caught.value.status == 412
    assert target.read("taken") == b"already here"
    assert _temporaries(target) == []


async def test_a_wrong_crc32c_composes_nothing(target: Target, settings: WriterSettings) -> None:
    data = payload(2 * SEGMENT)
    with pytest.raises(ChecksumMismatchError):
        await _upload(target, "bad", data, _composite(settings), crc=_crc(data) ^ 1)
    assert target.object_names() == []


async def test_abort_with_segments_in_flight_leaves_nothing(
    target: Target, settings: WriterSettings
) -> None:
    data = payload(4 * SEGMENT)
    async with open_composite_writer(
        target.bucket, "aborted", _composite(settings, parallel=4)
    ) as writer:
        await _write_in_pieces(writer, data[: 3 * SEGMENT + 100 * KiB])
        await writer.abort()
        with pytest.raises(WriterAbortedError):
            await writer.write_at(0, data[:10])
    assert target.object_names() == []
    # Every segment's session was cancelled, none left open.
    assert [s for s in target.strict.store.sessions() if not s.finalized] == []
