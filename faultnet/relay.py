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
from collections.abc import Awaitable, Callable
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
        try:
            if faults.delays_from_arrival:
                await self._pump_reading_ahead(source, sink, faults, timeline)
            else:
                while data := await source.receive_some(RELAY_CHUNK):
                    arrival = trio.current_time()
                    await self._move(
                        data, arrival, sink, faults, timeline, _drain_by_reading(source)
                    )
            for action in faults.finish():
                now = trio.current_time()
                await self._perform(action, sink, faults, timeline, now, _drain_by_reading(source))
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # One direction failing ends the connection; a reset stays a reset.
            self._end_connection(reset=_is_reset(exc))

    async def _pump_reading_ahead(
        self,
        source: trio.abc.ReceiveStream,
        sink: trio.abc.SendStream,
        faults: DirectionFaults,
        timeline: Timeline,
    ) -> None:
        arrivals, waiting = trio.open_memory_channel[tuple[float, bytes | bytearray]](math.inf)
        budget = _ByteBudget(READ_AHEAD_BYTES)

        async def read_ahead() -> None:
            async with arrivals:
                try:
                    while True:
                        await budget.wait_for_room()
                        data = await source.receive_some(RELAY_CHUNK)
                        if not data:
                            return
                        budget.take(len(data))
                        await arrivals.send((trio.current_time(), data))
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._end_connection(reset=_is_reset(exc))

        async def drain() -> None:
            async for _ in waiting:
                pass

        async with trio.open_nursery() as nursery, waiting:
            nursery.start_soon(read_ahead)
            async for arrival, data in waiting:
                budget.give_back(len(data))
                await self._move(data, arrival, sink, faults, timeline, drain)

    async def _move(
        self,
        data: bytes | bytearray,
        arrival: float,
        sink: trio.abc.SendStream,
        faults: DirectionFaults,
        timeline: Timeline,
        drain: Callable[[], Awaitable[None]],
    ) -> None:
        for action in faults.feed(data):
            await self._perform(action, sink, faults, timeline, arrival, drain)
        self._arm(faults)

    async def _perform(
        self,
        action: Action,
        sink: trio.abc.SendStream,
        faults: DirectionFaults,
        timeline: Timeline,
        arrival: float,
        drain: Callable[[], Awaitable[None]],
    ) -> None:
        match action:
            case Forward(data=data):
                await sink.send_all(data)
                faults.forwarded(len(data))
            case Freeze(seconds=None):
                await drain()  # drop what arrives until the sender gives up
                self._end_connection(reset=False)
            case Delay() | Freeze():
                now = trio.current_time()
                await trio.sleep_until(timeline.deadline(action, now=now, arrival=arrival))
            case Reset():
                self._end_connection(reset=True)
            case Close():
                self._end_connection(reset=False)


def _drain_by_reading(source: trio.abc.ReceiveStream) -> Callable[[], Awaitable[None]]:
    """A drain for a direction that reads as it goes: read and drop until EOF."""

    async def drain() -> None:
        while await source.receive_some(RELAY_CHUNK):
            pass

    return drain
