"""What a writer reports: its counters, and the object it made."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ObjectInfo", "WriterStats"]


@dataclass(frozen=True)
class WriterStats:
    """Counters of one writer, as a snapshot."""

    bytes_sent: int = 0
    bytes_acked: int = 0
    chunks: int = 0
    retries: int = 0
    retries_by_cause: Mapping[str, int] = field(default_factory=dict)
    session_restarts: int = 0
    held_bytes: int = 0
    #: Separate pieces (views) held, and the memory charged for them with the payload.
    fragments: int = 0
    buffered_cost: int = 0
    #: Payload bytes read to checksum them; bytes whose CRC32C the caller gave are not.
    bytes_checksummed: int = 0


@dataclass(frozen=True)
class ObjectInfo:
    """The finished object, from GCS's own metadata."""

    bucket: str
    name: str
    generation: int
    size: int
    crc32c: str | None
    md5_hash: str | None
    content_type: str | None
    metadata: Mapping[str, str]
    resource: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_resource(cls, resource: Mapping[str, Any]) -> ObjectInfo:
        """Read GCS's JSON object resource (numbers there are strings)."""
        return cls(
            bucket=str(resource.get("bucket", "")),
            name=str(resource.get("name", "")),
            generation=int(resource.get("generation", 0)),
            size=int(resource.get("size", 0)),
            crc32c=resource.get("crc32c"),
            md5_hash=resource.get("md5Hash"),
            content_type=resource.get("contentType"),
            metadata=dict(resource.get("metadata") or {}),
            resource=resource,
        )
