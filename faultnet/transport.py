"""Fault injection for the HTTP leg: a ``requests`` adapter whose sockets misbehave on cue.

google-cloud-storage sends every request through a ``requests.Session``, so a session with a
:class:`FaultyHTTPAdapter` mounted puts the proxy -> GCS leg under a :class:`FaultPlan`::

    session = faulty_session(FaultPlan.parse("reset_peer:up(after=300k)~0.5; seed=4"))
    client = storage.Client(project="p", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": url}, _http=session)

Each new HTTP connection gets the next connection index of its adapter (0, 1, 2, ...), so
``plan.for_connection(index)`` decides its toxics. Upstream toxics act on the request bytes
the client sends, downstream toxics on the response bytes it receives. Positions such as
``after=N`` count from the connection's first byte, across the keep-alive requests it
carries.

Where the socket is wrapped: after ``connect()``, which for HTTPS means *after* the TLS
handshake, around the TLS socket. Faults therefore act on the HTTP bytes, not on TLS
records: ``after=N`` means the same request byte over http and https, and ``corrupt``
exercises the application's own integrity checks (crc32c, md5) instead of merely tripping
TLS's MAC. The TCP-level effects stay real: a reset sends an RST (``SO_LINGER`` 0) on the
underlying TCP socket, and ``limit_data`` shuts it down (a FIN, as from a peer that closed).
Neither leaves urllib3 holding a dead descriptor: a connection a fault ended polls as
readable, as a kernel socket the peer closed or reset does, so urllib3 replaces it when it
comes out of the pool instead of failing on it.

How stalls end, and so how a progress timeout fires: a :class:`~faultnet.engine.Freeze`
(or a delay) blocks the calling thread for its duration, but never longer than the
socket's timeout -- the ``timeout=`` given to requests -- after which the operation raises
:class:`TimeoutError` exactly as a stalled kernel socket does, and requests reports a
timeout. The stall is still in force for the next operation on that socket. A stall also
ends, with ``OSError(EBADF)``, as soon as its socket is closed from another thread:
:meth:`FaultyHTTPAdapter.abort_connections` does that for every live connection, which is
how a watchdog can unblock a worker thread stuck in a ``stall`` with no socket timeout.
"""

from __future__ import annotations

import contextlib
import errno
import io
import math
import socket
import struct
import threading
import time
import weakref
from collections import deque
from typing import Any

from requests import Session
from requests.adapters import DEFAULT_POOLBLOCK, HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool
from urllib3.poolmanager import PoolManager

from faultnet.counters import FaultCounters
from faultnet.engine import (
    Action,
    Close,
    ConnectionFaults,
    Delay,
    Forward,
    Freeze,
    Reset,
    freeze_deadline,
)
from faultnet.plan import FaultPlan

__all__ = ["FaultyHTTPAdapter", "FaultySocket", "faulty_session"]

Buffer = bytes | bytearray | memoryview


class FaultySocket:
    """A connected blocking socket (plain or TLS) whose traffic passes a connection's faults.

    It stands in for the socket of an ``http.client`` connection: ``sendall``/``send`` feed
    the upstream engine, ``recv``/``recv_into``/``makefile("rb")`` read through the
    downstream engine. Any other attribute is the wrapped socket's.

    Failure modes match a kernel socket's, because urllib3 relies on them:

    * after a reset, every send and receive raises :class:`ConnectionResetError` (sticky).
      urllib3 swallows that error while it sends a request body and goes on to read the
      response; the read then fails too, which requests reports as a ``ConnectionError``;
    * after ``limit_data`` shut the connection down, sends raise :class:`BrokenPipeError`
      and receives return ``b""``;
    * either way the socket keeps a descriptor, until its owner closes it, that polls as
      readable: urllib3 checks a pooled connection that way before reusing it;
    * ``settimeout`` after the owner closed the socket is a no-op, as urllib3 expects.

    Meant for one thread at a time, like the connection it belongs to; only :meth:`close`
    may come from another thread, and it wakes an operation sleeping in a fault.
    """

    def __init__(self, sock: socket.socket, faults: ConnectionFaults) -> None:
        self._sock = sock
        self._faults = faults
        self._timeout = sock.gettimeout()
        self._closed = False  # our owner closed us
        self._woken = threading.Event()  # set by close() to cut sleeps and stalls short
        self._reset = False  # a reset_peer fired: sticky ECONNRESET
        self._limit_closed = False  # limit_data fired: EPIPE on send, EOF on receive
        self._seen_eof = False
        self._pending: deque[Action] = deque()  # downstream actions not yet delivered
        self._send_resume_at = 0.0  # time.monotonic() when a send-side delay/stall ends
        self._recv_resume_at = 0.0
        self._io_refs = 0  # open makefile() readers keep the real socket open, as socket does

    # -- sending -----------------------------------------------------------------------

    def sendall(self, data: Buffer, flags: int = 0) -> None:
        """Send all of ``data`` through the upstream faults.

        If a fault ends the connection partway, the bytes before it were sent and the call
        raises; if it ends exactly at the end of ``data``, the next call raises.
        """
        self._check_can_send()
        self._wait_until(self._send_resume_at)
        total = memoryview(data).nbytes
        sent = 0
        for action in self._faults.upstream.feed(data):
            if isinstance(action, Forward):
                self._sock.sendall(action.data, flags)
                self._faults.upstream.forwarded(len(action.data))
                sent += len(action.data)
            elif isinstance(action, Delay | Freeze):
                self._send_resume_at = _resume_at(action)
                self._wait_until(self._send_resume_at)
            else:
                self._end(action)
        if sent < total:
            self._check_can_send()

    def send(self, data: Buffer, flags: int = 0) -> int:
        self.sendall(data, flags)
        return memoryview(data).nbytes

    # -- receiving ---------------------------------------------------------------------

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        return bytes(self._receive(bufsize))

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0, flags: int = 0) -> int:
        target = memoryview(buffer).cast("B")
        data = self._receive(nbytes or len(target))
        target[: len(data)] = data
        return len(data)

    def _receive(self, max_bytes: int) -> bytes | memoryview:
        while True:
            self._wait_until(self._recv_resume_at)
            if self._reset:
                raise _connection_reset()
            if not self._pending:
                if self._limit_closed:
                    return b""
                if self._closed and self._io_refs == 0:
                    raise OSError(errno.EBADF, "socket is closed")
                chunk = self._sock.recv(max_bytes)
                if chunk:
                    self._pending.extend(self._faults.downstream.feed(chunk))
                    continue
                if not self._seen_eof:
                    self._seen_eof = True  # a slow close delays the EOF, once
                    for delay in self._faults.downstream.finish():
                        self._pending.append(delay)
                    if self._pending:
                        continue
                return b""
            action = self._pending.popleft()
            if isinstance(action, Forward):
                piece = action.data
                if len(piece) > max_bytes:
                    self._pending.appendleft(Forward(piece[max_bytes:]))
                    piece = piece[:max_bytes]
                self._faults.downstream.forwarded(len(piece))
                return piece
            if isinstance(action, Delay | Freeze):
                self._recv_resume_at = _resume_at(action)
            else:
                self._end(action)

    def makefile(self, mode: str = "r", buffering: int | None = None, **_: Any) -> io.IOBase:
        """A binary reader over :meth:`recv_into`; ``http.client`` reads responses with it."""
        if set(mode) - {"r", "b"}:
            raise ValueError(f"FaultySocket.makefile supports reading only, not mode {mode!r}")
        self._io_refs += 1
        raw = _Reader(self)
        if buffering == 0:
            return raw
        return io.BufferedReader(raw, buffering or io.DEFAULT_BUFFER_SIZE)

    # -- socket housekeeping -----------------------------------------------------------

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout
        if self._sock.fileno() != -1:
            self._sock.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self._timeout

    def fileno(self) -> int:
        return self._sock.fileno()

    def shutdown(self, how: int) -> None:
        if self._sock.fileno() != -1:
            self._sock.shutdown(how)

    def close(self) -> None:
        """Close the socket; a thread sleeping in a fault on it wakes with ``EBADF``."""
        self._closed = True
        self._woken.set()
        if self._io_refs == 0:
            self._sock.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)  # never recurse while __init__ is still running
        return getattr(self._sock, name)

    def __repr__(self) -> str:
        return f"<FaultySocket fd={self._sock.fileno()} toxics={len(self._faults.toxics)}>"

    def _release_reader(self) -> None:
        self._io_refs -= 1
        if self._closed and self._io_refs == 0:
            self._sock.close()

    # -- faults ------------------------------------------------------------------------

    def _check_can_send(self) -> None:
        if self._reset:
            raise _connection_reset()
        if self._limit_closed:
            raise BrokenPipeError(errno.EPIPE, "connection closed by fault injection (limit_data)")
        if self._closed:
            raise OSError(errno.EBADF, "socket is closed")

    def _end(self, action: Reset | Close) -> None:
        """End the connection as the fault says; closing the descriptor stays the owner's job."""
        self._pending.clear()
        if isinstance(action, Reset):
            self._reset = True
            self._sock = _abort(self._sock)
            return
        self._limit_closed = True
        # The peer may be gone already; then there is nothing left to shut down.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _wait_until(self, deadline: float) -> None:
        """Block until ``deadline``, but no longer than the socket timeout, like a kernel."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        timeout = self._timeout
        times_out = timeout is not None and timeout < remaining
        wait = timeout if times_out else (None if math.isinf(remaining) else remaining)
        if self._woken.wait(wait):
            raise OSError(errno.EBADF, "socket closed while a fault held it")
        if times_out:
            raise TimeoutError("timed out")


class _Reader(io.RawIOBase):
    def __init__(self, sock: FaultySocket) -> None:
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._sock.recv_into(buffer)

    def close(self) -> None:
        if not self.closed:
            self._sock._release_reader()
        super().close()


def _resume_at(action: Delay | Freeze) -> float:
    if isinstance(action, Delay):
        return time.monotonic() + action.seconds
    return freeze_deadline(time.monotonic(), action)


def _connection_reset() -> ConnectionResetError:
    return ConnectionResetError(errno.ECONNRESET, "connection reset by fault injection")


def _abort(sock: socket.socket) -> socket.socket:
    """Reset ``sock`` with a real RST; returns the descriptor that stands in for it.

    Only closing a socket with ``SO_LINGER`` 0 sends an RST, but a socket reset by its
    peer keeps its descriptor until its owner closes it, and that descriptor polls as
    readable. The stand-in, a socket whose other end is already closed, does the same, so
    urllib3's liveness check on a pooled connection sees it dead rather than failing on a
    closed descriptor.
    """
    if sock.fileno() == -1:
        return sock  # its owner closed it already: nothing left to reset
    stand_in, other_end = socket.socketpair()
    other_end.close()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()
    return stand_in


class _SocketWrapping:
    """Shared by the HTTP and HTTPS connection classes: wrap the socket once connected."""

    sock: Any

    def __init__(self, *args: Any, wrap_socket: _WrapSocket, **kwargs: Any) -> None:
        self._wrap_socket = wrap_socket
        super().__init__(*args, **kwargs)

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self.sock = self._wrap_socket(self.sock)


class FaultyHTTPConnection(_SocketWrapping, HTTPConnection):
    pass


class FaultyHTTPSConnection(_SocketWrapping, HTTPSConnection):
    pass


class _WrapSocket:
    """Numbers the connections of one adapter and wraps each one's socket."""

    def __init__(self, plan: FaultPlan, counters: FaultCounters) -> None:
        self.plan = plan
        self.counters = counters
        self._lock = threading.Lock()
        self._next_index = 0
        self._live: weakref.WeakSet[FaultySocket] = weakref.WeakSet()

    def __call__(self, sock: socket.socket) -> FaultySocket:
        with self._lock:
            index = self._next_index
            self._next_index += 1
        faulty = FaultySocket(
            sock, ConnectionFaults.for_connection(self.plan, index, self.counters)
        )
        with self._lock:
            self._live.add(faulty)
        return faulty

    def abort_all(self) -> int:
        with self._lock:
            live = [s for s in self._live if not s.closed]
        for sock in live:
            sock.close()
        return len(live)


class _FaultyPoolManager(PoolManager):
    def __init__(self, *args: Any, wrap_socket: _WrapSocket, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wrap_socket = wrap_socket

    def _new_pool(
        self,
        scheme: str,
        host: str,
        port: int,
        request_context: dict[str, Any] | None = None,
    ) -> HTTPConnectionPool:
        pool = super()._new_pool(scheme, host, port, request_context)
        pool.ConnectionCls = FaultyHTTPSConnection if scheme == "https" else FaultyHTTPConnection
        pool.conn_kw["wrap_socket"] = self._wrap_socket
        return pool


class FaultyHTTPAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` whose every new connection is subject to ``plan``.

    ``counters`` (a new :class:`FaultCounters` if not given) totals the bytes and faults of
    all its connections. Proxies are not supported: a session should not route around the
    faults (:func:`faulty_session` turns off proxies from the environment).
    """

    def __init__(
        self, plan: FaultPlan, counters: FaultCounters | None = None, **kwargs: Any
    ) -> None:
        self.plan = plan
        self.counters = counters if counters is not None else FaultCounters()
        # before super().__init__, which builds the pool manager
        self._wrap_socket = _WrapSocket(plan, self.counters)
        super().__init__(**kwargs)

    def init_poolmanager(
        self,
        connections: int,
        maxsize: int,
        block: bool = DEFAULT_POOLBLOCK,
        **pool_kwargs: Any,
    ) -> None:
        self._pool_connections = connections
        self._pool_maxsize = maxsize
        self._pool_block = block
        self.poolmanager = _FaultyPoolManager(
            num_pools=connections,
            maxsize=maxsize,
            block=block,
            wrap_socket=self._wrap_socket,
            **pool_kwargs,
        )

    def abort_connections(self) -> int:
        """Close every live connection, waking threads held by a fault; returns how many.

        The threads get ``OSError(EBADF)``, which requests reports as a connection error.
        """
        return self._wrap_socket.abort_all()

    def close(self) -> None:
        super().close()
        self.abort_connections()


def faulty_session(
    plan: FaultPlan, counters: FaultCounters | None = None, **adapter_kwargs: Any
) -> Session:
    """A ``requests.Session`` whose HTTP and HTTPS connections are all subject to ``plan``.

    ``adapter_kwargs`` go to :class:`FaultyHTTPAdapter` (and on to ``HTTPAdapter``), e.g.
    ``pool_maxsize`` for a session shared by many worker threads.
    """
    session = Session()
    # A proxy from the environment would take connections around the faulty pool.
    session.trust_env = False
    adapter = FaultyHTTPAdapter(plan, counters, **adapter_kwargs)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
