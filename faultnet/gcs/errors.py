"""The error a request handler raises to answer with a GCS-style JSON error.

Handlers never build error responses by hand: they raise :class:`GcsApiError` and the
server turns it into the ``{"error": {...}}`` body that google-api-core parses into its
exception types. Messages name buckets, objects and offsets, never upload ids (a session
URI is a bearer credential on real GCS).
"""

from __future__ import annotations

import json

__all__ = ["GcsApiError", "error_body"]


class GcsApiError(Exception):
    """A request that GCS would refuse, with the status and reason GCS would give."""

    def __init__(self, status: int, message: str, *, reason: str = "invalid") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason

    def __repr__(self) -> str:
        return f"GcsApiError({self.status}, {self.message!r}, reason={self.reason!r})"


def error_body(status: int, message: str, reason: str) -> bytes:
    """The JSON error document GCS's JSON API sends for ``status``."""
    document = {
        "error": {
            "code": status,
            "message": message,
            "errors": [{"domain": "global", "reason": reason, "message": message}],
        }
    }
    return json.dumps(document).encode()
