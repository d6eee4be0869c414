"""How a chaos client reaches the proxy: plain TCP, or each connection under a fault plan.

Both ``rup chaos`` and ``rup demo`` pass these to the client library as its ``connector``,
so the client's own reconnect logic meets the faults exactly as it would meet a real
network's.
"""

from __future__ import annotations

import itertools

import trio

from faultnet.counters import FaultCounters
from faultnet.plan import FaultPlan
from faultnet.stream import open_tcp_stream
from proxy.client import Connector

__all__ = ["faulty_connector", "plain_connector"]


def faulty_connector(
    address: tuple[str, int], plan: FaultPlan, counters: FaultCounters
) -> Connector:
    """Connections to ``address`` wrapped in ``plan``'s faults, numbered 0, 1, ... in order.

    The numbering is what makes a plan's per-connection choices replayable; ``counters``
    counts every fault injected.
    """
    host, port = address
    indexes = itertools.count()

    async def connect(_host: str, _port: int) -> trio.abc.Stream:
        return await open_tcp_stream(host, port, plan=plan, counters=counters, index=next(indexes))

    return connect


def plain_connector(address: tuple[str, int]) -> Connector:
    """Plain TCP connections to ``address``, whatever address the client asks for."""
    host, port = address

    async def connect(_host: str, _port: int) -> trio.abc.Stream:
        return await trio.open_tcp_stream(host, port)

    return connect
