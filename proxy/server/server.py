"""The proxy server: accepts client connections and serves the wire protocol on each.

Task tree (every task lives in a nursery)::

    serve()                          server nursery: metrics endpoint, one task per upload
    ├── UploadRegistry._run()        upload nursery: the writer (open_writer), the task that
    │                                announces credit, and the completion once asked for
    └── connections nursery          one task per client connection
        └── ClientConnection.run()   connection nursery: receive loop (the task itself),
                                     send loop, and one task per Complete awaiting its result

Uploads hang off the server nursery, not off a connection, so an upload survives the
connection that opened it. A connection reads frames one at a time and streams each
WriteAt payload straight into the upload's writer as it arrives. Everything it sends goes
through its :class:`_Outbox`, which keeps replies in order and coalesces Credit updates, so
a slow client never holds up the upload or other clients.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hmac
import logging
from collections import Counter as TallyCounter
from collections import deque
from collections.abc import AsyncIterator

import trio

from protocol import (
    NEED_DATA,
    Abort,
    Ack,
    AttachUpload,
    Complete,
    Completed,
    Connection,
    ConnectionClosed,
    ConnectionState,
    Credit,
    Error,
    ErrorCode,
    Event,
    GoingAway,
    Hello,
    OpenUpload,
    PayloadCrcError,
    Ping,
    Pong,
    RemoteProtocolError,
    Reply,
    Role,
    Status,
    StatusQuery,
    UploadOpened,
    WriteAtData,
    WriteAtEnd,
    WriteAtStart,
)
from proxy.server.backend import Backend
from proxy.server.logging import get_logger, log_event, protect_third_party_loggers, redact
from proxy.server.metrics import ServerMetrics, serve_metrics
from proxy.server.settings import ServerSettings
from proxy.server.uploads import (
    OpenRequest,
    StagedWrite,
    Upload,
    UploadError,
    UploadRegistry,
)
from reliablewriter import ObjectInfo

__all__ = ["ProxyServer", "serve", "serve_in_background"]

logger = get_logger(__name__)

#: most bytes asked of the socket per receive; a receive never reaches past the end of the
#: WriteAt payload being read, so payload views are whole receive buffers (no copy to checksum)
_RECEIVE_SIZE = 256 * 1024
#: replies a connection may have queued before its receive loop waits for the client to read
_OUTBOX_CAPACITY = 64
#: how long a connection that is being closed gets to deliver its last frames
_DRAIN_TIMEOUT = 2.0


class _HangUpError(Exception):
    """Ends the receive loop; the connection sends what is queued and closes."""


class _Outbox:
    """The frames waiting to go to one client: replies in order, plus the newest Credit.

    A Credit supersedes the one before it, so at most one is ever queued: an upload can
    tell every attached connection about its window without waiting for any of them.
    """

    def __init__(self, capacity: int) -> None:
        self._replies: deque[Reply] = deque()
        self._credit: Credit | None = None
        self._capacity = capacity
        self._closed = False
        self._has_items = trio.lowlevel.ParkingLot()
        self._has_room = trio.lowlevel.ParkingLot()

    async def put(self, reply: Reply) -> None:
        """Queue ``reply``, waiting while the client is ``capacity`` replies behind."""
        while len(self._replies) >= self._capacity and not self._closed:
            await self._has_room.park()
        self.put_nowait(reply)

    def put_nowait(self, reply: Reply) -> None:
        """Queue ``reply`` regardless of capacity (for the few frames that must not wait)."""
        if self._closed:
            return
        self._replies.append(reply)
        self._has_items.unpark_all()

    def offer_credit(self, credit: Credit) -> None:
        if self._closed:
            return
        self._credit = credit
        self._has_items.unpark_all()

    def forget_credit(self) -> None:
        self._credit = None

    def close(self) -> None:
        """Accept nothing more; :meth:`get` returns ``None`` once what is queued is taken."""
        self._closed = True
        self._has_items.unpark_all()
        self._has_room.unpark_all()

    async def get(self) -> Reply | None:
        while True:
            if self._replies:
                reply = self._replies.popleft()
                self._has_room.unpark_all()
                return reply
            if self._credit is not None:
                credit, self._credit = self._credit, None
                return credit
            if self._closed:
                return None
            await self._has_items.park()


def _authenticated(presented: str, accepted: tuple[str, ...]) -> bool:
    """Whether ``presented`` is one of ``accepted``, in time independent of where it differs."""
    if not accepted:
        return True
    presented_bytes = presented.encode("utf-8")
    matched = False
    for token in accepted:
        # No early exit: every configured token is compared every time.
        matched |= hmac.compare_digest(presented_bytes, token.encode("utf-8"))
    return matched


class ClientConnection:
    """One client connection: handshake, then requests until either side closes.

    Cancelling :meth:`run` closes the connection; the uploads it was attached to go on
    (they belong to the registry) and can be re-attached with their token.
    """

    def __init__(self, server: ProxyServer, stream: trio.abc.Stream, client: str) -> None:
        self._server = server
        self._settings = server.settings
        self._stream = stream
        self.client = client
        self._protocol = Connection(Role.SERVER, max_frame_size=self._settings.max_frame_size)
        self._outbox = _Outbox(_OUTBOX_CAPACITY)
        self._sender_done = trio.Event()
        self._upload: Upload | None = None
        self._staged: StagedWrite | None = None
        #: requests answered by tasks of their own (Complete); an idle client waiting on
        #: one of them is not idle
        self._outstanding = 0
        self._going_away = False

    # --- lifecycle --------------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_loop)
                try:
                    await self._receive_loop(nursery)
                except _HangUpError:
                    pass
                finally:
                    self._outbox.close()
                with trio.move_on_after(_DRAIN_TIMEOUT):
                    await self._sender_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._unbind()
            await trio.aclose_forcefully(self._stream)
            log_event(logger, logging.DEBUG, "connection-closed", client=self.client)

    def going_away(self) -> None:
        """Tell the client the server is shutting down; requests in flight still finish."""
        self._going_away = True
        self._outbox.put_nowait(GoingAway(0, "server shutting down; reconnect and attach"))

    def offer_credit(self, upload: Upload, committed_offset: int, window_end: int) -> None:
        if upload is self._upload:
            self._outbox.offer_credit(Credit(0, committed_offset, window_end))

    def upload_failed(self, upload: Upload, error: UploadError) -> None:
        # Unsolicited, so a client waiting for credit learns now instead of at its timeout.
        if upload is self._upload:
            self._outbox.forget_credit()
            self._fail(0, error)

    # --- sending ----------------------------------------------------------------------

    async def _send_loop(self) -> None:
        try:
            while True:
                reply = await self._outbox.get()
                if reply is None:
                    break
                if self._protocol.state is ConnectionState.ERROR and not isinstance(
                    reply, Error | GoingAway
                ):
                    continue  # after a fatal error only the explanation may still go out
                if isinstance(reply, Error):
                    self._server.metrics.errors.labels(code=reply.code.name).inc()
                await self._stream.send_all(b"".join(self._protocol.send(reply)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client is gone; the receive loop finds out on its own
        finally:
            self._sender_done.set()

    async def _reply(self, reply: Reply) -> None:
        """Queue ``reply``; a client that stops reading its replies gets disconnected.

        Without the limit, a client that pipelines requests but never reads would park
        this connection forever with its receive loop stuck here, out of the idle timeout's
        reach.
        """
        with trio.move_on_after(self._settings.idle_timeout):
            await self._outbox.put(reply)
            return
        log_event(logger, logging.INFO, "client-not-reading", client=self.client)
        raise _HangUpError

    def _fail(self, reply_to: int, error: UploadError | RemoteProtocolError) -> None:
        """Queue an Error at once, for the few that come at most once per request or upload."""
        self._outbox.put_nowait(_error(reply_to, error))

    # --- receiving --------------------------------------------------------------------

    async def _receive(self, patience: float) -> bytes | None:
        """The next bytes from the client (b"" at EOF), or ``None`` if none came in time."""
        with trio.move_on_after(patience):
            try:
                size = self._protocol.receive_size(_RECEIVE_SIZE)
                return bytes(await self._stream.receive_some(size))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return b""
        return None

    async def _next_event(self, *, patience: float) -> Event:
        while True:
            event = self._protocol.next_event()
            if event is not NEED_DATA:
                return event
            data = await self._receive(patience)
            if data is None:
                if self._outstanding:
                    continue
                raise TimeoutError
            self._protocol.receive_data(data)

    async def _receive_loop(self, nursery: trio.Nursery) -> None:
        settings = self._settings
        try:
            # One deadline for TLS and Hello together, so a slow trickle cannot stretch it.
            with trio.fail_after(settings.handshake_timeout):
                if isinstance(self._stream, trio.SSLStream):
                    await self._stream.do_handshake()
                hello = await self._next_event(patience=settings.handshake_timeout)
            await self._handshake(hello)
            while True:
                try:
                    event = await self._next_event(patience=settings.idle_timeout)
                except PayloadCrcError as exc:
                    # The header was sound, so the stream is still in step: refuse this
                    # frame only, and let the client resend it.
                    self._discard_staged()
                    await self._reply(_error(exc.seq, exc))
                    continue
                except TimeoutError:
                    self._outbox.put_nowait(
                        Error(0, ErrorCode.IDLE_TIMEOUT, True, "connection idle for too long")
                    )
                    return
                if isinstance(event, ConnectionClosed):
                    return
                try:
                    await self._dispatch(event, nursery)
                except UploadError as exc:
                    # Waits like any reply, so a client that keeps sending refused requests
                    # without reading the refusals cannot grow the outbox without bound.
                    await self._reply(_error(getattr(event, "seq", 0), exc))
                    if exc.code is ErrorCode.OUTSIDE_CREDIT:
                        # Writing outside the credit breaks the protocol: say so and close.
                        raise _HangUpError from exc
        except RemoteProtocolError as exc:
            log_event(
                logger, logging.INFO, "protocol-violation", client=self.client, error=exc.message
            )
            self._fail(exc.seq, exc)
        except TimeoutError:
            log_event(logger, logging.INFO, "handshake-timeout", client=self.client)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # TLS handshake failed or the client vanished mid-handshake
        finally:
            self._discard_staged()

    async def _handshake(self, event: Event) -> None:
        if not isinstance(event, Hello):
            # The protocol state machine refuses anything but Hello first; be explicit anyway.
            raise RemoteProtocolError("the first frame must be Hello", ErrorCode.UNEXPECTED_FRAME)
        if not _authenticated(event.auth, self._settings.auth_tokens):
            log_event(logger, logging.WARNING, "auth-refused", client=self.client)
            self._fail(
                event.seq, UploadError(ErrorCode.UNAUTHENTICATED, "bearer token not accepted")
            )
            raise _HangUpError
        await self._reply(self._protocol.welcome(event, server_name=self._settings.server_name))
        log_event(
            logger, logging.DEBUG, "connection-ready", client=self.client, name=event.client_name
        )

    async def _dispatch(self, event: Event, nursery: trio.Nursery) -> None:
        # The hot path first: payload pieces of a WriteAt frame.
        if isinstance(event, WriteAtData):
            if self._staged is not None:
                self._staged.feed(event.data)
        elif isinstance(event, WriteAtStart):
            self._staged = None  # set only once the write is accepted
            self._staged = self._bound().begin_write(event.offset, event.length)
        elif isinstance(event, WriteAtEnd):
            staged, self._staged = self._staged, None
            if staged is not None:
                committed = staged.commit()
                await self._reply(Ack(event.seq, committed))
        elif isinstance(event, OpenUpload):
            await self._open(event)
        elif isinstance(event, AttachUpload):
            await self._attach(event)
        elif isinstance(event, Complete):
            self._outstanding += 1
            nursery.start_soon(self._complete, self._bound(), event)
        elif isinstance(event, Abort):
            upload = self._bound()
            try:
                await upload.abort()
            finally:
                self._unbind()  # whatever the answer, an Abort leaves the connection unbound
            await self._reply(Ack(event.seq, 0))
        elif isinstance(event, StatusQuery):
            upload = self._bound()
            failure = upload.failure()
            if failure is not None:
                raise failure
            await self._reply(
                Status(
                    event.seq, upload.committed_offset, upload.received_ranges(), upload.window_end
                )
            )
        elif isinstance(event, Ping):
            await self._reply(Pong(event.seq, event.nonce))
        else:
            raise RemoteProtocolError(
                f"unexpected {type(event).__name__} frame", ErrorCode.UNEXPECTED_FRAME
            )

    def _discard_staged(self) -> None:
        staged, self._staged = self._staged, None
        if staged is not None:
            staged.discard()

    # --- requests ---------------------------------------------------------------------

    def _bound(self) -> Upload:
        if self._upload is None:
            raise UploadError(ErrorCode.INVALID_STATE, "no upload is open on this connection")
        return self._upload

    def _refuse_new_work_when_leaving(self) -> None:
        if self._going_away:
            raise UploadError(
                ErrorCode.SHUTTING_DOWN, "server is shutting down; use another", retryable=True
            )

    async def _open(self, event: OpenUpload) -> None:
        self._refuse_new_work_when_leaving()
        request = OpenRequest(
            bucket=event.bucket,
            name=event.name,
            content_type=event.content_type,
            metadata=event.metadata,
            expected_size=event.expected_size,
            if_generation_match=event.if_generation_match,
        )
        upload = await self._server.registry.open(request, self.client)
        await self._bind(event.seq, upload, resumed=False)

    async def _attach(self, event: AttachUpload) -> None:
        self._refuse_new_work_when_leaving()
        upload, resumed = await self._server.registry.attach(event.token, self.client)
        await self._bind(event.seq, upload, resumed=resumed)

    async def _bind(self, reply_to: int, upload: Upload, *, resumed: bool) -> None:
        self._unbind()
        self._upload = upload
        upload.attach(self)
        committed = upload.committed_offset
        await self._reply(UploadOpened(reply_to, upload.token, committed, resumed))
        self._outbox.offer_credit(Credit(0, committed, upload.window_end))

    def _unbind(self) -> None:
        self._discard_staged()
        if self._upload is not None:
            self._upload.detach(self)
            self._upload = None
        self._outbox.forget_credit()

    async def _complete(self, upload: Upload, event: Complete) -> None:
        try:
            info = await upload.complete(event.total_size, event.crc32c)
        except UploadError as exc:
            self._fail(event.seq, exc)
        else:
            if self._upload is upload:
                self._unbind()  # Completed returns the connection to the unbound state
            self._outbox.put_nowait(_completed(event.seq, info))
        finally:
            self._outstanding -= 1


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
        self._shutdown_requested = trio.Event()
        self._all_closed = trio.Event()

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def shutdown(self) -> None:
        """Begin a graceful shutdown: stop accepting, send GoingAway, finish in-flight frames.

        :func:`serve` returns once it is done. Unfinished uploads stay resumable in GCS.
        """
        self._shutdown_requested.set()

    async def _handle(self, stream: trio.SocketStream) -> None:
        client = _peer_host(stream)
        if self._per_client[client] >= self.settings.max_connections_per_client:
            log_event(logger, logging.WARNING, "connection-refused", client=client)
            await _refuse(stream, "too many connections from this client")
            return
        wrapped: trio.abc.Stream = stream
        if self.settings.tls is not None:
            wrapped = trio.SSLStream(stream, self.settings.tls, server_side=True)
        connection = ClientConnection(self, wrapped, client)
        self._connections.add(connection)
        self._per_client[client] += 1
        self.metrics.connections.inc()
        if self._shutdown_requested.is_set():
            connection.going_away()
        try:
            await connection.run()
        except Exception:
            # One broken connection must never take the server down with it.
            log_event(logger, logging.ERROR, "connection-crashed", exc=True, client=client)
        finally:
            self.metrics.connections.dec()
            self._connections.discard(connection)
            self._per_client[client] -= 1
            if self._per_client[client] <= 0:
                del self._per_client[client]
            if not self._connections and self._shutdown_requested.is_set():
                self._all_closed.set()

    async def _drain_and_close(self, connections_scope: trio.CancelScope) -> None:
        for connection in list(self._connections):
            connection.going_away()
        if self._connections:
            with trio.move_on_after(self.settings.shutdown_grace):
                await self._all_closed.wait()
        connections_scope.cancel()


def _error(reply_to: int, error: UploadError | RemoteProtocolError) -> Error:
    # Messages can quote GCS or library errors: scrub them like log lines.
    return Error(reply_to, error.code, error.retryable, redact(error.message))


def _completed(reply_to: int, info: ObjectInfo) -> Completed:
    """The Completed reply for ``info``, whose checksums are in GCS's base64 form."""
    crc32c = int.from_bytes(base64.b64decode(info.crc32c), "big") if info.crc32c else 0
    md5 = base64.b64decode(info.md5_hash) if info.md5_hash else None
    return Completed(reply_to, info.generation, info.size, crc32c, md5)


def _peer_host(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return "unknown"


async def _refuse(stream: trio.SocketStream, message: str) -> None:
    protocol = Connection(Role.SERVER)
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        with trio.move_on_after(_DRAIN_TIMEOUT):
            await stream.send_all(
                b"".join(protocol.send(Error(0, ErrorCode.TOO_BUSY, True, message)))
            )
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
    graceful (GoingAway, then up to ``shutdown_grace`` for in-flight frames); cancellation
    is abrupt. Either way unfinished uploads are released, not aborted: their GCS sessions
    stay resumable through their tokens.
    """
    protect_third_party_loggers()
    metrics = ServerMetrics()
    listeners = await trio.open_tcp_listeners(settings.port, host=settings.host)
    host, port = listeners[0].socket.getsockname()[:2]
    async with trio.open_nursery() as server_nursery:
        registry = UploadRegistry(settings, backend, metrics, server_nursery)
        server = ProxyServer(settings, backend, metrics, registry, (str(host), int(port)))
        if metrics_listen is not None:
            server.metrics_address = await server_nursery.start(
                serve_metrics, metrics, metrics_listen[0], metrics_listen[1]
            )
        async with trio.open_nursery() as connections_nursery:
            accept_scope = trio.CancelScope()

            async def accept() -> None:
                with accept_scope:
                    await trio.serve_listeners(
                        server._handle, listeners, handler_nursery=connections_nursery
                    )

            connections_nursery.start_soon(accept)
            log_event(
                logger,
                logging.INFO,
                "listening",
                address=f"{host}:{port}",
                tls=settings.tls is not None,
                gcs=backend.url,
            )
            task_status.started(server)
            await server._shutdown_requested.wait()
            log_event(logger, logging.INFO, "shutting-down", connections=server.connection_count)
            accept_scope.cancel()
            await server._drain_and_close(connections_nursery.cancel_scope)
        # Connections are gone; release the uploads (their GCS sessions stay resumable).
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
