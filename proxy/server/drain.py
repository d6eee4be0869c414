"""The last step of a graceful shutdown: let the GCS requests in flight finish.

Once every connection is gone nothing new arrives, but a writer may be in the middle of
sending a chunk. Cutting it off would throw away bytes GCS was about to persist, and the
client would have to send them again through the next instance. So each upload gets until
its committed offset has stopped moving for a moment (its writer idles, waiting for bytes
that will not come), within one shared ``patience`` (``--drain-timeout``). Then the server
cancels the uploads; their GCS sessions stay resumable through their tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import trio

from proxy.server.logging import get_logger, log_event
from proxy.server.uploads import Upload, UploadState
from reliablewriter import ReliableWriter, WriterError

__all__ = ["QUIET_PERIOD", "drain_uploads"]

logger = get_logger(__name__)

#: how long a writer's committed offset must stand still to count as drained: a chunk in
#: flight on a healthy link is acknowledged well within it
QUIET_PERIOD = 0.5


async def drain_uploads(uploads: Iterable[Upload], patience: float) -> None:
    """Wait (at most ``patience`` seconds) until no live upload's writer makes progress.

    Writers holding no bytes have nothing in flight and are not waited for.

    Cancelling it only cuts the wait short; nothing is changed either way.
    """
    writers = [
        upload.writer
        for upload in uploads
        if upload.state is UploadState.ACTIVE and upload.writer.stats.held_bytes > 0
    ]
    if not writers or patience <= 0:
        return
    start = trio.current_time()
    with trio.move_on_after(patience) as deadline:
        async with trio.open_nursery() as nursery:
            for writer in writers:
                nursery.start_soon(_settle, writer)
    log_event(
        logger,
        logging.INFO,
        "drained",
        uploads=len(writers),
        seconds=f"{trio.current_time() - start:.2f}",
        complete=not deadline.cancelled_caught,
    )


async def _settle(writer: ReliableWriter) -> None:
    while True:
        with trio.move_on_after(QUIET_PERIOD) as quiet:
            try:
                await writer.wait_committed(writer.committed_offset + 1)
            except WriterError:
                return  # closed, complete or failed: nothing in flight
        if quiet.cancelled_caught:
            return
