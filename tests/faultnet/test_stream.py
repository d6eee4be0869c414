from __future__ import annotations

import errno

import pytest
import trio
import trio.testing

from faultnet.counters import FaultCounters
from faultnet.plan import (
    Bandwidth,
    Corrupt,
    Direction,
    FaultPlan,
    Latency,
    LimitData,
    ResetPeer,
    Slicer,
    SlowClose,
    Stall,
    Toxic,
)
from faultnet.stream import FaultyListener, FaultyStream, open_tcp_stream

DOWN = Direction.DOWNSTREAM


def pair(
    *toxics: Toxic, counters: FaultCounters | None = None
) -> tuple[FaultyStream, trio.abc.HalfCloseableStream]:
    """A client-side FaultyStream and the plain peer it talks to, over memory."""
    ours, theirs = trio.testing.memory_stream_pair()
    return FaultyStream(ours, toxics, counters=counters), theirs


async def receive_exactly(stream: trio.abc.ReceiveStream, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = await stream.receive_some()
        assert chunk, f"EOF after {len(data)} of {count} bytes"
        data += chunk
    return bytes(data)


async def receive_all(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
    while chunk := await stream.receive_some():
        into += chunk


async def test_without_faults_it_is_a_conforming_half_closeable_stream() -> None:
    async def faulty_pair() -> tuple[FaultyStream, FaultyStream]:
        client, server = trio.testing.memory_stream_pair()
        return FaultyStream(client), FaultyStream(server, server_side=True)

    async def clogged_pair() -> tuple[FaultyStream, FaultyStream]:
        client, server = trio.testing.lockstep_stream_pair()
        return FaultyStream(client), FaultyStream(server, server_side=True)

    await trio.testing.check_half_closeable_stream(faulty_pair, clogged_pair)


async def test_latency_delays_each_send(autojump_clock: trio.testing.MockClock) -> None:
    stream, peer = pair(Latency(ms=50))
    start = trio.current_time()
    await stream.send_all(b"ab")
    assert trio.current_time() - start == pytest.approx(0.05)
    await stream.send_all(b"cd")
    assert trio.current_time() - start == pytest.approx(0.10)
    assert await receive_exactly(peer, 4) == b"abcd"


async def test_latency_downstream_delays_each_receive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream, peer = pair(Latency(direction=DOWN, ms=200))
    await peer.send_all(b"hello")
    start = trio.current_time()
    assert await stream.receive_some() == b"hello"
    assert trio.current_time() - start == pytest.approx(0.2)


async def test_bandwidth_takes_exactly_size_over_rate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream, peer = pair(Bandwidth(rate=1000))
    start = trio.current_time()
    await stream.send_all(b"x" * 250)
    assert trio.current_time() - start == pytest.approx(0.25)
    assert await receive_exactly(peer, 250) == b"x" * 250


async def test_slicer_downstream_gives_short_reads() -> None:
    stream, peer = pair(Slicer(direction=DOWN, size=3))
    await peer.send_all(b"abcdefgh")
    assert [await stream.receive_some() for _ in range(3)] == [b"abc", b"def", b"gh"]


async def test_slicer_upstream_spaces_pieces(autojump_clock: trio.testing.MockClock) -> None:
    stream, peer = pair(Slicer(size=4, delay_ms=10))
    arrivals: list[tuple[float, bytes | bytearray]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_all, b"0123456789")
        while sum(len(d) for _, d in arrivals) < 10:
            data = await peer.receive_some()
            arrivals.append((trio.current_time(), data))
    assert [d for _, d in arrivals] == [b"0123", b"4567", b"89"]
    assert [t for t, _ in arrivals] == pytest.approx([0.0, 0.01, 0.02])


async def test_receive_respects_max_bytes_and_keeps_the_rest() -> None:
    stream, peer = pair(Corrupt(direction=DOWN, at=100))  # any toxic: forces the slow path
    await peer.send_all(b"abcdef")
    assert await stream.receive_some(4) == b"abcd"
    assert await stream.receive_some(4) == b"ef"


async def test_stall_holds_the_bytes_after_n(autojump_clock: trio.testing.MockClock) -> None:
    stream, peer = pair(Stall(after=5, seconds=2))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_all, b"0123456789")
        assert await receive_exactly(peer, 5) == b"01234"
        assert trio.current_time() == 0
        assert await receive_exactly(peer, 5) == b"56789"
        assert trio.current_time() == pytest.approx(2.0)


async def test_stall_forever_blocks_until_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    counters = FaultCounters()
    stream, peer = pair(Stall(after=3), counters=counters)
    with trio.move_on_after(1000) as scope:
        await stream.send_all(b"abcdef")
    assert scope.cancelled_caught
    assert await peer.receive_some() == b"abc"
    assert counters.as_dict()["bytes_up"] == 3
    await stream.aclose()


async def test_a_stall_survives_cancelling_the_receive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream, peer = pair(Stall(direction=DOWN, after=2, seconds=3))
    await peer.send_all(b"abcd")
    assert await stream.receive_some() == b"ab"
    with trio.move_on_after(1):
        await stream.receive_some()
    assert await stream.receive_some() == b"cd"
    assert trio.current_time() == pytest.approx(3.0)


async def test_aclose_wakes_a_task_held_by_a_stall(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream, _ = pair(Stall(after=0))
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await stream.send_all(b"x")

        nursery.start_soon(send)
        await trio.sleep(5)
        await stream.aclose()


def assert_reset(exc: BaseException) -> None:
    assert isinstance(exc, trio.BrokenResourceError)
    assert isinstance(exc.__cause__, OSError)
    assert exc.__cause__.errno == errno.ECONNRESET


async def test_reset_sends_exactly_n_bytes_and_is_sticky() -> None:
    stream, peer = pair(ResetPeer(after=4))
    with pytest.raises(trio.BrokenResourceError) as sending:
        await stream.send_all(b"abcdefgh")
    assert_reset(sending.value)
    with pytest.raises(trio.BrokenResourceError) as receiving:
        await stream.receive_some()
    assert_reset(receiving.value)
    with pytest.raises(trio.BrokenResourceError) as again:
        await stream.send_all(b"more")
    assert_reset(again.value)
    assert await peer.receive_some() == b"abcd"


async def test_reset_right_after_the_last_byte_fails_the_next_call() -> None:
    stream, peer = pair(ResetPeer(after=3))
    await stream.send_all(b"abc")
    with pytest.raises(trio.BrokenResourceError):
        await stream.send_all(b"d")
    assert await peer.receive_some() == b"abc"


async def test_reset_downstream_delivers_n_bytes_then_breaks() -> None:
    stream, peer = pair(ResetPeer(direction=DOWN, after=2))
    await peer.send_all(b"abcd")
    assert await stream.receive_some() == b"ab"
    with pytest.raises(trio.BrokenResourceError) as receiving:
        await stream.receive_some()
    assert_reset(receiving.value)
    with pytest.raises(trio.BrokenResourceError):
        await stream.send_all(b"x")


async def test_limit_data_closes_after_exactly_n_bytes() -> None:
    stream, peer = pair(LimitData(bytes=5))
    with pytest.raises(trio.BrokenResourceError) as sending:
        await stream.send_all(b"0123456789")
    assert isinstance(sending.value.__cause__, OSError)
    assert sending.value.__cause__.errno == errno.EPIPE
    assert await peer.receive_some() == b"01234"
    assert await peer.receive_some() == b""
    assert await stream.receive_some() == b""


async def test_limit_data_downstream_ends_the_stream() -> None:
    stream, peer = pair(LimitData(direction=DOWN, bytes=3))
    await peer.send_all(b"abcdef")
    assert await stream.receive_some() == b"abc"
    assert await stream.receive_some() == b""
    assert await stream.receive_some() == b""


async def test_corrupt_flips_one_sent_byte_and_not_the_callers_buffer() -> None:
    stream, peer = pair(Corrupt(at=6, mask=0x20))
    data = bytearray(b"hello WORLD")
    await stream.send_all(data)
    assert await receive_exactly(peer, 11) == b"hello wORLD"
    assert data == b"hello WORLD"


async def test_corrupt_flips_one_received_byte() -> None:
    stream, peer = pair(Corrupt(direction=DOWN, at=7, mask=0xFF))
    await peer.send_all(b"abcd")
    await peer.send_all(b"efgh")
    received = await receive_exactly(stream, 8)
    assert received == b"abcdefg" + bytes([ord("h") ^ 0xFF])


async def test_slow_close_delays_the_fin(autojump_clock: trio.testing.MockClock) -> None:
    stream, peer = pair(SlowClose(ms=500))
    await stream.send_eof()
    assert trio.current_time() == pytest.approx(0.5)
    assert await peer.receive_some() == b""
    await stream.aclose()  # the delay applies once
    assert trio.current_time() == pytest.approx(0.5)


async def test_slow_close_downstream_delays_the_eof(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream, peer = pair(SlowClose(direction=DOWN, ms=300))
    await peer.aclose()
    assert await stream.receive_some() == b""
    assert trio.current_time() == pytest.approx(0.3)
    assert await stream.receive_some() == b""
    assert trio.current_time() == pytest.approx(0.3)


async def test_counters_see_exact_bytes_and_faults() -> None:
    counters = FaultCounters()
    stream, peer = pair(Corrupt(at=1), Slicer(direction=DOWN, size=2), counters=counters)
    await stream.send_all(b"abc")
    await peer.send_all(b"12345")
    await receive_exactly(stream, 5)
    assert counters.as_dict() == {
        "connections": 1,
        "bytes_up": 3,
        "bytes_down": 5,
        "faults": {"corrupt": 1, "slicer": 1},
    }


# -- real TCP ------------------------------------------------------------------------


async def test_reset_sends_a_real_rst_over_tcp() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    plan = FaultPlan.parse("reset_peer:up(after=1000)")
    async with listeners[0]:
        client = await open_tcp_stream("127.0.0.1", port, plan=plan, index=0)
        server = await listeners[0].accept()
        async with client, server:
            with pytest.raises(trio.BrokenResourceError):
                await client.send_all(b"z" * 5000)
            received = bytearray()
            with pytest.raises(trio.BrokenResourceError) as peer_side:
                await receive_all(server, received)
            assert len(received) == 1000
            assert isinstance(peer_side.value.__cause__, ConnectionResetError)


async def test_listener_applies_upstream_toxics_to_what_the_server_receives() -> None:
    plan = FaultPlan.parse("seed=5; corrupt:up(at=0,mask=1)~0.5")
    expected = [bool(plan.for_connection(i)) for i in range(6)]
    assert any(expected)
    assert not all(expected)
    counters = FaultCounters()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with FaultyListener(listeners[0], plan, counters=counters) as listener:
        corrupted = []
        for _ in range(6):
            client = await trio.open_tcp_stream("127.0.0.1", port)
            server = await listener.accept()
            async with client, server:
                await client.send_all(b"B")
                corrupted.append(await server.receive_some() == b"C")
                await server.send_all(b"ok")  # downstream: what the server sends
                assert await client.receive_some() == b"ok"
    assert corrupted == expected
    assert counters.connections == 6
    assert counters.as_dict()["bytes_up"] == 6
    assert counters.as_dict()["bytes_down"] == 12


async def test_same_plan_and_index_give_the_same_faults() -> None:
    plan = FaultPlan.parse("seed=9; slicer:down(size=5,variation=4)")

    async def sizes() -> list[int]:
        ours, theirs = trio.testing.memory_stream_pair()
        stream = FaultyStream.for_connection(ours, plan, 3)
        await theirs.send_all(b"q" * 100)
        return [len(await stream.receive_some()) for _ in range(12)]

    first = await sizes()
    assert first == await sizes()
    assert len(set(first)) > 1


async def test_a_reset_while_another_task_receives_breaks_that_receive() -> None:
    stream, _ = pair(ResetPeer(after=1))
    async with trio.open_nursery() as nursery:

        async def receive() -> None:
            with pytest.raises(trio.BrokenResourceError) as receiving:
                await stream.receive_some()
            assert_reset(receiving.value)

        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"ab")


async def test_a_limit_while_another_task_receives_ends_that_receive() -> None:
    stream, _ = pair(LimitData(bytes=1))
    async with trio.open_nursery() as nursery:

        async def receive() -> None:
            assert await stream.receive_some() == b""

        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"ab")


async def test_listener_applies_downstream_toxics_to_what_the_server_sends() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    plan = FaultPlan.parse("limit_data:down(bytes=2)")
    async with FaultyListener(listeners[0], plan) as listener:
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listener.accept()
        async with client, server:
            with pytest.raises(trio.BrokenResourceError):
                await server.send_all(b"hello")
            assert await receive_exactly(client, 2) == b"he"
            assert await client.receive_some() == b""
