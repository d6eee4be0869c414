"""Many objects at once: :func:`upload_many`, and :func:`put_file` for one object through a pool.

In the manner of google-cloud-storage's ``transfer_manager.upload_many``: it takes
(source, destination) pairs and a concurrency, and returns one outcome per pair, in order:
the :class:`~proxy.client.results.UploadResult`, or the
:class:`~proxy.client.errors.UploadError` that ended that object. One failure does not stop
the others.

An object that fits one frame (up to ``ClientSettings.put_object_limit``, 8 MiB, when the
proxy agrees frames that large) goes as one ``PutObject`` (protocol version 2) on a connection
of a :class:`~proxy.client.pool.ConnectionPool`, so it costs one exchange; a larger one, or
any object when the proxy speaks only version 1, is uploaded with
:func:`~proxy.client.api.upload_file` over its own ``settings.connections`` connections.

Cancellation: cancelling :func:`upload_many` cancels every upload in progress (the large
ones stay resumable on the proxy until their idle timeout); outcomes already reached are lost
with the call.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Final

import google_crc32c
import trio

from protocol import Completed, Error, ErrorCode, PutObject
from proxy.client.api import upload_file
from proxy.client.errors import (
    ConnectionLostError,
    ProxyUnreachableError,
    UploadError,
    UploadRejectedError,
    condemns_upload,
    rejection,
    verify_stored,
)
from proxy.client.names import parse_gs_url
from proxy.client.pool import ConnectionPool, open_connection_pool
from proxy.client.results import UploadResult
from proxy.client.settings import UploadOptions

__all__ = ["Outcome", "Source", "UploadLarge", "put_bytes", "put_file", "upload_many"]

Source = str | os.PathLike[str]
#: what one pair ended with
Outcome = UploadResult | UploadError
#: uploads an object too large for one frame (default :func:`~proxy.client.api.upload_file`)
UploadLarge = Callable[[Source, str, UploadOptions], Awaitable[UploadResult]]

#: files up to this size are read in the event loop's thread (from the page cache, a few µs)
_READ_IN_LOOP: Final = 64 * 1024


async def put_file(
    pool: ConnectionPool,
    path: Source,
    url: str,
    options: UploadOptions,
    *,
    upload_large: UploadLarge = upload_file,
) -> UploadResult:
    """Upload one file: as one ``PutObject`` on a pooled connection when it fits one frame
    as agreed with the proxy (up to the pool's ``put_object_limit``, or ``frame_size`` if
    larger) and the proxy speaks version 2, otherwise with ``upload_large``.

    ``options`` gives the object's properties (content type, metadata, precondition); the
    pool's own options give the proxy and the connection settings.
    """
    size = os.stat(path).st_size
    version, max_data = await _negotiated(pool, f"upload of {url}")
    if version < 2 or size > _largest_put_object(options, max_data):
        # never more connections than frames: each would cost a handshake and an attach
        frames = max(1, -(-size // options.settings.frame_size))
        if frames < options.settings.connections:
            options = dataclasses.replace(
                options, settings=dataclasses.replace(options.settings, connections=frames)
            )
        return await upload_large(path, url, options)
    if size <= _READ_IN_LOOP:  # a thread would cost more than the read itself
        data = _read_whole(path)
    else:
        data = await trio.to_thread.run_sync(_read_whole, path)
    if len(data) != size:
        raise UploadError(None, f"{os.fspath(path)} changed while it was read")
    return await put_bytes(pool, data, url, options)


def _largest_put_object(options: UploadOptions, max_data: int) -> int:
    """The largest object sent as one PutObject: what the proxy agreed (``max_data``, never
    more than the pool's Hello offered, which the protocol enforces).

    With a precondition, no more than one WriteAt frame: a PutObject whose reply is lost
    cannot be settled by this client (resending it is refused once the first one stored the
    object, and the client cannot read GCS to compare), where an upload's token can (the
    proxy remembers a completed upload's result, and its token pins the generation). Larger
    objects with a precondition therefore take the resumable path.
    """
    if options.if_generation_match is not None:
        return min(max_data, options.settings.frame_size)
    return max_data


async def _negotiated(pool: ConnectionPool, description: str) -> tuple[int, int]:
    """The version and frame size the pool's connections agree (opening one if needed, and
    trying again under the pool's retry policy)."""
    policy = pool.options.settings.retry
    since = trio.current_time()
    attempt = 0
    while True:
        try:
            async with pool.connection() as channel:
                return channel.version, channel.max_data
        except ConnectionLostError as exc:
            attempt += 1
            if policy.expired(trio.current_time() - since):
                raise ProxyUnreachableError(
                    f"{description}: no connection to the proxy within {policy.deadline:g} s"
                    f" ({attempt} attempts); last: {exc.reason}"
                ) from exc
        await trio.sleep(policy.delay(attempt, pool.rng))


def _read_whole(path: Source) -> bytes:
    with open(path, "rb") as file:
        return file.read()


async def put_bytes(
    pool: ConnectionPool, data: bytes, url: str, options: UploadOptions
) -> UploadResult:
    """Store ``data`` as one ``PutObject`` on a pooled connection, retried under the pool's
    policy while the proxy may still store it.

    ``data`` must fit what the proxy agreed (see :func:`put_file`, which decides);
    raises :class:`~proxy.client.errors.UploadError` otherwise, or when the object is
    refused. A reply lost with a precondition set ends in an error that says the object may
    have been stored (see docs/protocol.md section 10).
    """
    bucket, name = parse_gs_url(url)
    description = f"upload of {url}"
    crc32c = google_crc32c.value(data)
    request = PutObject(
        bucket=bucket,
        name=name,
        data=data,
        content_type=options.content_type,
        metadata=tuple(options.metadata.items()),
        if_generation_match=options.if_generation_match,
        crc32c=crc32c,
    )
    policy = pool.options.settings.retry
    started = time.monotonic()
    since = trio.current_time()
    attempt = 0
    #: a reply was lost: the object may have been stored by that attempt
    maybe_stored = False
    errors: dict[str, int] = {}
    last_problem = ""
    while True:
        if attempt:
            if policy.expired(trio.current_time() - since):
                raise ProxyUnreachableError(
                    f"{description}: not stored within {policy.deadline:g} s ({attempt}"
                    f" attempts); last: {last_problem}"
                )
            await trio.sleep(policy.delay(attempt, pool.rng))
        attempt += 1
        sent = False
        try:
            async with pool.connection() as channel:
                sent = True
                reply = await channel.request(request, patient=True)
        except ConnectionLostError as exc:
            maybe_stored = maybe_stored or sent
            last_problem = exc.reason
            continue
        if isinstance(reply, Completed):
            verify_stored(description, reply, len(data), crc32c)
            return UploadResult(
                bucket=bucket,
                name=name,
                size=reply.size,
                generation=reply.generation,
                crc32c=reply.crc32c,
                md5=reply.md5,
                elapsed=time.monotonic() - started,
                connections=1,
                bytes_sent=len(data) * attempt,
                reconnects=attempt - 1,
                resent_bytes_by_cause={"retried": len(data) * (attempt - 1)} if attempt > 1 else {},
                errors_by_code=errors,
            )
        if not isinstance(reply, Error):
            last_problem = f"proxy answered PutObject with {type(reply).__name__}"
            continue
        errors[reply.code.name] = errors.get(reply.code.name, 0) + 1
        if condemns_upload(reply):
            if maybe_stored and reply.code == ErrorCode.PRECONDITION_FAILED:
                raise UploadRejectedError(
                    reply.code,
                    f"{description}: precondition failed after a reply was lost; the earlier"
                    f" attempt may have stored the object: {reply.message}",
                )
            raise rejection(reply)
        last_problem = f"{reply.code.name}: {reply.message}"


async def upload_many(
    pairs: Iterable[tuple[Source, str]],
    options: UploadOptions,
    *,
    concurrency: int = 8,
    options_for: Callable[[Source, str], UploadOptions] | None = None,
    on_done: Callable[[int, Outcome], None] | None = None,
    upload_large: UploadLarge = upload_file,
    pool: ConnectionPool | None = None,
) -> list[Outcome]:
    """Upload every ``(source file, gs://bucket/object)`` pair, ``concurrency`` at a time.

    Returns one outcome per pair, in the pairs' order: its :class:`UploadResult`, or the
    :class:`UploadError` that ended it (an unreadable file is one too). ``options_for``
    gives an object's own options (content type, say; default ``options``); ``on_done(index,
    outcome)`` is called as each one ends. The small objects share one pool of connections
    (``pool``, or one made from ``options`` with ``concurrency`` connections at most); a large
    one opens its own ``settings.connections`` and is uploaded by ``upload_large``.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    work: Sequence[tuple[Source, str]] = list(pairs)
    outcomes: list[Outcome | None] = [None] * len(work)
    jobs = trio.Semaphore(concurrency)

    async def one(shared: ConnectionPool, index: int, source: Source, url: str) -> None:
        async with jobs:
            object_options = options_for(source, url) if options_for else options
            try:
                outcome: Outcome = await put_file(
                    shared, source, url, object_options, upload_large=upload_large
                )
            except UploadError as exc:
                outcome = exc
            except OSError as exc:  # the file cannot be read
                outcome = UploadError(None, f"upload of {url}: {exc}")
            except ValueError as exc:  # the destination is not a valid gs:// URL
                outcome = UploadError(None, f"upload of {url!r}: {exc}")
            outcomes[index] = outcome
            if on_done is not None:
                on_done(index, outcome)

    async def run_all(shared: ConnectionPool) -> None:
        async with trio.open_nursery() as nursery:
            for index, (source, url) in enumerate(work):
                nursery.start_soon(one, shared, index, source, url)

    if pool is not None:
        await run_all(pool)
    else:
        async with open_connection_pool(options, max_size=concurrency) as own:
            await run_all(own)
    assert all(outcome is not None for outcome in outcomes)
    return [outcome for outcome in outcomes if outcome is not None]
