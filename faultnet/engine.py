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

Positions are absolute per direction, counted from the first byte of the connection, so a
toxic with ``after=N`` acts at exactly byte N: a chunk that crosses N is split so exactly N
bytes go first. A trigger at the very end of a chunk acts right after it; one at 0 acts
before the first byte. Nothing after a :class:`Reset` or :class:`Close` is emitted.

The caller reports the bytes it really moved with :meth:`DirectionFaults.forwarded`, which
keeps the :class:`~faultnet.counters.FaultCounters` honest when an operation fails halfway.

Which bytes a direction covers is the caller's choice: :class:`ConnectionFaults` has one
engine per direction, and a client-side wrapper feeds what it sends to ``upstream`` and
what it receives to ``downstream`` (a server-side wrapper does the opposite).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

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

__all__ = [
    "Action",
    "Close",
    "ConnectionFaults",
    "Delay",
    "DirectionFaults",
    "Forward",
    "Freeze",
    "Reset",
    "freeze_deadline",
]

Buffer = bytes | bytearray | memoryview
View = bytes | memoryview


@dataclass(frozen=True)
class Delay:
    """Wait ``seconds`` before the next action; the connection is slow, not stuck."""

    seconds: float


@dataclass(frozen=True)
class Forward:
    """Pass ``data`` on. It is a view into the caller's buffer unless a byte was corrupted."""

    data: View


@dataclass(frozen=True)
class Freeze:
    """Move nothing for ``seconds``; ``None`` means until the connection is closed."""

    seconds: float | None


@dataclass(frozen=True)
class Reset:
    """Abort the connection with an RST once ``position`` bytes have passed."""

    position: int


@dataclass(frozen=True)
class Close:
    """Close the connection cleanly once ``position`` bytes have passed."""

    position: int


Action = Delay | Forward | Freeze | Reset | Close

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


class _LatencyStage(_Stage):
    def apply(self, actions: list[Action]) -> list[Action]:
        assert isinstance(self.toxic, Latency)
        jitter = self.rng.uniform(-self.toxic.jitter, self.toxic.jitter) if self.toxic.jitter else 0
        delay_ms = max(0.0, self.toxic.ms + jitter)
        if delay_ms <= 0 or not any(isinstance(a, Forward) for a in actions):
            return actions
        self.count()
        return [Delay(delay_ms / 1000), *actions]


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
                out.append(Freeze(None))  # no bandwidth at all: nothing ever moves
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
        return [Forward(before), Freeze(seconds), Forward(after)]


class _ResetStage(_PositionStage):
    def fire(self, before: View, after: View) -> list[Action]:
        return [Forward(before), Reset(self.at), Forward(after)]


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
        seed = rng.getrandbits(64)
        # Each toxic gets its own random stream so adding one toxic does not reshuffle
        # the choices of the others.
        self._stages = [
            _stage(toxic, random.Random(f"{seed}:{i}"), counters)
            for i, toxic in enumerate(self.toxics)
        ]
        self._counters = counters
        #: bytes the caller reported as moved, see :meth:`forwarded`
        self.forwarded_bytes = 0
        #: the Reset or Close that ended this direction, if any
        self.ended: Reset | Close | None = None

    def feed(self, data: Buffer) -> list[Action]:
        """The actions that move ``data`` (the next bytes of this direction) along."""
        if self.ended is not None:
            return [self.ended]
        if not data:
            return []
        actions: list[Action] = [Forward(_as_view(data))]
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
    ) -> None:
        rng = rng if rng is not None else random.Random(0)
        self.toxics = tuple(toxics)
        self.upstream = DirectionFaults(Direction.UPSTREAM, self.toxics, rng, counters)
        self.downstream = DirectionFaults(Direction.DOWNSTREAM, self.toxics, rng, counters)
        if counters is not None:
            counters.connection_opened()

    @classmethod
    def for_connection(
        cls, plan: FaultPlan, index: int, counters: FaultCounters | None = None
    ) -> ConnectionFaults:
        """The faults of connection number ``index`` under ``plan``; deterministic."""
        return cls(plan.for_connection(index), rng=plan.rng(index, "faults"), counters=counters)

    def direction(self, direction: Direction) -> DirectionFaults:
        return self.upstream if direction is Direction.UPSTREAM else self.downstream


def freeze_deadline(now: float, freeze: Freeze) -> float:
    """When a freeze that starts at ``now`` ends (``inf`` for one that never does)."""
    return math.inf if freeze.seconds is None else now + freeze.seconds
