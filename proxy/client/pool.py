"""A pool of negotiated connections to the proxy, kept across uploads, as HTTP clients keep theirs.

A connection is opened (connect, ``Hello``, ``Welcome``) only when no idle one is at hand, lent
to one request at a time, and given back afterwards; one the proxy closed, refused or asked to
go away is dropped, and the next request opens another. An idle connection is closed after
``idle_timeout`` seconds, so a pool left alone holds nothing open for long. At most
``max_size`` connections exist at once; a request beyond that waits for one to come back.

The pooled connections carry the one-request uploads (``PutObject``, protocol version 2):
what makes a small object cost one exchange is that the handshake was paid for by an earlier
one. Each is a :class:`~proxy.client.channel.Channel` that never binds to an upload.

Cancellation: leaving :func:`open_connection_pool`'s block closes every connection; a request
cancelled midway loses its connection (its reply may still be on its way) and the pool drops it.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Final

import trio

from protocol.ranges import ByteRange
from proxy.client.channel import Channel
from proxy.client.errors import ConnectionLostError, UploadError
from proxy.client.ledger import Ledger
from proxy.client.names import proxy_addresses
from proxy.client.settings import UploadOptions, default_connector

__all__ = ["ConnectionPool", "open_connection_pool"]

#: how often, at most, idle connections are looked at for closing
_REAP_INTERVAL: Final = 1.0


@asynccontextmanager
async def open_connection_pool(
    options: UploadOptions, *, max_size: int = 16, idle_timeout: float = 30.0
) -> AsyncIterator[ConnectionPool]:
    """A :class:`ConnectionPool` for the block; leaving it closes every connection.

    An exception that leaves the block comes out as itself (an
    :class:`~proxy.client.errors.UploadError` stays one), not grouped by the pool's nursery,
    as :func:`~proxy.client.api.connect_upload` does it.
    """
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        try:
            yield ConnectionPool(options, nursery, max_size=max_size, idle_timeout=idle_timeout)
        except trio.Cancelled:
            raise  # the nursery's own business: it absorbs a cancellation of its scope
        except BaseException as exc:  # re-raised below, outside the nursery
            body_error = exc
        nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error


class _PoolOwner:
    """What the pool's channels see as their upload (:class:`ChannelOwner`): none, since a
    pooled connection is never bound; its requests stand alone."""

    def __init__(self, options: UploadOptions, description: str) -> None:
        self.settings: Final = options.settings
        self.ledger: Final = Ledger(options.settings.frame_size, lambda: None)
        self.description: Final = description
        self.auth: Final = options.auth
        self.aborting: Final = False
        self.refusal: UploadError | None = None

    def fail(self, error: UploadError) -> None:
        """The proxy refused a Hello for good (credentials): every connection would be."""
        self.refusal = error

    async def next_piece(self, channel: Channel) -> ByteRange | None:
        return None  # never bound, so never sending WriteAt


class ConnectionPool:
    """Negotiated connections to one proxy (or a failover list), reused across requests.

    Made by :func:`open_connection_pool`; ``options`` gives the proxy, credentials, TLS or
    connector and :class:`ClientSettings` (timeouts, frame size, retry).
    """

    def __init__(
        self,
        options: UploadOptions,
        nursery: trio.Nursery,
        *,
        max_size: int = 16,
        idle_timeout: float = 30.0,
    ) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1, got {max_size}")
        if idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be positive, got {idle_timeout}")
        self.options = options
        self.max_size = max_size
        self.idle_timeout = idle_timeout
        self._nursery = nursery
        self._addresses = proxy_addresses(options.proxy)
        self._current = 0
        self._connector = options.connector or default_connector(options.tls)
        self._owner = _PoolOwner(options, "connection pool")
        #: idle connections, the most recently used last, with when they became idle
        self._idle: list[tuple[Channel, float]] = []
        #: connections that exist (idle, lent or being opened): at most max_size
        self._open = 0
        self._changed = trio.Event()
        self.rng = random.Random()
        #: connections opened over the pool's life (a reused one is not counted again)
        self.connections_opened = 0
        #: the protocol version the last opened connection agreed (None before the first)
        self.version: int | None = None
        nursery.start_soon(self._close_idle_connections)

    @property
    def idle(self) -> int:
        """How many connections are open and waiting to be used."""
        return len(self._idle)

    @property
    def size(self) -> int:
        """How many connections exist now: idle, lent or being opened."""
        return self._open

    # -- lending -----------------------------------------------------------------------------

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Channel]:
        """Lend a negotiated connection for the block; it goes back to the pool afterwards,
        unless it broke, the proxy is going away, or the block raised.

        Raises :class:`ConnectionLostError` if a new connection cannot be opened (the caller
        retries under its policy), :class:`UploadError` if the proxy refused the Hello for
        good (credentials).
        """
        channel = await self._take()
        healthy = False
        try:
            yield channel
            healthy = True
        finally:
            self._give_back(channel, reuse=healthy)

    async def _take(self) -> Channel:
        while True:
            while self._idle:
                channel, _ = self._idle.pop()
                if channel.failure is None and not channel.going_away:
                    return channel
                self._close(channel)
            if self._open < self.max_size:
                self._open += 1
                try:
                    return await self._connect()
                except BaseException:
                    self._open -= 1
                    self._notify()
                    raise
            await self._changed.wait()

    def _give_back(self, channel: Channel, *, reuse: bool) -> None:
        if reuse and channel.failure is None and not channel.going_away:
            self._idle.append((channel, trio.current_time()))
            self._notify()
        else:
            self._close(channel)

    def _close(self, channel: Channel) -> None:
        """Close ``channel``; its task then ends and frees its place (see :meth:`_serve`)."""
        if channel.failure is None:
            channel.fail(ConnectionLostError("closed by the connection pool"))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _connect(self) -> Channel:
        assert self._nursery is not None, "use the pool in an async with block"
        settings = self.options.settings
        address_index = self._current
        host, port = self._addresses[address_index]
        try:
            with trio.fail_after(settings.connect_timeout):
                stream = await self._connector(host, port)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            self._move_on_from(address_index)
            raise ConnectionLostError(
                f"cannot connect to {host}:{port}: {exc or type(exc).__name__}"
            ) from exc
        channel = Channel(self._owner, stream, peer=f"{host}:{port}")
        ready = trio.Event()

        async def park(_: Channel) -> None:
            ready.set()
            await trio.sleep_forever()

        self._nursery.start_soon(self._serve, channel, park, ready)
        await ready.wait()
        failure = channel.failure
        if failure is not None:
            self._move_on_from(address_index)
            if self._owner.refusal is not None:
                raise self._owner.refusal
            raise failure
        self.connections_opened += 1
        self.version = channel.version
        return channel

    async def _serve(
        self, channel: Channel, park: Callable[[Channel], Awaitable[None]], ready: trio.Event
    ) -> None:
        """Run ``channel`` until it fails or is closed, then free its place in the pool."""
        try:
            await channel.run(park)
        finally:
            ready.set()
            self._idle = [(idle, since) for idle, since in self._idle if idle is not channel]
            self._open -= 1
            self._notify()

    def _move_on_from(self, address_index: int) -> None:
        if self._current == address_index:
            self._current = (address_index + 1) % len(self._addresses)

    async def _close_idle_connections(self) -> None:
        while True:
            await trio.sleep(min(_REAP_INTERVAL, self.idle_timeout / 4))
            cutoff = trio.current_time() - self.idle_timeout
            for channel, since in list(self._idle):
                if since <= cutoff:
                    self._close(channel)
