from __future__ import annotations

import random

import pytest

from faultnet.counters import FaultCounters
from faultnet.engine import (
    Action,
    Close,
    ConnectionFaults,
    Delay,
    DirectionFaults,
    Forward,
    Freeze,
    Reset,
)
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

UP = Direction.UPSTREAM
DOWN = Direction.DOWNSTREAM


def engine(*toxics: Toxic, counters: FaultCounters | None = None) -> DirectionFaults:
    return DirectionFaults(UP, toxics, random.Random(1), counters)


def forwarded(actions: list[Action]) -> bytes:
    return b"".join(bytes(a.data) for a in actions if isinstance(a, Forward))


def shape(actions: list[Action]) -> list[object]:
    """Actions with each Forward replaced by its length, for compact comparisons."""
    return [len(a.data) if isinstance(a, Forward) else a for a in actions]


def test_no_toxics_forwards_the_callers_buffer_without_copying() -> None:
    data = bytearray(b"hello")
    (action,) = engine().feed(data)
    assert isinstance(action, Forward)
    assert isinstance(action.data, memoryview)
    assert action.data.obj is data


def test_empty_feed_does_nothing() -> None:
    assert engine(ResetPeer(after=0)).feed(b"") == []


def test_latency_delays_each_write() -> None:
    faults = engine(Latency(ms=50))
    assert faults.feed(b"abc") == [Delay(0.05), Forward(b"abc")]
    assert faults.feed(b"d") == [Delay(0.05), Forward(b"d")]


def test_latency_jitter_stays_within_bounds_and_is_seeded() -> None:
    def delays() -> list[float]:
        faults = engine(Latency(ms=100, jitter=20))
        return [a.seconds for _ in range(50) for a in faults.feed(b"x") if isinstance(a, Delay)]

    first = delays()
    assert first == delays()
    assert all(0.08 <= d <= 0.12 for d in first)
    assert len(set(first)) > 1


def test_bandwidth_spreads_bytes_over_exact_time() -> None:
    actions = engine(Bandwidth(rate=1000)).feed(b"x" * 250)
    assert shape(actions) == [Delay(0.1), 100, Delay(0.1), 100, Delay(0.05), 50]


def test_zero_bandwidth_freezes_forever() -> None:
    assert shape(engine(Bandwidth(rate=0)).feed(b"abc")) == [Freeze(None), 3]


def test_slicer_cuts_writes_with_gaps() -> None:
    actions = engine(Slicer(size=3, delay_ms=10)).feed(b"0123456789")
    assert shape(actions) == [3, Delay(0.01), 3, Delay(0.01), 3, Delay(0.01), 1]
    assert forwarded(actions) == b"0123456789"


def test_slicer_variation_is_seeded_and_never_empty() -> None:
    def sizes() -> list[int]:
        actions = engine(Slicer(size=2, variation=2)).feed(b"x" * 200)
        return [len(a.data) for a in actions if isinstance(a, Forward)]

    first = sizes()
    assert first == sizes()
    assert sum(first) == 200
    assert min(first) >= 1
    assert max(first) <= 4
    assert len(set(first)) > 1


def test_stall_splits_the_write_that_crosses_the_position() -> None:
    faults = engine(Stall(after=5, seconds=2))
    assert shape(faults.feed(b"abc")) == [3]
    assert shape(faults.feed(b"defg")) == [2, Freeze(2.0), 2]
    assert shape(faults.feed(b"hij")) == [3]


def test_stall_of_zero_seconds_is_forever() -> None:
    assert shape(engine(Stall(after=0)).feed(b"abc")) == [Freeze(None), 3]


def test_stall_at_the_end_of_a_write_comes_right_after_it() -> None:
    assert shape(engine(Stall(after=4, seconds=1)).feed(b"abcd")) == [4, Freeze(1.0)]


def test_reset_lets_exactly_after_bytes_through_and_is_sticky() -> None:
    faults = engine(ResetPeer(after=5))
    assert shape(faults.feed(b"abc")) == [3]
    assert faults.feed(b"defgh") == [Forward(b"de"), Reset(5)]
    assert faults.feed(b"more") == [Reset(5)]
    assert faults.ended == Reset(5)


def test_reset_after_zero_sends_nothing() -> None:
    assert engine(ResetPeer(after=0)).feed(b"abc") == [Reset(0)]


def test_limit_data_closes_after_exactly_n_bytes() -> None:
    faults = engine(LimitData(bytes=4))
    assert faults.feed(b"abcdef") == [Forward(b"abcd"), Close(4)]
    assert faults.feed(b"g") == [Close(4)]


def test_limit_reached_exactly_at_the_end_of_a_write() -> None:
    assert engine(LimitData(bytes=3)).feed(b"abc") == [Forward(b"abc"), Close(3)]


def test_corrupt_flips_exactly_one_byte_on_a_copy() -> None:
    faults = engine(Corrupt(at=6, mask=0x01))
    original = b"abcdefgh"
    first = faults.feed(original[:4])
    second = faults.feed(original[4:])
    assert shape(second) == [2, 1, 1]
    assert forwarded(first) + forwarded(second) == b"abcdeffh"
    assert original == b"abcdefgh"


def test_corrupt_at_a_chunk_boundary_hits_the_next_chunk() -> None:
    faults = engine(Corrupt(at=4))
    assert shape(faults.feed(b"abcd")) == [4]
    assert forwarded(faults.feed(b"efg")) == bytes([ord("e") ^ 0xFF]) + b"fg"


def test_slow_close_delays_the_end() -> None:
    faults = engine(SlowClose(ms=250))
    assert faults.feed(b"abc") == [Forward(b"abc")]
    assert faults.finish() == [Delay(0.25)]


def test_toxics_compose_in_plan_order() -> None:
    actions = engine(Slicer(size=2), ResetPeer(after=5)).feed(b"abcdefgh")
    assert shape(actions) == [2, 2, 1, Reset(5)]


def test_each_direction_gets_only_its_toxics() -> None:
    faults = ConnectionFaults([ResetPeer(direction=DOWN, after=1), Latency(ms=10)])
    assert faults.upstream.feed(b"abc") == [Delay(0.01), Forward(b"abc")]
    assert faults.downstream.feed(b"abc") == [Forward(b"a"), Reset(1)]


def test_counters_see_exact_bytes_and_faults() -> None:
    counters = FaultCounters()
    faults = ConnectionFaults(
        [Latency(ms=1), ResetPeer(after=10), Corrupt(direction=DOWN, at=0)], counters=counters
    )
    for engine_, data in [(faults.upstream, b"x" * 6)] * 2 + [(faults.downstream, b"y" * 3)]:
        for action in engine_.feed(data):
            if isinstance(action, Forward):
                engine_.forwarded(len(action.data))  # as a wrapper does once the bytes moved
    assert counters.as_dict() == {
        "connections": 1,
        "bytes_up": 10,
        "bytes_down": 3,
        "faults": {"corrupt": 1, "latency": 2, "reset_peer": 1},
    }


def test_same_seed_same_faults_and_toxicity_varies_by_connection() -> None:
    plan = FaultPlan.parse("seed=3; latency(ms=5,jitter=5)~0.5; slicer(size=4,variation=3)")

    def run(index: int) -> list[list[object]]:
        faults = ConnectionFaults.for_connection(plan, index)
        return [shape(faults.upstream.feed(b"z" * 40)) for _ in range(3)]

    assert run(0) == run(0)
    assert run(7) == run(7)
    with_latency = [
        i for i in range(20) if any(isinstance(t, Latency) for t in plan.for_connection(i))
    ]
    assert 0 < len(with_latency) < 20


@pytest.mark.parametrize("direction", [UP, DOWN])
def test_connection_faults_pick_the_engine_by_direction(direction: Direction) -> None:
    faults = ConnectionFaults()
    assert faults.direction(direction).direction is direction
