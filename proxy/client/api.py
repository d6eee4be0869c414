"""The entry points: :func:`connect_upload`, :func:`upload_file` and :func:`upload_stream`.

Each takes the destination (``gs://bucket/object``) and one
:class:`~proxy.client.settings.UploadOptions`. Cancellation: cancelling any call here
abandons the upload on this side, and so does ``KeyboardInterrupt``: the proxy keeps it
resumable (give :attr:`~proxy.client.upload.Upload.token` as ``UploadOptions.token`` to
resume it) until its resume window ends. Leaving :func:`connect_upload`'s block with any
other exception and without :meth:`~proxy.client.upload.Upload.complete` aborts the upload.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager, suppress

import trio

from protocol import OpenUpload
from proxy.client.composite import CompositeUpload
from proxy.client.errors import UploadError
from proxy.client.names import parse_gs_url, proxy_addresses
from proxy.client.results import UploadResult
from proxy.client.settings import UploadOptions, default_connector
from proxy.client.transfer import Transfer
from proxy.client.upload import Upload

__all__ = ["connect_upload", "upload_file", "upload_stream"]

#: how long leaving the block waits for the proxy to confirm an Abort
_ABORT_ON_EXIT_TIMEOUT = 5.0


@asynccontextmanager
async def connect_upload(url: str, options: UploadOptions) -> AsyncIterator[Upload]:
    """Open an upload of ``url`` (``gs://bucket/object``) and yield it once opened.

    Give the data with :meth:`Upload.send_file` or :meth:`Upload.write`, then call
    :meth:`Upload.complete`. If the proxy makes the upload composite (protocol version 3: a
    large ``expected_size``, unless ``options.single_session``), the handle is a
    :class:`~proxy.client.composite.CompositeUpload`: the same methods, its segments stored in
    parallel and composed. Leaving the block with an exception (but a cancellation or a
    ``KeyboardInterrupt``) and without completing aborts the upload. With
    ``options.token``, the upload of an earlier run is resumed: only what the proxy lacks is
    sent.
    """
    bucket, name = parse_gs_url(url)
    addresses = proxy_addresses(options.proxy)
    connector = options.connector or default_connector(options.tls)
    transfer = Transfer(
        open_request=OpenUpload(
            bucket=bucket,
            name=name,
            content_type=options.content_type,
            metadata=tuple(options.metadata.items()),
            expected_size=options.expected_size,
            if_generation_match=options.if_generation_match,
            single_session=options.single_session,
        ),
        options=options,
        addresses=addresses,
        connector=connector,
    )
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            transfer.start(nursery)
            try:
                await transfer.wait_opened()
                if transfer.lifecycle.failure is None:
                    upload = (
                        Upload(transfer)
                        if transfer.composite is None
                        else CompositeUpload(
                            transfer,
                            options=options,
                            addresses=addresses,
                            connector=connector,
                            nursery=nursery,
                        )
                    )
                    try:
                        yield upload
                    except trio.Cancelled:
                        raise
                    except BaseException as exc:  # re-raised below, outside the nursery
                        body_error = exc
                    # Ctrl-C leaves the upload resumable (rerun with its token); any other
                    # exception means the caller gave up on it
                    if not transfer.lifecycle.over and not _is_interrupt(body_error):
                        # a block left because its scope was cancelled abandons, not aborts
                        await trio.lowlevel.checkpoint_if_cancelled()
                        with (
                            trio.move_on_after(_ABORT_ON_EXIT_TIMEOUT, shield=True),
                            suppress(UploadError),
                        ):
                            await upload.abort()
            finally:
                transfer.stop()
    finally:
        source = transfer.ledger.source
        if source is not None:
            source.close()
    failure = transfer.lifecycle.failure
    if failure is not None and not isinstance(body_error, UploadError):
        raise failure
    if body_error is not None:
        raise body_error


async def upload_file(
    path: str | os.PathLike[str], url: str, options: UploadOptions
) -> UploadResult:
    """Upload the file at ``path`` to ``url`` (``gs://bucket/object``)."""
    options = dataclasses.replace(options, expected_size=os.stat(path).st_size)
    async with connect_upload(url, options) as upload:
        await upload.send_file(path)
        return await upload.complete()


async def upload_stream(
    chunks: AsyncIterable[bytes], url: str, options: UploadOptions
) -> UploadResult:
    """Upload everything ``chunks`` yields (length unknown up front) to ``url``.

    Only bytes the proxy has not committed yet are kept, at most ``stream_buffer`` of them;
    ``chunks`` is not iterated further while that buffer is full.
    """
    async with connect_upload(url, options) as upload:
        async for chunk in chunks:
            await upload.write(chunk)
        return await upload.complete()


def _is_interrupt(error: BaseException | None) -> bool:
    """Whether ``error`` is Ctrl-C (perhaps grouped by a nursery of the caller's)."""
    if isinstance(error, BaseExceptionGroup):
        interrupts, others = error.split(KeyboardInterrupt)
        return interrupts is not None and others is None
    return isinstance(error, KeyboardInterrupt)
