"""The rules of a GCS resumable upload session, held as strictly as real GCS holds them.

* ``Content-Range: bytes A-B/T`` (``T`` may be ``*``) carries bytes A..B; the request
  with ``B + 1 == T`` is the final one. ``bytes */T`` and ``bytes */*`` with an empty
  body are status queries; ``bytes */T`` with ``T`` equal to what is stored finalizes.
* Bytes the session already holds are skipped, not compared (GCS does the same); a chunk
  starting past the stored offset is refused with 400 - storage-testbench accepts it,
  and that leniency once hid a client bug that skipped bytes.
* A non-final chunk keeps only its part up to the last 256 KiB boundary, as GCS does;
  the 308's ``Range`` tells the client where to resume.
* A chunk the client cut off keeps the prefix up to the last boundary of
  ``persist_granularity`` bytes (0: keeps nothing).

:func:`apply_chunk` is the whole rule set. It runs with the session's lock held, after
the body has been read, so a slow client never holds a lock while its bytes trickle in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from faultnet.gcs.errors import GcsApiError
from faultnet.gcs.model import ObjectInfo
from faultnet.gcs.store import Store, UploadSession

__all__ = [
    "UPLOAD_QUANTUM",
    "ChunkOutcome",
    "ContentRange",
    "apply_chunk",
    "range_header",
]

#: GCS persists non-final chunks in multiples of this
UPLOAD_QUANTUM = 256 * 1024

_CONTENT_RANGE = re.compile(r"bytes (?:\*|([0-9]+)-([0-9]+))/(\*|[0-9]+)")


@dataclass(frozen=True)
class ContentRange:
    """A parsed ``Content-Range``; ``first``/``last`` are None for ``bytes */...``."""

    first: int | None
    last: int | None
    total: int | None

    @classmethod
    def parse(cls, header: str | None, body_length: int | None) -> ContentRange:
        """Parse ``header``; a PUT without one carries the whole object (``body_length``)."""
        if header is None:
            if body_length is None:
                raise GcsApiError(400, "Content-Range is required with a chunked body")
            if body_length == 0:
                return cls(None, None, 0)
            return cls(0, body_length - 1, body_length)
        match = _CONTENT_RANGE.fullmatch(header.strip())
        if match is None:
            raise GcsApiError(400, f"Failed to parse Content-Range header: {header!r}")
        first_text, last_text, total_text = match.groups()
        total = None if total_text == "*" else int(total_text)
        if first_text is None:
            return cls(None, None, total)
        first, last = int(first_text), int(last_text)
        if last < first:
            raise GcsApiError(400, f"Content-Range {header!r} ends before it starts")
        if total is not None and last >= total:
            raise GcsApiError(400, f"Content-Range {header!r} reaches past its total")
        return cls(first, last, total)

    @property
    def length(self) -> int:
        return 0 if self.first is None or self.last is None else self.last - self.first + 1


@dataclass(frozen=True)
class ChunkOutcome:
    """What a session holds after a request: the object once final, else the stored size."""

    persisted_size: int
    result: ObjectInfo | None


def range_header(persisted_size: int) -> tuple[tuple[str, str], ...]:
    """The ``Range`` header of a 308: none at all when nothing is stored, like GCS."""
    if persisted_size == 0:
        return ()
    return (("Range", f"bytes=0-{persisted_size - 1}"),)


def apply_chunk(
    store: Store,
    session: UploadSession,
    content_range: ContentRange,
    body: memoryview,
    *,
    complete: bool,
    persist_granularity: int = UPLOAD_QUANTUM,
    keep_at_most: int | None = None,
    may_finalize: bool = True,
    expected_crc32c: str | None = None,
    expected_md5: str | None = None,
) -> ChunkOutcome:
    """Apply one PUT to ``session`` (whose lock the caller holds).

    ``complete`` is False if the client cut the body off. Scripted faults use
    ``keep_at_most``, a cap on the absolute offset this request stores, and
    ``may_finalize=False``, which answers 308 even when all bytes are in. Raises
    GcsApiError for requests GCS refuses; a refused request stores nothing.
    """
    if session.result is not None:
        return ChunkOutcome(session.result.size, session.result)
    persisted = session.persisted_size
    total = content_range.total
    if complete and body.nbytes != content_range.length:
        raise GcsApiError(
            400,
            f"Content-Range says {content_range.length} bytes but the body has {body.nbytes}",
        )
    if total is not None:
        if session.total_size is not None and total != session.total_size:
            raise GcsApiError(
                400, f"upload size {total} differs from the declared {session.total_size}"
            )
        if total < persisted:
            raise GcsApiError(400, f"upload size {total} is below the {persisted} bytes stored")
    if content_range.first is not None and content_range.first > persisted:
        raise GcsApiError(
            400,
            f"chunk starts at byte {content_range.first}, past the {persisted} bytes stored",
        )

    if content_range.first is None:
        end = persisted
        keep_end = persisted
    else:
        end = content_range.first + body.nbytes
        if not complete:
            granularity = persist_granularity
            keep_end = end // granularity * granularity if granularity else persisted
        elif total is not None and end == total:
            keep_end = end
        else:
            keep_end = end // UPLOAD_QUANTUM * UPLOAD_QUANTUM
    if keep_at_most is not None:
        keep_end = min(keep_end, keep_at_most)
    new_bytes = body[0:0]
    if content_range.first is not None and keep_end > persisted:
        new_bytes = body[persisted - content_range.first : keep_end - content_range.first]
    if may_finalize and complete and total is not None and max(keep_end, persisted) == total:
        result = store.finalize_session(
            session, new_bytes, expected_crc32c=expected_crc32c, expected_md5=expected_md5
        )
        return ChunkOutcome(result.size, result)
    session.append(new_bytes)
    if total is not None:
        session.total_size = total
    persisted = session.persisted_size
    session.acknowledged_size = max(session.acknowledged_size, persisted)
    return ChunkOutcome(persisted, None)
