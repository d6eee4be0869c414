"""Named network profiles for benchmarks: what a real network does to each connection.

Loopback measures CPU, not what users feel. A profile gives each leg of an upload a
:class:`Link` (a rate per connection and a one-way latency, each way) and turns it into a
fault plan for the TCP chaos proxy, so one connection through ``rup faultproxy --profile
wan --leg client`` behaves like one flow over that network::

    from faultnet.profiles import PROFILES
    plan = PROFILES["wan"].client_leg   # bandwidth and latency, upstream and downstream

The legs: *client* is between the uploading client and the rup proxy, *gcs* between the
rup proxy and Google Cloud Storage. Rates are in bytes per second (MB = 10**6 bytes) and
apply to each connection and each direction separately, as a per-flow bottleneck does.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from faultnet.plan import Bandwidth, Direction, FaultPlan, Latency, Toxic

__all__ = ["MB", "PROFILES", "Leg", "Link", "NetworkProfile"]

#: a megabyte, as network rates count them
MB = 1_000_000


class Leg(enum.Enum):
    """Which stretch of an upload's path a plan is for."""

    CLIENT = "client"  # client <-> rup proxy
    GCS = "gcs"  # rup proxy <-> GCS


@dataclass(frozen=True)
class Link:
    """One network path, the same each way: ``rate`` bytes/s per connection (``None``:
    unlimited) and ``latency_ms`` milliseconds one way."""

    rate: int | None = None
    latency_ms: float = 0.0

    def toxics(self) -> tuple[Toxic, ...]:
        """Bandwidth, then latency, for each direction; nothing for an ideal link."""
        toxics: list[Toxic] = []
        for direction in (Direction.UPSTREAM, Direction.DOWNSTREAM):
            if self.rate is not None:
                toxics.append(Bandwidth(direction=direction, rate=self.rate))
            if self.latency_ms:
                toxics.append(Latency(direction=direction, ms=self.latency_ms))
        return tuple(toxics)

    @property
    def round_trip_seconds(self) -> float:
        return 2 * self.latency_ms / 1000


@dataclass(frozen=True)
class NetworkProfile:
    """A network for both legs of an upload."""

    name: str
    description: str
    client: Link
    gcs: Link

    def link(self, leg: Leg) -> Link:
        return self.client if leg is Leg.CLIENT else self.gcs

    def plan(self, leg: Leg, seed: int = 0) -> FaultPlan:
        """The fault plan that makes a chaos proxy behave like ``leg`` of this network."""
        return FaultPlan(toxics=self.link(leg).toxics(), seed=seed)

    @property
    def client_leg(self) -> FaultPlan:
        return self.plan(Leg.CLIENT)

    @property
    def gcs_leg(self) -> FaultPlan:
        return self.plan(Leg.GCS)


PROFILES: Mapping[str, NetworkProfile] = {
    profile.name: profile
    for profile in (
        NetworkProfile("lan", "no toxics: loopback as it is", Link(), Link()),
        NetworkProfile(
            "wan",
            "client leg 20 MB/s and 10 ms each way; GCS leg 50 MB/s and 5 ms each way",
            client=Link(rate=20 * MB, latency_ms=10),
            gcs=Link(rate=50 * MB, latency_ms=5),
        ),
        NetworkProfile(
            "far",
            "5 MB/s and 40 ms each way, on both legs",
            client=Link(rate=5 * MB, latency_ms=40),
            gcs=Link(rate=5 * MB, latency_ms=40),
        ),
    )
}
