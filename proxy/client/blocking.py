"""The blocking client API: the same uploads as :mod:`proxy.client`, for code without trio.

Each call runs its own trio event loop in the calling thread, so it must not be called from
inside a trio run (use :mod:`proxy.client` there). Callbacks run in the calling thread too.
A ``KeyboardInterrupt`` during a call abandons the upload; the proxy keeps it resumable
until its idle timeout.
"""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import AsyncIterator, Callable
from typing import BinaryIO, Final

import trio

from proxy.client import ClientSettings, Connector, UploadProgress, UploadResult
from proxy.client import upload as client

__all__ = ["upload_file", "upload_stream"]

_READ_SIZE: Final = 1024 * 1024


def upload_file(
    path: str | os.PathLike[str],
    url: str,
    *,
    proxy: str | tuple[str, int],
    connections: int | None = None,
    auth: str = "",
    tls: ssl.SSLContext | None = None,
    content_type: str = "application/octet-stream",
    if_generation_match: int | None = None,
    settings: ClientSettings | None = None,
    progress: Callable[[UploadProgress], None] | None = None,
) -> UploadResult:
    """Upload the file at ``path`` to ``url`` (``gs://bucket/object``) through ``proxy``."""
    return trio.run(
        functools.partial(
            client.upload_file,
            path,
            url,
            proxy=proxy,
            connections=connections,
            auth=auth,
            tls=tls,
            content_type=content_type,
            if_generation_match=if_generation_match,
            settings=settings,
            progress=progress,
        )
    )


def upload_stream(
    source: BinaryIO,
    url: str,
    *,
    proxy: str | tuple[str, int],
    connections: int | None = None,
    auth: str = "",
    tls: ssl.SSLContext | None = None,
    content_type: str = "application/octet-stream",
    if_generation_match: int | None = None,
    settings: ClientSettings | None = None,
    connector: Connector | None = None,
    progress: Callable[[UploadProgress], None] | None = None,
) -> UploadResult:
    """Upload everything read from ``source`` until EOF; it is read in a worker thread."""

    async def chunks() -> AsyncIterator[bytes]:
        while chunk := await trio.to_thread.run_sync(source.read, _READ_SIZE):
            yield chunk

    return trio.run(
        functools.partial(
            client.upload_stream,
            chunks(),
            url,
            proxy=proxy,
            connections=connections,
            auth=auth,
            tls=tls,
            content_type=content_type,
            if_generation_match=if_generation_match,
            settings=settings,
            connector=connector,
            progress=progress,
        )
    )
