"""The proxy server: accepts client connections, and runs until shut down.

Task tree (every task lives in a nursery)::

    serve()                          server nursery: metrics endpoint, one task per upload
    ├── Upload.run()                 upload nursery: the writer (open_writer), the task that
    │                                announces credit, and the completion once asked for
    └── connections nursery          one task per client connection
        └── ClientConnection.run()   see proxy.server.connection

Uploads hang off the server nursery, not off a connection, so an upload survives the
connection that opened it (see :mod:`proxy.server.registry`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import Counter as TallyCounter
from collections.abc import AsyncIterator

import trio

from protocol import Connection, Error, ErrorCode, Role
from proxy.server.backend import Backend
from proxy.server.connection import DRAIN_TIMEOUT, ClientConnection
from proxy.server.drain import drain_uploads
from proxy.server.health import Health
from proxy.server.logging import get_logger, log_event, protect_third_party_loggers
from proxy.server.metrics import ServerMetrics, observe_gcs_requests, serve_metrics
from proxy.server.registry import UploadRegistry
from proxy.server.settings import ServerSettings
from reliablewriter.transport import http_session

__all__ = ["ProxyServer", "serve", "serve_in_background"]

logger = get_logger(__name__)


class ProxyServer:
    """A running proxy, as handed out by :func:`serve` once it listens."""

    def __init__(
        self,
        settings: ServerSettings,
        backend: Backend,
        metrics: ServerMetrics,
        registry: UploadRegistry,
        address: tuple[str, int],
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        self.registry = registry
        #: where clients connect
        self.address = address
        #: where ``/metrics`` is served, when asked for
        self.metrics_address: tuple[str, int] | None = None
        self._connections: set[ClientConnection] = set()
        self._per_client: TallyCounter[str] = TallyCounter()
        #: connections whose Hello has not been accepted yet, oldest first
        self._waiting_for_hello: dict[ClientConnection, None] = {}
        self._shutdown_requested = trio.Event()
        self._all_closed = trio.Event()

    @property
    def draining(self) -> bool:
        """Whether a shutdown has begun (no new connections are taken from then on)."""
        return self._shutdown_requested.is_set()

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def shutdown(self) -> None:
        """Begin a graceful shutdown: stop accepting, send GoingAway, finish in-flight frames.

        :func:`serve` returns once it is done. Unfinished uploads stay resumable in GCS.
        """
        self._shutdown_requested.set()

    def _refusal(self, client: str) -> str | None:
        """Why a new connection from ``client`` cannot be taken now, or ``None``."""
        settings = self.settings
        if len(self._connections) >= settings.max_connections:
            return "the proxy has as many connections as it takes"
        if self._per_client[client] >= settings.max_connections_per_client:
            return "too many connections from this client"
        return None

    def _authenticated(self, connection: ClientConnection) -> None:
        self._waiting_for_hello.pop(connection, None)

    def _make_room_for_hello(self) -> None:
        """At ``max_preauth_connections``, drop the connection that has waited longest for
        its Hello: a crowd of half-sent Hellos costs a bounded amount, and cannot keep an
        honest client (whose Hello follows its connect at once) from getting in."""
        while len(self._waiting_for_hello) >= self.settings.max_preauth_connections:
            oldest = next(iter(self._waiting_for_hello))
            del self._waiting_for_hello[oldest]
            oldest.drop_before_hello()

    async def _handle(self, stream: trio.SocketStream) -> None:
        client = _peer_host(stream)
        refusal = self._refusal(client)
        if refusal is not None:
            log_event(logger, logging.WARNING, "connection-refused", client=client, why=refusal)
            await _refuse(stream, refusal)
            return
        wrapped: trio.abc.Stream = stream
        if self.settings.tls is not None:
            wrapped = trio.SSLStream(stream, self.settings.tls, server_side=True)
        connection = ClientConnection(
            self.settings,
            self.registry,
            self.metrics,
            wrapped,
            client,
            on_authenticated=self._authenticated,
        )
        self._connections.add(connection)
        self._per_client[client] += 1
        self._make_room_for_hello()
        self._waiting_for_hello[connection] = None
        self.metrics.connections.inc()
        if self._shutdown_requested.is_set():
            connection.going_away()
        try:
            await connection.run()
        except Exception:
            # One broken connection must never take the server down with it.
            log_event(logger, logging.ERROR, "connection-crashed", exc=True, client=client)
        finally:
            self._waiting_for_hello.pop(connection, None)
            self.metrics.connections.dec()
            self._connections.discard(connection)
            self._per_client[client] -= 1
            if self._per_client[client] <= 0:
                del self._per_client[client]
            if not self._connections and self._shutdown_requested.is_set():
                self._all_closed.set()

    async def serve_connections(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[ProxyServer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on ``listeners`` until :meth:`shutdown`, then drain and close connections.

        Reports this server through ``task_status`` once accepting. Cancelled, every
        connection closes at once (uploads belong to the registry and are not touched).
        """
        async with trio.open_nursery() as connections_nursery:
            accept_scope = trio.CancelScope()

            async def accept() -> None:
                with accept_scope:
                    await trio.serve_listeners(
                        self._handle, listeners, handler_nursery=connections_nursery
                    )

            connections_nursery.start_soon(accept)
            log_event(
                logger,
                logging.INFO,
                "listening",
                address=f"{self.address[0]}:{self.address[1]}",
                tls=self.settings.tls is not None,
                gcs=self.backend.url,
            )
            task_status.started(self)
            await self._shutdown_requested.wait()
            log_event(logger, logging.INFO, "shutting-down", connections=self.connection_count)
            accept_scope.cancel()
            await self._drain_and_close(connections_nursery.cancel_scope)

    async def _drain_and_close(self, connections_scope: trio.CancelScope) -> None:
        for connection in list(self._connections):
            connection.going_away()
        if self._connections:
            with trio.move_on_after(self.settings.shutdown_grace):
                await self._all_closed.wait()
        connections_scope.cancel()


def _peer_host(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return "unknown"


async def _refuse(stream: trio.SocketStream, message: str) -> None:
    protocol = Connection(Role.SERVER)
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        with trio.move_on_after(DRAIN_TIMEOUT):
            # TOO_MANY_CONNECTIONS; send() makes it TOO_BUSY, all a Hello-less peer may know.
            refusal = Error(0, ErrorCode.TOO_MANY_CONNECTIONS, True, message)
            await stream.send_all(b"".join(protocol.send(refusal)))
    await trio.aclose_forcefully(stream)


async def serve(
    settings: ServerSettings,
    backend: Backend,
    *,
    metrics_listen: tuple[str, int] | None = None,
    task_status: trio.TaskStatus[ProxyServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a proxy until :meth:`ProxyServer.shutdown` is called or the caller cancels.

    Use as ``server = await nursery.start(serve, settings, backend)``. A shutdown is
    graceful (GoingAway, then up to ``shutdown_grace`` for in-flight frames, then up to
    ``drain_timeout`` for chunks on their way to GCS); cancellation is abrupt. Either way
    unfinished uploads are released, not aborted: their GCS sessions stay resumable through
    their tokens.
    """
    protect_third_party_loggers()
    metrics = ServerMetrics()
    observe_gcs_requests(http_session(backend.client), metrics)
    listeners = await trio.open_tcp_listeners(settings.port, host=settings.host)
    host, port = listeners[0].socket.getsockname()[:2]
    async with trio.open_nursery() as server_nursery:
        registry = UploadRegistry(settings, backend, metrics, server_nursery)
        server = ProxyServer(settings, backend, metrics, registry, (str(host), int(port)))
        if metrics_listen is not None:
            health = Health(lambda: server.draining, backend.url)
            server.metrics_address = await server_nursery.start(
                serve_metrics, metrics, metrics_listen[0], metrics_listen[1], health.probes()
            )
        await server.serve_connections(listeners, task_status=task_status)
        # Connections are gone: let chunks on their way to GCS land, then release the
        # uploads (their GCS sessions stay resumable).
        await drain_uploads(registry.uploads(), settings.drain_timeout)
        server_nursery.cancel_scope.cancel()
    log_event(logger, logging.INFO, "stopped")


@contextlib.asynccontextmanager
async def serve_in_background(
    settings: ServerSettings,
    backend: Backend,
    *,
    metrics_listen: tuple[str, int] | None = None,
) -> AsyncIterator[ProxyServer]:
    """A proxy running for the duration of the ``async with`` block.

    Leaving the block shuts the server down gracefully (see :func:`serve`).
    """
    async with trio.open_nursery() as nursery:
        server: ProxyServer = await nursery.start(
            functools.partial(serve, settings, backend, metrics_listen=metrics_listen)
        )
        try:
            yield server
        finally:
            server.shutdown()
