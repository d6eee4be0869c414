"""The shared memory budget, and each upload's credit window carved from it.

Every byte an upload may make the proxy hold is paid for before it is granted: the window's
payload plus the overhead of the separate pieces the writer's buffer may keep for it
(``reliablewriter``'s measured :data:`~reliablewriter.buffer.FRAGMENT_OVERHEAD` per piece;
see :func:`window_cost`). The budget is shared three ways:

* in total (``total_buffer_limit``);
* per client (``client_buffer_share`` of the total per authenticated identity, or per IP
  address when the proxy has no auth), so no client can take what the others need;
* per upload: a new upload starts with a small window (``min_upload_window``) that doubles,
  up to ``upload_buffer_limit``, each time half its size in payload has arrived; an upload with no
  connection attached gives back everything but what its buffer really holds, and takes
  its window back when a connection attaches again.

Waiting for budget cannot deadlock: an upload never needs more than it holds to finish
(its window is what its client may send; growth never waits), so windows always come back.
"""

from __future__ import annotations

import dataclasses

import trio

from protocol import ErrorCode
from proxy.server.errors import ServerError
from proxy.server.metrics import ServerMetrics
from reliablewriter import CHUNK_QUANTUM, WriterSettings

__all__ = [
    "BufferBudget",
    "Reservation",
    "UploadWindow",
    "window_cost",
    "writer_settings_for",
]

#: chunks are at most this fraction of the window, so while one chunk is on its way to GCS
#: the client can already send the bytes of the next ones
_CHUNKS_PER_WINDOW = 4


def _quantized(size: int) -> int:
    """``size`` rounded down to the GCS chunk quantum, and at least one quantum."""
    return max(CHUNK_QUANTUM, size // CHUNK_QUANTUM * CHUNK_QUANTUM)


def writer_settings_for(template: WriterSettings, smallest: int, largest: int) -> WriterSettings:
    """``template`` for a writer whose window goes from ``smallest`` up to ``largest`` bytes.

    The writer's buffer may hold ``largest`` (the server grants less while the window is
    small). Chunks are at most a quarter of ``largest`` and at least a quarter of
    ``smallest``: a chunk as large as the window would stall the client for the whole time
    GCS takes to acknowledge it, and a smallest chunk above the window would never fill.
    """
    max_chunk = min(template.max_chunk_size, _quantized(largest // _CHUNKS_PER_WINDOW))
    min_chunk = min(template.min_chunk_size, max_chunk, _quantized(smallest // _CHUNKS_PER_WINDOW))
    return dataclasses.replace(
        template, buffer_limit=largest, max_chunk_size=max_chunk, min_chunk_size=min_chunk
    )


def window_cost(template: WriterSettings, window: int) -> int:
    """What a window of ``window`` bytes may cost in memory: its payload, plus the overhead
    of as many separate pieces as reliablewriter allows a buffer of that size."""
    return writer_settings_for(template, window, window).max_buffered_cost


class BufferBudget:
    """The pool of memory that upload windows are paid from, in total and per client."""

    def __init__(self, total: int, client_limit: int, metrics: ServerMetrics) -> None:
        self._total = total
        self._client_limit = client_limit
        self._reserved = 0
        self._per_client: dict[str, int] = {}
        self._metrics = metrics
        self._returned = trio.lowlevel.ParkingLot()

    @property
    def reserved(self) -> int:
        return self._reserved

    @property
    def available(self) -> int:
        return self._total - self._reserved

    def available_to(self, client: str) -> int:
        """What ``client`` could reserve now: its share's rest, or the pool's, the smaller."""
        return min(self.available, self._client_limit - self._per_client.get(client, 0))

    def charge(self, client: str, delta: int) -> bool:
        """Add ``delta`` bytes to ``client``'s reservations; a growth beyond what is available
        is refused (``False``, nothing changes), a decrease always succeeds."""
        if delta > 0 and delta > self.available_to(client):
            return False
        held = self._per_client.get(client, 0) + delta
        if held:
            self._per_client[client] = held
        else:
            self._per_client.pop(client, None)
        self._reserved += delta
        self._metrics.buffer_bytes.set(self._reserved)
        if delta < 0:
            self._returned.unpark_all()
        return True

    def reserve(self, client: str, amount: int) -> Reservation | None:
        """A reservation of ``amount`` bytes for ``client``, or ``None`` if it does not fit."""
        if not self.charge(client, amount):
            return None
        return Reservation(self, client, amount)

    async def acquire(self, client: str, amount: int, *, patience: float) -> Reservation:
        """Like :meth:`reserve`, but wait up to ``patience`` seconds for budget to come back.

        Raises a retryable TOO_BUSY if none came back in time; cancelled partway, nothing
        stays reserved.
        """
        reservation = Reservation(self, client, 0)
        await reservation.resize_waiting(amount, patience=patience)
        return reservation

    async def wait_returned(self) -> None:
        """Wait until some reservation shrinks."""
        await self._returned.park()


class Reservation:
    """Bytes of the budget held for one upload, charged to its client."""

    def __init__(self, budget: BufferBudget, client: str, amount: int) -> None:
        self._budget = budget
        self.client = client
        self._amount = amount

    @property
    def amount(self) -> int:
        return self._amount

    def resize(self, amount: int) -> bool:
        """Hold ``amount`` bytes from now on; growing fails (``False``) when it does not fit."""
        if not self._budget.charge(self.client, amount - self._amount):
            return False
        self._amount = amount
        return True

    async def resize_waiting(self, amount: int, *, patience: float) -> None:
        """:meth:`resize`, waiting up to ``patience`` seconds for room, then TOO_BUSY.

        Cancelled or refused, the reservation is as it was.
        """
        with trio.move_on_after(patience):
            while not self.resize(amount):
                await self._budget.wait_returned()
            return
        raise ServerError(
            ErrorCode.TOO_BUSY, "the proxy's buffer budget stayed exhausted; retry later"
        )

    def release(self) -> None:
        """Give everything back (idempotent)."""
        self.resize(0)


class UploadWindow:
    """One upload's credit window, paid for from its :class:`Reservation`.

    The window's end, as announced to clients, never goes down (:meth:`end`), so a write
    within any credit once granted stays within the current one.
    """

    def __init__(
        self, reservation: Reservation, template: WriterSettings, *, initial: int, largest: int
    ) -> None:
        self._reservation = reservation
        self._template = template
        self._size = initial
        self._initial = initial
        self._largest = largest
        self._announced_end = 0
        self._arrived = 0
        self._given_back = False
        self._costs: dict[int, int] = {}
        reservation.resize(max(reservation.amount, self._cost(initial)))

    @classmethod
    async def acquire(
        cls,
        budget: BufferBudget,
        client: str,
        template: WriterSettings,
        *,
        initial: int,
        largest: int,
        patience: float,
    ) -> UploadWindow:
        """A new upload's window of ``initial`` bytes, waiting up to ``patience`` for budget."""
        cost = window_cost(template, initial)
        reservation = await budget.acquire(client, cost, patience=patience)
        return cls(reservation, template, initial=initial, largest=largest)

    @property
    def size(self) -> int:
        return self._size

    def _cost(self, size: int) -> int:
        """:func:`window_cost` of ``size``, worked out once per size (asked for every write)."""
        cost = self._costs.get(size)
        if cost is None:
            cost = self._costs[size] = window_cost(self._template, size)
        return cost

    @property
    def reserved(self) -> int:
        return self._reservation.amount

    @property
    def fragment_allowance(self) -> int:
        """The memory the window's pieces may cost beyond its payload."""
        return self._cost(self._size) - self._size

    def end(self, committed: int) -> int:
        """Where the credit ends for a committed offset of ``committed``: never lower than
        any end returned before."""
        self._announced_end = max(self._announced_end, committed + self._size)
        return self._announced_end

    def grow_for(self, arrived: int) -> bool:
        """Count ``arrived`` bytes of payload; once half the window's size has arrived since
        it last grew, double it if the budget allows. Returns whether it grew; never waits.

        Bytes, not offsets: a client cannot grow its window by writing one byte at its end.
        """
        if self._given_back or self._size >= self._largest:
            return False
        self._arrived += arrived
        if self._arrived < self._size // 2:
            return False
        grown = min(self._largest, self._size * 2)
        if not self._reservation.resize(self._cost(grown)):
            return False
        self._size = grown
        self._arrived = 0
        return True

    def give_back(self, cost_now: int) -> None:
        """Nobody is attached: keep only ``cost_now``, what the buffer really holds."""
        self._given_back = True
        self._reservation.resize(min(self._reservation.amount, cost_now))

    async def take_back(self, committed: int, *, patience: float) -> None:
        """A connection attaches: pay for the window again, at least up to the end already
        announced, waiting up to ``patience`` (then TOO_BUSY, and still given back)."""
        if not self._given_back:
            return
        owed = max(self._initial, self._announced_end - committed)
        size = min(self._largest, -(-owed // CHUNK_QUANTUM) * CHUNK_QUANTUM)
        cost = max(self._reservation.amount, self._cost(size))
        await self._reservation.resize_waiting(cost, patience=patience)
        self._size = size
        self._given_back = False

    def release(self) -> None:
        self._reservation.release()
