"""A TCP chaos proxy: forward connections to an upstream, injecting a fault plan's toxics.

A :class:`ChaosProxy` listens on a port (loopback by default) and relays every accepted
connection to its upstream address. Connections are numbered in accept order, and
connection ``i`` gets the toxics ``plan.for_connection(i)`` picks, so a seeded run is
replayable. Toxics act in the plan's direction: *upstream* toxics on the bytes the client
sends to the server, *downstream* toxics on the bytes the server sends back. The fault
engine (:mod:`faultnet.engine`) decides what each toxic does; :mod:`faultnet.relay`
carries out its actions between two sockets.

A :class:`ProxyCollection` holds several named proxies, as one Toxiproxy server does: each
can be created, disabled (it stops listening and drops its connections), enabled again,
moved to another listen or upstream address, and deleted while the others run.
:func:`open_chaos_proxy` runs one proxy, and optionally the HTTP control API
(:mod:`faultnet.control`), for the duration of an ``async with`` block.

The toxics can change while a proxy runs. A change applies to the connections accepted
afterwards; connections already open keep the toxics they started with, as they would
with a real network that changes under new flows only, unless the change is made
``live`` (as Toxiproxy's API makes them): then it reaches the open connections too.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from faultnet.addresses import Address, format_address, parse_address
from faultnet.counters import FaultCounters
from faultnet.engine import ConnectionFaults
from faultnet.plan import Direction, FaultPlan, Toxic
from faultnet.relay import Relay

__all__ = [
    "DEFAULT_PROXY_NAME",
    "MAX_PROXIES",
    "MAX_TOXICS",
    "Address",
    "ChaosProxy",
    "DuplicateToxicError",
    "NamedToxic",
    "ProxyCollection",
    "ProxyExistsError",
    "ProxyLimitError",
    "ProxyNotFoundError",
    "ProxySpec",
    "ProxyStats",
    "ToxicNotFoundError",
    "format_address",
    "is_toxic_index",
    "open_chaos_proxy",
    "open_proxy_collection",
    "parse_address",
]

logger = logging.getLogger(__name__)

#: the name of the proxy that ``open_chaos_proxy`` and ``rup faultproxy --listen`` make
DEFAULT_PROXY_NAME = "default"


class ToxicNotFoundError(LookupError):
    """No toxic has the given index or name."""


class DuplicateToxicError(ValueError):
    """A toxic with that name already exists."""


class ProxyNotFoundError(LookupError):
    """No proxy has the given name."""


class ProxyExistsError(ValueError):
    """A proxy with that name already exists."""


class ProxyLimitError(Exception):
    """A collection holds as many proxies, or a proxy as many toxics, as it may."""


#: proxies one process may hold: each is a listening socket and its connections
MAX_PROXIES = 256
#: toxics one proxy may hold: each is a stage every byte of every connection goes through
MAX_TOXICS = 64


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


def is_toxic_index(text: str) -> bool:
    """Whether ``text`` names a toxic by its position: ASCII digits only (``str.isdigit``
    alone also accepts digits such as "²" that ``int`` refuses); names may not be so."""
    return text.isascii() and text.isdigit()


@dataclass(frozen=True)
class ProxySpec:
    """What a proxy is: its name, where it listens, where it relays to, and its toxics."""

    name: str
    listen: Address
    upstream: Address
    enabled: bool = True
    #: attached before the proxy listens; a bare Toxic gets Toxiproxy's default name
    toxics: tuple[NamedToxic | Toxic, ...] = ()
    seed: int = 0


class ChaosProxy:
    """One chaos proxy: its addresses, its toxics, its counters, and whether it listens.

    Build one through a :class:`ProxyCollection` or :func:`open_chaos_proxy`. All methods
    must be called from the trio thread the proxy runs in.
    """

    def __init__(
        self,
        name: str,
        upstream: Address,
        plan: FaultPlan = FaultPlan.NONE,
        *,
        listen: Address = ("127.0.0.1", 0),
        control_address: Callable[[], Address | None] = lambda: None,
    ) -> None:
        self.name = name
        self._upstream = upstream
        self._listen = listen
        self._seed = plan.seed
        self._toxics: list[NamedToxic] = []
        for toxic in plan.toxics:
            self.add_toxic(toxic)
        self._next_index = 0
        self._active = 0
        self._counters = FaultCounters()
        self._upstream_connect_failures = 0
        self._control_address = control_address
        self._open: dict[int, _OpenConnection] = {}
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()
        self._stopped.set()

    # -- addresses and toxics ----------------------------------------------------------

    @property
    def address(self) -> Address:
        """Where clients connect: the bound address once the proxy has listened (port 0
        replaced by the real port), the configured one before."""
        return self._listen

    @property
    def upstream(self) -> Address:
        return self._upstream

    @property
    def enabled(self) -> bool:
        """Whether the proxy is listening."""
        return self._scope is not None

    @property
    def plan(self) -> FaultPlan:
        """The plan new connections draw their toxics from."""
        return FaultPlan(toxics=tuple(t.toxic for t in self._toxics), seed=self._seed)

    def toxics(self) -> tuple[NamedToxic, ...]:
        return tuple(self._toxics)

    def toxic(self, name: str) -> NamedToxic:
        """The toxic named ``name``; :class:`ToxicNotFoundError` if there is none."""
        for named in self._toxics:
            if named.name == name:
                return named
        raise ToxicNotFoundError(f"no toxic named {name!r}")

    def add_toxic(self, toxic: Toxic, name: str | None = None, *, live: bool = False) -> NamedToxic:
        """Append ``toxic`` to the plan, for the connections accepted from now on, and with
        ``live`` for those open now too (each draws it by its toxicity).

        Without a ``name`` it gets Toxiproxy's default (``latency_downstream``), made unique
        with a numeric suffix. An explicit name that is taken raises
        :class:`DuplicateToxicError`.
        """
        if len(self._toxics) >= MAX_TOXICS:
            raise ProxyLimitError(f"proxy {self.name!r} already has {MAX_TOXICS} toxics")
        taken = {t.name for t in self._toxics}
        if name is None:
            base = name = _default_name(toxic)
            suffix = 2
            while name in taken:
                name = f"{base}_{suffix}"
                suffix += 1
        elif not name or is_toxic_index(name):
            raise ValueError(f"a toxic's name must be non-empty and not a number, got {name!r}")
        elif name in taken:
            raise DuplicateToxicError(f"a toxic named {name!r} already exists")
        named = NamedToxic(name=name, toxic=toxic)
        self._toxics.append(named)
        if live:
            self._change_open_connections(
                lambda index, toxics: [*toxics, named] if self._joins(named, index) else toxics
            )
        return named

    def replace_toxic(self, name: str, toxic: Toxic, *, live: bool = False) -> NamedToxic:
        """Change the toxic named ``name`` in place, for the connections accepted from now on,
        and with ``live`` for those open now too (it restarts there)."""
        position = self._toxics.index(self.toxic(name))
        named = self._toxics[position] = NamedToxic(name=name, toxic=toxic)
        if live:

            def replace(index: int, toxics: list[NamedToxic]) -> list[NamedToxic]:
                others = [t for t in toxics if t.name != name]
                if not self._joins(named, index):
                    return others
                if len(others) == len(toxics):
                    return [*toxics, named]
                return [named if t.name == name else t for t in toxics]

            self._change_open_connections(replace)
        return named

    def remove_toxic(self, key: int | str, *, live: bool = False) -> NamedToxic:
        """Remove one toxic, by position in :meth:`toxics` or by name; return it. With
        ``live`` it also stops acting on the connections open now."""
        if isinstance(key, int):
            if not 0 <= key < len(self._toxics):
                raise ToxicNotFoundError(f"no toxic at index {key}; there are {len(self._toxics)}")
            named = self._toxics[key]
        else:
            named = self.toxic(key)
        self._toxics.remove(named)
        if live:
            self._change_open_connections(
                lambda _, toxics: [t for t in toxics if t.name != named.name]
            )
        return named

    def reset(self, *, live: bool = False) -> None:
        """Remove every toxic and zero the counters; with ``live``, from the connections open
        now too.

        Connection numbering carries on, so a connection's index stays its accept order.
        """
        self._toxics.clear()
        self._counters = FaultCounters()
        self._upstream_connect_failures = 0
        if live:
            self._change_open_connections(lambda _, toxics: [])

    def _joins(self, named: NamedToxic, index: int) -> bool:
        return self.plan.joins(named.toxic, index, named.name)

    def _change_open_connections(
        self, change: Callable[[int, list[NamedToxic]], list[NamedToxic]]
    ) -> None:
        for connection in self._open.values():
            connection.toxics = change(connection.index, connection.toxics)
            connection.relay.change_toxics([t.toxic for t in connection.toxics])

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
        """Where the HTTP control API of this proxy's process listens, if it has one."""
        return self._control_address()

    # -- listening ---------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Listen, and relay in ``nursery`` until :meth:`stop`; no-op if already listening.

        Raises :class:`OSError` if the listen address cannot be bound.
        """
        if self._scope is None:
            await nursery.start(self._serve)

    async def stop(self) -> None:
        """Stop listening and close every relayed connection; returns once all are closed."""
        if self._scope is not None:
            self._scope.cancel()
        await self._stopped.wait()

    def move(self, *, listen: Address | None = None, upstream: Address | None = None) -> None:
        """Change where the proxy listens or relays to; takes effect at the next start."""
        if listen is not None:
            self._listen = listen
        if upstream is not None:
            self._upstream = upstream

    async def _serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        listeners = await trio.open_tcp_listeners(self._listen[1], host=self._listen[0])
        listener, extra = listeners[0], listeners[1:]
        for other in extra:
            await other.aclose()
        host, port = listener.socket.getsockname()[:2]
        self._listen = (host, port)
        self._stopped = trio.Event()
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                async with listener, trio.open_nursery() as nursery:
                    await nursery.start(trio.serve_listeners, self._relay, [listener])
                    task_status.started()
        finally:
            self._scope = None
            self._stopped.set()

    async def _relay(self, client: trio.SocketStream) -> None:
        index = self._next_index
        self._next_index += 1
        plan = self.plan
        toxics = [self._toxics[i] for i in plan.selected(index)]
        faults = ConnectionFaults(
            [t.toxic for t in toxics],
            rng=plan.rng(index, "faults"),
            counters=self._counters,
            timers=True,
        )
        self._active += 1
        try:
            async with client:
                try:
                    server = await trio.open_tcp_stream(*self._upstream)
                except OSError as exc:
                    self._upstream_connect_failures += 1
                    logger.warning(
                        "%s connection %d: upstream %s refused: %s",
                        self.name,
                        index,
                        format_address(self._upstream),
                        exc,
                    )
                    return
                async with server:
                    logger.debug("%s connection %d: toxics %s", self.name, index, faults.toxics)
                    relay = Relay(client, server, faults)
                    self._open[index] = _OpenConnection(index, relay, toxics)
                    try:
                        await relay.run()
                    finally:
                        del self._open[index]
        finally:
            self._active -= 1


@dataclass
class _OpenConnection:
    """A relayed connection, and the toxics it has now (they change with live changes)."""

    index: int
    relay: Relay
    toxics: list[NamedToxic]


class ProxyCollection:
    """Named chaos proxies in one process, as a Toxiproxy server holds them.

    Proxies run in the nursery given at construction; cancelling it closes them all.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        control_address: Callable[[], Address | None] = lambda: None,
    ) -> None:
        self._nursery = nursery
        self._proxies: dict[str, ChaosProxy] = {}
        self._control_address = control_address

    @property
    def control_address(self) -> Address | None:
        """Where the HTTP control API listens, if it is served."""
        return self._control_address()

    def proxies(self) -> tuple[ChaosProxy, ...]:
        return tuple(self._proxies.values())

    def get(self, name: str) -> ChaosProxy:
        proxy = self._proxies.get(name)
        if proxy is None:
            raise ProxyNotFoundError(f"no proxy named {name!r}")
        return proxy

    async def create(self, spec: ProxySpec) -> ChaosProxy:
        """Make a proxy with its toxics already attached, then let it listen if enabled.

        The toxics are in place before the first connection can arrive: no connection
        ever sees the proxy without them. Raises :class:`ProxyExistsError` for a taken
        name and :class:`OSError` if the address cannot be bound (nothing is created).
        """
        if spec.name in self._proxies:
            raise ProxyExistsError(f"a proxy named {spec.name!r} already exists")
        if not spec.name:
            raise ValueError("a proxy needs a name")
        if len(self._proxies) >= MAX_PROXIES:
            raise ProxyLimitError(f"this process already holds {MAX_PROXIES} proxies")
        if len(spec.toxics) > MAX_TOXICS:
            raise ProxyLimitError(f"a proxy may hold at most {MAX_TOXICS} toxics")
        proxy = ChaosProxy(
            spec.name,
            spec.upstream,
            FaultPlan(seed=spec.seed),
            listen=spec.listen,
            control_address=self._control_address,
        )
        for toxic in spec.toxics:
            if isinstance(toxic, NamedToxic):
                proxy.add_toxic(toxic.toxic, toxic.name)
            else:
                proxy.add_toxic(toxic)
        if spec.enabled:
            await proxy.start(self._nursery)
        self._proxies[spec.name] = proxy
        return proxy

    async def update(
        self,
        name: str,
        *,
        listen: Address | None = None,
        upstream: Address | None = None,
        enabled: bool | None = None,
    ) -> ChaosProxy:
        """Change a proxy's addresses or whether it listens; a new address restarts it
        (dropping its connections), as Toxiproxy does."""
        proxy = self.get(name)
        moved = (listen is not None and listen != proxy.address) or (
            upstream is not None and upstream != proxy.upstream
        )
        was_enabled = proxy.enabled
        if moved or enabled is False:
            await proxy.stop()
        proxy.move(listen=listen, upstream=upstream)
        if enabled or (enabled is None and was_enabled):
            await proxy.start(self._nursery)
        return proxy

    async def delete(self, name: str) -> None:
        proxy = self.get(name)
        await proxy.stop()
        del self._proxies[name]

    async def populate(self, specs: Sequence[ProxySpec]) -> list[ChaosProxy]:
        """Make sure each proxy exists as specified; Toxiproxy's ``/populate``.

        A proxy that exists with the same listen and upstream addresses is left alone
        (toxics and all); one that differs is replaced. Returns the proxies, in order.
        """
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError("populate names a proxy twice")
        proxies = []
        for spec in specs:
            existing = self._proxies.get(spec.name)
            if existing is not None and _same_place(existing, spec):
                proxies.append(existing)
                continue
            if existing is not None:
                await self.delete(spec.name)
            proxies.append(await self.create(spec))
        return proxies

    async def reset(self) -> None:
        """Enable every proxy, remove every toxic, zero every counter; Toxiproxy's /reset."""
        for proxy in self._proxies.values():
            proxy.reset(live=True)
            await proxy.start(self._nursery)


def _same_place(proxy: ChaosProxy, spec: ProxySpec) -> bool:
    listen_same = spec.listen == proxy.address or (
        spec.listen[1] == 0 and spec.listen[0] == proxy.address[0]
    )
    return listen_same and spec.upstream == proxy.upstream


@asynccontextmanager
async def open_chaos_proxy(
    upstream: Address,
    plan: FaultPlan = FaultPlan.NONE,
    *,
    listen: Address = ("127.0.0.1", 0),
    control: Address | None = None,
    name: str = DEFAULT_PROXY_NAME,
) -> AsyncIterator[ChaosProxy]:
    """Run a chaos proxy in the background for the duration of the ``async with`` block.

    ``listen`` and ``control`` take port 0 for a free port; read the real ones from
    :attr:`ChaosProxy.address` and :attr:`ChaosProxy.control_address`. With ``control``
    set, the HTTP control API is served there too, and proxies created through it live
    as long as the block. Leaving the block (or cancelling it) closes every relayed
    connection and every listener.
    """
    spec = ProxySpec(name, listen, upstream, toxics=plan.toxics, seed=plan.seed)
    async with open_proxy_collection([spec], control=control) as collection:
        yield collection.get(name)


@asynccontextmanager
async def open_proxy_collection(
    specs: Iterable[ProxySpec] = (), *, control: Address | None = None
) -> AsyncIterator[ProxyCollection]:
    """Run a :class:`ProxyCollection` (and its control API, with ``control``) for the
    duration of the ``async with`` block; ``specs`` are created first, in order."""
    # Imported here: the control API imports this module for its types.
    from faultnet.control import serve_control

    bound: list[Address] = []
    try:
        async with trio.open_nursery() as nursery:
            collection = ProxyCollection(
                nursery, control_address=lambda: bound[0] if bound else None
            )
            for spec in specs:
                await collection.create(spec)
            if control is not None:
                bound.append(await nursery.start(serve_control, collection, control))
            try:
                yield collection
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery wraps whatever the ``async with`` block raised; hand it back bare so
        # callers can catch it (KeyboardInterrupt, a test's AssertionError) by its type.
        if len(group.exceptions) != 1:
            raise
        raise group.exceptions[0] from None
