"""A TCP chaos proxy: forward connections to one upstream, injecting a fault plan's toxics.

:func:`open_chaos_proxy` listens on a port (loopback by default) and relays every accepted
connection to a fixed upstream address. Connections are numbered in accept order, and
connection ``i`` gets the toxics ``plan.for_connection(i)`` picks, so a seeded run is
replayable. Toxics act in the plan's direction: *upstream* toxics on the bytes the client
sends to the server, *downstream* toxics on the bytes the server sends back. The fault
engine (:mod:`faultnet.engine`) decides what each toxic does; this module only carries
out its actions between two sockets.

The toxics can change while the proxy runs, through :class:`ChaosProxy`'s methods or the
small HTTP control API (see :meth:`ChaosProxy.serve_control`). A change applies to the
connections accepted afterwards; connections already open keep the toxics they started
with, as they would with a real network that changes under new flows only.

The relay is transparent about how a connection ends: an EOF from one side becomes an EOF
(half-close) towards the other, a reset from either side (or from a ``reset_peer`` toxic)
becomes a reset of both, and any other failure closes both sides.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
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
from faultnet.http_json import HTTPError, Request, Response, serve_json
from faultnet.plan import Direction, FaultPlan, PlanSyntaxError, Toxic, toxic_from_dict

__all__ = [
    "Address",
    "ChaosProxy",
    "DuplicateToxicError",
    "NamedToxic",
    "ProxyStats",
    "ToxicNotFoundError",
    "open_chaos_proxy",
]

logger = logging.getLogger(__name__)

#: a host and port, as trio and the socket module take them
Address = tuple[str, int]

#: bytes asked for per receive: big enough that per-call Python overhead is noise next to
#: the copy itself, which is what lets the no-toxic path keep up with loopback.
RELAY_CHUNK = 1024 * 1024


class ToxicNotFoundError(LookupError):
    """No toxic has the given index or name."""


class DuplicateToxicError(ValueError):
    """A toxic with that name already exists."""


_STREAM_NAMES = {Direction.UPSTREAM: "upstream", Direction.DOWNSTREAM: "downstream"}


@dataclass(frozen=True)
class NamedToxic:
    """A toxic as the proxy holds it: with a name that the control API can address."""

    name: str
    toxic: Toxic

    def to_dict(self) -> dict[str, Any]:
        """The Toxiproxy-shaped JSON form, plus the name."""
        return {
            "name": self.name,
            "type": self.toxic.NAME,
            "direction": self.toxic.direction.value,
            "stream": _STREAM_NAMES[self.toxic.direction],
            "toxicity": self.toxic.toxicity,
            "attributes": self.toxic.params(),
        }


@dataclass(frozen=True)
class ProxyStats:
    """A snapshot of what the proxy has done since it started or was last reset.

    ``bytes_upstream`` counts bytes delivered to the upstream server, ``bytes_downstream``
    bytes delivered back to clients; ``faults`` counts applied faults by toxic name.
    """

    connections_accepted: int = 0
    connections_active: int = 0
    upstream_connect_failures: int = 0
    bytes_upstream: int = 0
    bytes_downstream: int = 0
    faults: Mapping[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "connections_accepted": self.connections_accepted,
            "connections_active": self.connections_active,
            "upstream_connect_failures": self.upstream_connect_failures,
            "bytes": {"upstream": self.bytes_upstream, "downstream": self.bytes_downstream},
            "faults": dict(self.faults),
        }


def _default_name(toxic: Toxic) -> str:
    # Toxiproxy's default: the type and the stream it acts on.
    return f"{toxic.NAME}_{_STREAM_NAMES[toxic.direction]}"


def _is_index(text: str) -> bool:
    # str.isdigit alone also accepts digits such as "²" that int() refuses.
    return text.isascii() and text.isdigit()


def _is_reset(exc: BaseException) -> bool:
    cause = exc.__cause__
    return isinstance(cause, OSError) and cause.errno in (errno.ECONNRESET, errno.EPIPE)


def _abort(stream: trio.abc.Stream) -> None:
    """Make the next close send an RST instead of a FIN, when the stream is a real socket."""
    if isinstance(stream, trio.SocketStream) and stream.socket.fileno() != -1:
        # If the socket is already dead, a plain close is all that is left to do.
        with suppress(OSError):
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class ChaosProxy:
    """A running chaos proxy: its addresses, its toxics, and its counters.

    Build one with :func:`open_chaos_proxy`. All methods must be called from the trio
    thread the proxy runs in.
    """

    def __init__(self, upstream: Address, plan: FaultPlan, listener: trio.SocketListener) -> None:
        self._upstream = upstream
        self._listener = listener
        self._seed = plan.seed
        self._toxics: list[NamedToxic] = []
        for toxic in plan.toxics:
            self.add_toxic(toxic)
        self._next_index = 0
        self._active = 0
        self._counters = FaultCounters()
        self._upstream_connect_failures = 0
        self._control_address: Address | None = None

    # -- addresses and toxics ----------------------------------------------------------

    @property
    def address(self) -> Address:
        """Where clients connect."""
        host, port = self._listener.socket.getsockname()[:2]
        return host, port

    @property
    def upstream(self) -> Address:
        return self._upstream

    @property
    def plan(self) -> FaultPlan:
        """The plan new connections draw their toxics from."""
        return FaultPlan(toxics=tuple(t.toxic for t in self._toxics), seed=self._seed)

    def toxics(self) -> tuple[NamedToxic, ...]:
        return tuple(self._toxics)

    def add_toxic(self, toxic: Toxic, name: str | None = None) -> NamedToxic:
        """Append ``toxic`` to the plan, for the connections accepted from now on.

        Without a ``name`` it gets Toxiproxy's default (``latency_downstream``), made unique
        with a numeric suffix. An explicit name that is taken raises
        :class:`DuplicateToxicError`.
        """
        taken = {t.name for t in self._toxics}
        if name is None:
            base = name = _default_name(toxic)
            suffix = 2
            while name in taken:
                name = f"{base}_{suffix}"
                suffix += 1
        elif not name or _is_index(name):
            raise ValueError(f"a toxic's name must be non-empty and not a number, got {name!r}")
        elif name in taken:
            raise DuplicateToxicError(f"a toxic named {name!r} already exists")
        named = NamedToxic(name=name, toxic=toxic)
        self._toxics.append(named)
        return named

    def remove_toxic(self, key: int | str) -> NamedToxic:
        """Remove one toxic, by position in :meth:`toxics` or by name; return it."""
        if isinstance(key, int):
            if not 0 <= key < len(self._toxics):
                raise ToxicNotFoundError(f"no toxic at index {key}; there are {len(self._toxics)}")
            return self._toxics.pop(key)
        for position, named in enumerate(self._toxics):
            if named.name == key:
                return self._toxics.pop(position)
        raise ToxicNotFoundError(f"no toxic named {key!r}")

    def reset(self) -> None:
        """Remove every toxic and zero the counters.

        Connection numbering carries on, so a connection's index stays its accept order.
        """
        self._toxics.clear()
        self._counters = FaultCounters()
        self._upstream_connect_failures = 0

    @property
    def counters(self) -> FaultCounters:
        """Bytes and faults of the connections accepted since the start or the last reset.

        A connection keeps counting into the counters that were current when it was
        accepted, so after a reset the totals cover only the connections that came after.
        """
        return self._counters

    def stats(self) -> ProxyStats:
        totals = self._counters.as_dict()
        return ProxyStats(
            connections_accepted=totals["connections"],
            connections_active=self._active,
            upstream_connect_failures=self._upstream_connect_failures,
            bytes_upstream=totals["bytes_up"],
            bytes_downstream=totals["bytes_down"],
            faults=totals["faults"],
        )

    @property
    def control_address(self) -> Address | None:
        """Where the HTTP control API listens, once :meth:`serve_control` has started."""
        return self._control_address

    # -- serving -----------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and relay connections until cancelled.

        Cancelling it closes every relayed connection (both sides) and the listener.
        """
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._relay, [self._listener])
            task_status.started()

    async def serve_control(
        self,
        address: Address,
        *,
        task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the HTTP control API on ``address`` until cancelled.

        Reports the bound address through ``task_status``. The routes, all JSON:

        - ``GET /toxics``: the current toxics (with index and name) and the plan's text;
        - ``POST /toxics``: add one toxic, in Toxiproxy's shape (``type``, ``stream`` or
          ``direction``, ``toxicity``, ``attributes``, optional ``name``); answers 201;
        - ``DELETE /toxics/<index or name>``: remove one toxic;
        - ``POST /reset``: remove every toxic and zero the counters (:meth:`reset`);
        - ``GET /stats``: the counters (:meth:`ProxyStats.to_dict`).

        Bad requests get a 4xx answer with an ``error`` message. Cancelling it drops any
        request in progress without an answer.
        """
        listeners = await trio.open_tcp_listeners(address[1], host=address[0])
        host, port = listeners[0].socket.getsockname()[:2]
        self._control_address = (host, port)
        task_status.started(self._control_address)
        await serve_json(listeners, partial(_route, self))

    async def _relay(self, client: trio.SocketStream) -> None:
        index = self._next_index
        self._next_index += 1
        faults = ConnectionFaults.for_connection(self.plan, index, self._counters)
        self._active += 1
        try:
            async with client:
                try:
                    server = await trio.open_tcp_stream(*self._upstream)
                except OSError as exc:
                    self._upstream_connect_failures += 1
                    logger.warning(
                        "connection %d: upstream %s:%d refused: %s", index, *self._upstream, exc
                    )
                    return
                async with server:
                    logger.debug("connection %d: toxics %s", index, faults.toxics)
                    await _Relay(client, server, faults).run()
        finally:
            self._active -= 1


class _Relay:
    """Both directions of one proxied connection, with their faults, and how it ends.

    Upstream faults act on what the client sends, downstream faults on what the server
    sends. A ``reset_peer`` resets both sides; a ``limit_data`` closes both; a stall that
    never ends keeps its direction stuck, reading and dropping what arrives (as
    Toxiproxy's ``timeout`` does) so that the sender closing still ends the connection.
    """

    def __init__(
        self, client: trio.SocketStream, server: trio.SocketStream, faults: ConnectionFaults
    ) -> None:
        self._client = client
        self._server = server
        self._faults = faults
        self._scope = trio.CancelScope()
        self._reset = False

    async def run(self) -> None:
        """Relay until both directions have ended, or one of them ends the connection.

        Returns with both streams still open (but set to reset if they should); the
        caller closes them.
        """
        with self._scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, self._client, self._server, self._faults.upstream)
                nursery.start_soon(self._pump, self._server, self._client, self._faults.downstream)
        if self._reset:
            _abort(self._client)
            _abort(self._server)

    def _end_connection(self, *, reset: bool) -> None:
        """End both directions now: each pump stops at its next checkpoint."""
        self._reset = self._reset or reset
        self._scope.cancel()

    async def _pump(
        self,
        source: trio.abc.HalfCloseableStream,
        sink: trio.abc.HalfCloseableStream,
        faults: DirectionFaults,
    ) -> None:
        try:
            while data := await source.receive_some(RELAY_CHUNK):
                for action in faults.feed(data):
                    await self._perform(action, source, sink, faults)
            for action in faults.finish():
                await self._perform(action, source, sink, faults)
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # One direction failing ends the connection; a reset stays a reset.
            self._end_connection(reset=_is_reset(exc))

    async def _perform(
        self,
        action: Action,
        source: trio.abc.ReceiveStream,
        sink: trio.abc.SendStream,
        faults: DirectionFaults,
    ) -> None:
        match action:
            case Forward(data=data):
                await sink.send_all(data)
                faults.forwarded(len(data))
            case Delay(seconds=seconds) | Freeze(seconds=float(seconds)):
                await trio.sleep(seconds)
            case Freeze(seconds=None):
                while await source.receive_some(RELAY_CHUNK):
                    pass
                self._end_connection(reset=False)
            case Reset():
                self._end_connection(reset=True)
            case Close():
                self._end_connection(reset=False)


@asynccontextmanager
async def open_chaos_proxy(
    upstream: Address,
    plan: FaultPlan = FaultPlan.NONE,
    *,
    listen: Address = ("127.0.0.1", 0),
    control: Address | None = None,
) -> AsyncIterator[ChaosProxy]:
    """Run a chaos proxy in the background for the duration of the ``async with`` block.

    ``listen`` and ``control`` take port 0 for a free port; read the real ones from
    :attr:`ChaosProxy.address` and :attr:`ChaosProxy.control_address`. With ``control``
    set, the HTTP control API is served there too. Leaving the block (or cancelling it)
    closes every relayed connection and both listeners.
    """
    listeners = await trio.open_tcp_listeners(listen[1], host=listen[0])
    proxy = ChaosProxy(upstream, plan, listeners[0])
    for extra in listeners[1:]:
        await extra.aclose()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            if control is not None:
                await nursery.start(proxy.serve_control, control)
            try:
                yield proxy
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery wraps whatever the ``async with`` block raised; hand it back bare so
        # callers can catch it (KeyboardInterrupt, a test's AssertionError) by its type.
        if len(group.exceptions) != 1:
            raise
        raise group.exceptions[0] from None


# -- the HTTP control API ----------------------------------------------------------------
#
# JSON in and out over h11 (faultnet.http_json); bad requests get a 4xx with a message.


_ALLOWED_METHODS = {
    ("toxics",): "GET, POST",
    ("toxics", "*"): "DELETE",
    ("reset",): "POST",
    ("stats",): "GET",
}


async def _route(proxy: ChaosProxy, request: Request) -> Response:
    segments = tuple(s for s in request.path.split("/") if s)
    try:
        match request.method, segments:
            case "GET", ("toxics",):
                return Response(200, _toxics_listing(proxy))
            case "POST", ("toxics",):
                toxic, name = _toxic_from_body(request)
                named = proxy.add_toxic(toxic, name)
                return Response(201, {"index": len(proxy.toxics()) - 1, **named.to_dict()})
            case "DELETE", ("toxics", key):
                removed = proxy.remove_toxic(int(key) if _is_index(key) else key)
                return Response(200, {"removed": removed.to_dict()})
            case "POST", ("reset",):
                proxy.reset()
                return Response(200, _toxics_listing(proxy))
            case "GET", ("stats",):
                return Response(200, proxy.stats().to_dict())
    except ToxicNotFoundError as exc:
        raise HTTPError(404, str(exc)) from exc
    except DuplicateToxicError as exc:
        raise HTTPError(409, str(exc)) from exc
    except ValueError as exc:
        raise HTTPError(400, str(exc)) from exc
    shape = segments[:1] + (("*",) if len(segments) == 2 else ())
    if len(segments) <= 2 and shape in _ALLOWED_METHODS:
        allowed = _ALLOWED_METHODS[shape]
        return Response(
            405, {"error": f"{request.method} not allowed; use {allowed}"}, (("Allow", allowed),)
        )
    return Response(404, {"error": f"no such resource {request.path[:100]!r}"})


def _toxics_listing(proxy: ChaosProxy) -> dict[str, Any]:
    return {
        "plan": proxy.plan.to_text(),
        "toxics": [{"index": i, **t.to_dict()} for i, t in enumerate(proxy.toxics())],
    }


_DIRECTION_NAMES = ("up", "down", "upstream", "downstream")


def _toxic_from_body(request: Request) -> tuple[Toxic, str | None]:
    """Read a toxic in Toxiproxy's JSON shape, where ``stream`` names the direction."""
    data = request.json()
    if not isinstance(data, dict):
        raise HTTPError(400, "a toxic must be a JSON object")
    name = data.pop("name", None)
    if name is not None and not isinstance(name, str):
        raise HTTPError(400, f"a toxic's name must be a string, got {name!r}")
    if "direction" not in data and "stream" in data:
        data["direction"] = data.pop("stream")
    if data.get("direction", "up") not in _DIRECTION_NAMES:
        raise HTTPError(400, f"direction must be one of {', '.join(_DIRECTION_NAMES)}")
    try:
        return toxic_from_dict(data), name
    except (TypeError, ValueError) as exc:
        message = str(exc) if isinstance(exc, PlanSyntaxError) else f"malformed toxic: {exc}"
        raise HTTPError(400, message) from exc
