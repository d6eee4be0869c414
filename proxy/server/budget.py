"""The shared pool of buffer bytes that upload windows are carved from."""

from __future__ import annotations

import trio

from protocol import ErrorCode
from proxy.server.errors import ServerError
from proxy.server.metrics import ServerMetrics
from reliablewriter import CHUNK_QUANTUM

__all__ = ["BufferBudget"]


class BufferBudget:
    """The shared pool of buffer bytes that upload windows are carved from."""

    def __init__(self, total: int, metrics: ServerMetrics) -> None:
        self._total = total
        self._reserved = 0
        self._metrics = metrics
        self._returned = trio.lowlevel.ParkingLot()

    @property
    def available(self) -> int:
        return self._total - self._reserved

    def reserve(self, preferred: int, minimum: int) -> int | None:
        """A window of ``minimum`` to ``preferred`` bytes, or ``None`` if even that is gone.

        Once the pool runs low, each new upload gets at most a quarter of what is left, so
        a burst of uploads shares the pool with shrinking windows instead of the first few
        taking it all and the rest being turned away.
        """
        if self.available < minimum:
            return None
        fair_share = max(minimum, self.available // 4)
        granted = max(minimum, min(preferred, fair_share) // CHUNK_QUANTUM * CHUNK_QUANTUM)
        self._reserved += granted
        self._metrics.buffer_bytes.set(self._reserved)
        return granted

    async def acquire(self, preferred: int, minimum: int, *, patience: float) -> int:
        """Like :meth:`reserve`, but wait up to ``patience`` seconds for windows to come back.

        Waiting cannot deadlock: uploads that hold windows never need more to finish, so
        they always give theirs back. Raises a retryable TOO_BUSY if none came back in time;
        cancelled partway, nothing stays reserved.
        """
        with trio.move_on_after(patience):
            while (granted := self.reserve(preferred, minimum)) is None:
                await self._returned.park()
            return granted
        raise ServerError(
            ErrorCode.TOO_BUSY, "the proxy's buffer budget stayed exhausted; retry later"
        )

    def release(self, amount: int) -> None:
        self._reserved -= amount
        self._metrics.buffer_bytes.set(self._reserved)
        self._returned.unpark_all()
