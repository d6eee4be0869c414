"""What an upload reports: progress snapshots while it runs, and the result once it is stored."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["UploadProgress", "UploadResult"]


@dataclass(frozen=True)
class UploadProgress:
    """A snapshot for progress displays; ``total`` is None while a stream is still open."""

    total: int | None
    bytes_sent: int
    bytes_received: int
    committed: int
    connections: int
    reconnects: int
    resent_bytes: int
    #: seconds since the last connection to the proxy was lost, while none is up (else None)
    retrying_for: float | None = None
    #: times the upload started again from byte 0 because the proxy could not resume it
    restarts: int = 0


@dataclass(frozen=True)
class UploadResult:
    """The finalized object, as the proxy reported it, plus what it took to get there."""

    bucket: str
    name: str
    size: int
    generation: int
    crc32c: int
    md5: bytes | None
    elapsed: float
    connections: int
    bytes_sent: int
    reconnects: int
    resent_bytes_by_cause: Mapping[str, int]
    errors_by_code: Mapping[str, int]
    #: times the upload started again from byte 0 because the proxy could not resume it
    restarts: int = 0
    #: the segments the object was composed from (a composite upload, protocol section 14;
    #: GCS gives such an object no MD5), or 0 for an upload through one session
    segments: int = 0

    @property
    def composite(self) -> bool:
        """Whether the object was composed from segments (and so has no MD5)."""
        return self.segments > 0

    @property
    def throughput(self) -> float:
        """Object bytes per second, over the whole upload."""
        return self.size / self.elapsed if self.elapsed > 0 else math.inf
