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
    Timeline,
    Timer,
    TimerNotSupportedError,
)
from faultnet.plan import (
    Bandwidth,
    Corrupt,
    Direction,
    FaultPlan,
    Latency,
    LimitData,
    LimitTime,
    Loss,
    ResetPeer,
    Slicer,
    SlowClose,
    Stall,
    Timeout,
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


# -- toxics that act at a time -----------------------------------------------------------


def test_limit_time_arms_its_timer_at_the_start_and_closes_where_the_bytes_stand() -> None:
    counters = FaultCounters()
    faults = ConnectionFaults([LimitTime(ms=1500)], counters=counters, timers=True)
    [timer] = faults.upstream.take_timers()
    assert timer == Timer(1.5, "limit_time")
    assert faults.upstream.take_timers() == []  # taken once
    assert faults.downstream.take_timers() == []
    assert faults.upstream.feed(b"abcde") == [Forward(b"abcde")]  # bytes flow until then

    assert faults.upstream.fire(timer) == Close(5)
    assert faults.upstream.feed(b"f") == [Close(5)]
    assert faults.upstream.fire(timer) is None  # already ended: nothing more happens
    assert counters.faults_applied("limit_time") == 1


def test_timeout_drops_everything_and_closes_after_its_timer() -> None:
    faults = ConnectionFaults([Timeout(ms=250)], timers=True)
    assert faults.upstream.take_timers() == [Timer(0.25, "timeout")]
    assert faults.upstream.feed(b"abc") == [Freeze(None)]
    assert faults.upstream.feed(b"def") == []  # dropped, as Toxiproxy's timeout does


def test_timeout_of_zero_needs_no_timer() -> None:
    faults = ConnectionFaults([Timeout(ms=0)])  # no timers: still allowed
    assert faults.upstream.take_timers() == []
    assert faults.upstream.feed(b"abc") == [Freeze(None)]


@pytest.mark.parametrize("toxic", [LimitTime(ms=10), Timeout(ms=10)])
def test_a_timed_toxic_is_refused_where_timers_cannot_run(toxic: Toxic) -> None:
    with pytest.raises(TimerNotSupportedError, match=toxic.NAME):
        ConnectionFaults([toxic])


def test_reset_peer_can_hold_the_bytes_before_resetting() -> None:
    faults = engine(ResetPeer(after=2, ms=500))
    assert faults.feed(b"abcd") == [Forward(b"ab"), Freeze(0.5), Reset(2)]


# -- triggers ----------------------------------------------------------------------------


def test_a_byte_trigger_starts_a_toxic_where_it_is_crossed() -> None:
    faults = engine(LimitData(bytes=10, trigger_bytes=100))
    assert shape(faults.feed(b"x" * 60)) == [60]
    assert shape(faults.feed(b"x" * 60)) == [40, 10, Close(10)]  # positions count from 100
    assert faults.position == 120


def test_a_byte_trigger_spares_the_bytes_before_it_from_latency() -> None:
    faults = engine(Latency(ms=20, trigger_bytes=5))
    assert faults.feed(b"abc") == [Forward(b"abc")]
    assert faults.feed(b"defg") == [Forward(b"de"), Delay(0.02), Forward(b"fg")]
    assert faults.feed(b"h") == [Delay(0.02), Forward(b"h")]


def test_a_byte_trigger_arms_a_timer_when_it_is_crossed() -> None:
    faults = ConnectionFaults([LimitTime(ms=100, trigger_bytes=4)], timers=True)
    assert faults.upstream.take_timers() == []
    faults.upstream.feed(b"abc")
    assert faults.upstream.take_timers() == []
    faults.upstream.feed(b"de")
    assert faults.upstream.take_timers() == [Timer(0.1, "limit_time")]


def test_a_trigger_at_the_end_of_a_write_acts_on_the_next() -> None:
    faults = engine(ResetPeer(after=0, trigger_bytes=3))
    assert faults.feed(b"abc") == [Forward(b"abc")]
    assert faults.feed(b"d") == [Reset(0)]


def test_a_connection_trigger_spares_the_first_connections() -> None:
    plan = FaultPlan.parse("seed=5; limit_data(bytes=1)@connections=3; latency(ms=1)")
    chosen = [[t.NAME for t in plan.for_connection(i)] for i in range(5)]
    assert chosen == [["latency"]] * 3 + [["limit_data", "latency"]] * 2


# -- packet loss as stalled segments -----------------------------------------------------


def test_loss_of_every_segment_puts_a_timeout_before_each() -> None:
    faults = engine(Loss(p=1, segment=10, rto_ms=200))
    assert shape(faults.feed(b"x" * 25)) == [Delay(0.2), 10, Delay(0.2), 10, Delay(0.2), 5]
    # the next write continues the segment the last one left open
    assert shape(faults.feed(b"x" * 25)) == [5, Delay(0.2), 10, Delay(0.2), 10]


def test_no_loss_forwards_the_data_whole() -> None:
    data = bytearray(100_000)
    (action,) = engine(Loss(p=0)).feed(data)
    assert isinstance(action, Forward)
    assert isinstance(action.data, memoryview)
    assert action.data.obj is data


def lost_segments(actions: list[Action], segment: int) -> list[bool]:
    """Which segments a loss toxic's actions stalled: a Delay stands before a lost one."""
    position = 0
    lost: list[bool] = []
    for action in actions:
        if isinstance(action, Delay):
            lost.append(True)
        elif isinstance(action, Forward):
            position += len(action.data)
            lost.extend([False] * (-(-position // segment) - len(lost)))
    return lost


@pytest.mark.parametrize(("correlation", "mean_burst"), [(0.0, 1 / 0.9), (0.8, 1 / 0.18)])
def test_loss_keeps_its_rate_and_correlation_makes_bursts(
    correlation: float, mean_burst: float
) -> None:
    faults = engine(Loss(p=0.1, correlation=correlation, segment=10, rto_ms=1))
    actions: list[Action] = []
    for size in [37, 2500, 10_000, 13] * 50:  # uneven writes: segments straddle them
        actions += faults.feed(b"x" * size)
    lost = lost_segments(actions, 10)

    assert len(lost) == 50 * 12_550 // 10
    assert forwarded(actions) == b"x" * (50 * 12_550)
    bursts = [run for run in "".join("L" if x else "." for x in lost).split(".") if run]
    assert sum(lost) / len(lost) == pytest.approx(0.1, rel=0.1)
    assert sum(lost) / len(bursts) == pytest.approx(mean_burst, rel=0.1)


def test_loss_is_seeded() -> None:
    def delays() -> list[int]:
        actions = engine(Loss(p=0.3, correlation=0.5, segment=7)).feed(b"x" * 7000)
        return [i for i, a in enumerate(actions) if isinstance(a, Delay)]

    assert delays() == delays()


# -- the timeline ------------------------------------------------------------------------


def test_timeline_keeps_a_rate_although_each_sleep_overshoots() -> None:
    timeline = Timeline()
    now = 0.0
    for _ in range(100):
        deadline = timeline.deadline(Delay(0.01), now=now, arrival=0.0)
        now = deadline + 0.001  # the I/O layer wakes 1 ms late, every time
    assert deadline == pytest.approx(1.0)


def test_timeline_restarts_from_now_after_an_idle_spell() -> None:
    timeline = Timeline(slack=0.02)
    assert timeline.deadline(Delay(0.1), now=0.0, arrival=0.0) == pytest.approx(0.1)
    # the sender paused for 5 s: no credit for the idle time beyond the slack
    assert timeline.deadline(Delay(0.1), now=5.1, arrival=5.1) == pytest.approx(5.2)


def test_timeline_counts_latency_from_arrival_and_never_reorders() -> None:
    timeline = Timeline()
    latency = Delay(0.05, after_arrival=True)
    # three reads that arrived 1 ms apart while the first one waited
    assert timeline.deadline(latency, now=0.0, arrival=0.0) == pytest.approx(0.05)
    assert timeline.deadline(latency, now=0.05, arrival=0.001) == pytest.approx(0.051)
    assert timeline.deadline(latency, now=0.051, arrival=0.002) == pytest.approx(0.052)
    # behind a transmission that ends later, the bytes wait for it
    assert timeline.deadline(Delay(0.5), now=0.052, arrival=0.002) == pytest.approx(0.552)
    assert timeline.deadline(latency, now=0.552, arrival=0.003) == pytest.approx(0.552)


def test_timeline_waits_forever_for_an_endless_freeze() -> None:
    assert Timeline().deadline(Freeze(None), now=1.0, arrival=1.0) == float("inf")


def test_latency_is_a_delay_from_arrival_and_bandwidth_is_not() -> None:
    [latency, _] = engine(Latency(ms=5)).feed(b"a")
    [bandwidth, _] = engine(Bandwidth(rate=10)).feed(b"a")
    assert isinstance(latency, Delay)
    assert isinstance(bandwidth, Delay)
    assert (latency.after_arrival, bandwidth.after_arrival) == (True, False)


# -- toxics changed on an open connection ------------------------------------------------


def test_a_toxic_kept_across_a_change_keeps_its_state() -> None:
    faults = ConnectionFaults([LimitData(bytes=10)])
    assert faults.upstream.feed(b"x" * 6) == [Forward(b"x" * 6)]

    faults.change([LimitData(bytes=10), Latency(ms=5)])

    assert shape(faults.upstream.feed(b"y" * 6)) == [Delay(0.005), 4, Close(10)]


def test_a_toxic_added_to_an_open_connection_counts_from_then() -> None:
    faults = ConnectionFaults()
    faults.upstream.feed(b"x" * 100)

    faults.change([LimitData(bytes=10), LimitData(direction=DOWN, bytes=1)])

    assert shape(faults.upstream.feed(b"y" * 20)) == [10, Close(10)]
    assert shape(faults.downstream.feed(b"z" * 5)) == [1, Close(1)]


def test_a_toxic_taken_away_disarms_its_timer_and_lifts_its_freeze() -> None:
    faults = ConnectionFaults([LimitTime(ms=100), Timeout(ms=0)], timers=True)
    [timer] = faults.upstream.take_timers()
    [freeze] = faults.upstream.feed(b"abc")
    assert isinstance(freeze, Freeze)
    assert faults.upstream.holds(freeze.by)

    faults.change([])

    assert not faults.upstream.holds(freeze.by)
    assert faults.upstream.fire(timer) is None
    assert faults.upstream.feed(b"def") == [Forward(b"def")]


def test_a_timer_armed_by_a_toxic_added_later_fires() -> None:
    faults = ConnectionFaults(timers=True)
    faults.upstream.feed(b"abc")
    faults.change([LimitTime(ms=250)])
    [timer] = faults.upstream.take_timers()
    assert timer == Timer(0.25, "limit_time")
    assert faults.upstream.fire(timer) == Close(3)


def test_a_change_is_refused_a_timed_toxic_where_timers_cannot_run() -> None:
    with pytest.raises(TimerNotSupportedError):
        ConnectionFaults().change([LimitTime(ms=1)])


def test_a_toxic_joins_open_connections_by_its_own_draw() -> None:
    plan = FaultPlan(seed=9)
    half = Latency(ms=1, toxicity=0.5)
    joined = [plan.joins(half, i, "slow") for i in range(200)]
    assert joined == [plan.joins(half, i, "slow") for i in range(200)]
    assert 60 < sum(joined) < 140
    assert [plan.joins(half, i, "other") for i in range(200)] != joined
    assert not plan.joins(Latency(ms=1, trigger_connections=5), 4, "slow")
    assert plan.joins(Latency(ms=1, trigger_connections=5), 5, "slow")
