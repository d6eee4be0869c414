"""The client's one error family, and what an ``Error`` frame from the proxy means to it.

Every failure reaches a caller as :class:`UploadError` (or a subclass): ``code`` is the
protocol's :class:`~protocol.ErrorCode` when the proxy gave one (None for failures the client
found itself), ``retryable`` says whether trying the same upload again may succeed. Messages
name the upload (``upload of gs://bucket/object``) and never carry a token or a credential.

:class:`ConnectionLostError` is not an upload failure: it condemns one connection, and the
slot that owned it reconnects. It never reaches a caller.
"""

from __future__ import annotations

from protocol import Completed, Error, ErrorCode, Event, error_spec

__all__ = [
    "ChecksumMismatchError",
    "ConnectionLostError",
    "ProxyUnreachableError",
    "UploadError",
    "UploadRejectedError",
    "condemns_upload",
    "rejection",
    "unexpected_reply",
    "verify_stored",
]


class UploadError(Exception):
    """An upload failed. ``code`` is the proxy's error code when the proxy gave one."""

    def __init__(self, code: ErrorCode | None, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r}, retryable={self.retryable})"


class ProxyUnreachableError(UploadError):
    """No connection to the proxy could be made or kept within the retry policy's deadline."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message, retryable=True)


class UploadRejectedError(UploadError):
    """The proxy refused the upload for good (auth, permission, precondition, token, ...)."""


class ChecksumMismatchError(UploadError):
    """The object the proxy finalized differs from what was sent (size or CRC32C)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.CHECKSUM_MISMATCH, message)


class ConnectionLostError(Exception):
    """One connection is unusable; the slot that owns it reconnects."""

    def __init__(self, reason: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


def condemns_upload(error: Error) -> bool:
    """Whether an ``Error`` frame ends the whole upload (rather than one connection or frame).

    The protocol's table (:data:`protocol.ERROR_SPECS`) decides: a code that trying again can
    help is a reason to reconnect (or resend), whatever its scope; one that cannot ends the
    upload. Only codes whose retryability is stated per reply (GCS_ERROR, UNKNOWN_UPLOAD) are
    judged by the frame's own flag.
    """
    spec = error_spec(error.code)
    retryable = error.retryable if spec.retryable_per_reply else spec.retryable or error.retryable
    return not retryable


def rejection(error: Error) -> UploadRejectedError:
    """The caller-facing form of an ``Error`` frame that ends the upload."""
    return UploadRejectedError(
        error.code, f"proxy refused the upload: {error.code.name}: {error.message}"
    )


def unexpected_reply(reply: Event, request: str) -> UploadError | ConnectionLostError:
    """What it means that ``request`` was answered with ``reply`` instead of its success."""
    if isinstance(reply, Error):
        if condemns_upload(reply):
            return rejection(reply)
        return ConnectionLostError(f"proxy said: {reply.message}", code=reply.code)
    return ConnectionLostError(f"proxy answered {request} with {type(reply).__name__}")


def verify_stored(description: str, reply: Completed, size: int, crc32c: int) -> None:
    """Raise :class:`ChecksumMismatchError` unless GCS stored ``size`` bytes with ``crc32c``."""
    if reply.size != size or reply.crc32c != crc32c:
        raise ChecksumMismatchError(
            f"{description}: GCS stored {reply.size} bytes with crc32c {reply.crc32c:08x},"
            f" but {size} bytes with crc32c {crc32c:08x} were sent"
        )
