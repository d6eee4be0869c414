"""Counters of bytes moved and faults applied, shared by many connections and threads.

One :class:`FaultCounters` is typically shared by every connection of a listener, an HTTP
adapter or a chaos proxy, so its numbers are the totals of a whole run: the chaos report and
``rup demo`` print :meth:`FaultCounters.as_dict`.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import TypedDict

from faultnet.plan import Direction

__all__ = ["FaultCounters", "FaultCountersDict"]


class FaultCountersDict(TypedDict):
    """The JSON-friendly form of :class:`FaultCounters`."""

    connections: int
    bytes_up: int
    bytes_down: int
    faults: dict[str, int]


class FaultCounters:
    """Thread-safe totals: connections seen, bytes per direction, faults applied per toxic.

    Bytes are counted once they have really been written (or handed to the reader), so
    bytes that a reset, a ``limit_data`` or a timed-out stall held back are not counted.
    Faults are counted by toxic name, once per time the toxic acted: per delayed write for
    ``latency``, per throttled write for ``bandwidth``, per write cut up for ``slicer``, and
    once per connection for the one-shot toxics (``stall``, ``reset_peer``, ``limit_data``,
    ``corrupt``, ``slow_close``).
    """

    def __init__(self) -> None:
        # Worker threads of the HTTP transport and trio tasks update the same object.
        self._lock = threading.Lock()
        self._connections = 0
        self._bytes = {Direction.UPSTREAM: 0, Direction.DOWNSTREAM: 0}
        self._faults: Counter[str] = Counter()

    def connection_opened(self) -> None:
        with self._lock:
            self._connections += 1

    def add_bytes(self, direction: Direction, count: int) -> None:
        with self._lock:
            self._bytes[direction] += count

    def add_fault(self, toxic_name: str) -> None:
        with self._lock:
            self._faults[toxic_name] += 1

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    def bytes_moved(self, direction: Direction) -> int:
        with self._lock:
            return self._bytes[direction]

    def faults_applied(self, toxic_name: str) -> int:
        with self._lock:
            return self._faults[toxic_name]

    def as_dict(self) -> FaultCountersDict:
        """A consistent snapshot of every counter."""
        with self._lock:
            return FaultCountersDict(
                connections=self._connections,
                bytes_up=self._bytes[Direction.UPSTREAM],
                bytes_down=self._bytes[Direction.DOWNSTREAM],
                faults=dict(sorted(self._faults.items())),
            )

    def __repr__(self) -> str:
        return f"FaultCounters({self.as_dict()!r})"
