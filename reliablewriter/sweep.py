"""Sweeping: the temporary objects of interrupted composite uploads, found and deleted.

A composite upload that completes or aborts deletes its own temporaries; a process that
dies midway cannot. Its objects stay under ``<temp_prefix><upload_id>/``, as swift's
``.tmp`` segments do, until a sweep removes them. An upload counts as interrupted when its
*newest* temporary object is older than the cut-off, so the segments of an upload still
in progress (which keeps making new ones) are left alone even if its first is old.

Blocking: it is meant for ``rup sweep`` and for a server's own housekeeping thread.
"""

from __future__ import annotations

import contextlib
import datetime
from collections import defaultdict
from dataclasses import dataclass

from google.api_core import exceptions as api_exceptions
from google.cloud import storage  # type: ignore[import-untyped]

from .composite import DEFAULT_TEMP_PREFIX

__all__ = ["SweptObject", "sweep_temporaries"]


@dataclass(frozen=True)
class SweptObject:
    """A temporary object a sweep removed (or, in a dry run, would remove)."""

    name: str
    upload_id: str
    size: int
    age_seconds: float


def sweep_temporaries(
    bucket: storage.Bucket,
    *,
    older_than: datetime.timedelta,
    prefix: str = DEFAULT_TEMP_PREFIX,
    now: datetime.datetime | None = None,
    dry_run: bool = False,
    timeout: float = 60.0,
) -> list[SweptObject]:
    """Delete the temporaries of every upload under ``prefix`` idle for ``older_than``.

    Returns what was removed, by upload then name. An object already gone counts as
    removed (another sweep, or its upload finishing). Other errors of google-cloud-storage
    propagate: a sweep that stops halfway is simply run again.
    """
    if not prefix.endswith("/"):
        raise ValueError("the temporary prefix must end with '/'")
    moment = now or datetime.datetime.now(datetime.UTC)
    by_upload: dict[str, list[storage.Blob]] = defaultdict(list)
    for blob in bucket.list_blobs(prefix=prefix, timeout=timeout):
        upload_id, slash, _ = blob.name[len(prefix) :].partition("/")
        if slash:  # anything not of the form <prefix><upload id>/<part> is not ours
            by_upload[upload_id].append(blob)
    swept: list[SweptObject] = []
    for upload_id in sorted(by_upload):
        blobs = by_upload[upload_id]
        newest = max(blob.time_created for blob in blobs)
        if moment - newest < older_than:
            continue
        for blob in sorted(blobs, key=lambda b: str(b.name)):
            if not dry_run:
                with contextlib.suppress(api_exceptions.NotFound):
                    bucket.delete_blob(blob.name, timeout=timeout)
            age = (moment - blob.time_created).total_seconds()
            swept.append(SweptObject(blob.name, upload_id, int(blob.size or 0), age))
    return swept
