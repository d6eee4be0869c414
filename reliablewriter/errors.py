"""Errors raised by :mod:`reliablewriter`, named by what went wrong.

Every error carries the context needed to act on it (object name, offset, attempt, HTTP
status) and never a secret: session URIs and bearer tokens stay out of messages, ``repr``
and attributes alike.
"""

from __future__ import annotations

__all__ = [
    "ChecksumMismatchError",
    "IncompleteObjectError",
    "NonRetryableHTTPError",
    "RetriesExhaustedError",
    "ServerRegressionError",
    "SessionLostError",
    "TooFragmentedError",
    "UnexpectedResponseError",
    "WindowExceededError",
    "WriterAbortedError",
    "WriterClosedError",
    "WriterError",
]


class WriterError(Exception):
    """Base of every error a :class:`~reliablewriter.ReliableWriter` raises.

    ``name`` is the object name, ``offset`` the committed offset when the error happened.
    """

    def __init__(self, message: str, *, name: str = "", offset: int | None = None) -> None:
        context = []
        if name:
            context.append(f"object {name!r}")
        if offset is not None:
            context.append(f"committed offset {offset}")
        suffix = f" ({', '.join(context)})" if context else ""
        super().__init__(message + suffix)
        self.name = name
        self.offset = offset


class NonRetryableHTTPError(WriterError):
    """GCS refused a request in a way that retrying cannot fix (400, 401, 403, 412, ...)."""

    def __init__(
        self, message: str, *, status: int, reason: str, name: str = "", offset: int | None = None
    ) -> None:
        super().__init__(f"{message}: HTTP {status}: {reason}", name=name, offset=offset)
        self.status = status
        self.reason = reason


class RetriesExhaustedError(WriterError):
    """Retryable failures went on for too many attempts, or for too long without progress."""

    def __init__(
        self, message: str, *, attempts: int, cause: str, name: str = "", offset: int | None = None
    ) -> None:
        super().__init__(
            f"{message} after {attempts} attempts, last cause: {cause}", name=name, offset=offset
        )
        self.attempts = attempts
        self.cause = cause


class SessionLostError(WriterError):
    """GCS no longer knows the upload session (404/410), and the writer will not replace it.

    A session URI travels (in a proxy's tokens), so a lost session may have been
    cancelled or finished elsewhere: a new session could write the object again after an
    abort or a completion. The writer starts one only when its caller allowed it
    (``restart_if_nothing_committed``), no byte was ever committed, and no object exists.

    ``lost_range`` is the half-open byte range that was acknowledged and released from
    the buffer, to be resent by whoever still has it; ``None`` when no such range is
    known (a session lost while being resumed, or before GCS acknowledged any byte).
    ``status`` is GCS's answer.
    """

    def __init__(
        self,
        message: str,
        *,
        lost_range: tuple[int, int] | None,
        status: int | None = None,
        name: str = "",
        offset: int | None = None,
    ) -> None:
        if lost_range is not None and lost_range[1] > lost_range[0]:
            start, end = lost_range
            message = f"{message}; bytes [{start}, {end}) are no longer held"
        super().__init__(message, name=name, offset=offset)
        self.lost_range = lost_range
        self.status = status


class ServerRegressionError(WriterError):
    """GCS reported fewer stored bytes than it had already acknowledged.

    Resending silently could hide data loss on the server, so the upload stops instead.
    """

    def __init__(
        self, *, acknowledged: int, reported: int, name: str = "", offset: int | None = None
    ) -> None:
        super().__init__(
            f"server regressed: it acknowledged {acknowledged} bytes earlier "
            f"and now reports {reported}",
            name=name,
            offset=offset,
        )
        self.acknowledged = acknowledged
        self.reported = reported


class UnexpectedResponseError(WriterError):
    """GCS answered in a way the resumable upload protocol does not allow."""


class ChecksumMismatchError(WriterError):
    """Two checksums of the object that must agree did not.

    ``expected`` and ``actual`` are base64 CRC32C (or MD5) strings as GCS writes them.
    """

    def __init__(
        self, message: str, *, expected: str, actual: str, name: str = "", offset: int | None = None
    ) -> None:
        super().__init__(f"{message}: expected {expected}, got {actual}", name=name, offset=offset)
        self.expected = expected
        self.actual = actual


class IncompleteObjectError(WriterError):
    """``complete()`` was called while bytes of the object were still missing."""

    def __init__(
        self, *, missing: tuple[tuple[int, int], ...], name: str = "", offset: int | None = None
    ) -> None:
        shown = ", ".join(f"[{start}, {end})" for start, end in missing[:4])
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        super().__init__(f"cannot complete: missing bytes {shown}{more}", name=name, offset=offset)
        self.missing = missing


class TooFragmentedError(WriterError):
    """A write would make the upload hold more separate pieces than its cap allows.

    Every piece held costs memory beyond its bytes, so a caller writing many tiny
    pieces with holes between them (out of order) is refused rather than let the
    buffer's real size grow without bound. The write's pieces before the refused one may
    be held (they are correct bytes; sending the write again is safe); the writer itself
    carries on. ``fragments`` is how many were held, ``adding`` how many the refused piece
    would have added, ``limit`` the cap.
    """

    def __init__(
        self,
        *,
        fragments: int,
        adding: int,
        limit: int,
        name: str = "",
        offset: int | None = None,
    ) -> None:
        super().__init__(
            f"too fragmented: {fragments} separate pieces held, this write adds {adding}, "
            f"the limit is {limit}; send larger pieces, in order",
            name=name,
            offset=offset,
        )
        self.fragments = fragments
        self.adding = adding
        self.limit = limit


class WindowExceededError(WriterError):
    """A staged write reached beyond the window the buffer currently grants."""


class WriterAbortedError(WriterError):
    """The writer was aborted; its upload session is cancelled."""


class WriterClosedError(WriterError):
    """The writer is no longer running (completed, failed, or its context has exited)."""
