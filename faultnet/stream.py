"""Fault injection for trio streams: :class:`FaultyStream`, :class:`FaultyListener`, and
:func:`open_tcp_stream`.

A :class:`FaultyStream` wraps any :class:`trio.abc.HalfCloseableStream` and puts what it
sends and receives through a connection's faults (:mod:`faultnet.engine`). Toxic
directions are those of the plan: upstream is client -> server. A client-side stream (the
default, and what :func:`open_tcp_stream` makes) applies upstream toxics to what it sends
and downstream toxics to what it receives; a server-side stream (what
:class:`FaultyListener` accepts) does the opposite, so one plan describes one network
whichever end it is injected at.

Errors follow trio's convention. Once a fault has reset the connection it stays reset, as a
kernel's would: every later send or receive raises :class:`trio.BrokenResourceError` whose
``__cause__`` is ``OSError(ECONNRESET)``. A ``limit_data`` close makes later receives see
end-of-file and later sends raise :class:`trio.BrokenResourceError` caused by
``OSError(EPIPE)``. Closing the stream ourselves gives :class:`trio.ClosedResourceError`.
Delays and stalls sleep on trio's clock, so tests can run them on virtual time.
"""

from __future__ import annotations

import errno
import math
import random
import socket
import struct
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import trio

from faultnet.counters import FaultCounters
from faultnet.engine import (
    Action,
    Close,
    ConnectionFaults,
    Delay,
    DirectionFaults,
    Forward,
    Freeze,
    Reset,
)
from faultnet.plan import FaultPlan, Toxic

__all__ = ["FaultyListener", "FaultyStream", "open_tcp_stream"]

Buffer = bytes | bytearray | memoryview


class FaultyStream(trio.abc.HalfCloseableStream):
    """A :class:`trio.abc.HalfCloseableStream` whose traffic passes through faults.

    ``toxics`` are this connection's toxics (``plan.for_connection(index)``), ``rng`` the
    random source of their choices (jitter, slice sizes), ``counters`` where bytes and
    faults are totalled. ``server_side`` says which end of the connection this is, and so
    which toxics act on sends (see the module docstring). With no toxics the stream
    behaves exactly like the one it wraps.
    """

    def __init__(
        self,
        transport_stream: trio.abc.HalfCloseableStream,
        toxics: Sequence[Toxic] = (),
        *,
        rng: random.Random | None = None,
        counters: FaultCounters | None = None,
        server_side: bool = False,
    ) -> None:
        self.transport_stream = transport_stream
        self.faults = ConnectionFaults(toxics, rng=rng, counters=counters)
        self._outgoing: DirectionFaults
        self._incoming: DirectionFaults
        if server_side:
            self._outgoing, self._incoming = self.faults.downstream, self.faults.upstream
        else:
            self._outgoing, self._incoming = self.faults.upstream, self.faults.downstream
        self._pending: deque[Action] = deque()  # received, not yet handed to the reader
        self._send_resume_at = -math.inf  # trio time when a send-side delay/stall ends
        self._receive_resume_at = -math.inf
        self._waits: set[trio.CancelScope] = set()
        self._send_conflict = _ConflictDetector("sending")
        self._receive_conflict = _ConflictDetector("receiving")
        self._closed = False
        self._reset = False
        self._limit_closed = False
        self._outgoing_finished = False
        self._incoming_finished = False

    @classmethod
    def for_connection(
        cls,
        transport_stream: trio.abc.HalfCloseableStream,
        plan: FaultPlan,
        index: int,
        *,
        counters: FaultCounters | None = None,
        server_side: bool = False,
    ) -> FaultyStream:
        """Wrap connection number ``index`` under ``plan``; deterministic per plan and index."""
        return cls(
            transport_stream,
            plan.for_connection(index),
            rng=plan.rng(index, "faults"),
            counters=counters,
            server_side=server_side,
        )

    # -- sending -----------------------------------------------------------------------

    async def send_all(self, data: Buffer) -> None:
        """Send ``data`` through the outgoing faults.

        If a fault ends the connection partway, the bytes before it were sent and this
        raises; if it ends the connection right after the last byte, the next call raises.
        Cancellation partway leaves an unknown prefix sent, as with any trio stream; a delay
        or stall that was under way still holds the next send until it would have ended.
        """
        with self._send_conflict:
            self._check_usable()
            await self._wait_until(self._send_resume_at)
            if not data:
                with self._fault_errors():
                    await self.transport_stream.send_all(data)
                return
            total = memoryview(data).nbytes
            sent = 0
            for action in self._outgoing.feed(data):
                if isinstance(action, Forward):
                    with self._fault_errors():
                        await self.transport_stream.send_all(action.data)
                    self._outgoing.forwarded(len(action.data))
                    sent += len(action.data)
                elif isinstance(action, Delay | Freeze):
                    self._send_resume_at = _resume_at(action)
                    await self._wait_until(self._send_resume_at)
                else:
                    await self._end(action)
            if sent < total:
                self._check_usable()

    async def wait_send_all_might_not_block(self) -> None:
        with self._send_conflict:
            self._check_usable()
            await self._wait_until(self._send_resume_at)
            with self._fault_errors():
                await self.transport_stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """Half-close, after the outgoing ``slow_close`` delay if there is one."""
        with self._send_conflict:
            self._check_usable()
            await self._finish_outgoing()
            with self._fault_errors():
                await self.transport_stream.send_eof()

    # -- receiving ---------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Receive through the incoming faults; short reads are how ``slicer`` shows up.

        Cancellation loses nothing: bytes already read from the transport stay queued for
        the next call, and a delay or stall under way keeps its deadline.
        """
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        with self._receive_conflict:
            while True:
                self._check_open()
                await self._wait_until(self._receive_resume_at)
                if not self._pending:
                    if self._limit_closed:
                        return b""
                    try:
                        chunk = await self.transport_stream.receive_some(max_bytes)
                    except trio.ClosedResourceError:
                        # A fault on the sending side may have closed the transport under us.
                        self._check_open()
                        if self._limit_reached():
                            return b""
                        raise
                    if chunk:
                        self._pending.extend(self._incoming.feed(chunk))
                    elif not self._incoming_finished:
                        self._incoming_finished = True  # a slow close delays the EOF, once
                        self._pending.extend(self._incoming.finish())
                    if not self._pending:
                        return b""
                    continue
                action = self._pending.popleft()
                if isinstance(action, Forward):
                    return self._deliver(action.data, max_bytes)
                if isinstance(action, Delay | Freeze):
                    self._receive_resume_at = _resume_at(action)
                else:
                    await self._end(action)

    def _deliver(self, data: bytes | memoryview, max_bytes: int | None) -> bytes:
        if max_bytes is not None and len(data) > max_bytes:
            self._pending.appendleft(Forward(data[max_bytes:]))
            data = data[:max_bytes]
        self._incoming.forwarded(len(data))
        whole = data.obj if isinstance(data, memoryview) else None
        if type(whole) is bytes and len(whole) == len(data):
            return whole  # the transport's own chunk, untouched: no copy
        return bytes(data)

    # -- closing -----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close, after the outgoing ``slow_close`` delay if there is one.

        Tasks blocked in a fault's delay or stall on this stream get
        :class:`trio.ClosedResourceError`. If cancelled during the delay, the stream is
        closed at once anyway.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        for scope in self._waits:
            scope.cancel()
        try:
            if not (self._reset or self._limit_closed):
                await self._finish_outgoing()
        except trio.Cancelled:
            await trio.aclose_forcefully(self.transport_stream)
            raise
        await self.transport_stream.aclose()

    async def _finish_outgoing(self) -> None:
        if self._outgoing_finished:
            return
        self._outgoing_finished = True
        for delay in self._outgoing.finish():
            if isinstance(delay, Delay | Freeze):
                self._send_resume_at = _resume_at(delay)
                await self._wait_until(self._send_resume_at)

    # -- faults ------------------------------------------------------------------------

    async def _end(self, action: Reset | Close) -> None:
        self._pending.clear()  # a connection that is gone delivers nothing more
        if isinstance(action, Reset):
            self._reset = True
            _arm_rst(self.transport_stream)
        else:
            self._limit_closed = True
        await trio.aclose_forcefully(self.transport_stream)

    def _limit_reached(self) -> bool:
        # a method, not the bare attribute: another task may set it while we are suspended
        return self._limit_closed

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this FaultyStream was closed")
        if self._reset:
            raise trio.BrokenResourceError(
                "connection reset by fault injection (reset_peer)"
            ) from ConnectionResetError(errno.ECONNRESET, "connection reset by peer")

    def _check_usable(self) -> None:
        """For sends: also fails once ``limit_data`` has closed the connection."""
        self._check_open()
        if self._limit_closed:
            raise trio.BrokenResourceError(
                "connection closed by fault injection (limit_data)"
            ) from BrokenPipeError(errno.EPIPE, "broken pipe")

    async def _wait_until(self, deadline: float) -> None:
        """Sleep until a delay or stall ends; :meth:`aclose` cuts it short."""
        with trio.CancelScope() as scope:
            self._waits.add(scope)
            try:
                await trio.sleep_until(deadline)
            finally:
                self._waits.discard(scope)
        if scope.cancelled_caught:
            raise trio.ClosedResourceError("this FaultyStream was closed")

    @contextmanager
    def _fault_errors(self) -> Iterator[None]:
        """Report a transport that a fault closed under us as that fault, not as our close.

        A reset or ``limit_data`` on one direction closes the transport while another task
        may be inside it on the other direction; that task must see the fault's error.
        """
        try:
            yield
        except trio.ClosedResourceError:
            if not self._closed:
                self._check_usable()
            raise


class _ConflictDetector:
    """trio streams reject two tasks sending (or receiving) at once with BusyResourceError.

    The wrapped stream would only notice once we reach it, after a fault's sleep, so we
    check on entry.
    """

    def __init__(self, activity: str) -> None:
        self._activity = activity
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(f"another task is already {self._activity} on this stream")
        self._held = True

    def __exit__(self, *exc_info: object) -> None:
        self._held = False


def _resume_at(action: Delay | Freeze) -> float:
    seconds = action.seconds
    return math.inf if seconds is None else trio.current_time() + seconds


def _arm_rst(stream: Any) -> None:
    """Make closing ``stream`` send an RST, if a real TCP socket is underneath it."""
    while stream is not None:
        if isinstance(stream, trio.SocketStream):
            if stream.socket.family in (socket.AF_INET, socket.AF_INET6):
                stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        stream = getattr(stream, "transport_stream", None)  # e.g. trio.SSLStream


class FaultyListener(trio.abc.Listener[FaultyStream]):
    """Wraps a listener so every accepted stream is a server-side :class:`FaultyStream`.

    Connections are numbered in accept order from 0, so the plan's choices for each
    connection are repeatable.
    """

    def __init__(
        self,
        transport_listener: trio.abc.Listener[trio.abc.HalfCloseableStream],
        plan: FaultPlan,
        *,
        counters: FaultCounters | None = None,
    ) -> None:
        self.transport_listener = transport_listener
        self.plan = plan
        self.counters = counters
        self._next_index = 0

    async def accept(self) -> FaultyStream:
        stream = await self.transport_listener.accept()
        index = self._next_index
        self._next_index += 1
        return FaultyStream.for_connection(
            stream, self.plan, index, counters=self.counters, server_side=True
        )

    async def aclose(self) -> None:
        await self.transport_listener.aclose()


async def open_tcp_stream(
    host: str | bytes,
    port: int,
    *,
    plan: FaultPlan,
    index: int,
    counters: FaultCounters | None = None,
    **kwargs: Any,
) -> FaultyStream:
    """:func:`trio.open_tcp_stream`, wrapped as client-side connection ``index`` of ``plan``.

    The caller numbers its connections (0, 1, ...): that number picks the toxics, so a
    client opening N connections gets the same faults on every run. ``kwargs`` go to
    :func:`trio.open_tcp_stream`. Cancellation while connecting leaves nothing open.
    """
    stream = await trio.open_tcp_stream(host, port, **kwargs)
    return FaultyStream.for_connection(stream, plan, index, counters=counters)
