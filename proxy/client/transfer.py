"""The engine of one upload: N connection slots that open or attach, then send pieces.

One upload is spread over ``connections`` TCP connections ("slots"). The first slot opens the
upload and gets its token; the others attach with that token. Every slot then takes the
lowest piece of the object that still has to be sent, within the proxy's credit window, and
pipelines up to ``frames_in_flight`` ``WriteAt`` frames before it waits for their ``Ack``.
Pieces never cross a frame-size boundary, so a resend after a fault is the same frame again.

When a slot reconnects it re-attaches with the token and asks for ``Status``; the
:class:`~proxy.client.ledger.Ledger` then holds exactly what the proxy does not hold and no
other connection is sending. That is what makes a proxy restart harmless: the new instance
recovers the committed offset from GCS and the client resends only the rest.

:class:`Transfer` is what each :class:`~proxy.client.channel.Channel` talks to (it is their
:class:`~proxy.client.channel.ChannelOwner`); :class:`~proxy.client.upload.Upload` is the
caller's handle on it. Cancellation: cancelling the nursery given to :meth:`Transfer.start`
closes every connection; the proxy keeps the upload resumable with its token.
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from typing import Final, NoReturn

import trio

from protocol import (
    AttachUpload,
    CompositeOpened,
    Error,
    ErrorCode,
    Incomplete,
    OpenSegment,
    OpenUpload,
    Status,
    StatusQuery,
    UploadOpened,
)
from protocol.ranges import ByteRange, RangeSet
from proxy.client.channel import Channel
from proxy.client.errors import (
    ConnectionLostError,
    ProxyUnreachableError,
    UploadError,
    UploadRejectedError,
    condemns_upload,
    unexpected_reply,
)
from proxy.client.ledger import CONNECTION_LOST, Ledger
from proxy.client.lifecycle import Lifecycle, UploadState
from proxy.client.results import UploadProgress
from proxy.client.settings import ClientSettings, Connector, UploadOptions

__all__ = ["Transfer"]

_log: Final = logging.getLogger("rup.client")

#: Attach refusals that mean "this proxy cannot open your token": not an attack, and not an
#: authentication failure. BAD_TOKEN is what a version-1 peer says instead of
#: TOKEN_NOT_RESUMABLE; for a token this client was given, it means the same.
_NOT_RESUMABLE: Final = frozenset({ErrorCode.TOKEN_NOT_RESUMABLE, ErrorCode.BAD_TOKEN})


class Transfer:
    """One upload's connections, lifecycle and byte ledger."""

    def __init__(
        self,
        *,
        open_request: OpenUpload | OpenSegment,
        options: UploadOptions,
        addresses: list[tuple[str, int]],
        connector: Connector,
        destination: tuple[str, str] | None = None,
        description: str | None = None,
    ) -> None:
        """``open_request`` opens the upload: an ``OpenUpload``, or an ``OpenSegment`` for one
        segment of a composite upload, which then needs its ``destination`` (the object's
        bucket and name) and ``description``."""
        self._options = options
        self._open_request = open_request
        if destination is None:
            assert isinstance(open_request, OpenUpload)
            destination = (open_request.bucket, open_request.name)
        #: the object's bucket and name
        self.destination = destination
        self._addresses = addresses
        #: index into _addresses of the proxy every slot connects to: moves on when one fails
        self._current = 0
        self._connector = connector
        self._description = description or f"upload of gs://{destination[0]}/{destination[1]}"
        self.rng = random.Random()
        self.lifecycle = Lifecycle()
        self._ledger = Ledger(options.settings.frame_size, self.report)
        self._opened = trio.Event()
        #: given to resume an upload, else issued by the proxy at the open
        self._token: bytes | None = options.token
        self._channels: set[Channel] = set()
        self._cancel_scope = trio.CancelScope()
        self.started = time.monotonic()
        #: when the last bound connection was lost (None while one is bound)
        self._unavailable_since: float | None = None
        #: the proxy's answer to the open when it made the upload composite (section 14):
        #: the segments then go over connections of their own and these slots end
        self.composite: CompositeOpened | None = None
        #: whether that answer came to the token given to resume (an earlier run's upload,
        #: whose stored segments only GCS knows)
        self.composite_resumed = False

    # -- what a Channel sees (ChannelOwner) ------------------------------------------------

    @property
    def settings(self) -> ClientSettings:
        return self._options.settings

    @property
    def ledger(self) -> Ledger:
        return self._ledger

    @property
    def description(self) -> str:
        return self._description

    @property
    def auth(self) -> str:
        return self._options.auth

    @property
    def aborting(self) -> bool:
        return self.lifecycle.at(UploadState.ABORTING)

    def fail(self, error: UploadError) -> None:
        """End the upload with ``error`` (kept only if it is the first), stopping every slot."""
        if self.lifecycle.fail(error):
            self._cancel_scope.cancel()
        self._ledger.notify()

    async def next_piece(self, channel: Channel) -> ByteRange | None:
        """The lowest piece to send that fits the credit window; None when going away."""
        while True:
            self.lifecycle.check()
            if channel.going_away or not self.lifecycle.at(UploadState.SENDING):
                return None
            piece = self._ledger.take(channel.max_data)
            if piece is not None:
                return piece
            await self._ledger.wait_changed()

    # -- what the Upload sees --------------------------------------------------------------

    @property
    def open_request(self) -> OpenUpload | OpenSegment:
        return self._open_request

    @property
    def token(self) -> bytes | None:
        """The upload's token once the proxy issued it (a secret: never log it)."""
        return self._token

    async def wait_changed(self) -> None:
        """Wait until something changes; raises the upload's failure if there is one."""
        self.lifecycle.check()
        await self._ledger.wait_changed()

    async def wait_opened(self) -> None:
        """Wait until the upload is open or has failed (then :attr:`lifecycle` says why)."""
        while not self._opened.is_set() and self.lifecycle.failure is None:
            await self._ledger.wait_changed()

    def move(self, state: UploadState) -> None:
        """Move the lifecycle on and wake every waiter."""
        self.lifecycle.move(state)
        self._ledger.notify()

    async def any_channel(self) -> Channel:
        """A connection that is bound and healthy (waits for one)."""
        while True:
            self.lifecycle.check()
            for channel in self._channels:
                if channel.failure is None and not channel.going_away:
                    return channel
            await self._ledger.wait_changed()

    async def catch_up(self, channel: Channel) -> None:
        """Ask the proxy what it holds and make that the basis of what is left to send."""
        # Frames acknowledged while the Status is on its way are held too, even though the
        # Status (a snapshot taken earlier) cannot say so.
        with self._ledger.watch_acks() as acked_meanwhile:
            status = await channel.request(StatusQuery())
        if not isinstance(status, Status):
            raise unexpected_reply(status, "StatusQuery")
        in_flight = RangeSet()
        for other in self._channels:
            for start, end in other.in_flight():
                in_flight.add(start, end)
        self._ledger.resync(status, acked_meanwhile, in_flight)

    def resend_missing(self, incomplete: Incomplete) -> None:
        """A Complete was answered ``Incomplete``: send the listed ranges again."""
        self._ledger.count_error(ErrorCode.MISSING_RANGES)
        self._ledger.note_credit(incomplete.committed_offset, incomplete.window_end)
        in_flight = RangeSet()
        for other in self._channels:
            for start, end in other.in_flight():
                in_flight.add(start, end)
        self._ledger.forget(incomplete.missing, in_flight)

    def report(self) -> None:
        progress = self._options.progress
        if progress is None:
            return
        ledger = self._ledger
        source = ledger.source
        progress(
            UploadProgress(
                total=source.total if source is not None else None,
                bytes_sent=ledger.bytes_sent,
                bytes_received=ledger.received_total,
                committed=ledger.committed,
                connections=len(self._channels),
                reconnects=ledger.reconnects,
                resent_bytes=sum(ledger.resent_bytes_by_cause.values()),
                restarts=ledger.restarts,
                retrying_for=(
                    None
                    if self._unavailable_since is None
                    else trio.current_time() - self._unavailable_since
                ),
            )
        )

    async def _report_while_unavailable(self) -> None:
        """Once a second while no connection is up, so a display can count the seconds."""
        while True:
            await trio.sleep(1.0)
            if self._unavailable_since is not None:
                self.report()

    # -- connection slots ------------------------------------------------------------------

    def start(self, nursery: trio.Nursery) -> None:
        """Start every connection slot in ``nursery``; a failure of the upload cancels it all.

        Whatever else runs in ``nursery`` (the caller's block) is cancelled with the slots, so
        a failure interrupts a caller waiting on something unrelated, such as its data.
        """
        self._cancel_scope = nursery.cancel_scope
        self._ledger.mark_progress()  # the deadline counts from the start, at first
        for index in range(self.settings.connections):
            nursery.start_soon(self._run_slot, index)
        if self._options.progress is not None:
            nursery.start_soon(self._report_while_unavailable)

    def stop(self) -> None:
        """Stop every slot: the upload is over, or the caller left."""
        if not self.lifecycle.over:
            self.move(UploadState.DETACHED)
        self._cancel_scope.cancel()

    async def _run_slot(self, index: int) -> None:
        """Connect, bind and send; after a failure, back off and do it again, until the
        upload is over or no progress was made for the retry policy's deadline."""
        policy = self.settings.retry
        failures = 0
        last_reason = ""
        while not self.lifecycle.over and not self._handed_to_segments():
            if failures:
                idle = trio.current_time() - self._ledger.last_progress
                if policy.expired(idle):
                    self.fail(
                        ProxyUnreachableError(
                            f"{self._description}: gave up after {idle:.0f} s without progress"
                            f" ({failures} failed attempts on connection {index}); last:"
                            f" {last_reason}"
                        )
                    )
                    return
                await trio.sleep(policy.delay(failures, self.rng))
            address_index = self._current
            host, port = self._addresses[address_index]
            try:
                with trio.fail_after(self.settings.connect_timeout):
                    stream = await self._connector(host, port)
            except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                refusal = _tls_refusal(exc)
                if refusal is not None:  # a certificate or protocol mismatch: retrying cannot help
                    self.fail(
                        UploadError(
                            None, f"{self._description}: TLS with {host}:{port} failed: {refusal}"
                        )
                    )
                    return
                failures += 1
                last_reason = f"cannot connect to {host}:{port}: {exc or type(exc).__name__}"
                _log.info("%s: connection %d: %s", self._description, index, last_reason)
                self._move_on_from(address_index)
                self._note_unavailable()
                continue
            channel = Channel(self, stream, peer=f"{host}:{port}")
            await channel.run(self._bind)
            if self._handed_to_segments():
                return  # not a lost connection: the segments have connections of their own
            bound = self._drop(channel)
            assert channel.failure is not None
            last_reason = channel.failure.reason
            _log.info(
                "%s: connection %d lost (%s, %s): %s",
                self._description, index,
                "bound" if bound else "before binding",
                "frames acknowledged" if channel.acked_any else "no frame acknowledged",
                last_reason,
            )  # fmt: skip
            if channel.failure.code is not None:
                self._ledger.count_error(channel.failure.code)
            if not bound:
                self._move_on_from(address_index)  # refused before binding: try the next proxy
            if not self.lifecycle.over:
                self._ledger.note_reconnect()
                failures = 1 if channel.acked_any else failures + 1
            self.report()

    def _handed_to_segments(self) -> bool:
        """Whether the upload is composite, so its segments have connections of their own."""
        return self.composite is not None

    def _move_on_from(self, address_index: int) -> None:
        """The proxy at ``address_index`` failed: the slots go to the next one (if any)."""
        if self._current == address_index:
            self._current = (address_index + 1) % len(self._addresses)

    def _note_unavailable(self) -> None:
        if not self._channels and self._unavailable_since is None:
            self._unavailable_since = trio.current_time()
            self.report()

    def _drop(self, channel: Channel) -> bool:
        """Forget a finished connection, requeueing its frames; whether it had been bound."""
        bound = channel in self._channels
        if bound:
            self._channels.discard(channel)
            self._ledger.requeue(channel.surrender(), cause=CONNECTION_LOST)
        if not self.lifecycle.over:
            self._note_unavailable()
        self._ledger.notify()
        return bound

    def _bound(self, channel: Channel) -> None:
        self._channels.add(channel)
        self._unavailable_since = None

    async def _bind(self, channel: Channel) -> None:
        """Open the upload (first connection) or attach to it, and catch up with its state.

        The first connection of an upload given a token (a resume) attaches with it and asks
        for Status; if the proxy no longer has that upload, it opens a new one instead:
        nothing of this run's data was sent yet, so nothing is lost.
        """
        if self.lifecycle.at(UploadState.NEW):
            self.move(UploadState.OPENING)
            try:
                resumed = await self._request_resume(channel) if self._token else None
                opened = resumed or await self._request_open(channel)
            except BaseException:
                if self.lifecycle.at(UploadState.OPENING):
                    self.move(UploadState.NEW)  # another connection (or this one, again) opens
                raise
            self._token = opened.token
            if isinstance(opened, CompositeOpened):
                self.composite_resumed = resumed is not None
                self._open_composite(opened)
            self._ledger.note_attached(
                opened.committed_offset, resumed=opened.resumed, window_end=opened.window_end
            )
            self.move(UploadState.SENDING)
            self._opened.set()
            self._ledger.mark_progress()
            self._bound(channel)
            if resumed is not None:
                await self.catch_up(channel)
            self._ledger.notify()
            return
        await self._opened.wait()
        if self.composite is not None:
            raise ConnectionLostError("the upload is composite: this connection is not needed")
        token = self._token
        if token is None:
            # The upload started again (_start_again) while this waited: an already-set
            # Event's wait still yields, so the new upload may not be open yet. Bind anew.
            await self._bind(channel)
            return
        attached = await channel.request(AttachUpload(token=token), blocking=True)
        if isinstance(attached, Error) and attached.code in _NOT_RESUMABLE:
            if token is self._token:  # the first connection to hear it: start again
                self._start_again(attached)
            await self._bind(channel)  # the refused attach left the connection unbound
            return
        if not isinstance(attached, UploadOpened):
            raise unexpected_reply(attached, "AttachUpload")
        self._ledger.note_attached(
            attached.committed_offset, resumed=attached.resumed, window_end=attached.window_end
        )
        self._bound(channel)
        await self.catch_up(channel)

    def _start_again(self, refusal: Error) -> None:
        """The proxy cannot open the token (it restarted with another key, say): open a new
        upload and send everything again, if the source still holds everything."""
        self._ledger.count_error(refusal.code)
        source = self._ledger.source
        if self.aborting or (source is not None and not source.holds_everything):
            raise UploadRejectedError(
                ErrorCode.TOKEN_NOT_RESUMABLE,
                f"{self._description}: the proxy cannot resume this upload (it restarted with"
                " another key, or the token is damaged), and the first bytes of the stream are"
                " gone: upload it again",
            )
        _log.warning(
            "%s: the proxy cannot resume this upload (it restarted with another key, or the"
            " token is damaged): starting again from byte 0",
            self._description,
        )
        self._token = None
        self._opened = trio.Event()
        for other in list(self._channels):  # bound to the old upload: they must bind anew
            other.fail(ConnectionLostError("the upload starts again from byte 0"))
        self._ledger.restart()
        self.move(UploadState.NEW)
        self.report()

    async def _request_resume(self, channel: Channel) -> UploadOpened | CompositeOpened | None:
        """Attach with the token given to resume; None if the proxy cannot resume it."""
        assert self._token is not None
        reply = await channel.request(AttachUpload(token=self._token), blocking=True)
        if isinstance(reply, UploadOpened):
            _log.info("%s: resuming, %d bytes committed", self._description, reply.committed_offset)
            return reply
        if isinstance(reply, CompositeOpened) and isinstance(self._open_request, OpenUpload):
            _log.info("%s: resuming a composite upload", self._description)
            return reply
        if isinstance(reply, Error) and (reply.code in _NOT_RESUMABLE or condemns_upload(reply)):
            self._ledger.count_error(reply.code)
            _log.warning(
                "%s: cannot resume the interrupted upload (%s: %s): starting a new one",
                self._description,
                reply.code.name,
                reply.message,
            )
            self._token = None
            return None
        raise unexpected_reply(reply, "AttachUpload")

    def _open_composite(self, opened: CompositeOpened) -> NoReturn:
        """The proxy made the upload composite: it is open, and every slot ends (this one by
        raising, which closes its idle connection)."""
        request = self._open_request
        assert isinstance(request, OpenUpload)  # only an OpenUpload is answered so
        size = request.expected_size
        if size is None or opened.segment_size < 1 or opened.parallel_segments < 1:
            raise UploadError(
                None,
                f"{self._description}: the proxy made an upload of"
                f" {'unknown size' if size is None else f'{size} bytes'} composite, with"
                f" segments of {opened.segment_size} bytes, {opened.parallel_segments} at once",
            )
        self.composite = opened
        self.move(UploadState.SENDING)
        self._opened.set()
        self._ledger.mark_progress()
        self._ledger.notify()
        raise ConnectionLostError("the upload is composite: this connection is not needed")

    async def _request_open(self, channel: Channel) -> UploadOpened | CompositeOpened:
        request = self._open_request
        reply = await channel.request(request, blocking=True)
        # only an OpenUpload may be made composite; a segment is an ordinary upload
        if isinstance(reply, UploadOpened) or (
            isinstance(reply, CompositeOpened) and isinstance(request, OpenUpload)
        ):
            return reply
        raise unexpected_reply(reply, type(request).__name__)


def _tls_refusal(exc: BaseException) -> str | None:
    """Why a TLS handshake was refused for good (a bad certificate, a peer that does not speak
    TLS), or None when the failure may be the network's (a reset, an early EOF)."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if cause is None or isinstance(cause, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return None
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate not accepted: {cause.verify_message}"
    reason = getattr(cause, "reason", None) or type(cause).__name__
    return f"{str(reason).lower().replace('_', ' ')} (is it a TLS server?)"
