"""faultnet: deterministic fault injection for trio streams, HTTP clients and TCP.

Faults are data (:mod:`faultnet.plan`); :mod:`faultnet.engine` turns them into actions on a
connection's bytes, and the wrappers apply those actions: :mod:`faultnet.stream` for trio
streams and :mod:`faultnet.transport` for the ``requests`` session of google-cloud-storage.
:mod:`faultnet.tcpproxy` is a TCP chaos proxy built on the same engine, and
:mod:`faultnet.gcs` is a strict GCS endpoint with scripted faults.

Importing :mod:`faultnet` itself costs nothing: each name below is imported from its module
the first time it is used (PEP 562). The ``rup`` command line imports
:mod:`faultnet.cli_support` on every start, and ``rup upload`` needs nothing else of it.
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from faultnet.counters import FaultCounters, FaultCountersDict
    from faultnet.engine import ConnectionFaults, DirectionFaults
    from faultnet.plan import (
        TOXIC_TYPES,
        Bandwidth,
        Corrupt,
        Direction,
        FaultPlan,
        Latency,
        LimitData,
        PlanSyntaxError,
        ResetPeer,
        Slicer,
        SlowClose,
        Stall,
        Toxic,
        toxic_from_dict,
    )
    from faultnet.stream import FaultyListener, FaultyStream, open_tcp_stream
    from faultnet.tcpproxy import ChaosProxy, NamedToxic, ProxyStats, open_chaos_proxy
    from faultnet.transport import FaultyHTTPAdapter, FaultySocket, faulty_session

__all__ = [
    "TOXIC_TYPES",
    "Bandwidth",
    "ChaosProxy",
    "ConnectionFaults",
    "Corrupt",
    "Direction",
    "DirectionFaults",
    "FaultCounters",
    "FaultCountersDict",
    "FaultPlan",
    "FaultyHTTPAdapter",
    "FaultyListener",
    "FaultySocket",
    "FaultyStream",
    "Latency",
    "LimitData",
    "NamedToxic",
    "PlanSyntaxError",
    "ProxyStats",
    "ResetPeer",
    "Slicer",
    "SlowClose",
    "Stall",
    "Toxic",
    "faulty_session",
    "open_chaos_proxy",
    "open_tcp_stream",
    "toxic_from_dict",
]

#: where each name of ``__all__`` lives
_EXPORTS: _typing.Final[dict[str, str]] = {
    "FaultCounters": "faultnet.counters",
    "FaultCountersDict": "faultnet.counters",
    "ConnectionFaults": "faultnet.engine",
    "DirectionFaults": "faultnet.engine",
    "TOXIC_TYPES": "faultnet.plan",
    "Bandwidth": "faultnet.plan",
    "Corrupt": "faultnet.plan",
    "Direction": "faultnet.plan",
    "FaultPlan": "faultnet.plan",
    "Latency": "faultnet.plan",
    "LimitData": "faultnet.plan",
    "PlanSyntaxError": "faultnet.plan",
    "ResetPeer": "faultnet.plan",
    "Slicer": "faultnet.plan",
    "SlowClose": "faultnet.plan",
    "Stall": "faultnet.plan",
    "Toxic": "faultnet.plan",
    "toxic_from_dict": "faultnet.plan",
    "FaultyListener": "faultnet.stream",
    "FaultyStream": "faultnet.stream",
    "open_tcp_stream": "faultnet.stream",
    "ChaosProxy": "faultnet.tcpproxy",
    "NamedToxic": "faultnet.tcpproxy",
    "ProxyStats": "faultnet.tcpproxy",
    "open_chaos_proxy": "faultnet.tcpproxy",
    "FaultyHTTPAdapter": "faultnet.transport",
    "FaultySocket": "faultnet.transport",
    "faulty_session": "faultnet.transport",
}


def __getattr__(name: str) -> _typing.Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'faultnet' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # looked up once
    return value
