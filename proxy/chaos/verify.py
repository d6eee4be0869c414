"""The judge of ``rup chaos`` and ``rup demo``: what GCS holds, against what it should hold.

Blocking (google-cloud-storage over HTTP, no faults): call from a worker thread. Every check
returns the empty string when GCS holds what it should, and otherwise one sentence saying
what differs, which is what the report prints. :func:`judge_upload` turns how an upload
ended (:class:`Stored` or :class:`Failed`, whether the client ran in the run's process or
as ``rup upload``) and what GCS holds into the upload's verdict.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
from dataclasses import dataclass

import google_crc32c
from google.api_core import exceptions as api_exceptions
from google.cloud import storage  # type: ignore[import-untyped]

from proxy.chaos.report import UploadOutcome, Verdict
from proxy.chaos.source import ObjectSource, SourceReader
from proxy.chaos.workload import Precondition, UploadSpec

__all__ = [
    "Failed",
    "SourceComparator",
    "Stored",
    "delete_object",
    "judge_upload",
    "left_temporaries",
    "put_previous",
    "verify_object",
    "verify_untouched",
]


class SourceComparator:
    """A write-only file that compares what is written, in order, with an object's source.

    Keeps only the first difference and a running CRC32C of what was written.
    """

    def __init__(self, reader: SourceReader) -> None:
        self._reader = reader
        self.offset = 0
        self.crc32c = 0
        self.first_difference: int | None = None

    def write(self, data: bytes) -> int:
        self.crc32c = google_crc32c.extend(self.crc32c, data)
        if self.first_difference is None:
            expected = self._reader.read(self.offset, len(data))
            if expected != data:
                self.first_difference = self.offset + next(
                    (i for i, (a, b) in enumerate(zip(expected, data, strict=False)) if a != b),
                    min(len(expected), len(data)),
                )
        self.offset += len(data)
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered."""


def _stored_crc32c(blob: storage.Blob) -> int:
    return int.from_bytes(base64.b64decode(blob.crc32c or ""), "big")


def _compare_download(blob: storage.Blob, source: ObjectSource) -> str:
    comparator = SourceComparator(source.reader())
    # checksum=None: this comparison is the judge, not the library's own check
    blob.download_to_file(comparator, checksum=None)
    if comparator.first_difference is not None:
        return f"the stored object differs from the source from byte {comparator.first_difference}"
    if comparator.offset != source.size:
        return f"the download has {comparator.offset} bytes, the source {source.size}"
    return ""


def verify_object(
    bucket: storage.Bucket,
    name: str,
    source: ObjectSource,
    *,
    generation: int | None = None,
    reported_crc32c: int | None = None,
    reported_size: int | None = None,
) -> str:
    """'' when ``name`` holds exactly ``source``: size, CRC32C, and every byte.

    ``generation``, ``reported_crc32c`` and ``reported_size`` are what the client was told;
    they must match what GCS holds too.
    """
    blob = bucket.get_blob(name)
    if blob is None:
        return "the upload succeeded but there is no object"
    expected_crc = source.crc32c()
    # storage-testbench leaves "size" out of a 0-byte object's resource
    stored_size = blob.size or 0
    if stored_size != source.size:
        return f"GCS holds {stored_size} bytes, the source has {source.size}"
    if _stored_crc32c(blob) != expected_crc:
        return f"GCS reports crc32c {_stored_crc32c(blob):08x}, the source has {expected_crc:08x}"
    if reported_crc32c is not None and reported_crc32c != expected_crc:
        return (
            f"the client was told crc32c {reported_crc32c:08x}, the source has {expected_crc:08x}"
        )
    if reported_size is not None and reported_size != source.size:
        return f"the client was told {reported_size} bytes, the source has {source.size}"
    if generation is not None and blob.generation != generation:
        return f"the client was told generation {generation}, GCS holds {blob.generation}"
    return _compare_download(blob, source)


def verify_untouched(
    bucket: storage.Bucket,
    name: str,
    previous: ObjectSource | None,
    previous_generation: int | None,
) -> str:
    """'' when a failed upload left nothing behind: no object, or the previous one intact."""
    blob = bucket.get_blob(name)
    if previous is None or previous_generation is None:
        if blob is None:
            return ""
        return f"the upload failed but left an object of {blob.size} bytes behind"
    if blob is None:
        return "the upload failed and the previous generation is gone"
    if blob.generation != previous_generation:
        return (
            f"the upload failed but generation {blob.generation} replaced"
            f" generation {previous_generation}"
        )
    return _compare_download(blob, previous)


def put_previous(bucket: storage.Bucket, name: str, previous: ObjectSource) -> int:
    """Store ``previous`` as ``name`` (any earlier object is replaced); its generation."""
    blob = bucket.blob(name)
    blob.upload_from_string(b"".join(previous.blocks()), content_type="application/octet-stream")
    generation: int = blob.generation
    return generation


def delete_object(bucket: storage.Bucket, name: str) -> None:
    """Remove ``name`` if it exists, so a long run does not fill the endpoint's memory."""
    with contextlib.suppress(api_exceptions.NotFound):
        bucket.blob(name).delete()


#: the last part of a discarded composite upload's marker (proxy.server.composites), which
#: stays for the token lifetime by design
_DISCARDED_MARKER = "discarded"


def left_temporaries(bucket: storage.Bucket, prefix: str) -> tuple[list[str], list[str]]:
    """What composite uploads left under their temporary ``prefix``: segments and
    intermediate composes (which nothing may leave once its upload ended), then the markers
    of discarded uploads (kept for the token lifetime, then swept). Called once the run's
    proxies are gone, it deletes the markers, which no proxy will consult any more."""
    names = sorted(blob.name for blob in bucket.list_blobs(prefix=prefix))
    markers = [name for name in names if name.rsplit("/", 1)[-1] == _DISCARDED_MARKER]
    for marker in markers:
        delete_object(bucket, marker)
    return [name for name in names if name not in markers], markers


@dataclass(frozen=True)
class Stored:
    """The client was told its upload is stored: as which generation, with which CRC32C."""

    generation: int
    crc32c: int
    size: int | None = None


@dataclass(frozen=True)
class Failed:
    """The client was told its upload failed."""

    #: the proxy's error code, or the exception type, or how the command ended
    cause: str
    message: str
    #: the proxy refused the upload's ifGenerationMatch
    precondition_failed: bool = False


def judge_upload(
    bucket: storage.Bucket,
    spec: UploadSpec,
    base: UploadOutcome,
    ending: Stored | Failed,
    previous_generation: int | None,
) -> UploadOutcome:
    """``base`` with the verdict: what GCS holds now, against what ``ending`` promises."""
    if isinstance(ending, Stored):
        if spec.precondition is Precondition.STALE:
            return dataclasses.replace(
                base,
                verdict=Verdict.WRONGLY_ACCEPTED,
                problem=f"ifGenerationMatch named a stale generation, yet generation"
                f" {ending.generation} was written",
            )
        problem = verify_object(
            bucket,
            spec.name,
            spec.source,
            generation=ending.generation,
            reported_crc32c=ending.crc32c,
            reported_size=ending.size,
        )
        if problem:
            return dataclasses.replace(base, verdict=Verdict.CORRUPT, problem=problem)
        return base
    problem = verify_untouched(bucket, spec.name, spec.previous, previous_generation)
    if problem:
        return dataclasses.replace(
            base,
            verdict=Verdict.LEFT_BEHIND,
            cause=ending.cause,
            problem=f"{problem}; the client was told: {ending.message}",
        )
    refused = spec.precondition is Precondition.STALE and ending.precondition_failed
    return dataclasses.replace(
        base,
        verdict=Verdict.REFUSED if refused else Verdict.FAILED_CLEANLY,
        cause=ending.cause,
        problem="" if refused else ending.message,
    )
