"""One connection to the proxy: a sans-IO :class:`~protocol.Connection`, a stream, its requests.

A :class:`Channel` knows nothing of the upload's insides: it talks to it through
:class:`ChannelOwner` (the settings, the byte :class:`~proxy.client.ledger.Ledger`, the next
piece to send, and where to report an upload-level refusal). Replies are matched to
requests by ``reply_to``; ``WriteAt`` frames are tracked by sequence number with the range
they carry, so a lost connection hands those ranges back.

Network trouble never escapes :meth:`Channel.run`: it becomes :attr:`Channel.failure` (a
:class:`~proxy.client.errors.ConnectionLostError`) and the slot that owns the channel decides
whether to reconnect. Cancelling ``run`` closes the stream; frames in flight are then lost
and :meth:`Channel.in_flight` says which.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Final, Protocol, TypeVar

import trio

from protocol import (
    MAGIC,
    NEED_DATA,
    PROTOCOL_VERSION,
    Ack,
    Connection,
    ConnectionClosed,
    Credit,
    Error,
    ErrorCode,
    Event,
    GoingAway,
    LocalProtocolError,
    Pong,
    RemoteProtocolError,
    Reply,
    Request,
    Role,
    Scope,
    Welcome,
    WriteAt,
    error_spec,
)
from protocol.ranges import ByteRange
from proxy.client.errors import (
    ConnectionLostError,
    UploadError,
    condemns_upload,
    rejection,
    unexpected_reply,
)
from proxy.client.ledger import Ledger
from proxy.client.settings import ClientSettings, KiB

__all__ = ["CLIENT_NAME", "Channel", "ChannelOwner"]

CLIENT_NAME: Final = "rup-client/0.1"
_RECEIVE_SIZE: Final = 64 * KiB

_E = TypeVar("_E", bound=BaseException)


class ChannelOwner(Protocol):
    """What a channel needs from the upload it serves, and nothing more."""

    @property
    def settings(self) -> ClientSettings: ...

    @property
    def ledger(self) -> Ledger: ...

    @property
    def description(self) -> str:
        """Names the upload in messages (``upload of gs://bucket/object``), never a secret."""

    @property
    def auth(self) -> str:
        """The bearer token for Hello (never logged)."""

    @property
    def aborting(self) -> bool:
        """An Abort is on its way: ABORTED refusals are expected, not failures."""

    def fail(self, error: UploadError) -> None:
        """The proxy refused the upload for good: end it with ``error``."""

    async def next_piece(self, channel: Channel) -> ByteRange | None:
        """The next piece for ``channel`` to send (waits for one); None to stop sending."""


class _Waiter:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: Reply | ConnectionLostError | None = None


class Channel:
    """One connection to the proxy: a sans-IO Connection, a stream, and its outstanding requests.

    Replies are matched to requests by ``reply_to``. WriteAt frames are tracked by sequence
    number with the range they carry, so a lost connection hands those ranges back.
    """

    def __init__(self, owner: ChannelOwner, stream: trio.abc.Stream, *, peer: str) -> None:
        self._owner = owner
        self._stream = stream
        #: ``host:port``, for messages
        self._peer = peer
        #: the first bytes the peer sent, until they show it speaks the protocol
        self._first_bytes: bytes | None = b""
        self._conn = Connection(Role.CLIENT, max_frame_size=owner.settings.offered_frame_size)
        #: the most data one WriteAt or PutObject may carry, as agreed in the Welcome (a
        #: transfer cuts its WriteAt frames at its own, usually smaller, frame size)
        self.max_data = owner.settings.offered_frame_size
        #: the protocol version the Welcome agreed (1 until then)
        self.version = PROTOCOL_VERSION
        self._send_lock = trio.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._frames: dict[int, ByteRange] = {}
        #: a piece taken for sending that has no sequence number yet
        self._staged: ByteRange | None = None
        self._frame_slots = trio.Semaphore(owner.settings.frames_in_flight)
        self.failure: ConnectionLostError | None = None
        self.going_away = False
        self.acked_any = False
        self._blocking = False
        self._patient = False
        self._cancel_scope = trio.CancelScope()
        self._receive_scope: trio.CancelScope | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def fail(self, reason: ConnectionLostError) -> None:
        if self.failure is None:
            self.failure = reason
        for waiter in self._waiters.values():
            waiter.reply = reason
            waiter.done.set()
        self._waiters.clear()
        self._cancel_scope.cancel()

    def in_flight(self) -> list[ByteRange]:
        """The pieces this connection has taken and the proxy has not answered yet."""
        pieces = list(self._frames.values())
        if self._staged is not None:
            pieces.append(self._staged)
        return pieces

    def surrender(self) -> list[ByteRange]:
        """Once the connection is gone: its pieces in flight, which are now lost."""
        pieces = self.in_flight()
        self._frames.clear()
        self._staged = None
        return pieces

    async def run(self, bind: Callable[[Channel], Awaitable[None]]) -> None:
        """Handshake, bind to the upload, then send pieces until cancelled or failed.

        Never raises for network trouble: the reason ends up in :attr:`failure` and the
        owning slot decides whether to reconnect. Upload-level refusals go to the upload.
        """
        try:
            with self._cancel_scope:
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._receive_loop)
                        await self._handshake()
                        await bind(self)
                        await self._send_loop()
                except* ConnectionLostError as group:
                    self.fail(_first(group, ConnectionLostError))
                except* UploadError as group:
                    error = _first(group, UploadError)
                    if not (self._owner.aborting and error.code == ErrorCode.ABORTED):
                        self._owner.fail(error)
                    self.fail(ConnectionLostError(error.message, code=error.code))
                except* (trio.BrokenResourceError, trio.ClosedResourceError) as group:
                    reason = f"connection broke: {_first(group, Exception)!r}"
                    self.fail(ConnectionLostError(reason))
                except* trio.TooSlowError:
                    self.fail(ConnectionLostError("proxy stopped reading for too long"))
                except* RemoteProtocolError as group:
                    exc = _first(group, RemoteProtocolError)
                    reason = f"proxy broke the protocol: {exc.message}"
                    self.fail(ConnectionLostError(reason, code=exc.code))
            if self.failure is None:
                self.fail(ConnectionLostError("connection closed"))
        finally:
            await trio.aclose_forcefully(self._stream)

    async def _handshake(self) -> None:
        settings = self._owner.settings
        # every version the codec speaks: a version-1 proxy picks 1, and all works as before
        hello = self._conn.hello(auth=self._owner.auth, client_name=CLIENT_NAME)
        with trio.fail_after(settings.connect_timeout):
            reply = await self.request(hello, blocking=True)
        if not isinstance(reply, Welcome):
            raise unexpected_reply(reply, "Hello")
        self.max_data = reply.max_frame_size
        self.version = reply.version
        self._owner.ledger.note_frame_size(reply.max_frame_size)

    # -- requests -------------------------------------------------------------------------

    async def _write_frame(self, buffers: list[bytes | memoryview]) -> None:
        """Write one frame; a broken, closed or stalled stream condemns this connection.

        Requests are also sent from tasks outside :meth:`run` (``complete()`` and
        ``abort()`` run in the caller's task), so the stream's own errors are turned into
        :class:`ConnectionLostError` here, at the one place frames are written.
        """
        try:
            with trio.fail_after(self._owner.settings.reply_timeout):
                for buffer in buffers:
                    await self._stream.send_all(buffer)
        except trio.TooSlowError as exc:
            lost = ConnectionLostError("proxy stopped reading for too long")
            self.fail(lost)
            raise lost from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            lost = ConnectionLostError(f"connection broke: {exc!r}")
            self.fail(lost)
            raise lost from exc

    async def _send_piece(
        self, piece: ByteRange, data: bytes | memoryview, crc32c: int | None
    ) -> bool:
        """Send one WriteAt; False, with nothing sent, if a blocking request got in first."""
        async with self._send_lock:
            if self._blocking:
                return False
            buffers = self._conn.send(WriteAt(offset=piece[0], data=data, data_crc32c=crc32c))
            self._frames[self._conn.last_sent_seq] = piece
            self._staged = None
            self._arm_receive_timeout()
            await self._write_frame(buffers)
        return True

    async def request(
        self, event: Request, *, blocking: bool = False, patient: bool = False
    ) -> Reply:
        """Send ``event`` and return the proxy's reply to it (which may be an Error).

        ``blocking`` requests (Hello, Open, Attach, Complete, Abort) forbid any WriteAt on
        this connection until answered. A ``patient`` one (Complete) may take as long as GCS
        needs to finalize, so it waits ``complete_timeout`` rather than ``reply_timeout``.
        """
        waiter = _Waiter()
        while True:
            async with self._send_lock:
                if self.failure is not None:
                    raise self.failure
                # One blocking request at a time: the protocol allows nothing else while,
                # say, a Complete is in flight, so an Abort waits for its answer.
                if not (blocking and self._blocking):
                    try:
                        buffers = self._conn.send(event)
                    except LocalProtocolError as exc:
                        raise UploadError(
                            ErrorCode.INVALID_STATE,
                            f"{self._owner.description}: cannot send"
                            f" {type(event).__name__} now: {exc.message}",
                        ) from exc
                    self._waiters[self._conn.last_sent_seq] = waiter
                    self._blocking = self._blocking or blocking
                    self._patient = self._patient or patient
                    self._arm_receive_timeout()
                    await self._write_frame(buffers)
                    break
            await self._owner.ledger.wait_changed()
        try:
            await waiter.done.wait()
        finally:
            if blocking:
                self._blocking = False
                self._owner.ledger.notify()
            if patient:
                self._patient = False
        if isinstance(waiter.reply, ConnectionLostError):
            raise waiter.reply
        assert waiter.reply is not None
        return waiter.reply

    # -- the two loops --------------------------------------------------------------------

    async def _send_loop(self) -> None:
        owner = self._owner
        while True:
            await self._frame_slots.acquire()
            while self._blocking:
                await owner.ledger.wait_changed()
            piece = await owner.next_piece(self)
            if piece is None:  # going away: let the proxy answer what is in flight
                self._frame_slots.release()
                await trio.sleep_forever()
            self._staged = piece
            data, crc32c = await owner.ledger.read(piece)
            if not await self._send_piece(piece, data, crc32c):
                self._staged = None
                owner.ledger.hand_back(piece)
                self._frame_slots.release()
                continue
            owner.ledger.note_sent(len(data))

    def _receive_timeout(self) -> float:
        if not self._waiters and not self._frames:
            return math.inf
        settings = self._owner.settings
        return settings.complete_timeout if self._patient else settings.reply_timeout

    def _arm_receive_timeout(self) -> None:
        # a reply is now due: a receive that started with no deadline must get one
        if self._receive_scope is not None:
            deadline = trio.current_time() + self._receive_timeout()
            self._receive_scope.deadline = min(self._receive_scope.deadline, deadline)

    async def _receive_loop(self) -> None:
        while True:
            event = self._conn.next_event()
            if event is NEED_DATA:
                deadline = trio.current_time() + self._receive_timeout()
                with trio.CancelScope(deadline=deadline) as scope:
                    self._receive_scope = scope
                    data = await self._stream.receive_some(_RECEIVE_SIZE)
                self._receive_scope = None
                if scope.cancelled_caught:
                    self.fail(ConnectionLostError("no reply from the proxy in time"))
                    return
                if not data:
                    self.fail(ConnectionLostError("proxy closed the connection"))
                    return
                self._check_peer_speaks_rup(data)
                self._conn.receive_data(data)
                continue
            self._dispatch(event)

    def _check_peer_speaks_rup(self, data: bytes | bytearray) -> None:
        """Fail the upload at once if the peer's first bytes are not a rup frame's magic.

        Such a peer (an HTTP server, say: a wrong port) will never answer, and retrying it
        until the deadline would only hide the mistake. One damaged byte is a fault on the
        wire, not another protocol: only two or more bytes off the magic count.
        """
        if self._first_bytes is None:
            return
        self._first_bytes += bytes(data[: len(MAGIC) - len(self._first_bytes)])
        if len(self._first_bytes) < len(MAGIC):
            return
        first, self._first_bytes = self._first_bytes, None
        if sum(a != b for a, b in zip(first, MAGIC, strict=True)) >= 2:
            preview = bytes(data[:24]).decode("ascii", "backslashreplace")
            self._owner.fail(
                UploadError(
                    None,
                    f"{self._owner.description}: {self._peer} does not speak the rup protocol"
                    f" (it sent {preview!r}); is that the proxy's address?",
                )
            )
            raise ConnectionLostError(f"{self._peer} does not speak the rup protocol")

    def _dispatch(self, event: Event) -> None:
        owner = self._owner
        if not isinstance(event, Reply):
            message = "proxy closed the connection" if isinstance(event, ConnectionClosed) else ""
            self.fail(ConnectionLostError(message or f"proxy sent a {type(event).__name__}"))
            return
        piece = self._frames.pop(event.reply_to, None) if event.reply_to else None
        if piece is not None:
            self._frame_slots.release()
            self._on_frame_reply(piece, event)
            if self.going_away and not self._frames:
                self.fail(ConnectionLostError("proxy is going away"))
            return
        waiter = self._waiters.pop(event.reply_to, None) if event.reply_to else None
        if waiter is not None:
            waiter.reply = event
            waiter.done.set()
        elif isinstance(event, Credit):
            owner.ledger.note_credit(event.committed_offset, event.window_end)
        elif isinstance(event, GoingAway):
            self.going_away = True
            owner.ledger.notify()
            if not self._frames:
                self.fail(ConnectionLostError("proxy is going away"))
        elif isinstance(event, Error):
            # unsolicited: the proxy is about to close this connection, or the upload is gone
            owner.ledger.count_error(event.code)
            if not condemns_upload(event) or owner.aborting:
                self.fail(ConnectionLostError(f"proxy said: {event.message}", code=event.code))
            else:
                owner.fail(rejection(event))
        elif not isinstance(event, Pong):
            raise RemoteProtocolError(
                f"reply to unknown request {event.reply_to}: {type(event).__name__}",
                ErrorCode.UNEXPECTED_FRAME,
            )

    def _on_frame_reply(self, piece: ByteRange, event: Reply) -> None:
        owner = self._owner
        if isinstance(event, Ack | Credit):
            self.acked_any = True
            owner.ledger.note_received(piece, event.committed_offset)
            if isinstance(event, Credit):
                owner.ledger.note_credit(event.committed_offset, event.window_end)
        elif isinstance(event, Error):
            owner.ledger.count_error(event.code)
            owner.ledger.requeue([piece], cause=event.code.name.lower())
            if event.retryable and error_spec(event.code).scope is Scope.FRAME:
                return  # only this frame failed (BAD_CRC, TOO_BUSY...): it is resent here
            if owner.aborting and event.code == ErrorCode.ABORTED:
                return
            if condemns_upload(event):
                owner.fail(rejection(event))
            else:
                self.fail(ConnectionLostError(f"proxy said: {event.message}", code=event.code))
        else:
            raise RemoteProtocolError(
                f"a WriteAt was answered with {type(event).__name__}", ErrorCode.UNEXPECTED_FRAME
            )


def _first(group: BaseExceptionGroup[BaseException], kind: type[_E]) -> _E:
    """The first leaf of an exception group (nested groups included)."""
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, kind)
    return leaf
