"""The server's one error family: a refusal carrying the code the client is told.

Whatever goes wrong while serving a request (a bad token, a full budget, a failed writer)
becomes a :class:`ServerError` at one boundary, with ``raise ... from`` the cause; the
connection turns it into an ``Error`` frame (:meth:`ServerError.to_frame`). What a code
means (its scope, and whether trying again can help) is decided by ``protocol.ERROR_SPECS``,
not here: only the codes whose row says ``retryable_per_reply`` take a ``retryable`` from
the raise site. Messages never carry secrets, and every value they quote is bounded and
escaped by :func:`quote`, so an Error frame always encodes.
"""

from __future__ import annotations

from protocol import Error, ErrorCode

__all__ = ["MAX_MESSAGE_CHARS", "MAX_QUOTED_CHARS", "ServerError", "quote"]

#: the most characters of any one value (a name, a bucket) an error message quotes
MAX_QUOTED_CHARS = 200
#: the most characters of a whole message: far below the 64 KiB control-frame limit even
#: when every character takes four bytes of UTF-8
MAX_MESSAGE_CHARS = 2000


def quote(value: object, *, limit: int = MAX_QUOTED_CHARS) -> str:
    """``value`` as text fit for a message: every non-printable character escaped
    (``\\x1b``, ``\\n``), and cut after about ``limit`` characters, saying so."""
    text = str(value)
    pieces: list[str] = []
    length = 0
    for char in text:
        piece = char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        length += len(piece)
        if length > limit:
            return "".join(pieces) + f"...({len(text)} chars)"
        pieces.append(piece)
    return "".join(pieces)


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
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 20] + "...(message cut)"
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = spec.retryable if retryable is None else retryable

    def __repr__(self) -> str:
        return f"ServerError({self.code.name}, {self.message!r}, retryable={self.retryable})"

    def to_frame(self, reply_to: int, version: int | None = None) -> Error:
        """The Error frame that tells the client, in a code its protocol version knows."""
        code = self.code if version is None else self.code.for_version(version)
        return Error(reply_to, code, self.retryable, self.message)
