"""ReliableWriter without faults: the contract itself.

Every test runs against the strict endpoint and against gcp-storage-emulator from PyPI
(marked ``emulator``), except where the emulator gets GCS wrong; those skip, naming why.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import random

import google_crc32c
import pytest
import trio

from reliablewriter import (
    ChecksumMismatchError,
    ChecksumMode,
    IncompleteObjectError,
    NonRetryableHTTPError,
    ReliableWriter,
    WindowExceededError,
    WriterClosedError,
    WriterSettings,
    WriterStats,
    open_blocking_writer,
    open_writer,
)

from .conftest import KiB, MiB, Target, payload, upload

EMULATOR_IGNORES_PRECONDITIONS = (
    "gcp-storage-emulator ignores ifGenerationMatch on resumable uploads (it overwrites)"
)
EMULATOR_FORGETS_FINISHED_SESSIONS = (
    "gcp-storage-emulator does not answer a status query on a finalized session with the "
    "object (it reports an empty session instead)"
)


@pytest.fixture(params=["strict", pytest.param("emulator", marks=pytest.mark.emulator)])
def target(request: pytest.FixtureRequest) -> Target:
    """The strict endpoint, then gcp-storage-emulator."""
    fixture = "strict_target" if request.param == "strict" else "emulator_target"
    found: Target = request.getfixturevalue(fixture)
    return found


@pytest.fixture
def finished_session_target(target: Target) -> Target:
    """:func:`target`, where a finalized session answers a status query with the object."""
    if target.server is None:
        pytest.skip(EMULATOR_FORGETS_FINISHED_SESSIONS)
    return target


@pytest.fixture
def precondition_target(target: Target) -> Target:
    """:func:`target`, where the endpoint honours ``ifGenerationMatch``."""
    if target.server is None:
        pytest.skip(EMULATOR_IGNORES_PRECONDITIONS)
    return target


async def test_out_of_order_overlapping_writes_make_a_byte_exact_object(
    target: Target, settings: WriterSettings
) -> None:
    data = payload(3 * MiB + 123)
    pieces = [
        (offset, data[offset : offset + 100 * KiB]) for offset in range(0, len(data), 100 * KiB)
    ]
    random.Random(1).shuffle(pieces)
    # Resends overlapping what came first, with different bytes: the first copy must win.
    decoys = [(offset + 10, bytes(len(chunk))) for offset, chunk in pieces[::3]]
    async with open_writer(target.bucket, "obj", settings) as writer:
        async with trio.open_nursery() as nursery:
            for offset, chunk in pieces:
                nursery.start_soon(writer.write_at, offset, chunk)
        for offset, decoy in decoys:
            await writer.write_at(offset, decoy)
        info = await writer.complete(total_size=len(data), crc32c=google_crc32c.value(data))
        assert writer.committed_offset == len(data)
        assert writer.stats.held_bytes == 0
    assert target.read("obj") == data
    assert info.size == len(data)
    assert info.name == "obj"
    assert info.generation > 0


async def test_an_empty_object(target: Target, settings: WriterSettings) -> None:
    async with open_writer(target.bucket, "empty", settings) as writer:
        info = await writer.complete()
    assert info.size == 0
    assert target.read("empty") == b""
    assert writer.stats.chunks == 1


async def test_an_object_smaller_than_a_chunk_takes_one_request(
    target: Target, settings: WriterSettings
) -> None:
    data = payload(1000)
    async with open_writer(target.bucket, "small", settings) as writer:
        await writer.write_at(0, data)
        info = await writer.complete()
    assert writer.stats.chunks == 1
    assert writer.stats.bytes_sent == len(data)
    assert info.crc32c is not None
    assert target.read("small") == data


async def test_content_type_metadata_and_progress(target: Target, settings: WriterSettings) -> None:
    data = payload(2 * MiB)
    seen: list[WriterStats] = []
    async with open_writer(
        target.bucket,
        "meta",
        settings,
        content_type="text/plain",
        metadata={"origin": "test"},
        progress=seen.append,
    ) as writer:
        await writer.write_at(0, data)
        info = await writer.complete()
    assert info.content_type == "text/plain"
    assert info.metadata == {"origin": "test"}
    acked = [stats.bytes_acked for stats in seen]
    assert acked == sorted(acked)
    assert len(acked) >= 4
    assert acked[-1] == len(data)


async def test_crc32c_and_md5_together(target: Target, settings: WriterSettings) -> None:
    data = payload(MiB + 1)
    settings = dataclasses.replace(settings, checksum=ChecksumMode.BOTH)
    info = await upload(target.bucket, "both", data, settings)
    assert info.md5_hash == base64.b64encode(hashlib.md5(data).digest()).decode()
    assert target.read("both") == data


async def test_writes_beyond_the_window_wait_for_the_committed_offset(
    target: Target, settings: WriterSettings
) -> None:
    data = payload(3 * MiB)
    far = 2 * MiB  # beyond committed (0) + buffer_limit (1 MiB)
    events: list[str] = []
    async with open_writer(target.bucket, "window", settings) as writer:
        assert writer.window_end == settings.buffer_limit

        async def far_write() -> None:
            await writer.write_at(far, data[far:])
            events.append(f"far write done at committed {writer.committed_offset}")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(far_write)
            await trio.testing.wait_all_tasks_blocked()
            assert events == []
            for offset in range(0, far, 128 * KiB):
                await writer.write_at(offset, data[offset : offset + 128 * KiB])
        await writer.complete()
    assert target.read("window") == data
    (event,) = events
    assert int(event.rsplit(" ", 1)[1]) >= far + len(data[far:]) - settings.buffer_limit


async def test_streams_that_respect_the_window_never_deadlock(
    target: Target, settings: WriterSettings
) -> None:
    """Four connections, frames spread at random, some resent elsewhere, some discarded.

    Each connection sends its frames in offset order and waits for the window before each
    one, as the proxy does: the lowest missing frame is then always at the head of some
    connection and inside the window, so the upload always moves.
    """
    data = payload(3 * MiB + 777)
    frame = 64 * KiB
    rng = random.Random(4)
    streams: list[list[tuple[int, int]]] = [[] for _ in range(4)]
    for offset in range(0, len(data), frame):
        frame_range = (offset, min(frame, len(data) - offset))
        streams[rng.randrange(4)].append(frame_range)
        if rng.random() < 0.2:
            streams[rng.randrange(4)].append(frame_range)  # a resend, maybe on the same one
    for stream in streams:
        stream.sort()
    view = memoryview(data)

    async def send(writer: ReliableWriter, stream: list[tuple[int, int]]) -> None:
        for offset, length in stream:
            await writer.wait_for_window(offset + length)
            if rng.random() < 0.1:  # a frame that fails its CRC check: dropped, then resent
                with writer.begin_write(offset, length) as corrupt:
                    corrupt.feed(bytes(length))
            with writer.begin_write(offset, length) as pending:
                for piece in range(offset, offset + length, 16 * KiB):
                    pending.feed(view[piece : min(piece + 16 * KiB, offset + length)])
                pending.commit()
            await trio.lowlevel.checkpoint()

    async with open_writer(target.bucket, "streams", settings) as writer:
        async with trio.open_nursery() as nursery:
            for stream in streams:
                nursery.start_soon(send, writer, stream)
        await writer.complete(len(data), crc32c=google_crc32c.value(data))
    assert target.read("streams") == data


async def test_staged_writes_upload_only_once_committed(
    target: Target, settings: WriterSettings
) -> None:
    data = payload(600 * KiB)
    async with open_writer(target.bucket, "staged", settings) as writer:
        dropped = writer.begin_write(0, 300 * KiB)
        dropped.feed(bytes(300 * KiB))
        dropped.discard()
        assert writer.received_ranges() == ()
        staged = writer.begin_write(0, 300 * KiB)
        staged.feed(data[: 100 * KiB])
        staged.feed(memoryview(data)[100 * KiB : 300 * KiB])
        with pytest.raises(ValueError, match="overruns"):
            staged.feed(b"x")
        assert staged.commit() == 300 * KiB
        assert writer.received_ranges() == ((0, 300 * KiB),)
        with pytest.raises(WindowExceededError, match="past the window end"):
            writer.begin_write(writer.window_end, 1)
        with writer.begin_write(300 * KiB, 300 * KiB) as rest:
            rest.feed(data[300 * KiB :])
            rest.commit()
        await writer.complete()
    assert target.read("staged") == data


async def test_complete_refuses_holes_and_is_idempotent(
    target: Target, settings: WriterSettings
) -> None:
    data = payload(1 * MiB)
    async with open_writer(target.bucket, "holes", settings) as writer:
        await writer.write_at(0, data[: 100 * KiB])
        await writer.write_at(200 * KiB, data[200 * KiB :])
        with pytest.raises(IncompleteObjectError, match=r"missing bytes \[102400, 204800\)"):
            await writer.complete()
        await writer.write_at(100 * KiB, data[100 * KiB : 200 * KiB])
        first = await writer.complete(len(data))
        assert await writer.complete(len(data)) is first
        with pytest.raises(WriterClosedError):
            await writer.write_at(len(data), b"more")
    assert target.read("holes") == data


async def test_a_wrong_expected_crc32c_fails_before_the_object_exists(
    target: Target, settings: WriterSettings
) -> None:
    data = payload(700 * KiB)
    async with open_writer(target.bucket, "badcrc", settings) as writer:
        await writer.write_at(0, data)
        with pytest.raises(ChecksumMismatchError, match="caller's CRC32C"):
            await writer.complete(crc32c=google_crc32c.value(data) ^ 1)
    assert target.object_names() == []


async def test_leaving_without_complete_keeps_the_session_resumable(
    target: Target, settings: WriterSettings
) -> None:
    data = payload(2 * MiB + 7)
    async with open_writer(target.bucket, "resumed", settings) as first:
        await first.write_at(0, data[:MiB])
        await first.wait_committed(MiB // 2)
        session_uri = first.session_uri
    async with open_writer(target.bucket, "resumed", settings, session_uri=session_uri) as second:
        resumed_at = second.committed_offset
        assert resumed_at >= MiB // 2
        await second.write_at(resumed_at, data[resumed_at:])
        # Bytes from before the restart were never seen here: the caller's CRC32C stands in.
        info = await second.complete(crc32c=google_crc32c.value(data))
    assert info.size == len(data)
    assert target.read("resumed") == data


async def test_if_generation_match_applies_at_initiation(
    precondition_target: Target, settings: WriterSettings
) -> None:
    target = precondition_target
    first = await upload(target.bucket, "gen", b"first", settings, if_generation_match=0)
    with pytest.raises(NonRetryableHTTPError, match="HTTP 412") as refused:
        await upload(target.bucket, "gen", b"second", settings, if_generation_match=0)
    assert refused.value.status == 412
    await upload(target.bucket, "gen", b"third", settings, if_generation_match=first.generation)
    assert target.read("gen") == b"third"


async def test_if_generation_match_applies_at_finalization(
    precondition_target: Target, settings: WriterSettings
) -> None:
    target = precondition_target
    async with open_writer(target.bucket, "race", settings, if_generation_match=0) as writer:
        await writer.write_at(0, b"loser")
        await upload(target.bucket, "race", b"winner", settings)
        with pytest.raises(NonRetryableHTTPError, match="HTTP 412"):
            await writer.complete()
    assert target.read("race") == b"winner"


# Issue 10 #8: with ifGenerationMatch, one metadata request fails a doomed upload before
# its bytes are sent (storage-testbench checks preconditions only at finalization).


async def test_a_doomed_resume_fails_before_any_byte_is_sent(
    strict_target: Target, settings: WriterSettings
) -> None:
    target = strict_target
    data = payload(MiB)
    async with open_writer(target.bucket, "doomed", settings, if_generation_match=0) as first:
        await first.write_at(0, data[: 600 * KiB])
        await first.wait_committed(512 * KiB)
        session_uri = first.session_uri
    winner = await upload(target.bucket, "doomed", b"winner", settings)
    resume = functools.partial(
        open_writer, target.bucket, "doomed", settings, session_uri=session_uri
    )
    # Unchecked, the resumed writer takes bytes that GCS will refuse only at the end.
    async with resume(if_generation_match=0) as unchecked:
        assert unchecked.committed_offset == 512 * KiB
    with pytest.raises(NonRetryableHTTPError, match="live generation is") as refused:
        async with resume(if_generation_match=0, check_generation_first=True):
            pytest.fail("a doomed upload must not open")
    assert refused.value.status == 412
    assert f"generation is {winner.generation}, not 0" in str(refused.value)
    assert target.read("doomed") == b"winner"


async def test_the_generation_is_checked_before_a_session_starts(
    strict_target: Target, settings: WriterSettings
) -> None:
    target = strict_target
    first = await upload(target.bucket, "gen", b"first", settings)
    with pytest.raises(NonRetryableHTTPError, match="live generation is") as refused:
        async with open_writer(
            target.bucket, "gen", settings, if_generation_match=0, check_generation_first=True
        ):
            pytest.fail("a doomed upload must not open")
    assert refused.value.status == 412
    # The metadata request is retried like any other; a matching generation opens.
    target.http.headers["x-retry-test-id"] = target.strict.create_retry_test(
        {"storage.objects.get": ["return-503"]}
    )
    async with open_writer(
        target.bucket,
        "gen",
        settings,
        if_generation_match=first.generation,
        check_generation_first=True,
    ) as writer:
        assert writer.stats.retries_by_cause == {"http-503": 1}
        await writer.write_at(0, b"second")
        await writer.complete()
        # Once the object changed, the method says so too.
        with pytest.raises(NonRetryableHTTPError, match="HTTP 412"):
            await writer.check_precondition()
    assert target.read("gen") == b"second"


async def test_a_finished_session_resumes_despite_the_generation_check(
    strict_target: Target, settings: WriterSettings
) -> None:
    """The object a resumed session finished is its own: no false 412."""
    target = strict_target
    """The object a resumed session finished is its own: no false 412."""
    async with open_writer(target.bucket, "own", settings, if_generation_match=0) as first:
        await first.write_at(0, b"mine")
        info = await first.complete()
        session_uri = first.session_uri
    async with open_writer(
        target.bucket,
        "own",
        settings,
        session_uri=session_uri,
        if_generation_match=0,
        check_generation_first=True,
    ) as again:
        assert again.result == info
        assert await again.complete() == info


def test_blocking_facade_writes_sequentially(target: Target, settings: WriterSettings) -> None:
    data = payload(MiB + 5)
    with open_blocking_writer(target.bucket, "blocking", settings) as file:
        for offset in range(0, len(data), 64 * KiB):
            file.write(data[offset : offset + 64 * KiB])
        assert file.tell() == len(data)
    assert file.result is not None
    assert file.result.size == len(data)
    assert target.read("blocking") == data


def test_blocking_facade_abort_leaves_no_object(target: Target, settings: WriterSettings) -> None:
    file = open_blocking_writer(target.bucket, "blocking-abort", settings)
    file.write(payload(700 * KiB))
    file.abort()
    with pytest.raises(WriterClosedError):
        file.write(b"more")
    assert target.object_names() == []


async def test_resuming_a_finished_session_returns_the_object(
    finished_session_target: Target, settings: WriterSettings
) -> None:
    target = finished_session_target
    data = payload(700 * KiB)
    async with open_writer(target.bucket, "done", settings) as first:
        await first.write_at(0, data)
        finished = await first.complete()
        session_uri = first.session_uri
    crc32c = google_crc32c.value(data)
    async with open_writer(target.bucket, "done", settings, session_uri=session_uri) as again:
        assert again.committed_offset == len(data)
        info = await again.complete(len(data), crc32c=crc32c)
        with pytest.raises(ChecksumMismatchError, match="finished object"):
            await again.complete(len(data), crc32c=crc32c ^ 1)
    assert (info.generation, info.size, info.crc32c) == (
        finished.generation,
        finished.size,
        finished.crc32c,
    )


async def test_a_missing_bucket_is_refused_when_opening(
    target: Target, settings: WriterSettings
) -> None:
    bucket = target.bucket.client.bucket("no-such-bucket")
    with pytest.raises(NonRetryableHTTPError, match="not found") as refused:
        await upload(bucket, "obj", b"data", settings)
    assert refused.value.status == 404
