"""Whole small objects in one request (``PUT_OBJECT``): one exchange with the client, one with GCS.

A small object through the resumable path costs an open, a session initiation, a write, a
final PUT and a complete. ``PUT_OBJECT`` carries the whole object in one frame, and the proxy
stores it with one multipart request (:mod:`reliablewriter.one_request`): no session, no
token, nothing left to attach to or to expire.

It is refused as an open would be (allow-lists, names GCS refuses, a precondition that does
not hold, a missing bucket), and its bytes are paid for from the client's share of the
buffer budget while GCS is asked, so that many pipelined ``PUT_OBJECT`` frames cost what
they hold and no more. Cancelled midway (a shutdown), the object is stored whole or not at
all, and the client, which got no ``COMPLETED``, resends or reads the object to find out.
"""

from __future__ import annotations

import logging

import trio

from protocol import ErrorCode, PutObject
from proxy.server.backend import Backend
from proxy.server.budget import BufferBudget, Reservation
from proxy.server.errors import ServerError, quote
from proxy.server.logging import get_logger, log_event
from proxy.server.metrics import ServerMetrics
from proxy.server.settings import ServerSettings
from proxy.server.uploads import error_from_refused_start
from reliablewriter import (
    ObjectInfo,
    ObjectRequest,
    WriterError,
    upload_in_one_request,
)
from reliablewriter.buffer import FRAGMENT_OVERHEAD
from reliablewriter.http_posts import WholeObjectPoster

__all__ = ["WholeObjects"]

logger = get_logger(__name__)


class WholeObjects:
    """Stores ``PUT_OBJECT`` requests for every connection of one server."""

    def __init__(
        self,
        settings: ServerSettings,
        backend: Backend,
        budget: BufferBudget,
        metrics: ServerMetrics,
        poster: WholeObjectPoster | None = None,
    ) -> None:
        self._settings = settings
        self._backend = backend
        self._budget = budget
        self._metrics = metrics
        #: stores straight from trio when given (else through the backend's session)
        self._poster = poster

    async def pay(self, client: str, payload_size: int) -> Reservation:
        """Reserve what a PUT_OBJECT with a payload of ``payload_size`` bytes costs in memory
        (its bytes, plus one piece's overhead, as a window pays), charged to ``client``.

        Waits up to the budget wait for memory to come back; raises a retryable TOO_BUSY if
        none did, or at once if the object is more than ``client`` may ever hold. Cancelled
        while waiting, nothing stays reserved.
        """
        cost = payload_size + FRAGMENT_OVERHEAD
        if cost > self._settings.client_buffer_limit:
            raise ServerError(
                ErrorCode.TOO_BUSY,
                f"a {payload_size}-byte PUT_OBJECT is more than this proxy lets one client"
                " buffer: upload it with OPEN_UPLOAD",
                retryable=True,
            )
        return await self._budget.acquire(client, cost, patience=self._settings.budget_wait)

    async def store(self, event: PutObject, client: str, payment: Reservation) -> ObjectInfo:
        """Store ``event``'s object for ``client``, whose bytes ``payment`` (from :meth:`pay`)
        holds in the budget until GCS has answered; raises :class:`ServerError` with the
        code the client is told."""
        settings = self._settings
        try:
            if not settings.allows(event.bucket, event.name):
                raise ServerError(
                    ErrorCode.FORBIDDEN,
                    f"writing {quote(event.bucket)}/{quote(event.name)} is not allowed by this"
                    " proxy",
                )
            self._metrics.uploads_started.inc()
            bucket = self._backend.ready_bucket(event.bucket)
            if bucket is None:  # the bucket may have to be created first: that blocks
                bucket = await trio.to_thread.run_sync(self._backend.bucket, event.bucket)
            info = await upload_in_one_request(
                bucket,
                ObjectRequest(
                    event.name,
                    event.data,
                    content_type=event.content_type,
                    metadata=dict(event.metadata),
                    if_generation_match=event.if_generation_match,
                    crc32c=event.crc32c,
                    # from the frame's CRC32C, checked on arrival: no second pass
                    verified_crc32c=event.data_crc32c,
                ),
                policy=settings.writer.retry,
                connect_timeout=settings.writer.connect_timeout,
                read_timeout=settings.writer.progress_timeout,
                poster=self._poster,
            )
        except WriterError as exc:
            error = error_from_refused_start(exc)
            self._metrics.uploads_failed.labels(reason=error.code.name.lower()).inc()
            log_event(
                logger, logging.INFO, "put-object-failed",
                bucket=event.bucket, object=event.name, client=client, code=error.code.name,
            )  # fmt: skip
            raise error from exc
        finally:
            payment.release()
        self._metrics.bytes_received.inc(len(event.data))
        self._metrics.bytes_committed.inc(len(event.data))
        self._metrics.uploads_completed.inc()
        # DEBUG, unlike a session's upload-completed: at a line per small object, formatting
        # costs about 0.1 ms of CPU each, a few per cent of the object (the counters above
        # count them all)
        log_event(
            logger, logging.DEBUG, "put-object-stored",
            bucket=event.bucket, object=event.name, client=client, size=info.size,
            generation=info.generation,
        )  # fmt: skip
        return info
