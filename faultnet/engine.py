"""The sans-IO fault engine: turns the bytes of one connection into a script of actions.

The trio stream wrapper (:mod:`faultnet.stream`), the sync socket wrapper of the HTTP
transport (:mod:`faultnet.transport`) and the chaos proxy all share this engine, so a plan
means exactly the same thing everywhere. The engine does no I/O and never sleeps: for each
chunk of bytes it is fed it returns what the caller must do, in order:

* :class:`Delay` -- wait this long; the data is slow (latency, bandwidth, slicer gaps,
  slow close),
* :class:`Forward` -- pass these bytes on (write them, or hand them to the reader),
* :class:`Freeze` -- nothing moves for this long, or until the connection is closed
  (a stall: the case a progress timeout has to catch),
* :class:`Reset` -- abort the connection with an RST; sticky, as a kernel's is,
* :class:`Close` -- close the connection cleanly (``limit_data`` reached).

Toxics that act at a time rather than at a byte (``limit_time``, ``timeout``) arm a
:class:`Timer` instead: the caller takes new timers with :meth:`DirectionFaults.take_timers`
after building the engine and after each :meth:`~DirectionFaults.feed`, and when one
expires asks :meth:`DirectionFaults.fire` how to end the connection. Only a wrapper that
can run timers may build such an engine (``ConnectionFaults(..., timers=True)``).

A :class:`Delay` says how long to wait; :class:`Timeline` says until when, so that an
I/O layer whose sleeps overshoot and whose writes take time still keeps a ``bandwidth``
rate, and so that ``latency`` counts from when the bytes arrived (a pipe, not a queue).

Positions are counted per direction from where the toxic starts acting: the first byte of
the connection, or its ``trigger_bytes``, or the moment it was added to an open connection
(:meth:`ConnectionFaults.change`). So a toxic with ``after=N`` acts at exactly its byte N:
a chunk that crosses N is split so exactly N bytes go first. A trigger at the very end of
a chunk acts right after it; one at 0 acts before the first byte. Nothing after a
:class:`Reset` or :class:`Close` is emitted.

The caller reports the bytes it really moved with :meth:`DirectionFaults.forwarded`, which
keeps the :class:`~faultnet.counters.FaultCounters` honest when an operation fails halfway.

Which bytes a direction covers is the caller's choice: :class:`ConnectionFaults` has one
engine per direction, and a client-side wrapper feeds what it sends to ``upstream`` and
what it receives to ``downstream`` (a server-side wrapper does the opposite).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from faultnet.counters import FaultCounters
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

__all__ = [
    "Action",
    "Close",
    "ConnectionFaults",
    "Delay",
    "DirectionFaults",
    "Forward",
    "Freeze",
    "Reset",
    "Timeline",
    "Timer",
    "TimerNotSupportedError",
    "freeze_deadline",
]

Buffer = bytes | bytearray | memoryview
View = bytes | memoryview


@dataclass(frozen=True)
class Delay:
    """Wait ``seconds`` before the next action; the connection is slow, not stuck.

    ``after_arrival`` marks a propagation delay (``latency``): it counts from when the
    bytes arrived, so a layer that reads ahead delays every byte by the same amount
    instead of adding the delay once per read. It is left out of comparisons: both kinds
    mean the same wait on an ideal clock, and only a :class:`Timeline` tells them apart.
    """

    seconds: float
    after_arrival: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class Forward:
    """Pass ``data`` on. It is a view into the caller's buffer unless a byte was corrupted."""

    data: View


@dataclass(frozen=True)
class Freeze:
    """Move nothing for ``seconds``; ``None`` means until the connection is closed, or
    until the toxic that froze it (``by``, left out of comparisons) is taken away: see
    :meth:`DirectionFaults.holds`."""

    seconds: float | None
    by: object = field(default=None, compare=False)


@dataclass(frozen=True)
class Reset:
    """Abort the connection with an RST once ``position`` bytes have passed."""

    position: int


@dataclass(frozen=True)
class Close:
    """Close the connection cleanly once ``position`` bytes have passed."""

    position: int


Action = Delay | Forward | Freeze | Reset | Close


@dataclass(frozen=True)
class Timer:
    """End the connection ``seconds`` after the timer was armed, unless it ended before.

    ``reset`` says whether it ends with an RST; ``toxic`` names the toxic that armed it.
    """

    seconds: float
    toxic: str
    reset: bool = False
    #: the engine stage that armed it; a timer whose toxic was taken away never fires
    by: object = field(default=None, compare=False)


class TimerNotSupportedError(ValueError):
    """A toxic that acts at a time was given to a wrapper that cannot run timers."""


#: how far behind the current time a Timeline's schedule may fall and still be kept: the
#: slack absorbs sleeps that overshoot and writes that take time, so a bandwidth limit
#: holds over a long transfer; past it, the schedule restarts from now, so a sender that
#: paused gets a burst of at most this much link time, as from a token bucket.
TIMELINE_SLACK = 0.02


class Timeline:
    """When each wait of one direction ends, on an ideal clock. Sans-IO: the caller says
    what time it is and when the bytes being moved arrived; it sleeps until the answer.

    Waits queue behind each other: a wait starts where the previous one ended if that is
    no more than :data:`TIMELINE_SLACK` ago, so the I/O layer's own lateness does not add
    up. A propagation delay (``Delay.after_arrival``) ends that long after the bytes
    arrived, or when the previous wait ended if that is later: bytes never overtake.
    """

    def __init__(self, slack: float = TIMELINE_SLACK) -> None:
        self._slack = slack
        self._cursor = -math.inf

    def deadline(self, wait: Delay | Freeze, *, now: float, arrival: float) -> float:
        """The time at which ``wait`` (a :class:`Freeze` with a length) is over."""
        seconds = wait.seconds
        if seconds is None:
            return math.inf
        base = self._cursor if self._cursor >= now - self._slack else now
        if isinstance(wait, Delay) and wait.after_arrival:
            target = max(base, arrival + seconds)
        else:
            target = base + seconds
        self._cursor = target
        return target


# Bandwidth is shaped in slices of a tenth of a second so a large write trickles out
# instead of arriving in one burst after a long silence.
_BANDWIDTH_SLICES_PER_SECOND = 10


class _Stage:
    """One toxic's transformation of an action list."""

    def __init__(self, toxic: Toxic, rng: random.Random, counters: FaultCounters | None) -> None:
        self.toxic = toxic
        self.rng = rng
        self.counters = counters

    def count(self) -> None:
        if self.counters is not None:
            self.counters.add_fault(self.toxic.NAME)

    def apply(self, actions: list[Action]) -> list[Action]:
        raise NotImplementedError

    def finish(self) -> list[Action]:
        return []

    def start(self) -> list[Timer]:
        """The timers the toxic arms when it starts acting."""
        return []


class _LatencyStage(_Stage):
    def apply(self, actions: list[Action]) -> list[Action]:
        assert isinstance(self.toxic, Latency)
        jitter = self.rng.uniform(-self.toxic.jitter, self.toxic.jitter) if self.toxic.jitter else 0
        delay_ms = max(0.0, self.toxic.ms + jitter)
        if delay_ms <= 0 or not any(isinstance(a, Forward) for a in actions):
            return actions
        self.count()
        return [Delay(delay_ms / 1000, after_arrival=True), *actions]


class _BandwidthStage(_Stage):
    def apply(self, actions: list[Action]) -> list[Action]:
        assert isinstance(self.toxic, Bandwidth)
        rate = self.toxic.rate
        out: list[Action] = []
        for action in actions:
            if not isinstance(action, Forward):
                out.append(action)
                continue
            if rate == 0:
                out.append(Freeze(None, by=self))  # no bandwidth at all: nothing ever moves
                out.append(action)
                continue
            step = max(1, rate // _BANDWIDTH_SLICES_PER_SECOND)
            data = action.data
            for start in range(0, len(data), step):
                piece = data[start : start + step]
                out.append(Delay(len(piece) / rate))
                out.append(Forward(piece))
        if len(out) != len(actions):
            self.count()
        return out


class _SlicerStage(_Stage):
    def apply(self, actions: list[Action]) -> list[Action]:
        assert isinstance(self.toxic, Slicer)
        size, variation = self.toxic.size, self.toxic.variation
        gap = self.toxic.delay_ms / 1000
        out: list[Action] = []
        sliced = False
        for action in actions:
            if not isinstance(action, Forward):
                out.append(action)
                continue
            data = action.data
            start = 0
            while start < len(data):
                wobble = self.rng.randint(-variation, variation) if variation else 0
                length = max(1, size + wobble)
                if start and gap:
                    out.append(Delay(gap))
                out.append(Forward(data[start : start + length]))
                sliced = sliced or start > 0
                start += length
        if sliced:
            self.count()
        return out


class _PositionStage(_Stage):
    """A one-shot toxic that acts when the direction's byte position reaches ``at``."""

    def __init__(
        self, toxic: Toxic, rng: random.Random, counters: FaultCounters | None, at: int
    ) -> None:
        super().__init__(toxic, rng, counters)
        self.at = at
        self.position = 0
        self.fired = False

    def reaches(self, start: int, end: int) -> bool:
        return start <= self.at <= end

    def apply(self, actions: list[Action]) -> list[Action]:
        out: list[Action] = []
        for action in actions:
            if self.fired or not isinstance(action, Forward):
                out.append(action)
                continue
            data = action.data
            start = self.position
            self.position += len(data)
            if not self.reaches(start, self.position):
                out.append(action)
                continue
            self.fired = True
            self.count()
            cut = self.at - start
            out.extend(a for a in self.fire(data[:cut], data[cut:]) if _non_empty(a))
        return out

    def fire(self, before: View, after: View) -> list[Action]:
        raise NotImplementedError


class _StallStage(_PositionStage):
    def fire(self, before: View, after: View) -> list[Action]:
        assert isinstance(self.toxic, Stall)
        seconds = self.toxic.seconds or None  # 0 means forever
        return [Forward(before), Freeze(seconds, by=self), Forward(after)]


class _ResetStage(_PositionStage):
    def fire(self, before: View, after: View) -> list[Action]:
        assert isinstance(self.toxic, ResetPeer)
        hold = [Freeze(self.toxic.ms / 1000)] if self.toxic.ms > 0 else []
        return [Forward(before), *hold, Reset(self.at), Forward(after)]


class _LimitStage(_PositionStage):
    def fire(self, before: View, after: View) -> list[Action]:
        return [Forward(before), Close(self.at), Forward(after)]


class _CorruptStage(_PositionStage):
    def reaches(self, start: int, end: int) -> bool:
        return start <= self.at < end  # needs the byte itself, not just the boundary

    def fire(self, before: View, after: View) -> list[Action]:
        assert isinstance(self.toxic, Corrupt)
        # Copy only the flipped byte: the caller's buffer is not ours to change.
        flipped = bytes([after[0] ^ (self.toxic.mask & 0xFF)])
        return [Forward(before), Forward(flipped), Forward(after[1:])]


class _SlowCloseStage(_Stage):
    def apply(self, actions: list[Action]) -> list[Action]:
        return actions

    def finish(self) -> list[Action]:
        assert isinstance(self.toxic, SlowClose)
        if self.toxic.ms <= 0:
            return []
        self.count()
        return [Delay(self.toxic.ms / 1000)]


class _LimitTimeStage(_Stage):
    def apply(self, actions: list[Action]) -> list[Action]:
        return actions

    def start(self) -> list[Timer]:
        assert isinstance(self.toxic, LimitTime)
        return [Timer(self.toxic.ms / 1000, self.toxic.NAME, by=self)]


class _TimeoutStage(_Stage):
    """Nothing passes: the first bytes meet a freeze that only the connection's end lifts
    (a wrapper drops what arrives meanwhile), and a timer closes the connection."""

    def __init__(self, toxic: Toxic, rng: random.Random, counters: FaultCounters | None) -> None:
        super().__init__(toxic, rng, counters)
        self.frozen = False

    def apply(self, actions: list[Action]) -> list[Action]:
        if self.frozen:
            return [a for a in actions if not isinstance(a, Forward)]
        out: list[Action] = []
        for action in actions:
            if isinstance(action, Forward):
                self.frozen = True
                self.count()
                out.append(Freeze(None, by=self))
                break
            out.append(action)
        return out

    def start(self) -> list[Timer]:
        assert isinstance(self.toxic, Timeout)
        return [Timer(self.toxic.ms / 1000, self.toxic.NAME, by=self)] if self.toxic.ms > 0 else []


class _LossStage(_Stage):
    """Decides segment by segment whether it is lost (a two-state Markov chain whose
    stationary loss rate is ``p`` and whose lag-one correlation is ``correlation``), and
    puts a retransmission timeout in front of each lost one."""

    def __init__(self, toxic: Toxic, rng: random.Random, counters: FaultCounters | None) -> None:
        super().__init__(toxic, rng, counters)
        assert isinstance(toxic, Loss)
        self.segment = toxic.segment
        self.rto = toxic.rto_ms / 1000
        p, c = toxic.p, toxic.correlation
        self.loss_after_loss = p + c * (1 - p)
        self.loss_after_delivery = p * (1 - c)
        self.previous_lost: bool | None = None  # None: the first segment draws at rate p
        self.position = 0

    def _lost(self) -> bool:
        if self.previous_lost is None:
            chance = self.toxic.p if isinstance(self.toxic, Loss) else 0.0
        elif self.previous_lost:
            chance = self.loss_after_loss
        else:
            chance = self.loss_after_delivery
        self.previous_lost = self.rng.random() < chance
        return self.previous_lost

    def apply(self, actions: list[Action]) -> list[Action]:
        out: list[Action] = []
        for action in actions:
            if not isinstance(action, Forward):
                out.append(action)
                continue
            data = action.data
            run_start = 0
            # the first segment boundary inside this piece of data
            boundary = -self.position % self.segment
            while boundary < len(data):
                if self._lost():
                    self.count()
                    if boundary > run_start:
                        out.append(Forward(data[run_start:boundary]))
                    out.append(Delay(self.rto))
                    run_start = boundary
                boundary += self.segment
            if run_start < len(data):
                out.append(Forward(data[run_start:]))
            self.position += len(data)
        return out


class _TriggeredStage(_Stage):
    """Holds a toxic back until ``at`` bytes have passed; from there the toxic acts as if
    its connection had just started."""

    def __init__(self, inner: _Stage, at: int, arm: Callable[[list[Timer]], None]) -> None:
        super().__init__(inner.toxic, inner.rng, inner.counters)
        self.inner = inner
        self.at = at
        self.arm = arm
        self.position = 0
        self.armed = False

    def apply(self, actions: list[Action]) -> list[Action]:
        if self.armed:
            return self.inner.apply(actions)
        out: list[Action] = []
        rest: list[Action] = []
        for action in actions:
            if self.armed:
                rest.append(action)
            elif isinstance(action, Forward) and self.position + len(action.data) >= self.at:
                cut = self.at - self.position
                self.position = self.at
                self.armed = True
                self.arm(self.inner.start())
                out.extend(a for a in (Forward(action.data[:cut]),) if _non_empty(a))
                rest.extend(a for a in (Forward(action.data[cut:]),) if _non_empty(a))
            else:
                if isinstance(action, Forward):
                    self.position += len(action.data)
                out.append(action)
        return out + (self.inner.apply(rest) if rest else [])

    def finish(self) -> list[Action]:
        return self.inner.finish() if self.armed else []


def _non_empty(action: Action) -> bool:
    return not isinstance(action, Forward) or len(action.data) > 0


def _as_view(data: Buffer) -> memoryview:
    # A flat byte view, never a copy: slicing it to split a write costs nothing.
    return memoryview(data).cast("B")


def _stage(toxic: Toxic, rng: random.Random, counters: FaultCounters | None) -> _Stage:
    match toxic:
        case Latency():
            return _LatencyStage(toxic, rng, counters)
        case Bandwidth():
            return _BandwidthStage(toxic, rng, counters)
        case Slicer():
            return _SlicerStage(toxic, rng, counters)
        case Stall(after=at):
            return _StallStage(toxic, rng, counters, at)
        case ResetPeer(after=at):
            return _ResetStage(toxic, rng, counters, at)
        case LimitData(bytes=at):
            return _LimitStage(toxic, rng, counters, at)
        case Corrupt(at=at):
            return _CorruptStage(toxic, rng, counters, at)
        case SlowClose():
            return _SlowCloseStage(toxic, rng, counters)
        case LimitTime():
            return _LimitTimeStage(toxic, rng, counters)
        case Timeout():
            return _TimeoutStage(toxic, rng, counters)
        case Loss():
            return _LossStage(toxic, rng, counters)
    raise TypeError(f"no fault engine stage for toxic {toxic!r}")


class DirectionFaults:
    """The engine for one direction of one connection. Not thread-safe: one user at a time.

    Toxics act in plan order, each on the output of the ones before it. Determinism: the
    same toxics, random source and sequence of :meth:`feed` calls give the same actions.
    """

    def __init__(
        self,
        direction: Direction,
        toxics: Sequence[Toxic],
        rng: random.Random,
        counters: FaultCounters | None = None,
    ) -> None:
        self.direction = direction
        self.toxics = tuple(t for t in toxics if t.direction is direction)
        self._seed = rng.getrandbits(64)
        self._counters = counters
        self._timers: list[Timer] = []
        self._added = 0
        # Each toxic gets its own random stream so adding one toxic does not reshuffle
        # the choices of the others.
        self._stages = [
            self._build(toxic, f"{self._seed}:{i}") for i, toxic in enumerate(self.toxics)
        ]
        #: bytes fed so far
        self.position = 0
        #: bytes the caller reported as moved, see :meth:`forwarded`
        self.forwarded_bytes = 0
        #: the Reset or Close that ended this direction, if any
        self.ended: Reset | Close | None = None

    def _build(self, toxic: Toxic, rng_key: str) -> _Stage:
        stage = _stage(toxic, random.Random(rng_key), self._counters)
        if toxic.trigger_bytes:
            return _TriggeredStage(stage, toxic.trigger_bytes, self._timers.extend)
        self._timers.extend(stage.start())
        return stage

    def change(self, toxics: Sequence[Toxic]) -> None:
        """Take this direction's share of ``toxics``, the connection's new list of toxics.

        A toxic that was there already keeps its state. A new one starts now, as if the
        connection had just started: its positions count from here and its timers start
        now. One that is gone stops acting, and its timers and endless freezes with it
        (see :meth:`holds`). This is how Toxiproxy changes connections already open.
        """
        before = list(zip(self.toxics, self._stages, strict=True))
        toxics_now: list[Toxic] = []
        stages_now: list[_Stage] = []
        for toxic in (t for t in toxics if t.direction is self.direction):
            same = next((i for i, (old, _) in enumerate(before) if old == toxic), None)
            if same is not None:
                stage = before.pop(same)[1]
            else:
                self._added += 1
                stage = self._build(toxic, f"{self._seed}:added:{self._added}")
            toxics_now.append(toxic)
            stages_now.append(stage)
        self.toxics = tuple(toxics_now)
        self._stages = stages_now
        self._timers[:] = [timer for timer in self._timers if self.holds(timer.by)]

    def holds(self, by: object) -> bool:
        """Whether the stage behind a :class:`Freeze` or :class:`Timer` still acts here."""
        if by is None:
            return True
        return any(
            stage is by or (isinstance(stage, _TriggeredStage) and stage.inner is by)
            for stage in self._stages
        )

    @property
    def delays_from_arrival(self) -> bool:
        """Whether some wait counts from the bytes' arrival (``latency``): a wrapper that
        reads ahead while earlier bytes wait keeps such a delay from adding up per read."""
        return any(isinstance(t, Latency) for t in self.toxics)

    def take_timers(self) -> list[Timer]:
        """The timers armed since the last call (at the start, or by a trigger)."""
        timers, self._timers[:] = list(self._timers), []
        return timers

    def fire(self, timer: Timer) -> Reset | Close | None:
        """A timer expired: how the connection ends, or ``None`` if it already has (or the
        toxic that armed the timer was taken away)."""
        if self.ended is not None or not self.holds(timer.by):
            return None
        if self._counters is not None:
            self._counters.add_fault(timer.toxic)
        self.ended = Reset(self.position) if timer.reset else Close(self.position)
        return self.ended

    def feed(self, data: Buffer) -> list[Action]:
        """The actions that move ``data`` (the next bytes of this direction) along."""
        if self.ended is not None:
            return [self.ended]
        if not data:
            return []
        view = _as_view(data)
        self.position += len(view)
        actions: list[Action] = [Forward(view)]
        for stage in self._stages:
            actions = stage.apply(actions)
        for i, action in enumerate(actions):
            if isinstance(action, Reset | Close):
                self.ended = action
                return actions[: i + 1]
        return actions

    def forwarded(self, nbytes: int) -> None:
        """Record that the caller has really moved ``nbytes`` of a :class:`Forward`.

        Counting is the caller's job because only it knows whether a write went through:
        a stall that times out, or a cancellation, leaves the rest of the actions undone.
        """
        self.forwarded_bytes += nbytes
        if self._counters is not None:
            self._counters.add_bytes(self.direction, nbytes)

    def finish(self) -> list[Action]:
        """The actions to take before this direction ends (a FIN sent or an EOF seen)."""
        return [action for stage in self._stages for action in stage.finish()]


class ConnectionFaults:
    """Both directions of one connection: ``upstream`` and ``downstream`` engines."""

    def __init__(
        self,
        toxics: Sequence[Toxic] = (),
        *,
        rng: random.Random | None = None,
        counters: FaultCounters | None = None,
        timers: bool = False,
    ) -> None:
        rng = rng if rng is not None else random.Random(0)
        self.toxics = tuple(toxics)
        self._timers_supported = timers
        self._check_timers(self.toxics)
        self.upstream = DirectionFaults(Direction.UPSTREAM, self.toxics, rng, counters)
        self.downstream = DirectionFaults(Direction.DOWNSTREAM, self.toxics, rng, counters)
        if counters is not None:
            counters.connection_opened()

    @classmethod
    def for_connection(
        cls,
        plan: FaultPlan,
        index: int,
        counters: FaultCounters | None = None,
        *,
        timers: bool = False,
    ) -> ConnectionFaults:
        """The faults of connection number ``index`` under ``plan``; deterministic."""
        return cls(
            plan.for_connection(index),
            rng=plan.rng(index, "faults"),
            counters=counters,
            timers=timers,
        )

    def _check_timers(self, toxics: Sequence[Toxic]) -> None:
        timed = [t.NAME for t in toxics if t.needs_timer()]
        if timed and not self._timers_supported:
            raise TimerNotSupportedError(
                f"{', '.join(timed)} acts at a time, which only the TCP chaos proxy can do"
            )

    def change(self, toxics: Sequence[Toxic]) -> None:
        """Give the open connection a new list of toxics; see :meth:`DirectionFaults.change`."""
        self._check_timers(toxics)
        self.toxics = tuple(toxics)
        self.upstream.change(self.toxics)
        self.downstream.change(self.toxics)

    def direction(self, direction: Direction) -> DirectionFaults:
        return self.upstream if direction is Direction.UPSTREAM else self.downstream


def freeze_deadline(now: float, freeze: Freeze) -> float:
    """When a freeze that starts at ``now`` ends (``inf`` for one that never does)."""
    return math.inf if freeze.seconds is None else now + freeze.seconds
