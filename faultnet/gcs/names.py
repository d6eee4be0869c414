"""GCS's rules for bucket names, object names and object metadata, with GCS's answers.

The endpoint refuses what GCS refuses, with the status GCS gives (400), and stores
whatever else GCS stores: an object name may hold any Unicode but CR and LF (other
control characters are allowed, if unwise), so names never decide file names on disk
(see :mod:`faultnet.gcs.disk`).

Sources: cloud.google.com/storage/docs/objects#naming, /docs/buckets#naming, /quotas, and
the JSON API's ``ServiceConstants`` (custom metadata: 8 KiB in all, 1 KiB a key, 4 KiB a
value).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping

from faultnet.gcs.errors import GcsApiError

__all__ = [
    "MAX_CONTENT_TYPE_BYTES",
    "MAX_CUSTOM_METADATA_BYTES",
    "MAX_METADATA_KEY_BYTES",
    "MAX_METADATA_VALUE_BYTES",
    "MAX_OBJECT_NAME_BYTES",
    "check_bucket_name",
    "check_content_type",
    "check_custom_metadata",
    "check_object_name",
]

MAX_OBJECT_NAME_BYTES = 1024
MAX_CUSTOM_METADATA_BYTES = 8 * 1024
MAX_METADATA_KEY_BYTES = 1024
MAX_METADATA_VALUE_BYTES = 4 * 1024
#: GCS documents no limit; a media type is rarely 100 bytes, so this is generous
MAX_CONTENT_TYPE_BYTES = 1024

_BUCKET_CHARS = re.compile(r"[a-z0-9][a-z0-9._-]*[a-z0-9]")
_RESERVED_OBJECT_PREFIX = ".well-known/acme-challenge/"


def _utf8_size(text: str, what: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate: the request's bytes were not UTF-8
        raise GcsApiError(400, f"The {what} is not valid UTF-8.") from None


def check_object_name(name: str) -> None:
    """400 unless ``name`` is a name GCS accepts for an object."""
    size = _utf8_size(name, "object name")
    if size == 0:
        raise GcsApiError(400, "An object name is required.", reason="required")
    if size > MAX_OBJECT_NAME_BYTES:
        raise GcsApiError(
            400,
            f"The maximum object length is {MAX_OBJECT_NAME_BYTES} bytes, "
            f"but got a name with {size} bytes.",
        )
    if "\r" in name or "\n" in name:
        raise GcsApiError(400, "Object names may not contain carriage returns or line feeds.")
    if name in (".", ".."):
        raise GcsApiError(400, "Object names '.' and '..' are not allowed.")
    if name.startswith(_RESERVED_OBJECT_PREFIX):
        raise GcsApiError(400, f"Object names may not start with {_RESERVED_OBJECT_PREFIX!r}.")


def check_bucket_name(name: str) -> None:
    """400 unless ``name`` is a syntactically valid GCS bucket name."""
    if not _is_valid_bucket_name(name):
        shown = name if len(name) <= 64 and name.isprintable() else ascii(name[:64])
        raise GcsApiError(400, f"Invalid bucket name: '{shown}'")


def _is_valid_bucket_name(name: str) -> bool:
    if not 3 <= len(name) <= 222 or not _BUCKET_CHARS.fullmatch(name):
        return False
    # Up to 63 characters, or 222 with dots, each dot-separated part at most 63.
    if "." not in name and len(name) > 63:
        return False
    parts = name.split(".")
    if any(not part or len(part) > 63 for part in parts):
        return False
    if name.startswith("goog") or "google" in name:
        return False
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return True
    return False  # dotted-decimal IP addresses are not bucket names


def check_custom_metadata(metadata: Mapping[str, str]) -> None:
    """400 if custom metadata passes GCS's limits (8 KiB in all, counting keys and values)."""
    total = 0
    for key, value in metadata.items():
        key_size = _utf8_size(key, "custom metadata key")
        value_size = _utf8_size(value, "custom metadata value")
        if not key_size or key_size > MAX_METADATA_KEY_BYTES:
            raise GcsApiError(
                400, f"Custom metadata keys must be 1 to {MAX_METADATA_KEY_BYTES} bytes."
            )
        if value_size > MAX_METADATA_VALUE_BYTES:
            raise GcsApiError(
                400, f"Custom metadata values may not exceed {MAX_METADATA_VALUE_BYTES} bytes."
            )
        total += key_size + value_size
    if total > MAX_CUSTOM_METADATA_BYTES:
        raise GcsApiError(
            400,
            f"Custom metadata may not exceed {MAX_CUSTOM_METADATA_BYTES} bytes in total "
            f"(got {total}).",
        )


def check_content_type(content_type: str) -> None:
    """400 if a content type is longer than any real one (or holds control characters)."""
    if _utf8_size(content_type, "content type") > MAX_CONTENT_TYPE_BYTES:
        raise GcsApiError(400, f"The content type may not exceed {MAX_CONTENT_TYPE_BYTES} bytes.")
    if not content_type.isprintable():
        raise GcsApiError(400, "The content type may not hold control characters.")
