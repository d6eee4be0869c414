"""The GCS resumable upload protocol, sans-IO: what to send next and what a response means.

Nothing here touches a socket or a clock. :class:`ResumableState` is told what was sent
and what came back, and answers with an outcome; the writer does the I/O and the waiting.
That keeps every protocol decision (chunk sizes, ``Content-Range``, 308 with and without
``Range``, regressions, which statuses are worth a retry) testable on its own.

Why not google-resumable-media's ``ResumableUpload._process_resumable_response``: it treats
a 308 without ``Range`` as an invalid response and tombstones the upload (GCS sends exactly
that when it stored nothing), it accepts a ``Range`` lower than what it had already
acknowledged without noticing the data loss, and on 200 it credits the bytes it *sent*
rather than what the server says it stored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import NonRetryableHTTPError, ServerRegressionError, UnexpectedResponseError
from .settings import CHUNK_QUANTUM, RetryPolicy

__all__ = [
    "ChunkPlan",
    "Finished",
    "HttpResponse",
    "Outcome",
    "Persisted",
    "ResumableState",
    "RetryLater",
    "SessionGone",
    "error_reason",
    "plan_chunk",
]

_RANGE = re.compile(r"^bytes=0-(?P<last>\d+)$")
_REASON_LIMIT = 300


@dataclass(frozen=True)
class ChunkPlan:
    """Bytes ``[start, end)`` to send; ``total`` is set when this chunk finalizes the object."""

    start: int
    end: int
    total: int | None = None

    @property
    def final(self) -> bool:
        return self.total is not None

    @property
    def size(self) -> int:
        return self.end - self.start

    def content_range(self) -> str:
        total = "*" if self.total is None else str(self.total)
        if self.start == self.end:
            return f"bytes */{total}"
        return f"bytes {self.start}-{self.end - 1}/{total}"


def plan_chunk(
    *, committed: int, available_end: int, total: int | None, min_size: int, max_size: int
) -> ChunkPlan | None:
    """The next chunk to send from ``committed``, or ``None`` if it is better to wait.

    ``available_end`` is where the gap-free run of held bytes ends. A non-final chunk is a
    multiple of :data:`CHUNK_QUANTUM` between ``min_size`` and ``max_size``; once ``total``
    is known and every byte up to it is held, the rest goes out, the last piece as the
    final chunk (possibly empty, possibly shorter than ``min_size``).
    """
    if total is not None and available_end >= total:
        if total - committed <= max_size:
            return ChunkPlan(committed, total, total)
        return ChunkPlan(committed, committed + max_size)
    size = min(available_end - committed, max_size)
    size -= size % CHUNK_QUANTUM
    if size >= min_size:
        return ChunkPlan(committed, committed + size)
    return None


@dataclass(frozen=True)
class HttpResponse:
    """What the transport got back. Header names are lower case."""

    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True)
class Persisted:
    """GCS holds the bytes ``[0, offset)``; the upload is not finished."""

    offset: int


@dataclass(frozen=True)
class Finished:
    """The object exists; ``resource`` is its JSON metadata."""

    resource: Mapping[str, Any]


@dataclass(frozen=True)
class RetryLater:
    """A transient failure; ``cause`` names it for counters (``http-503``, ``truncated``)."""

    cause: str


@dataclass(frozen=True)
class SessionGone:
    """GCS no longer knows the session (404 or 410)."""

    status: int


Outcome = Persisted | Finished | RetryLater | SessionGone


def error_reason(response: HttpResponse) -> str:
    """GCS's own explanation of an error, shortened; never includes request URLs."""
    try:
        message = json.loads(response.body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.body[:_REASON_LIMIT].decode("utf-8", "replace").strip()
    return str(message)[:_REASON_LIMIT] or "(no reason given)"


class ResumableState:
    """The client's view of one resumable session.

    ``committed`` is what GCS has acknowledged; ``high_water`` is the end of everything
    ever sent (or acknowledged), which bounds what GCS can truthfully claim to hold. For a
    session resumed from its URI, ``high_water`` is unknown (``None``) until GCS first
    reports its offset.
    """

    def __init__(
        self, *, name: str, policy: RetryPolicy, committed: int = 0, resumed: bool = False
    ) -> None:
        self.name = name
        self.policy = policy
        self.committed = committed
        self.high_water: int | None = None if resumed else committed

    def sending(self, plan: ChunkPlan) -> None:
        """Note that ``plan`` is about to go out."""
        if plan.start != self.committed:
            raise ValueError(f"chunks start at the committed offset {self.committed}")
        self.high_water = max(self.high_water or 0, plan.end)

    def restart(self) -> None:
        """Start over in a fresh session (the old one is gone and every byte is held)."""
        self.committed = 0

    def resumed_at(self, offset: int) -> None:
        """Adopt what GCS reports for a session this process did not write to before."""
        self.committed = self.high_water = offset

    def receive(self, response: HttpResponse, sent: ChunkPlan | None) -> Outcome:
        """Interpret the response to ``sent`` (``None`` for a status query).

        Raises :class:`~reliablewriter.NonRetryableHTTPError`,
        :class:`~reliablewriter.ServerRegressionError` or
        :class:`~reliablewriter.UnexpectedResponseError` when retrying cannot help.
        """
        status = response.status
        if status in (200, 201):
            return self._finished(response, sent)
        if status == 308:
            return self._persisted(response)
        if status in (404, 410):
            return SessionGone(status)
        if self.policy.is_retryable_status(status):
            return RetryLater(f"http-{status}")
        raise NonRetryableHTTPError(
            "GCS refused the upload",
            status=status,
            reason=error_reason(response),
            name=self.name,
            offset=self.committed,
        )

    def _finished(self, response: HttpResponse, sent: ChunkPlan | None) -> Outcome:
        if sent is not None and not sent.final:
            # Not a finalization: this chunk did not ask for one (storage-testbench sends an
            # empty 200 here for a broken stream). Nothing tells what the server holds.
            raise UnexpectedResponseError(
                f"unexpected response: HTTP {response.status} to a non-final chunk ending at "
                f"{sent.end} (a 308 was due; this writer finalized nothing)",
                name=self.name,
                offset=self.committed,
            )
        try:
            resource = json.loads(response.body)
        except ValueError:
            # The object exists but its metadata was cut short; a status query repeats it.
            return RetryLater("truncated-response")
        if not isinstance(resource, dict):
            return RetryLater("truncated-response")
        return Finished(resource)

    def _persisted(self, response: HttpResponse) -> Outcome:
        header = response.headers.get("range")
        if header is None:
            reported = 0  # GCS omits Range when it holds nothing at all
        else:
            match = _RANGE.match(header.strip())
            if match is None:
                # Damaged on the way (GCS only ever sends ``bytes=0-N``): asking again is
                # safe, and a server that keeps sending it runs out the retries.
                return RetryLater("malformed-range")
            reported = int(match["last"]) + 1
        if reported < self.committed:
            raise ServerRegressionError(
                acknowledged=self.committed,
                reported=reported,
                name=self.name,
                offset=self.committed,
            )
        if self.high_water is not None and reported > self.high_water:
            raise UnexpectedResponseError(
                f"GCS claims {reported} bytes but only {self.high_water} were ever sent",
                name=self.name,
                offset=self.committed,
            )
        self.committed = reported
        return Persisted(reported)
