"""The blocking client API: the same uploads as :mod:`proxy.client`, for code without trio.

Each call runs its own trio event loop in the calling thread, so it must not be called from
inside a trio run (use :mod:`proxy.client` there). Callbacks (``options.progress``, and a
``options.connector``) run in the calling thread's loop too. A ``KeyboardInterrupt`` during a
call abandons the upload; the proxy keeps it resumable until its idle timeout.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterable
from typing import BinaryIO, Final

import trio

from proxy.client import api, many
from proxy.client.many import Outcome, Source
from proxy.client.results import UploadResult
from proxy.client.settings import MiB, UploadOptions

__all__ = ["upload_file", "upload_many", "upload_stream"]

_READ_SIZE: Final = 1 * MiB


def upload_file(path: str | os.PathLike[str], url: str, options: UploadOptions) -> UploadResult:
    """Upload the file at ``path`` to ``url`` (``gs://bucket/object``)."""
    return trio.run(api.upload_file, path, url, options)


def upload_stream(source: BinaryIO, url: str, options: UploadOptions) -> UploadResult:
    """Upload everything read from ``source`` until EOF; it is read in a worker thread."""

    async def chunks() -> AsyncIterator[bytes]:
        while chunk := await trio.to_thread.run_sync(source.read, _READ_SIZE):
            yield chunk

    return trio.run(api.upload_stream, chunks(), url, options)


def upload_many(
    pairs: Iterable[tuple[Source, str]],
    options: UploadOptions,
    *,
    concurrency: int = 8,
    options_for: Callable[[Source, str], UploadOptions] | None = None,
    on_done: Callable[[int, Outcome], None] | None = None,
) -> list[Outcome]:
    """Upload every ``(file, gs://bucket/object)`` pair, ``concurrency`` at a time; one
    outcome (:class:`UploadResult` or :class:`UploadError`) per pair, in order. See
    :func:`proxy.client.upload_many`; the callbacks run in the calling thread's loop."""

    async def run() -> list[Outcome]:
        return await many.upload_many(
            pairs, options, concurrency=concurrency, options_for=options_for, on_done=on_done
        )

    return trio.run(run)
