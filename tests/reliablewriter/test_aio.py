"""The asyncio writer: the trio writer's semantics, errors and counters, awaited from
asyncio (plain ``asyncio.run``), against the strict endpoint and through faultnet."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import trio

from reliablewriter import (
    NonRetryableHTTPError,
    ResumeHandle,
    WriterAbortedError,
    WriterClosedError,
    WriterSettings,
    open_async_writer,
    open_writer,
)

from .conftest import KiB, MiB, Target, payload

Faulty = Callable[[str], Target]


def test_writes_out_of_order_and_completes(target: Target, settings: WriterSettings) -> None:
    data = payload(2 * MiB + 7)

    async def main() -> None:
        async with open_async_writer(target.bucket, "obj", settings) as writer:
            # The tail waits for room in the 1 MiB window until the head is sent.
            await asyncio.gather(writer.write_at(MiB, data[MiB:]), writer.write_at(0, data[:MiB]))
            info = await writer.complete()
            assert info.size == len(data)
            assert await writer.complete() == info  # idempotent, as on trio
        assert writer.stats.bytes_acked == len(data)
        assert writer.stats.retries == 0

    asyncio.run(main())
    assert target.read("obj") == data


def test_a_reset_through_faultnet_is_survived_and_counted(
    faulty_target: Faulty, settings: WriterSettings
) -> None:
    target = faulty_target("reset_peer:up(after=700k)")
    data = payload(3 * MiB)

    async def main() -> None:
        async with open_async_writer(target.bucket, "obj", settings) as writer:
            await writer.write(data)
            await writer.complete()
        assert writer.stats.retries_by_cause["connection"] >= 2

    asyncio.run(main())
    assert target.counters.faults_applied("reset_peer") >= 2
    assert target.read("obj") == data


def test_a_corrupted_byte_fails_with_the_trio_writers_error(
    faulty_target: Faulty, settings: WriterSettings
) -> None:
    target = faulty_target("corrupt:up(at=1000)")

    async def main() -> None:
        async with open_async_writer(target.bucket, "obj", settings) as writer:
            await writer.write(payload(700 * KiB))
            with pytest.raises(NonRetryableHTTPError, match="CRC32C") as refused:
                await writer.complete()
        assert refused.value.status == 400

    asyncio.run(main())
    assert target.object_names() == []


def test_a_precondition_refusal_is_the_trio_writers_error(
    target: Target, settings: WriterSettings
) -> None:
    async def main() -> None:
        async with open_async_writer(
            target.bucket, "obj", settings, if_generation_match=0
        ) as writer:
            assert await writer.write(b"first") == 5
            await writer.complete()
        with pytest.raises(NonRetryableHTTPError) as refused:
            async with open_async_writer(target.bucket, "obj", settings, if_generation_match=0):
                pass  # the strict endpoint refuses the session's initiation
        assert refused.value.status == 412

    asyncio.run(main())
    assert target.read("obj") == b"first"


def test_a_cancelled_complete_keeps_finalizing(target: Target, settings: WriterSettings) -> None:
    """As on trio: cancelling complete() does not stop the finalization; a later
    complete() returns its result."""
    data = payload(MiB)

    async def main() -> None:
        async with open_async_writer(target.bucket, "obj", settings) as writer:
            # The first chunk's request stalls for 3 s; progress_timeout (1 s) retries it.
            target.script("stall-for-3s-after-256K")
            await writer.write(data)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(writer.complete(), timeout=0.2)
            assert writer.result is None  # cancelled mid-finalization
            info = await writer.complete()
            assert info.size == len(data)
            assert writer.stats.retries >= 1

    asyncio.run(main())
    assert target.read("obj") == data


def test_a_cancelled_write_may_be_sent_again(target: Target, settings: WriterSettings) -> None:
    """As on trio: a write cancelled while it waits for room may have taken a prefix;
    sending all of it again is safe, and position does not move."""
    data = payload(3 * MiB)

    async def main() -> None:
        async with open_async_writer(target.bucket, "obj", settings) as writer:
            target.script("stall-for-3s-after-256K")
            # 3 MiB cannot fit the 1 MiB window while the first chunk stalls.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(writer.write(data), timeout=0.2)
            assert writer.position == 0
            assert 0 < writer.stats.held_bytes <= settings.buffer_limit  # a prefix was taken
            await writer.write(data)
            await writer.complete()

    asyncio.run(main())
    assert target.read("obj") == data


def test_abort_then_calls_raise_aborted(target: Target, settings: WriterSettings) -> None:
    async def main() -> None:
        async with open_async_writer(target.bucket, "obj", settings) as writer:
            await writer.write(payload(300 * KiB))
            await writer.abort()
            with pytest.raises(WriterAbortedError):
                await writer.write(b"more")
        with pytest.raises(WriterClosedError):
            await writer.write(b"after the block")

    asyncio.run(main())
    assert target.object_names() == []


def test_leaving_by_an_exception_keeps_the_session_for_a_resume_handle(
    target: Target, settings: WriterSettings
) -> None:
    data = payload(MiB)
    handles: list[ResumeHandle] = []

    async def serve_until_stopped() -> None:
        async with open_async_writer(target.bucket, "obj", settings) as writer:
            await writer.write(data[: 600 * KiB])
            await writer.wait_committed(512 * KiB)
            handles.append(writer.resume_handle)
            raise RuntimeError("the service stops")

    async def main() -> None:
        with pytest.raises(RuntimeError, match="the service stops"):
            await serve_until_stopped()

    asyncio.run(main())
    handle = ResumeHandle.from_json(handles[0].to_json())
    assert handle.committed_offset == 512 * KiB
    assert handle.session_uri not in repr(handle)

    async def resume() -> None:
        # A trio writer picks the session up: the handle is the session, not the API.
        async with open_writer(
            target.bucket, handle.name, settings, session_uri=handle.session_uri
        ) as writer:
            assert writer.committed_offset == handle.committed_offset
            await writer.write_at(writer.committed_offset, data[writer.committed_offset :])
            await writer.complete()

    trio.run(resume)
    assert target.read("obj") == data
