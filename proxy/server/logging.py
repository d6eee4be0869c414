"""Structured logs for the proxy, with secrets scrubbed before they are written.

Every log line is one event name plus ``key=value`` fields (or one JSON object per line
with ``json_lines=True``). The proxy never passes a bearer token, an upload token or a
GCS session URI to a logger on purpose; :func:`redact` is the second line of defence for
text we do not control, such as exception messages from requests, which quote URLs that
contain the session's ``upload_id``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any, TextIO

__all__ = [
    "REDACTED",
    "RedactingFilter",
    "RedactingFormatter",
    "configure_logging",
    "get_logger",
    "log_event",
    "printable",
    "protect_third_party_loggers",
    "redact",
]

REDACTED = "[redacted]"

#: the parts of text that may carry a secret, whatever surrounds them
_SECRET_PATTERNS = (
    # the GCS resumable session id, in a URL query or in a bare message
    re.compile(r"(upload_id=)[^&\s'\"]+"),
    # whole session URIs when they appear without a query we recognise
    re.compile(r"(https?://\S*/upload/\S*?)(\?\S*)"),
    # (the words "bearer token" are our own messages', not a secret)
    re.compile(r"(?i)(bearer\s+)(?!token\b)\S+"),
    re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)[^'\",\s]+"),
)


def redact(text: str) -> str:
    """``text`` with anything that looks like a session id, URI query or bearer token masked."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda match: match.group(1) + REDACTED, text)
    return text


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped (``\\x1b``, ``\\n``, ``\\u2028``),
    so a name a client chose cannot forge log lines or drive a terminal."""
    if text.isprintable():
        return text
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


def _render_value(value: object) -> str:
    text = redact(str(value))
    if not text or not text.isprintable() or any(char in text for char in ' "='):
        return json.dumps(text)  # quoted, and every control character escaped
    return text


class RedactingFormatter(logging.Formatter):
    """Formats records as ``key=value`` or JSON lines and scrubs the result."""

    def __init__(self, *, json_lines: bool = False) -> None:
        super().__init__()
        self._json_lines = json_lines

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = getattr(record, "rup_fields", {})
        # log_event records carry the bare event name; anything else is a plain message
        message = printable(redact(getattr(record, "rup_event", None) or record.getMessage()))
        if record.exc_info:
            fields = {**fields, "exc": redact(self.formatException(record.exc_info))}
        if self._json_lines:
            doc = {
                "ts": round(record.created, 3),
                "level": record.levelname.lower(),
                "logger": record.name,
                "event": message,
                **{key: redact(str(value)) for key, value in fields.items()},
            }
            return json.dumps(doc, separators=(",", ":"))
        parts = [
            self.formatTime(record),
            record.levelname.lower(),
            record.name,
            message,
            *(f"{key}={_render_value(value)}" for key, value in fields.items()),
        ]
        return " ".join(parts)


class RedactingFilter(logging.Filter):
    """Scrubs a record's message in place, for loggers whose text we do not control."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = redact(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        return True


#: third-party loggers that write request URLs (with the session's upload_id) at DEBUG
_URL_LOGGERS = (
    # A filter does not reach sibling loggers, so each one that may print a URL is listed.
    "urllib3.connectionpool",
    "urllib3.connection",
    "google.auth.transport.requests",
    "google.resumable_media",
    "google.cloud.storage",
)
_FILTER = RedactingFilter()


def protect_third_party_loggers() -> None:
    """Scrub session ids from what HTTP libraries log, whoever ends up handling it.

    A logger's filters see every record created on that logger, before any handler
    (including ones installed later, such as pytest's), so this holds even when an
    operator turns on DEBUG logging for everything. Idempotent.
    """
    for name in _URL_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def log_event(
    logger: logging.Logger, level: int, event: str, /, *, exc: bool = False, **fields: Any
) -> None:
    """Log ``event`` with structured ``fields`` (values are redacted when the line is built).

    The message itself is ``event`` plus the rendered fields, so handlers that do not use
    :class:`RedactingFormatter` (pytest's caplog, for one) still see the whole, scrubbed line.
    """
    if not logger.isEnabledFor(level):
        return
    rendered = " ".join(f"{key}={_render_value(value)}" for key, value in fields.items())
    message = f"{event} {rendered}" if rendered else event
    logger.log(
        level,
        "%s",
        message,
        exc_info=exc,
        extra={
            "rup_event": event,
            "rup_fields": {key: redact(str(value)) for key, value in fields.items()},
        },
    )


def configure_logging(
    *, level: int = logging.INFO, json_lines: bool = False, stream: TextIO | None = None
) -> logging.Handler:
    """Send rup's loggers to ``stream`` (default stderr), formatted and redacted."""
    protect_third_party_loggers()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(RedactingFormatter(json_lines=json_lines))
    for name in ("proxy", "reliablewriter", "faultnet"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    return handler
