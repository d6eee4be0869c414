"""One proxied TCP connection: both directions, their faults, their timers, and how it ends.

:class:`Relay` carries out the fault engine's actions (:mod:`faultnet.engine`) between two
sockets. Upstream faults act on what the client sends, downstream faults on what the
server sends back. A ``reset_peer`` (or a reset from either side) resets both sides; a
``limit_data``, a ``limit_time`` or an EOF-less failure closes both; an EOF from one side
becomes an EOF (half-close) towards the other. A stall that never ends keeps its
direction stuck, reading and dropping what arrives (as Toxiproxy's ``timeout`` does), so
that the sender closing still ends the connection.

Waits are scheduled on a :class:`~faultnet.engine.Timeline`, so a ``bandwidth`` limit
holds over a long transfer although each sleep and write takes a little longer than
planned. A direction with ``latency`` reads ahead into a bounded buffer while earlier bytes
wait, stamping each read with its arrival time: the delay is then a pipe's (every byte
late by the same amount) instead of a queue's (the delay added once per read).
"""

from __future__ import annotations

import errno
import math
import socket
import struct
from collections.abc import Callable, Sequence
from contextlib import suppress

import trio

from faultnet.engine import (
    Action,
    Close,
    ConnectionFaults,
    Delay,
    DirectionFaults,
    Forward,
    Freeze,
    Reset,
    Timeline,
    Timer,
)
from faultnet.plan import Toxic

__all__ = ["READ_AHEAD_BYTES", "RELAY_CHUNK", "Relay"]

#: bytes asked for per receive: big enough that per-call Python overhead is noise next to
#: the copy itself, which is what lets the no-toxic path keep up with loopback.
RELAY_CHUNK = 1024 * 1024

#: bytes a direction with latency may hold while they wait (plus one read): room for the
#: bandwidth-delay product of every network profile (50 MB/s x 40 ms = 2 MB)
READ_AHEAD_BYTES = 2 * 1024 * 1024


def _is_reset(exc: BaseException) -> bool:
    cause = exc.__cause__
    return isinstance(cause, OSError) and cause.errno in (errno.ECONNRESET, errno.EPIPE)


def _abort(stream: trio.abc.Stream) -> None:
    """Make the next close send an RST instead of a FIN, when the stream is a real socket."""
    if isinstance(stream, trio.SocketStream) and stream.socket.fileno() != -1:
        # If the socket is already dead, a plain close is all that is left to do.
        with suppress(OSError):
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _ByteBudget:
    """How many bytes a read-ahead holds; the reader waits while it is over its limit."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._held = 0
        self._room = trio.Event()

    async def wait_for_room(self) -> None:
        while self._held >= self._limit:
            self._room = trio.Event()
            await self._room.wait()

    def take(self, nbytes: int) -> None:
        self._held += nbytes

    def give_back(self, nbytes: int) -> None:
        self._held -= nbytes
        self._room.set()


class Relay:
    """Both directions of one proxied connection. Build it, then :meth:`run` it."""

    def __init__(
        self, client: trio.SocketStream, server: trio.SocketStream, faults: ConnectionFaults
    ) -> None:
        self._client = client
        self._server = server
        self._faults = faults
        self._scope = trio.CancelScope()
        self._timers: trio.Nursery | None = None
        self._reset = False
        self._holds: set[trio.CancelScope] = set()

    def change_toxics(self, toxics: Sequence[Toxic]) -> None:
        """Give the open connection a new list of toxics, as Toxiproxy does.

        Toxics that stay keep their state, new ones start now (their timers too), and one
        taken away stops: an endless stall or ``timeout`` it caused lets data through again
        (what arrived meanwhile stays dropped). A wait already under way runs its course.
        """
        self._faults.change(toxics)
        if self._timers is not None:
            self._arm(self._faults.upstream)
            self._arm(self._faults.downstream)
        for hold in self._holds:
            hold.cancel()  # each looks again whether its freeze still holds

    async def run(self) -> None:
        """Relay until both directions have ended, or one of them ends the connection.

        Returns with both streams still open (but set to reset if they should); the
        caller closes them. Cancelling it stops both directions where they are.
        """
        with self._scope:
            async with trio.open_nursery() as timers:
                self._timers = timers
                self._arm(self._faults.upstream)
                self._arm(self._faults.downstream)
                async with trio.open_nursery() as pumps:
                    pumps.start_soon(self._pump, self._client, self._server, self._faults.upstream)
                    pumps.start_soon(
                        self._pump, self._server, self._client, self._faults.downstream
                    )
                timers.cancel_scope.cancel()  # the connection is over: its timers are moot
        if self._reset:
            _abort(self._client)
            _abort(self._server)

    def _end_connection(self, *, reset: bool) -> None:
        """End both directions now: each pump stops at its next checkpoint."""
        self._reset = self._reset or reset
        self._scope.cancel()

    def _arm(self, faults: DirectionFaults) -> None:
        assert self._timers is not None
        for timer in faults.take_timers():
            self._timers.start_soon(self._expire, faults, timer)

    async def _expire(self, faults: DirectionFaults, timer: Timer) -> None:
        await trio.sleep(timer.seconds)
        ending = faults.fire(timer)
        if ending is not None:
            self._end_connection(reset=isinstance(ending, Reset))

    async def _pump(
        self,
        source: trio.abc.HalfCloseableStream,
        sink: trio.abc.HalfCloseableStream,
        faults: DirectionFaults,
    ) -> None:
        timeline = Timeline()
        arrivals = _Arrivals(source)
        async with trio.open_nursery() as nursery:
            if faults.delays_from_arrival:
                await nursery.start(arrivals.read_ahead, self._end_connection)
            try:
                while (item := await arrivals.next()) is not None:
                    arrival, data = item
                    for action in faults.feed(data):
                        await self._perform(action, sink, faults, timeline, arrival, arrivals)
                    self._arm(faults)
                for action in faults.finish():
                    now = trio.current_time()
                    await self._perform(action, sink, faults, timeline, now, arrivals)
                await sink.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                # One direction failing ends the connection; a reset stays a reset.
                self._end_connection(reset=_is_reset(exc))

    async def _perform(
        self,
        action: Action,
        sink: trio.abc.SendStream,
        faults: DirectionFaults,
        timeline: Timeline,
        arrival: float,
        arrivals: _Arrivals,
    ) -> None:
        match action:
            case Forward(data=data):
                await sink.send_all(data)
                faults.forwarded(len(data))
            case Freeze(seconds=None):
                await self._hold(action, faults, arrivals)
            case Delay() | Freeze():
                now = trio.current_time()
                await trio.sleep_until(timeline.deadline(action, now=now, arrival=arrival))
            case Reset():
                self._end_connection(reset=True)
            case Close():
                self._end_connection(reset=False)

    async def _hold(self, freeze: Freeze, faults: DirectionFaults, arrivals: _Arrivals) -> None:
        """Drop what arrives while an endless freeze holds.

        The sender ending ends the connection. The toxic behind the freeze being taken
        away lets data through again: a read that the change interrupts loses nothing,
        and bytes read once the toxic is gone go back to be relayed.
        """
        while faults.holds(freeze.by):
            with trio.CancelScope() as scope:
                self._holds.add(scope)
                try:
                    item = await arrivals.next()
                finally:
                    self._holds.discard(scope)
            if scope.cancelled_caught:
                continue  # the toxics changed: look again whether the freeze still holds
            if item is None:
                self._end_connection(reset=False)
                return
            if not faults.holds(freeze.by):
                arrivals.push_back(item)


class _Arrivals:
    """Where one direction's bytes come from, each with its arrival time.

    Straight from the socket, or, after :meth:`read_ahead` has started, from a bounded
    buffer that a reader task fills while earlier bytes wait. :meth:`next` is safe to
    cancel: nothing is lost. One item can be pushed back to come out next.
    """

    def __init__(self, source: trio.abc.ReceiveStream) -> None:
        self._source = source
        self._pushed_back: list[tuple[float, bytes | bytearray]] = []
        self._waiting: trio.MemoryReceiveChannel[tuple[float, bytes | bytearray]] | None = None
        self._budget = _ByteBudget(READ_AHEAD_BYTES)

    async def next(self) -> tuple[float, bytes | bytearray] | None:
        """The next bytes and when they arrived; ``None`` at the end."""
        if self._pushed_back:
            return self._pushed_back.pop()
        if self._waiting is None:
            data = await self._source.receive_some(RELAY_CHUNK)
            return (trio.current_time(), data) if data else None
        try:
            arrival, data = await self._waiting.receive()
        except trio.EndOfChannel:
            return None
        self._budget.give_back(len(data))
        return arrival, data

    def push_back(self, item: tuple[float, bytes | bytearray]) -> None:
        self._pushed_back.append(item)

    async def read_ahead(
        self,
        end_connection: Callable[..., None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Read into the buffer until the end, stamping each read with its arrival."""
        arrivals, self._waiting = trio.open_memory_channel[tuple[float, bytes | bytearray]](
            math.inf
        )
        task_status.started()
        async with arrivals:
            try:
                while True:
                    await self._budget.wait_for_room()
                    data = await self._source.receive_some(RELAY_CHUNK)
                    if not data:
                        return
                    self._budget.take(len(data))
                    await arrivals.send((trio.current_time(), data))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                end_connection(reset=_is_reset(exc))
