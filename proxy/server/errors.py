"""The server's one error family: a refusal carrying the code the client is told.

Whatever goes wrong while serving a request (a bad token, a full budget, a failed writer)
becomes a :class:`ServerError` at one boundary, with ``raise ... from`` the cause; the
connection turns it into an ``Error`` frame (the protocol's ``send()`` picks the code a
version-1 peer knows). What a code
means (its scope, and whether trying again can help) is decided by ``protocol.ERROR_SPECS``,
not here: only the codes whose row says ``retryable_per_reply`` take a ``retryable`` from
the raise site. Messages never carry secrets, and every value they quote is bounded and
escaped by :func:`quote`, so an Error frame always encodes.
"""

from __future__ import annotations

from protocol import ErrorCode
from proxy.server.logging import printable

__all__ = ["MAX_MESSAGE_CHARS", "MAX_QUOTED_CHARS", "ServerError", "quote"]

#: the most characters of any one value (a name, a bucket) an error message quotes
MAX_QUOTED_CHARS = 200
#: the most characters of a whole message: far below the 64 KiB control-frame limit even
#: when every character takes four bytes of UTF-8
MAX_MESSAGE_CHARS = 2000


def quote(value: object, *, limit: int = MAX_QUOTED_CHARS) -> str:
    """``value`` as text fit for a message: every non-printable character escaped
    (:func:`~proxy.server.logging.printable`), and cut after ``limit`` characters, saying so."""
    text = str(value)
    shown = printable(text[:limit])
    if len(text) <= limit and len(shown) <= limit:
        return shown
    return f"{shown[:limit]}...({len(text)} chars)"


class ServerError(Exception):
    """A request the server cannot serve, or an upload that failed, as the client hears it.

    ``retryable`` may be given only for codes whose meaning says it varies per reply
    (``ErrorSpec.retryable_per_reply``: GCS_ERROR, UNKNOWN_UPLOAD); every other code takes
    the protocol's table value.
    """

    def __init__(self, code: ErrorCode, message: str, *, retryable: bool | None = None) -> None:
        spec = code.spec
        if retryable is not None and not spec.retryable_per_reply and retryable != spec.retryable:
            raise ValueError(f"{code.name} is never {'' if retryable else 'not '}retryable")
        message = printable(message)
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 20] + "...(message cut)"
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = spec.retryable if retryable is None else retryable

    def __repr__(self) -> str:
        return f"ServerError({self.code.name}, {self.message!r}, retryable={self.retryable})"
