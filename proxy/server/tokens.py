"""Upload tokens: everything needed to resume an upload, sealed with the server's key.

A token is the only state a proxy hands out. It carries a reference to the GCS resumable
session (its ``upload_id``, a bearer credential for the upload), so the token is encrypted
as well as authenticated (AES-256-GCM). Any proxy instance holding the same key can open it
and resume the upload from GCS alone, which is why proxies need no shared store.

A token never carries a URL: the proxy that resumes it builds the session URI from its own
configured endpoint (see :meth:`proxy.server.backend.Backend.session_uri`), so a restarted
endpoint may listen elsewhere, and even a forged token cannot point the proxy at another
host. It also pins the generation the upload may replace (``if_generation_match``, 0 for
"no object yet"), and every session started for it carries that precondition: once the
upload completed, GCS itself refuses to write the object again from the same token.

Wire form: ``version (1 byte) || nonce (12 bytes) || AES-GCM(ciphertext || tag)`` over a
compact JSON document. The version byte is also bound in as associated data, so a token
cannot be replayed under a different format. Version 1 tokens (which carried a URL) are
refused.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "BadTokenError",
    "TokenCodec",
    "UploadTicket",
]

_FORMAT_VERSION = 2
_NONCE_SIZE = 12
_ASSOCIATED_DATA = b"rup upload token v2"
#: AES-GCM appends a 16-byte tag; anything shorter than header + tag cannot be a token
_MIN_TOKEN_SIZE = 1 + _NONCE_SIZE + 16
#: generous, but stops someone from making us decrypt megabytes
_MAX_TOKEN_SIZE = 8 * 1024


class BadTokenError(Exception):
    """A token this proxy cannot open: sealed with another key, damaged, or expired.

    Not an authentication failure: a proxy restarted without its key sees its own tokens
    this way. The message says which, but never echoes any part of the token.
    """


@dataclass(frozen=True)
class UploadTicket:
    """What a token says about an upload.

    ``upload_id`` names the upload inside one proxy process; ``session_ref`` (the GCS
    session's ``upload_id``) is the secret that lets any process resume it, and ``repr``
    hides it. ``if_generation_match`` is the generation the upload may replace (0: only
    create), pinned when it opened, whether or not the client asked for a precondition.

    A composite upload's ticket has a ``segment_size`` and no session (``session_ref`` is
    empty): its segments are uploads of their own, whose tickets name their temporary object
    and, as ``destination``, the object the upload is for (what the allow-list checks).
    """

    upload_id: str
    bucket: str
    name: str
    session_ref: str = field(repr=False)
    content_type: str = "application/octet-stream"
    metadata: tuple[tuple[str, str], ...] = ()
    expected_size: int | None = None
    if_generation_match: int | None = None
    created_at: float = 0.0
    expires_at: float = 0.0
    segment_size: int = 0
    destination: str | None = None

    @property
    def is_composite(self) -> bool:
        """Whether this is a composite upload's ticket (its segments have tickets of their own)."""
        return self.segment_size > 0

    @property
    def object_name(self) -> str:
        """The object the client is uploading: the allow-lists are checked against it."""
        return self.destination if self.destination is not None else self.name

    def to_json(self) -> dict[str, Any]:
        return {
            "u": self.upload_id,
            "b": self.bucket,
            "n": self.name,
            "s": self.session_ref,
            "t": self.content_type,
            "m": [list(pair) for pair in self.metadata],
            "z": self.expected_size,
            "g": self.if_generation_match,
            "c": self.created_at,
            "e": self.expires_at,
            "k": self.segment_size,
            "d": self.destination,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> UploadTicket:
        metadata = tuple((str(key), str(value)) for key, value in doc["m"])
        return cls(
            upload_id=str(doc["u"]),
            bucket=str(doc["b"]),
            name=str(doc["n"]),
            session_ref=str(doc["s"]),
            content_type=str(doc["t"]),
            metadata=metadata,
            expected_size=None if doc["z"] is None else int(doc["z"]),
            if_generation_match=None if doc["g"] is None else int(doc["g"]),
            created_at=float(doc["c"]),
            expires_at=float(doc["e"]),
            segment_size=int(doc.get("k") or 0),
            destination=None if doc.get("d") is None else str(doc["d"]),
        )


class TokenCodec:
    """Seals tickets into tokens and opens tokens back into tickets."""

    def __init__(
        self, key: bytes, *, lifetime: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._aead = AESGCM(key)
        self._lifetime = lifetime
        self._clock = clock

    def issue(
        self,
        *,
        upload_id: str,
        bucket: str,
        name: str,
        session_ref: str,
        content_type: str,
        metadata: tuple[tuple[str, str], ...],
        expected_size: int | None,
        if_generation_match: int | None,
        segment_size: int = 0,
        destination: str | None = None,
    ) -> UploadTicket:
        """A ticket for a freshly opened upload, stamped with its creation and expiry times."""
        now = self._clock()
        return UploadTicket(
            upload_id=upload_id,
            bucket=bucket,
            name=name,
            session_ref=session_ref,
            content_type=content_type,
            metadata=metadata,
            expected_size=expected_size,
            if_generation_match=if_generation_match,
            created_at=now,
            expires_at=now + self._lifetime,
            segment_size=segment_size,
            destination=destination,
        )

    def seal(self, ticket: UploadTicket) -> bytes:
        plaintext = json.dumps(ticket.to_json(), separators=(",", ":")).encode("utf-8")
        nonce = os.urandom(_NONCE_SIZE)
        header = bytes([_FORMAT_VERSION])
        return header + nonce + self._aead.encrypt(nonce, plaintext, _ASSOCIATED_DATA + header)

    def open(self, token: bytes) -> UploadTicket:
        """The ticket inside ``token``; :class:`BadTokenError` unless genuine and unexpired."""
        if not _MIN_TOKEN_SIZE <= len(token) <= _MAX_TOKEN_SIZE:
            raise BadTokenError(
                f"this proxy cannot resume that upload: a token of {len(token)} bytes is damaged"
            )
        header, nonce, sealed = token[:1], token[1 : 1 + _NONCE_SIZE], token[1 + _NONCE_SIZE :]
        if header[0] != _FORMAT_VERSION:
            raise BadTokenError(
                f"this proxy cannot resume that upload: its token has format {header[0]}, "
                f"this proxy reads format {_FORMAT_VERSION} only"
            )
        try:
            plaintext = self._aead.decrypt(nonce, sealed, _ASSOCIATED_DATA + header)
        except InvalidTag:
            raise BadTokenError(
                "this proxy cannot resume that upload: it restarted with another key, "
                "or the token is damaged"
            ) from None
        try:
            ticket = UploadTicket.from_json(json.loads(plaintext))
        except (ValueError, KeyError, TypeError) as exc:
            # Authentic but unreadable: only a server bug could produce this.
            raise BadTokenError("upload token is authentic but malformed") from exc
        if self._clock() >= ticket.expires_at:
            raise BadTokenError(
                f"this proxy cannot resume upload {ticket.upload_id}: its token has expired"
            )
        return ticket
