"""One client connection: the protocol per connection, and the dispatch of its requests.

Task tree of one connection (every task lives in the connection's nursery)::

    ClientConnection.run()   receive loop (the task itself), send loop, and one task per
                             Complete awaiting its result

A connection reads frames one at a time and streams each WriteAt payload straight into the
upload's writer as it arrives. Everything it sends goes through its :class:`Outbox`, which
keeps replies in order and coalesces Credit updates, so a slow client never holds up the
upload or other clients. Uploads belong to the registry, not to a connection: closing a
connection leaves its upload to go on, to be attached again with its token.
"""

from __future__ import annotations

import base64
import hmac
import logging
import os
from collections import deque
from collections.abc import Callable

import trio

from protocol import (
    MAX_LISTED_RANGES,
    NEED_DATA,
    Abort,
    Ack,
    AttachUpload,
    Complete,
    Completed,
    Compose,
    CompositeOpened,
    Connection,
    ConnectionClosed,
    ConnectionState,
    Credit,
    Discard,
    Error,
    ErrorCode,
    Event,
    FrameType,
    GoingAway,
    Hello,
    IncomingFrame,
    Incomplete,
    OpenSegment,
    OpenUpload,
    PayloadCrcError,
    Ping,
    Pong,
    ProtocolError,
    PutObject,
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
from proxy.server.budget import Reservation
from proxy.server.errors import ServerError
from proxy.server.logging import get_logger, log_event, redact
from proxy.server.metrics import ServerMetrics
from proxy.server.registry import CompositeTokenError, UploadRegistry
from proxy.server.settings import ServerSettings
from proxy.server.uploads import MissingRangesError, OpenRequest, StagedWrite, Upload
from reliablewriter import ObjectInfo
from reliablewriter.checksum import crc32c_from_b64

__all__ = ["ClientConnection", "Outbox"]

logger = get_logger(__name__)

#: most bytes asked of the socket per receive (1 MiB: about 10% less CPU per GiB than 256 KiB,
#: fewer wake-ups per frame); a receive never reaches past the end of the
#: WriteAt payload being read, so payload views are whole receive buffers (no copy to checksum)
_RECEIVE_SIZE = 1024 * 1024

#: receives taken without waiting before the receive loop lets other tasks run: trio's own
#: receive yields to the scheduler after each one, a pass of its loop that cost more than the
#: receive itself; a receive that has to wait yields anyway
_RECEIVES_PER_YIELD = 8

#: PUT_OBJECT requests one connection may have in flight; each holds its object's bytes
#: (paid from the budget) until GCS answers, and more would only queue behind them
_PUT_OBJECTS_IN_FLIGHT = 16
#: COMPOSE and DISCARD requests one connection may have in flight (each lists and deletes
#: objects in GCS; a client needs one per upload)
_COMPOSITE_REQUESTS_IN_FLIGHT = 4
#: the protocol version that has composite uploads (docs/protocol.md section 14)
_COMPOSITE_VERSION = 3
#: replies a connection may have queued before its receive loop waits for the client to read
_OUTBOX_CAPACITY = 64
#: how long a connection that is being closed gets to deliver its last frames
DRAIN_TIMEOUT = 2.0


class _HangUpError(Exception):
    """Ends the receive loop; the connection sends what is queued and closes."""


class Outbox:
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

    @property
    def has_room(self) -> bool:
        """Whether :meth:`put` would queue at once."""
        return len(self._replies) < self._capacity or self._closed

    async def put(self, reply: Reply) -> None:
        """Queue ``reply``, waiting while the client is ``capacity`` replies behind."""
        while not self.has_room:
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

    async def get(self) -> list[Reply]:
        """Everything queued, in order (the Credit last), waiting until there is something;
        ``[]`` once closed and empty."""
        while True:
            if self._replies:
                replies = list(self._replies)
                self._replies.clear()
                self._has_room.unpark_all()
                if self._credit is not None:
                    replies.append(self._credit)
                    self._credit = None
                return replies
            if self._credit is not None:
                credit, self._credit = self._credit, None
                return [credit]
            if self._closed:
                return []
            await self._has_items.park()


def _authenticated(presented: str, accepted: tuple[str, ...]) -> int | None:
    """Which of ``accepted`` ``presented`` is (its index), or ``None``; in time independent
    of where it differs. With nothing to accept, everyone is index 0."""
    if not accepted:
        return 0
    presented_bytes = presented.encode("utf-8")
    matched: int | None = None
    for index, token in enumerate(accepted):
        # No early exit: every configured token is compared every time.
        if hmac.compare_digest(presented_bytes, token.encode("utf-8")):
            matched = index
    return matched


class ClientConnection:
    """One client connection: handshake, then requests until either side closes.

    Cancelling :meth:`run` closes the connection; the uploads it was attached to go on
    (they belong to the registry) and can be re-attached with their token.
    """

    def __init__(
        self,
        settings: ServerSettings,
        registry: UploadRegistry,
        metrics: ServerMetrics,
        stream: trio.abc.Stream,
        client: str,
        *,
        on_authenticated: Callable[[ClientConnection], None] = lambda connection: None,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._metrics = metrics
        self._stream = stream
        self.client = client
        #: who the client is to budgets and limits: its address until a bearer token says
        self.identity = client
        #: whether the client's Hello was accepted
        self.authenticated = False
        self._hello_wait = trio.CancelScope()
        self._dropped_before_hello = False
        self._on_authenticated = on_authenticated
        self._protocol = Connection(Role.SERVER, max_frame_size=self._settings.max_frame_size)
        self._outbox = Outbox(_OUTBOX_CAPACITY)
        self._sender_done = trio.Event()
        self._upload: Upload | None = None
        self._staged: StagedWrite | None = None
        #: requests answered by tasks of their own (Complete); an idle client waiting on
        #: one of them is not idle
        self._outstanding = 0
        self._puts_in_flight = 0
        self._composite_requests_in_flight = 0
        self._going_away = False
        #: the socket of a plain TCP connection, read without trio's wrappers (_read_socket;
        #: os.read on a socket is POSIX)
        self._socket = (
            stream.socket if isinstance(stream, trio.SocketStream) and os.name == "posix" else None
        )
        self._receives_since_yield = 0
        #: what PUT_OBJECT frames being received have paid for their payload, by seq
        self._put_payments: dict[int, Reservation] = {}

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
                with trio.move_on_after(DRAIN_TIMEOUT):
                    await self._sender_done.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._unbind()
            await trio.aclose_forcefully(self._stream)
            log_event(logger, logging.DEBUG, "connection-closed", client=self.client)

    def drop_before_hello(self) -> None:
        """End the wait for this client's Hello now (others are waiting for theirs): it is
        told TOO_MANY_CONNECTIONS, and may connect again. Does nothing after the Hello."""
        if not self.authenticated:
            self._dropped_before_hello = True
            self._hello_wait.cancel()

    def going_away(self) -> None:
        """Tell the client the server is shutting down; requests in flight still finish."""
        self._going_away = True
        self._outbox.put_nowait(GoingAway(0, "server shutting down; reconnect and attach"))

    def offer_credit(self, upload: Upload, committed_offset: int, window_end: int) -> None:
        if upload is self._upload:
            self._outbox.offer_credit(Credit(0, committed_offset, window_end))

    def upload_failed(self, upload: Upload, error: ServerError) -> None:
        # Unsolicited, so a client waiting for credit learns now instead of at its timeout.
        if upload is self._upload:
            self._outbox.forget_credit()
            self._fail(0, error)

    # --- sending ----------------------------------------------------------------------

    async def _send_loop(self) -> None:
        """Sends what the outbox holds, all that is queued in one write: the Acks of the
        frames one receive completed cost one send, not one each."""
        try:
            while replies := await self._outbox.get():
                frames: list[bytes | memoryview] = []
                for reply in replies:
                    if self._protocol.state is ConnectionState.ERROR and not isinstance(
                        reply, Error | GoingAway
                    ):
                        continue  # after a fatal error only the explanation may still go out
                    if isinstance(reply, Error):
                        self._metrics.errors.labels(code=reply.code.name).inc()
                    frames += self._protocol.send(reply)
                if frames:
                    await self._send_all(b"".join(frames))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client is gone; the receive loop finds out on its own
        finally:
            self._sender_done.set()

    async def _send_all(self, data: bytes) -> None:
        """Send ``data``; on a plain TCP connection with room in the socket's buffer (the
        usual case for replies), one write without trio's wrappers or a scheduler pass.
        Raises BrokenResourceError once the client is gone."""
        if self._socket is not None:
            try:
                sent = os.write(self._socket.fileno(), data)
            except BlockingIOError:
                sent = 0  # the client is behind: wait for room below
            except OSError as exc:  # reset, or closed under us
                raise trio.BrokenResourceError(f"the client is gone: {exc}") from exc
            if sent == len(data):
                return
            data = data[sent:]
        await self._stream.send_all(data)

    async def _reply(self, reply: Reply) -> None:
        """Queue ``reply``; a client that stops reading its replies gets disconnected.

        Without the limit, a client that pipelines requests but never reads would park
        this connection forever with its receive loop stuck here, out of the idle timeout's
        reach.
        """
        if self._outbox.has_room:  # the usual case, without a cancel scope
            self._outbox.put_nowait(reply)
            return
        with trio.move_on_after(self._settings.idle_timeout):
            await self._outbox.put(reply)
            return
        log_event(logger, logging.INFO, "client-not-reading", client=self.client)
        raise _HangUpError

    def _fail(self, reply_to: int, error: ServerError | ProtocolError) -> None:
        """Queue an Error at once, for the few that come at most once per request or upload."""
        self._outbox.put_nowait(_error(reply_to, error))

    # --- receiving --------------------------------------------------------------------

    async def _receive(self, patience: float) -> bytes | None:
        """The next bytes from the client (b"" at EOF), or ``None`` if none came in time:
        no byte for ``patience`` seconds."""
        size = self._protocol.receive_size(_RECEIVE_SIZE)
        if self._socket is not None:
            return await self._read_socket(self._socket, size, patience)
        with trio.move_on_after(patience):
            return await self._receive_some(size)
        return None

    async def _read_socket(
        self, socket: trio.socket.SocketType, size: int, patience: float
    ) -> bytes | None:
        """:meth:`_receive` on a plain TCP connection, without trio's receive wrappers.

        Bytes already waiting are read at once: no cancel scope, and a yield to other tasks
        only every ``_RECEIVES_PER_YIELD`` receives (trio's receive yields after each, a pass
        of its scheduler that cost more than the receive). Only a receive that has to wait
        gets a deadline, ``patience`` from when it started waiting, as every receive did.
        """
        deadline: float | None = None
        while True:
            try:
                data = os.read(socket.fileno(), size)
            except BlockingIOError:
                pass  # nothing waiting: wait for it below
            except OSError:
                return b""  # reset, or closed under us: the client is gone
            else:
                self._receives_since_yield += 1
                if self._receives_since_yield >= _RECEIVES_PER_YIELD:
                    self._receives_since_yield = 0
                    await trio.lowlevel.checkpoint()
                return data
            self._receives_since_yield = 0
            if deadline is None:
                deadline = trio.current_time() + patience
            with trio.move_on_at(deadline):
                await trio.lowlevel.wait_readable(socket)
                continue
            return None

    async def _next_event(self, *, patience: float) -> Event:
        while True:
            event = self._protocol.next_event()
            if event is not NEED_DATA:
                return event
            staged, socket = self._staged, self._socket
            wanted = self._protocol.write_at_data_wanted
            if staged is not None and socket is not None and wanted:
                await self._read_write_at_data(staged, socket, wanted, patience)
                continue
            incoming = self._protocol.incoming_frame
            if incoming is not None and incoming.type is FrameType.PUT_OBJECT:
                await self._pay_for_put_object(incoming)
            data = await self._receive(patience)
            if data is None:
                if self._outstanding:
                    continue
                raise TimeoutError
            self._protocol.receive_data(data)

    async def _read_write_at_data(
        self, staged: StagedWrite, socket: trio.socket.SocketType, wanted: int, patience: float
    ) -> None:
        """Read an accepted WRITE_AT's data from a plain TCP socket straight into its staged
        write: each receive is checksummed by the protocol and fed on, with no event or
        dispatch per receive (a frame takes a few receives of up to ``_RECEIVE_SIZE``; this
        is the path every streamed byte takes). Returns once the data is all read, or at EOF
        (the protocol then reports the frame cut short); raises TimeoutError as
        :meth:`_next_event` does.

        Cancelled partway, the bytes fed so far stay staged, to be discarded with the frame.
        """
        protocol = self._protocol
        while wanted:
            data = await self._read_socket(socket, min(wanted, _RECEIVE_SIZE), patience)
            if data is None:
                if self._outstanding:
                    continue
                raise TimeoutError
            if not data:
                protocol.receive_data(b"")
                return
            protocol.receive_write_at_data(data)
            staged.feed(memoryview(data))
            wanted -= len(data)

    async def _pay_for_put_object(self, incoming: IncomingFrame) -> None:
        """Charge a PUT_OBJECT's payload to the memory budget before any of it is read.

        The protocol buffers the whole object before it can be checked and handed on, so a
        connection that has not paid reads nothing more: it waits for budget like a new
        upload's window does. If none comes back in time, the client is told TOO_BUSY and the
        connection closes, since the payload cannot be skipped. Cancelled while waiting,
        nothing stays charged.
        """
        if incoming.seq in self._put_payments:
            return
        try:
            self._put_payments[incoming.seq] = await self._registry.whole_objects.pay(
                self.identity, incoming.payload_size
            )
        except ServerError as exc:
            log_event(
                logger, logging.INFO, "put-object-unpaid", client=self.client,
                size=incoming.payload_size,
            )  # fmt: skip
            self._fail(incoming.seq, exc)
            raise _HangUpError from exc

    def _release_put_payment(self, seq: int) -> None:
        payment = self._put_payments.pop(seq, None)
        if payment is not None:
            payment.release()

    async def _read_hello(self) -> Event | None:
        """The first event, or ``None`` (and the client told why) if the handshake timed out.

        One deadline covers TLS and Hello together, so a slow trickle cannot stretch it, and
        at most ``preauth_read_limit`` bytes are read before the Hello is accepted, so a
        crowd of half-sent Hellos costs little each (TLS records aside, which the TLS layer
        bounds itself). Raises RemoteProtocolError (FRAME_TOO_LARGE) past that limit.
        """
        settings = self._settings
        limit = settings.preauth_read_limit
        tls_done = not isinstance(self._stream, trio.SSLStream)
        received = 0
        self._hello_wait.deadline = trio.current_time() + settings.handshake_timeout
        with self._hello_wait:
            if isinstance(self._stream, trio.SSLStream):
                await self._stream.do_handshake()
                tls_done = True
            while (event := self._protocol.next_event()) is NEED_DATA:
                if received >= limit:
                    raise RemoteProtocolError(
                        f"no complete Hello in the first {limit} bytes", ErrorCode.FRAME_TOO_LARGE
                    )
                data = await self._receive_some(min(limit - received, _RECEIVE_SIZE))
                received += len(data)
                self._protocol.receive_data(data)
            return event
        if self._dropped_before_hello:
            # TOO_MANY_CONNECTIONS; send() makes it TOO_BUSY for a version-1 peer.
            code, message = ErrorCode.TOO_MANY_CONNECTIONS, "too many connections wait for a Hello"
            event_name = "dropped-before-hello"
        else:
            # HANDSHAKE_TIMEOUT; send() makes it IDLE_TIMEOUT for a version-1 peer.
            code, message = (
                ErrorCode.HANDSHAKE_TIMEOUT,
                f"no Hello within {settings.handshake_timeout:g} s",
            )
            event_name = "handshake-timeout"
        if tls_done:
            self._outbox.put_nowait(Error(0, code, True, message))
        log_event(logger, logging.INFO, event_name, client=self.client)
        return None

    async def _receive_some(self, size: int) -> bytes:
        """Up to ``size`` bytes from the client, b"" once it is gone."""
        try:
            return bytes(await self._stream.receive_some(size))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    async def _receive_loop(self, nursery: trio.Nursery) -> None:
        settings = self._settings
        try:
            hello = await self._read_hello()
            if hello is None:
                return
            await self._handshake(hello)
            while True:
                try:
                    event = await self._next_event(patience=settings.idle_timeout)
                except PayloadCrcError as exc:
                    # The header was sound, so the stream is still in step: refuse this
                    # frame only, and let the client resend it.
                    self._discard_staged()
                    self._release_put_payment(exc.seq)
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
                except ServerError as exc:
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
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # TLS handshake failed or the client vanished mid-handshake
        finally:
            self._discard_staged()
            for seq in list(self._put_payments):  # a PUT_OBJECT cut off partway
                self._release_put_payment(seq)

    async def _handshake(self, event: Event) -> None:
        if not isinstance(event, Hello):
            # The protocol state machine refuses anything but Hello first; be explicit anyway.
            raise RemoteProtocolError("the first frame must be Hello", ErrorCode.UNEXPECTED_FRAME)
        matched = _authenticated(event.auth, self._settings.auth_tokens)
        if matched is None:
            refusal = "bearer token not accepted" if event.auth else "no bearer token sent"
            log_event(logger, logging.WARNING, "auth-refused", client=self.client, why=refusal)
            self._fail(event.seq, ServerError(ErrorCode.UNAUTHENTICATED, refusal))
            raise _HangUpError
        self.authenticated = True
        self._on_authenticated(self)
        if self._settings.auth_tokens:
            # Clients are told apart by the bearer token they hold, not by address: clients
            # behind one NAT are not one client, and one client on many addresses is.
            self.identity = f"bearer-{matched + 1}"
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
                # The frame's data CRC32C, checked on arrival: the writer builds the object's
                # from it instead of reading the bytes again.
                committed = staged.commit(event.data_crc32c)
                await self._reply(Ack(event.seq, committed))
        elif isinstance(event, OpenUpload):
            await self._open(event)
        elif isinstance(event, AttachUpload):
            await self._attach(event)
        elif isinstance(event, OpenSegment):
            self._refuse_new_work_when_leaving()
            upload = await self._registry.open_segment(event.token, event.index, self.identity)
            await self._bind(event.seq, upload, resumed=False)
        elif isinstance(event, Compose | Discard):
            self._refuse_new_work_when_leaving()
            _refuse_beyond(
                self._composite_requests_in_flight,
                _COMPOSITE_REQUESTS_IN_FLIGHT,
                "COMPOSE or DISCARD",
            )
            self._outstanding += 1
            self._composite_requests_in_flight += 1
            nursery.start_soon(self._finish_composite, event)
        elif isinstance(event, Complete):
            self._outstanding += 1
            nursery.start_soon(self._complete, self._bound(), event)
        elif isinstance(event, PutObject):
            # Paid when its header arrived: a header is read apart from its payload
            # (receive_size), and a PUT_OBJECT's payload is never empty. Should one ever come
            # whole all the same, it is paid now rather than not at all.
            payment = self._put_payments.pop(event.seq, None)
            if payment is None:
                payment = await self._registry.whole_objects.pay(self.identity, len(event.data))
            try:
                self._refuse_new_work_when_leaving()
                _refuse_beyond(self._puts_in_flight, _PUT_OBJECTS_IN_FLIGHT, "PUT_OBJECT")
            except ServerError:
                payment.release()
                raise
            self._outstanding += 1
            self._puts_in_flight += 1
            nursery.start_soon(self._put_object, event, payment)
        elif isinstance(event, Abort):
            upload = self._bound()
            try:
                await self._registry.abort(upload)
            finally:
                self._unbind()  # whatever the answer, an Abort leaves the connection unbound
            await self._reply(Ack(event.seq, 0))
        elif isinstance(event, StatusQuery):
            upload = self._bound()
            failure = upload.failure()
            if failure is not None:
                raise failure
            # The lowest ranges only, so the reply always fits a control frame; a client
            # resends what it does not see listed, which is safe.
            received = upload.received_ranges()[:MAX_LISTED_RANGES]
            await self._reply(
                Status(event.seq, upload.committed_offset, received, upload.window_end)
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
            raise ServerError(ErrorCode.INVALID_STATE, "no upload is open on this connection")
        return self._upload

    def _refuse_new_work_when_leaving(self) -> None:
        if self._going_away:
            raise ServerError(
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
        composite = self._settings.composite
        speaks_composite = (self._protocol.version or 1) >= _COMPOSITE_VERSION
        if speaks_composite and composite.applies_to(
            event.expected_size, single_session=event.single_session
        ):
            token = await self._registry.open_composite(request, self.identity)
            await self._reply(
                CompositeOpened(
                    event.seq, token, composite.segment_size, composite.parallel_segments
                )
            )
            return
        upload = await self._registry.open(request, self.identity)
        await self._bind(event.seq, upload, resumed=False)

    async def _attach(self, event: AttachUpload) -> None:
        self._refuse_new_work_when_leaving()
        try:
            upload, resumed = await self._registry.attach(event.token, self.identity)
        except CompositeTokenError:
            if (self._protocol.version or 1) < _COMPOSITE_VERSION:
                raise
            # What was stored lives in GCS: the client composes to learn what is missing.
            ticket = self._registry.composite_ticket(event.token)
            await self._registry.composites.check_not_discarded(ticket)
            parallel = self._settings.composite.parallel_segments
            await self._reply(
                CompositeOpened(event.seq, event.token, ticket.segment_size, parallel)
            )
            return
        await self._bind(event.seq, upload, resumed=resumed)

    async def _bind(self, reply_to: int, upload: Upload, *, resumed: bool) -> None:
        self._unbind()
        await upload.attach(self)
        self._upload = upload
        committed = upload.committed_offset
        window_end = upload.window_end
        await self._reply(UploadOpened(reply_to, upload.token, committed, resumed, window_end))
        self._outbox.offer_credit(Credit(0, committed, upload.window_end))

    def _unbind(self) -> None:
        self._discard_staged()
        if self._upload is not None:
            self._upload.detach(self)
            self._upload = None
        self._outbox.forget_credit()

    async def _put_object(self, event: PutObject, payment: Reservation) -> None:
        """Pipelined: replies may overtake each other, and the connection's state does not
        change (it stays unbound). ``payment`` is released when GCS has answered."""
        try:
            info = await self._registry.whole_objects.store(event, self.identity, payment)
        except ServerError as exc:
            self._fail(event.seq, exc)
        else:
            # Without waiting for room: at most _PUT_OBJECTS_IN_FLIGHT such replies queue.
            self._outbox.put_nowait(_completed(event.seq, info))
        finally:
            self._outstanding -= 1
            self._puts_in_flight -= 1

    async def _finish_composite(self, event: Compose | Discard) -> None:
        """Pipelined, like PUT_OBJECT: the connection stays unbound."""
        try:
            if isinstance(event, Discard):
                await self._registry.discard_composite(event.token)
                self._outbox.put_nowait(Ack(event.seq, 0))
                return
            ticket = self._registry.composite_ticket(event.token)
            info = await self._registry.composites.compose(ticket, event.total_size, event.crc32c)
        except MissingRangesError as exc:
            # Segments, not bytes, are missing: what lies below the first is all stored.
            stored = exc.missing[0][0]
            self._outbox.put_nowait(Incomplete(event.seq, stored, stored, exc.missing))
        except ServerError as exc:
            self._fail(event.seq, exc)
        else:
            self._outbox.put_nowait(_completed(event.seq, info))
        finally:
            self._outstanding -= 1
            self._composite_requests_in_flight -= 1

    async def _complete(self, upload: Upload, event: Complete) -> None:
        try:
            info = await upload.complete(event.total_size, event.crc32c)
        except MissingRangesError as exc:
            # send() turns this into MISSING_RANGES for a version-1 client.
            self._outbox.put_nowait(
                Incomplete(event.seq, upload.committed_offset, upload.window_end, exc.missing)
            )
        except ServerError as exc:
            self._fail(event.seq, exc)
        else:
            if self._upload is upload:
                self._unbind()  # Completed returns the connection to the unbound state
            self._outbox.put_nowait(_completed(event.seq, info))
        finally:
            self._outstanding -= 1


def _refuse_beyond(in_flight: int, limit: int, kind: str) -> None:
    """TOO_BUSY (retryable) once ``limit`` pipelined requests of ``kind`` are in flight on one
    connection: each holds memory or GCS work until answered, and more would only queue."""
    if in_flight >= limit:
        raise ServerError(
            ErrorCode.TOO_BUSY,
            f"{limit} {kind} requests are in flight on this connection already: wait for a"
            " reply, or use another connection",
            retryable=True,
        )


def _error(reply_to: int, error: ServerError | ProtocolError) -> Error:
    # Messages can quote GCS or library errors: scrub them like log lines.
    return Error(reply_to, error.code, error.retryable, redact(error.message))


def _completed(reply_to: int, info: ObjectInfo) -> Completed:
    """The Completed reply for ``info``, whose checksums are in GCS's base64 form."""
    crc32c = crc32c_from_b64(info.crc32c) if info.crc32c else 0
    md5 = base64.b64decode(info.md5_hash) if info.md5_hash else None
    return Completed(reply_to, info.generation, info.size, crc32c, md5)
