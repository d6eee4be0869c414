"""Immutable configuration: the retry policy and the writer settings."""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from .buffer import FRAGMENT_OVERHEAD

__all__ = ["CHUNK_QUANTUM", "ChecksumMode", "KiB", "MiB", "RetryPolicy", "WriterSettings"]

#: byte units: the one home for the layers that may import reliablewriter (server, chaos)
KiB = 1024
MiB = 1024 * KiB
#: GCS requires every non-final chunk of a resumable upload to be a multiple of this.
CHUNK_QUANTUM = 256 * KiB

_RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

# The derived fragment cap: one piece per 4 KiB of buffer, never fewer than 256.
_BYTES_PER_DERIVED_FRAGMENT = 4 * 1024
_MIN_DERIVED_FRAGMENTS = 256


@dataclass(frozen=True)
class RetryPolicy:
    """When to retry and how long to wait, in the manner of urllib3's ``Retry``.

    Delays grow exponentially from ``initial_delay`` by ``multiplier`` up to ``max_delay``
    and are drawn with full jitter (uniformly from zero to that bound), so that many writers
    failing together do not retry in lockstep.

    Both limits count from the last *progress* (GCS acknowledging more bytes), not from when
    the current chunk started: a long upload over a flaky link keeps going as long as it
    keeps moving. ``deadline`` is in seconds: 120 by default, google-cloud-storage's own
    retry deadline, and long enough to outlast a GCS endpoint's restart. ``max_attempts``
    (None by default: time alone decides) counts failed attempts since that progress; a
    count limit gives up sooner on fast failures, such as a refused connection during the
    seconds an endpoint is down, which is rarely what an upload wants.
    """

    max_attempts: int | None = None
    deadline: float = 120.0
    initial_delay: float = 0.25
    max_delay: float = 16.0
    multiplier: float = 2.0
    retryable_statuses: frozenset[int] = field(default=_RETRYABLE_STATUSES)

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.deadline <= 0 or self.initial_delay < 0 or self.max_delay < self.initial_delay:
            raise ValueError("need deadline > 0 and 0 <= initial_delay <= max_delay")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be at least 1, got {self.multiplier}")

    def next_delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to sleep before retry number ``attempt`` (1 for the first retry).

        ``rng`` makes the jitter reproducible; without it the module's generator is used.
        """
        if attempt < 1:
            raise ValueError(f"attempt counts from 1, got {attempt}")
        bound = min(self.max_delay, self.initial_delay * self.multiplier ** (attempt - 1))
        return (rng or random).uniform(0.0, bound)

    def is_retryable_status(self, status: int) -> bool:
        """Whether an HTTP status from GCS is worth another attempt."""
        return status in self.retryable_statuses

    def gives_up(self, attempts: int, seconds_since_progress: float) -> bool:
        """Whether to stop after ``attempts`` failures and this long without progress."""
        counted_out = self.max_attempts is not None and attempts >= self.max_attempts
        return counted_out or seconds_since_progress >= self.deadline


class ChecksumMode(enum.Enum):
    """Which whole-object checksums to compute while streaming and have GCS verify."""

    CRC32C = "crc32c"
    MD5 = "md5"
    BOTH = "both"
    NONE = "none"

    @property
    def crc32c(self) -> bool:
        return self in (ChecksumMode.CRC32C, ChecksumMode.BOTH)

    @property
    def md5(self) -> bool:
        return self in (ChecksumMode.MD5, ChecksumMode.BOTH)


@dataclass(frozen=True)
class WriterSettings:
    """Everything that shapes one writer's behaviour.

    Chunks: every non-final chunk is a multiple of :data:`CHUNK_QUANTUM`, at least
    ``min_chunk_size`` and at most ``max_chunk_size``; the final one may be shorter.

    ``buffer_limit`` bounds the bytes held: writes must end at or before
    ``committed_offset + buffer_limit`` (the window); beyond it they wait. It must hold at
    least one maximal chunk, so the head of the window can always be sent.

    Timeouts, in seconds: ``connect_timeout`` to open a connection; ``progress_timeout``
    for any single socket operation (sending a slice of body, waiting for a response) to
    make progress, so a stalled connection fails and is retried instead of hanging.
    ``send_slice`` is how many bytes are handed to the socket at once, which is what
    bounds one socket operation. (urllib3 applies the connect timeout to sending the
    request as well, so the smaller of the two bounds connecting.)

    ``max_fragments`` caps the separate pieces (views) the buffer holds; a write beyond it
    raises :class:`~reliablewriter.TooFragmentedError`. ``None`` derives it from the
    buffer: one piece per 4 KiB of ``buffer_limit`` (at least 256), so the pieces'
    overhead adds at most an eighth to the buffer (see :attr:`fragment_limit` and
    :attr:`max_buffered_cost`).
    """

    min_chunk_size: int = 8 * 1024 * 1024
    max_chunk_size: int = 32 * 1024 * 1024
    buffer_limit: int = 64 * 1024 * 1024
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    connect_timeout: float = 10.0
    progress_timeout: float = 60.0
    checksum: ChecksumMode = ChecksumMode.CRC32C
    send_slice: int = 1024 * 1024
    max_fragments: int | None = None

    def __post_init__(self) -> None:
        for name in ("min_chunk_size", "max_chunk_size"):
            value = getattr(self, name)
            if value <= 0 or value % CHUNK_QUANTUM:
                raise ValueError(f"{name} must be a positive multiple of {CHUNK_QUANTUM}")
        if self.min_chunk_size > self.max_chunk_size:
            raise ValueError("min_chunk_size must not exceed max_chunk_size")
        if self.buffer_limit < self.max_chunk_size:
            raise ValueError("buffer_limit must hold at least one max_chunk_size chunk")
        if self.connect_timeout <= 0 or self.progress_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if self.send_slice <= 0:
            raise ValueError("send_slice must be positive")
        if self.max_fragments is not None and self.max_fragments < 1:
            raise ValueError("max_fragments must be at least 1")

    @property
    def fragment_limit(self) -> int:
        """The cap on separate pieces held, given or derived from ``buffer_limit``."""
        if self.max_fragments is not None:
            return self.max_fragments
        return max(_MIN_DERIVED_FRAGMENTS, self.buffer_limit // _BYTES_PER_DERIVED_FRAGMENT)

    @property
    def max_buffered_cost(self) -> int:
        """The most a writer's :attr:`~reliablewriter.ReliableWriter.buffered_cost` can be.

        Payload within the window plus the overhead of every piece the cap allows: what a
        caller sharing a memory budget between writers should reserve for one.
        """
        return self.buffer_limit + self.fragment_limit * FRAGMENT_OVERHEAD
