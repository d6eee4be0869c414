"""faultnet: deterministic fault injection for trio streams, HTTP clients and TCP.

Faults are data (:mod:`faultnet.plan`); :mod:`faultnet.engine` turns them into actions on a
connection's bytes, and the wrappers apply those actions: :mod:`faultnet.stream` for trio
streams and :mod:`faultnet.transport` for the ``requests`` session of google-cloud-storage.
:mod:`faultnet.tcpproxy` is a TCP chaos proxy built on the same engine, and
:mod:`faultnet.gcs` is a strict GCS endpoint with scripted faults.
"""

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
