"""Compose: many objects made one, server-side, retried without ever making a wrong object.

GCS's ``compose`` concatenates up to 32 source objects into a destination. It carries no
payload, so retrying it is cheap; what makes it safe is the destination precondition
(``ifGenerationMatch``, 0 for "must not exist yet"): a compose that GCS applied but whose
answer was lost is refused (412) when sent again, so the object is made once. Such a
refusal, like any attempt without a clear answer, is settled by **reading the destination
back**: an object of the expected size and CRC32C (and not the generation the precondition
names) is ours, and counts as success.

:func:`compose_tree` plans the composes for any number of sources, in groups of at most
:data:`MAX_COMPOSE_SOURCES` (gVisor's ParallelWriter and gsutil do the same), as data;
:func:`compose_object` performs one, under a :class:`~reliablewriter.RetryPolicy`;
:func:`delete_objects` removes temporaries. Blocking HTTP runs in worker threads, through
the storage client's own ``requests`` session, so faultnet's adapters apply.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import trio
from google.api_core import exceptions as api_exceptions
from google.cloud import storage  # type: ignore[import-untyped]

from .checksum import crc32c_combine, crc32c_from_b64, crc32c_to_b64
from .errors import (
    ChecksumMismatchError,
    NonRetryableHTTPError,
    UnexpectedResponseError,
)
from .results import ObjectInfo
from .settings import RetryPolicy
from .settled import ExpectedObject, SettledRequest, settle
from .transport import (
    _NETWORK_ERRORS,
    GcsTransport,
    Refused,
    StoreOutcome,
    _cause_of,
    _scrub,
    object_outcome,
    request_timeout,
)

__all__ = [
    "MAX_COMPONENT_COUNT",
    "MAX_COMPOSE_SOURCES",
    "ComposeOptions",
    "ComposeStep",
    "compose_object",
    "compose_parts",
    "compose_tree",
    "delete_objects",
]

logger = logging.getLogger(__name__)

#: GCS's limit on the sources of one compose request
MAX_COMPOSE_SOURCES = 32
#: GCS's limit on the components of one composite object (composites of composites count
#: their components)
MAX_COMPONENT_COUNT = 1024


@dataclass(frozen=True)
class ComposeStep:
    """One compose request: ``sources`` (object names, in order) into ``destination``."""

    destination: str
    sources: tuple[str, ...]
    final: bool = False


def compose_tree(
    sources: Sequence[str],
    destination: str,
    intermediate: Callable[[int, int], str],
    *,
    fan_in: int = MAX_COMPOSE_SOURCES,
) -> list[ComposeStep]:
    """The composes that make ``destination`` from ``sources``, in an order that works.

    Up to ``fan_in`` sources take one compose. Beyond that, each level composes groups of
    ``fan_in`` into intermediates named ``intermediate(level, index)`` (a group of one is
    carried up as it is), until one compose into ``destination`` remains: the final step.
    Steps of one level do not depend on each other.
    """
    if not sources:
        raise ValueError("compose needs at least one source")
    if fan_in < 2:
        raise ValueError(f"fan_in must be at least 2, got {fan_in}")
    steps: list[ComposeStep] = []
    names = list(sources)
    level = 0
    while len(names) > fan_in:
        next_names: list[str] = []
        for index, start in enumerate(range(0, len(names), fan_in)):
            group = tuple(names[start : start + fan_in])
            if len(group) == 1:
                next_names.append(group[0])
                continue
            made = intermediate(level, index)
            steps.append(ComposeStep(made, group))
            next_names.append(made)
        names = next_names
        level += 1
    steps.append(ComposeStep(destination, tuple(names), final=True))
    return steps


def _compose_once(
    bucket: storage.Bucket,
    step: ComposeStep,
    *,
    content_type: str | None,
    metadata: Mapping[str, str] | None,
    if_generation_match: int | None,
    timeout: tuple[float, float],
) -> StoreOutcome:
    """Send one compose request (in a worker thread); never raises for the network or GCS."""
    blob = bucket.blob(step.destination)
    blob.content_type = content_type or "application/octet-stream"
    blob.metadata = dict(metadata) if metadata else None
    return object_outcome(
        blob,
        lambda: blob.compose(
            [bucket.blob(name) for name in step.sources],
            if_generation_match=if_generation_match,
            timeout=timeout,
            retry=None,
        ),
    )


async def compose_object(
    bucket: storage.Bucket,
    step: ComposeStep,
    *,
    size: int,
    crc32c: str,
    policy: RetryPolicy,
    if_generation_match: int | None = None,
    content_type: str | None = None,
    metadata: Mapping[str, str] | None = None,
    connect_timeout: float = 30.0,
    read_timeout: float = 60.0,
) -> ObjectInfo:
    """Perform ``step``, expecting an object of ``size`` bytes with CRC32C ``crc32c``
    (GCS's base64 form).

    Retries 408/429/5xx and lost answers under ``policy``; after each, and after a 412
    that may be our own earlier attempt's doing, the destination is read back first.
    Raises :class:`~reliablewriter.NonRetryableHTTPError` for a refusal (404: a source is
    missing; 412: the precondition does not hold), :class:`UnexpectedResponseError` if GCS
    made an object that is not the expected one, :class:`RetriesExhaustedError` once the
    policy gives up. Cancelled midway, the destination exists whole or not at all.
    """
    timeout = request_timeout(connect_timeout, read_timeout)
    reader = GcsTransport(
        bucket.blob(step.destination), connect_timeout=connect_timeout, read_timeout=read_timeout
    )
    decisions = SettledRequest(
        ExpectedObject(step.destination, size, crc32c, if_generation_match),
        policy,
        now=trio.current_time(),
        action="the compose",
        refusal=lambda refused: _refusal(refused, step.destination),
    )
    return await settle(
        decisions,
        lambda: _compose_once(
            bucket,
            step,
            content_type=content_type,
            metadata=metadata,
            if_generation_match=if_generation_match,
            timeout=timeout,
        ),
        reader.lookup_object,
    )


def _refusal(refused: Refused, name: str) -> NonRetryableHTTPError:
    message = (
        "a source of the compose is missing"
        if refused.status == 404
        else ("GCS refused the compose")
    )
    return NonRetryableHTTPError(message, status=refused.status, reason=refused.reason, name=name)


@dataclass(frozen=True)
class ComposeOptions:
    """How :func:`compose_parts` composes: names for intermediates, retries, and what the
    final object carries (its precondition, content type and metadata)."""

    intermediate: Callable[[int, int], str]
    policy: RetryPolicy
    if_generation_match: int | None = None
    content_type: str | None = None
    metadata: Mapping[str, str] | None = None
    connect_timeout: float = 30.0
    read_timeout: float = 60.0


def _crc_value(info: ObjectInfo) -> int:
    """An object's CRC32C as a number (GCS reports one for every object)."""
    if info.crc32c is None:
        raise UnexpectedResponseError("GCS reported no CRC32C for a part", name=info.name)
    return crc32c_from_b64(info.crc32c)


async def compose_parts(
    bucket: storage.Bucket,
    name: str,
    parts: Sequence[ObjectInfo],
    options: ComposeOptions,
    *,
    expected_crc32c: str | None = None,
    made: list[str] | None = None,
) -> ObjectInfo:
    """Compose ``parts`` (objects GCS reported, in order) into ``name``.

    The object's CRC32C is combined from the parts' own, so no byte is read again; it is
    checked against ``expected_crc32c`` (GCS's base64 form) before anything is composed
    (:class:`ChecksumMismatchError`), and every compose's result against what it must be.
    Intermediates of a tree are appended to ``made`` as they are started, for the caller
    to delete.
    """
    sizes_and_crcs = {part.name: (part.size, _crc_value(part)) for part in parts}
    crc = 0
    for part in parts:
        crc = crc32c_combine(crc, sizes_and_crcs[part.name][1], part.size)
    if expected_crc32c is not None and expected_crc32c != crc32c_to_b64(crc):
        raise ChecksumMismatchError(
            "the parts' CRC32C is not the caller's; nothing was composed",
            expected=expected_crc32c,
            actual=crc32c_to_b64(crc),
            name=name,
        )
    result: ObjectInfo | None = None
    for step in compose_tree([part.name for part in parts], name, options.intermediate):
        step_size, step_crc = 0, 0
        for source in step.sources:
            part_size, part_crc = sizes_and_crcs[source]
            step_crc = crc32c_combine(step_crc, part_crc, part_size)
            step_size += part_size
        if not step.final and made is not None:
            made.append(step.destination)
        result = await compose_object(
            bucket,
            step,
            size=step_size,
            crc32c=crc32c_to_b64(step_crc),
            policy=options.policy,
            # An intermediate is new: pinned to 0, a retry after a lost answer is safe too.
            if_generation_match=options.if_generation_match if step.final else 0,
            content_type=options.content_type if step.final else None,
            metadata=options.metadata if step.final else None,
            connect_timeout=options.connect_timeout,
            read_timeout=options.read_timeout,
        )
        sizes_and_crcs[step.destination] = (step_size, step_crc)
    # compose_object checked every step's size and CRC32C; the last one is the object.
    assert result is not None
    return result


def _delete_once(bucket: storage.Bucket, name: str, timeout: tuple[float, float]) -> str | None:
    """Delete one object (in a worker thread): None when gone (or never there), else a cause."""
    try:
        bucket.delete_blob(name, timeout=timeout, retry=None)
    except api_exceptions.NotFound:
        return None
    except api_exceptions.GoogleAPICallError as exc:
        cause = f"http-{exc.code}"
        _scrub(exc)
        return cause
    except _NETWORK_ERRORS as exc:
        cause = _cause_of(exc)
        _scrub(exc)
        return cause
    return None


async def delete_objects(
    bucket: storage.Bucket,
    names: Sequence[str],
    *,
    policy: RetryPolicy,
    connect_timeout: float = 30.0,
    read_timeout: float = 60.0,
) -> list[str]:
    """Delete ``names`` (a missing one counts as deleted); return those left behind.

    Each is retried under ``policy``; what is left is for a sweep (``rup sweep``) to find.
    Cancellation midway leaves the rest in place, which a sweep removes as well.
    """
    timeout = request_timeout(connect_timeout, read_timeout)
    left: list[str] = []
    for name in names:
        started = trio.current_time()
        attempts = 0
        while cause := await trio.to_thread.run_sync(_delete_once, bucket, name, timeout):
            attempts += 1
            if policy.gives_up(attempts, trio.current_time() - started):
                logger.warning("left temporary object %r behind (%s)", name, cause)
                left.append(name)
                break
            await trio.sleep(policy.next_delay(attempts))
    return left
