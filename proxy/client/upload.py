"""The caller's handle on one upload: give it data, then complete or abort it.

Made by :func:`~proxy.client.connect_upload`. Files are read with ``os.pread`` piece by
piece (never loaded whole; a resend reads again). A stream keeps only the bytes the proxy has
not yet committed to GCS, within a bounded buffer. The CRC32C of the whole object goes with
``Complete`` and the proxy's reply is checked against it and the size.

The upload's lifecycle is :class:`~proxy.client.lifecycle.UploadState`; :attr:`Upload.state`
shows it. Errors: every failure reaches the caller as
:class:`~proxy.client.errors.UploadError` (or a subclass); a broken, closed or stalled
connection is only a reason to reconnect. Once ``complete()`` has returned, the upload is
done: the object exists and matched what was sent, so anything the proxy says afterwards
about frames still in flight elsewhere (the proxy acknowledges such late resends anyway)
changes nothing.

Cancellation: cancelling ``write()`` or ``complete()`` partway leaves the upload as it was
(bytes already queued are still sent while the block lasts); cancelling ``abort()`` leaves it
unconfirmed.
"""

from __future__ import annotations

import os
import time
from typing import Final, Protocol

import trio

from protocol import Abort, Complete, Completed, Error, ErrorCode, Incomplete, Reply
from protocol.ranges import format_ranges
from proxy.client.errors import (
    ChecksumMismatchError,
    ConnectionLostError,
    UploadError,
    rejection,
    unexpected_reply,
    verify_stored,
)
from proxy.client.lifecycle import UploadState
from proxy.client.results import UploadResult
from proxy.client.sources import FileSource, StreamSource
from proxy.client.transfer import Transfer

__all__ = ["Upload", "UploadCounts"]

#: a Complete answered "bytes missing" this many times, each after resending them, means the
#: proxy keeps losing what it acknowledged: give up rather than loop
_MAX_INCOMPLETE_REPLIES: Final = 16


class UploadCounts(Protocol):
    """What an upload counts for its result (a :class:`~proxy.client.ledger.Ledger` does)."""

    bytes_sent: int
    reconnects: int
    restarts: int
    resent_bytes_by_cause: dict[str, int]
    errors_by_code: dict[str, int]


def _is_missing_ranges(reply: Incomplete | Error) -> bool:
    return isinstance(reply, Incomplete) or reply.code == ErrorCode.MISSING_RANGES


class Upload:
    """One upload spread over several connections. Made by :func:`connect_upload`."""

    def __init__(self, transfer: Transfer) -> None:
        self._transfer = transfer
        self._ledger = transfer.ledger
        self._description = transfer.description

    @property
    def state(self) -> UploadState:
        return self._transfer.lifecycle.state

    @property
    def token(self) -> bytes | None:
        """The upload's token: give it as :attr:`UploadOptions.token` to resume this upload
        from another process. A secret: keep it like a password, never log it."""
        return self._transfer.token

    def confirmed_ranges(self) -> list[tuple[int, int]]:
        """The byte ranges the proxy has acknowledged holding, lowest first."""
        return self._ledger.received_ranges()

    @property
    def committed_offset(self) -> int:
        """Bytes the proxy reports durable in GCS."""
        return self._ledger.committed

    async def send_file(self, path: str | os.PathLike[str]) -> None:
        """Queue a whole file for upload; it is read piece by piece as the slots send it.

        Returns at once; :meth:`complete` waits for the bytes. The file must not change
        until the upload completes.
        """
        if self._ledger.source is not None:
            raise RuntimeError("this upload already has data")
        fd = os.open(path, os.O_RDONLY)
        try:
            source = FileSource(fd, os.fstat(fd).st_size, self._ledger.frame_size)
        except BaseException:
            os.close(fd)
            raise
        self._ledger.set_source(source)

    def _stream(self) -> StreamSource | None:
        """The stream source, made on first use; None if this upload sends a file."""
        source = self._ledger.source
        if source is None:
            source = StreamSource(self._ledger.frame_size)
            self._ledger.set_source(source)
        return source if isinstance(source, StreamSource) else None

    async def write(self, data: bytes) -> None:
        """Append ``data`` to the object; waits while the stream buffer is full."""
        source = self._stream()
        if source is None or source.total is not None:
            raise RuntimeError("write() is for streams that are not finished")
        transfer = self._transfer
        # Never less than the proxy's window: it may need that much to commit anything.
        while source.written - self._ledger.committed >= max(
            transfer.settings.stream_buffer, self._ledger.window_end - self._ledger.committed
        ):
            await transfer.wait_changed()
        transfer.lifecycle.check()
        before = source.available
        source.append(bytes(data))
        if source.available > before:
            self._ledger.extend(before, source.available)

    async def _all_received(self, total: int) -> None:
        while not self._ledger.holds(total):
            await self._transfer.wait_changed()

    async def complete(self) -> UploadResult:
        """Finish the object and return what GCS stored, once it matches what was sent.

        Raises :class:`UploadError` (or a subclass) on failure. Idempotent on the proxy side:
        a Complete lost with its connection is simply sent again.
        """
        self._stream()  # an upload given no data at all is an empty stream
        source = self._ledger.source
        assert source is not None
        if isinstance(source, StreamSource) and source.total is None:
            before = source.available
            source.finish()
            self._ledger.extend(before, source.available)
        total = source.total
        assert total is not None
        transfer = self._transfer
        settings = transfer.settings
        # A file's checksum is combined from its pieces', so it is known once all were sent.
        await self._all_received(total)
        crc32c = await source.crc32c()
        self._ledger.mark_progress()  # every byte is held: the deadline counts from here
        policy = settings.retry
        last_problem = ""
        attempt = 0
        incomplete_replies = 0
        while True:
            if attempt:
                idle = trio.current_time() - self._ledger.last_progress
                if policy.expired(idle):
                    break
                await trio.sleep(policy.delay(attempt, transfer.rng))
            attempt += 1
            await self._all_received(total)
            channel = await transfer.any_channel()
            try:
                reply = await channel.request(
                    Complete(total_size=total, crc32c=crc32c), blocking=True, patient=True
                )
                if isinstance(reply, Incomplete | Error) and _is_missing_ranges(reply):
                    # the proxy lost bytes it had acknowledged (a restart): resend them, then
                    # complete again; bounded, as every retry here, by the policy's deadline
                    incomplete_replies += 1
                    if incomplete_replies > _MAX_INCOMPLETE_REPLIES:
                        break
                    # An answer is news: the deadline counts from it, not from before the
                    # proxy spent its complete_timeout waiting for the bytes (a proxy that
                    # died had acknowledged them; its successor lacks them).
                    self._ledger.mark_progress()
                    if isinstance(reply, Incomplete):  # version 2: the list is in the reply
                        last_problem = f"bytes still missing: {format_ranges(reply.missing)}"
                        transfer.resend_missing(reply)
                    else:  # version 1: the list is only in the text; ask for Status
                        self._ledger.count_error(reply.code)
                        last_problem = reply.message
                        await transfer.catch_up(channel)
                    continue
            except ConnectionLostError as exc:
                last_problem = exc.reason
                continue
            if isinstance(reply, Completed):
                return self._finish(reply, total, crc32c)
            transfer.lifecycle.check()
            error = unexpected_reply(reply, "Complete")
            if isinstance(error, UploadError):
                transfer.fail(error)
                raise error
            last_problem = error.reason
        failure = UploadError(
            None,
            f"{self._description}: the proxy did not finalize the object within"
            f" {policy.deadline:g} s of the last progress ({attempt} attempts, {incomplete_replies}"
            f" answered with missing bytes); last:"
            f" {last_problem}",
            retryable=True,
        )
        transfer.fail(failure)
        raise failure

    def _finish(
        self,
        reply: Completed,
        total: int,
        crc32c: int,
        *,
        counts: UploadCounts | None = None,
        connections: int | None = None,
        segments: int = 0,
    ) -> UploadResult:
        """The result, once ``reply`` shows GCS stored ``total`` bytes with ``crc32c``;
        ``counts`` and ``connections`` are the ledger's and the settings' unless given."""
        transfer = self._transfer
        try:
            verify_stored(self._description, reply, total, crc32c)
        except ChecksumMismatchError as error:
            transfer.fail(error)
            raise
        transfer.move(UploadState.COMPLETED)
        bucket, name = transfer.destination
        counts = counts or self._ledger
        return UploadResult(
            bucket=bucket,
            name=name,
            size=reply.size,
            generation=reply.generation,
            crc32c=reply.crc32c,
            md5=reply.md5,
            elapsed=time.monotonic() - transfer.started,
            connections=connections or transfer.settings.connections,
            bytes_sent=counts.bytes_sent,
            reconnects=counts.reconnects,
            resent_bytes_by_cause=dict(counts.resent_bytes_by_cause),
            errors_by_code=dict(counts.errors_by_code),
            restarts=counts.restarts,
            segments=segments,
        )

    async def abort(self) -> None:
        """Cancel the upload on the proxy and in GCS; the object is not created.

        Sending stops at once; frames already in flight fail on the proxy with ABORTED,
        which is expected here and not reported. An Abort waits for a Complete in flight on
        the same connection to be answered; once the object is complete, abort raises
        :class:`UploadError` with INVALID_STATE.
        """
        transfer = self._transfer
        lifecycle = transfer.lifecycle
        if lifecycle.at(UploadState.COMPLETED):
            raise UploadError(
                ErrorCode.INVALID_STATE,
                f"{self._description}: cannot abort, the object is already complete",
            )
        lifecycle.check()
        if not lifecycle.at(UploadState.SENDING):
            return  # already aborting, aborted or left: nothing more to ask the proxy
        transfer.move(UploadState.ABORTING)
        try:
            reply = await self._request_abort()
        except ConnectionLostError as exc:
            raise UploadError(
                None, f"{self._description}: abort not confirmed: {exc.reason}"
            ) from exc
        finally:
            if lifecycle.at(UploadState.ABORTING):
                transfer.move(UploadState.ABORTED)
        if isinstance(reply, Error) and reply.code != ErrorCode.ABORTED:
            raise rejection(reply)

    async def _request_abort(self) -> Reply:
        """Ask the proxy to abort; ConnectionLostError if the request or its reply was lost."""
        channel = await self._transfer.any_channel()
        return await channel.request(Abort(), blocking=True)
