"""What a chaos run uploads, and under which faults: all of it derived from one seed.

Every upload is described up front by an :class:`UploadSpec` drawn from its own random
stream (``seed`` and upload index), so an upload gets the same size, data, fault plans and
scripted GCS faults whether it runs alone (``rup chaos --only 17``) or among thousands, in
any order, at any concurrency. That is what makes a failing seed replayable.

Object data is never stored: each upload's :class:`~proxy.chaos.source.ObjectSource` is
keyed by the seed and index, and regenerates any byte range on demand.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import random
from dataclasses import dataclass
from typing import Final

from faultnet.plan import (
    Corrupt,
    Direction,
    FaultPlan,
    Latency,
    LimitData,
    ResetPeer,
    Slicer,
    Stall,
    Toxic,
)
from proxy.chaos.source import ObjectSource
from reliablewriter import CHUNK_QUANTUM, KiB, MiB

__all__ = [
    "FAULT_MIXES",
    "NON_PORTABLE_INSTRUCTIONS",
    "ChunkGeometry",
    "ClientLeg",
    "FaultMix",
    "Precondition",
    "UploadSpec",
    "boundary_sizes",
    "gcs_leg_plan",
    "if_generation_match",
    "plan_uploads",
]

#: size of the object that ifGenerationMatch uploads find already in place
_PREVIOUS_SIZE: Final = 3000


@dataclass(frozen=True)
class ChunkGeometry:
    """The sizes the proxy cuts data by; sizes just around them are the interesting ones."""

    quantum: int = CHUNK_QUANTUM
    min_chunk: int = 1 * MiB
    max_chunk: int = 4 * MiB
    frame: int = 256 * KiB
    window: int = 8 * MiB
    #: a composite upload's segment (protocol section 14): small, so that most uploads of a
    #: run's sizes are cut into several
    segment: int = 1 * MiB
    #: objects up to this size are stored by one request, with no resumable session (the
    #: proxy's own limit is larger: a run wants most sizes to cross chunk edges in a session)
    one_request: int = 1 * MiB
    #: the largest object a client sends whole, as one PUT_OBJECT: the proxy agrees frames
    #: this large, the client still cuts its WriteAt frames at ``frame``
    put_object: int = 2 * MiB
    #: the WriteAt frames of a share of the uploads (at most ``put_object``, which the proxy
    #: agrees): large enough that connections cut mid-frame make the client's pieces shrink,
    #: as they do for rup's own 4 MiB frames, down to 256 KiB
    large_frame: int = 1 * MiB

    def frame_for(self, spec: UploadSpec) -> int:
        """The WriteAt frame size ``spec``'s client cuts its data at."""
        return self.large_frame if spec.large_frames else self.frame


def boundary_sizes(geometry: ChunkGeometry, max_size: int) -> list[int]:
    """0, 1 and every size one byte either side of a quantum, chunk, frame or window edge."""
    edges = sorted(
        {
            geometry.quantum,
            2 * geometry.quantum,
            geometry.frame,
            geometry.min_chunk,
            2 * geometry.min_chunk,
            geometry.max_chunk,
            geometry.window,
            geometry.segment,
            2 * geometry.segment,
            geometry.one_request,
        }
    )
    sizes = [0, 1]
    for edge in edges:
        sizes += [edge - 1, edge, edge + 1]
    sizes.append(max_size)
    return sorted({size for size in sizes if 0 <= size <= max_size})


class ClientLeg(enum.Enum):
    """How an upload's client -> proxy connections meet their faults."""

    #: each connection is wrapped in the client process (faultnet.stream)
    FAULTY_STREAM = "faulty stream"
    #: connections go through a TCP chaos proxy (faultnet.tcpproxy): real sockets both sides
    CHAOS_PROXY = "chaos proxy"


#: share of uploads whose client leg goes through a TCP chaos proxy
_CHAOS_PROXY_SHARE: Final = 0.25


class Precondition(enum.Enum):
    """How an upload uses ``ifGenerationMatch``, and so what its outcome must be."""

    NONE = "none"
    #: the object does not exist and the upload says ifGenerationMatch=0: it must succeed
    ABSENT = "absent"
    #: a previous generation exists and the upload names it: it must replace it
    CURRENT = "current"
    #: a previous generation exists and the upload names another: it must be refused, and
    #: the previous generation must be left intact
    STALE = "stale"

    @property
    def needs_previous(self) -> bool:
        return self in (Precondition.CURRENT, Precondition.STALE)


def if_generation_match(precondition: Precondition, previous_generation: int | None) -> int | None:
    """The ``ifGenerationMatch`` an upload sends, given the generation it found in place."""
    if precondition is Precondition.ABSENT:
        return 0
    if previous_generation is None:
        return None
    if precondition is Precondition.CURRENT:
        return previous_generation
    if precondition is Precondition.STALE:
        return max(1, previous_generation - 1)
    return None


@dataclass(frozen=True)
class FaultMix:
    """How often each kind of fault strikes, before ``--intensity`` scales it.

    ``client`` and ``gcs`` are toxicities per connection of the client and proxy legs;
    ``scripted`` is the share of uploads that get GCS-side retry-test instructions, drawn
    from ``instructions``.
    """

    name: str
    client: dict[str, float]
    gcs: dict[str, float]
    scripted: float
    instructions: tuple[str, ...]

    def portable(self) -> FaultMix:
        """This mix without the scripted faults storage-testbench cannot serve."""
        kept = tuple(i for i in self.instructions if i not in NON_PORTABLE_INSTRUCTIONS)
        return dataclasses.replace(self, instructions=kept)


#: retry-test instructions a run against storage-testbench leaves out: the first two it does
#: not know; after "return-broken-stream" on a chunk that is not the last, it keeps a
#: session that no retry can finish, which would be blamed on the writer
NON_PORTABLE_INSTRUCTIONS: Final = frozenset(
    {"return-308-short-range-128K", "return-range-regression", "return-broken-stream"}
)

_RECOVERABLE_INSTRUCTIONS: Final = (
    "return-503",
    "return-429",
    "return-500",
    "return-reset-connection",
    "return-broken-stream",
    "return-503-after-256K",
    "stall-for-1s-after-256K",
    "return-308-short-range-128K",
    "return-broken-stream-final-chunk-after-4B",
)

FAULT_MIXES: Final = {
    mix.name: mix
    for mix in (
        FaultMix("none", {}, {}, 0.0, ()),
        FaultMix(
            "light",
            {"reset_peer": 0.1, "corrupt": 0.05, "latency": 0.2},
            {"reset_peer": 0.05, "latency": 0.1},
            0.1,
            _RECOVERABLE_INSTRUCTIONS,
        ),
        FaultMix(
            "moderate",
            {
                "reset_peer": 0.2,
                "corrupt": 0.1,
                "stall": 0.03,
                "limit_data": 0.05,
                "slicer": 0.1,
                "latency": 0.3,
            },
            {"reset_peer": 0.1, "limit_data": 0.05, "stall": 0.02, "latency": 0.2},
            0.3,
            _RECOVERABLE_INSTRUCTIONS,
        ),
        # Harsh adds faults no client can ride out (an expired session, a lying server):
        # those uploads must fail cleanly, leaving no object behind.
        FaultMix(
            "harsh",
            {
                "reset_peer": 0.4,
                "corrupt": 0.2,
                "stall": 0.05,
                "limit_data": 0.1,
                "slicer": 0.2,
                "latency": 0.5,
            },
            {"reset_peer": 0.25, "limit_data": 0.1, "stall": 0.05, "latency": 0.3},
            0.6,
            (*_RECOVERABLE_INSTRUCTIONS, "return-410", "return-range-regression"),
        ),
    )
}


@dataclass(frozen=True)
class UploadSpec:
    """Everything about one upload of a run, fixed before the run starts."""

    index: int
    name: str
    size: int
    connections: int
    client_leg: ClientLeg
    precondition: Precondition
    client_plan: FaultPlan
    gcs_plan: FaultPlan
    #: retry-test instructions for ``storage.objects.insert``, applied in order
    instructions: tuple[str, ...]
    source: ObjectSource
    previous: ObjectSource | None
    #: stored as segments composed at the end (protocol section 14); otherwise the client
    #: asks for one resumable session
    composite: bool = False
    #: sent whole as one PUT_OBJECT (the client's path for small objects), not streamed
    one_request: bool = False
    #: streamed in WriteAt frames of ``ChunkGeometry.large_frame`` instead of ``frame``
    large_frames: bool = False


def _log_uniform_size(rng: random.Random, max_size: int) -> int:
    """Sizes spread evenly over orders of magnitude, 0 B up to ``max_size``."""
    return min(max_size, int(math.exp(rng.uniform(0.0, math.log(max_size + 1)))) - 1)


def _scaled(toxicity: float, intensity: float) -> float:
    return min(1.0, toxicity * intensity)


def _client_toxics(
    mix: FaultMix, intensity: float, size: int, rng: random.Random
) -> tuple[Toxic, ...]:
    """Client -> proxy faults. Thresholds fall within the object, so they really fire."""
    # Thresholds count every byte on a connection, frame headers and the handshake included;
    # 16 KiB lets each connection get some work done, so an upload always moves forward.
    span = max(size, 1) + 16 * KiB
    up, down = Direction.UPSTREAM, Direction.DOWNSTREAM
    builders: dict[str, list[Toxic]] = {
        "reset_peer": [ResetPeer(up, 1.0, after=rng.randrange(16 * KiB, span + 16 * KiB))],
        "corrupt": [Corrupt(up, 1.0, at=rng.randrange(span), mask=rng.randrange(1, 256))],
        "stall": [Stall(up, 1.0, after=rng.randrange(16 * KiB, span + 16 * KiB), seconds=0)],
        "limit_data": [LimitData(up, 1.0, bytes=rng.randrange(16 * KiB, span + 16 * KiB))],
        "slicer": [
            Slicer(up, 1.0, size=16 * KiB, variation=12 * KiB),
            Slicer(down, 1.0, size=5, variation=4),
        ],
        "latency": [Latency(down, 1.0, ms=2.0, jitter=1.0)],
    }
    return tuple(
        dataclasses.replace(toxic, toxicity=_scaled(toxicity, intensity))
        for name, toxicity in mix.client.items()
        for toxic in builders[name]
        if _scaled(toxicity, intensity) > 0
    )


def _gcs_toxics(
    mix: FaultMix, intensity: float, size: int, rng: random.Random
) -> tuple[Toxic, ...]:
    """Proxy -> GCS faults, on the HTTP connections of this upload's writer."""
    span = max(size, 1) + 4 * KiB
    up, down = Direction.UPSTREAM, Direction.DOWNSTREAM
    builders: dict[str, Toxic] = {
        "reset_peer": ResetPeer(up, 1.0, after=rng.randrange(4 * KiB, span + 4 * KiB)),
        # a response cut after its head or partway through it
        "limit_data": LimitData(down, 1.0, bytes=rng.randrange(1, 600)),
        # a response that never comes: the writer's progress timeout must notice
        "stall": Stall(down, 1.0, after=0, seconds=0),
        "latency": Latency(down, 1.0, ms=10.0, jitter=5.0),
    }
    return tuple(
        dataclasses.replace(builders[name], toxicity=_scaled(toxicity, intensity))
        for name, toxicity in mix.gcs.items()
        if _scaled(toxicity, intensity) > 0
    )


#: GCS-leg faults a proxy run as a process cannot ride out in a run's time: it keeps
#: ``rup serve``'s writer settings, whose progress timeout is a minute
_SLOW_TO_NOTICE: Final = frozenset({"stall"})


def gcs_leg_plan(mix: FaultMix, intensity: float, max_size: int, seed: int) -> FaultPlan:
    """One plan for every proxy -> GCS connection of a run whose proxy is a process (and so
    cannot route each upload's requests through that upload's own plan)."""
    rng = random.Random(f"rup-chaos:{seed}:gcs-leg")
    quick = dataclasses.replace(
        mix, gcs={name: p for name, p in mix.gcs.items() if name not in _SLOW_TO_NOTICE}
    )
    return FaultPlan(_gcs_toxics(quick, intensity, max_size, rng), seed=rng.getrandbits(32))


def _precondition(rng: random.Random, share: float) -> Precondition:
    if rng.random() >= share:
        return Precondition.NONE
    return rng.choice([Precondition.ABSENT, Precondition.CURRENT, Precondition.STALE])


def plan_uploads(
    *,
    uploads: int,
    seed: int,
    max_size: int,
    connections: int,
    mix: FaultMix,
    intensity: float,
    geometry: ChunkGeometry,
    precondition_share: float = 0.1,
    composite_share: float = 0.0,
    one_request_share: float = 0.0,
    large_frame_share: float = 0.0,
) -> list[UploadSpec]:
    """The run's uploads: boundary sizes first, then log-uniform sizes; all from ``seed``.

    A ``composite_share`` of them are composite. They get no scripted GCS faults: a
    segment's requests cannot be told apart by upload (see :mod:`proxy.chaos.routing` for
    the GCS-leg faults segments do meet). A ``one_request_share`` of those that fit one
    PUT_OBJECT and use no precondition are sent as one (with a precondition, a reply lost
    on the way back cannot be settled by the client: docs/protocol.md section 10). A
    ``large_frame_share`` of those streamed cut their frames at ``geometry.large_frame``."""
    boundaries = boundary_sizes(geometry, max_size)
    specs = []
    for index in range(uploads):
        # Two streams: what is uploaded never depends on the fault mix or its intensity,
        # so runs that differ only in faults upload the same objects the same way.
        rng = random.Random(f"rup-chaos:{seed}:{index}")
        fault_rng = random.Random(f"rup-chaos:{seed}:{index}:faults")
        size = boundaries[index] if index < len(boundaries) else _log_uniform_size(rng, max_size)
        precondition = _precondition(rng, precondition_share)
        upload_connections = rng.randint(1, connections)
        client_leg = (
            ClientLeg.CHAOS_PROXY if rng.random() < _CHAOS_PROXY_SHARE else ClientLeg.FAULTY_STREAM
        )
        instructions: tuple[str, ...] = ()
        if mix.instructions and fault_rng.random() < _scaled(mix.scripted, intensity):
            instructions = tuple(fault_rng.choices(mix.instructions, k=fault_rng.randint(1, 2)))
        # Drawn last from its stream, so the draws before it stay what they were.
        composite = rng.random() < composite_share
        if composite:
            instructions = ()  # drawn all the same, so the faults after them stay the same
        one_request = (
            rng.random() < one_request_share  # drawn after, so the draws before stay the same
            and not composite
            and precondition is Precondition.NONE
            and size <= geometry.put_object
        )
        large_frames = (
            rng.random() < large_frame_share  # drawn last, so the draws before stay the same
            and not one_request
        )
        key = f"{seed}:{index}"
        specs.append(
            UploadSpec(
                index=index,
                name=f"chaos/{seed}/{index:05d}-{size}",
                size=size,
                connections=upload_connections,
                client_leg=client_leg,
                precondition=precondition,
                client_plan=FaultPlan(
                    _client_toxics(mix, intensity, size, fault_rng),
                    seed=fault_rng.getrandbits(32),
                ),
                gcs_plan=FaultPlan(
                    _gcs_toxics(mix, intensity, size, fault_rng), seed=fault_rng.getrandbits(32)
                ),
                instructions=instructions,
                source=ObjectSource(key, size),
                previous=(
                    ObjectSource(f"{key}:previous", _PREVIOUS_SIZE)
                    if precondition.needs_previous
                    else None
                ),
                composite=composite,
                one_request=one_request,
                large_frames=large_frames,
            )
        )
    return specs
