"""Where an upload goes: the proxy's address and the ``gs://`` destination, parsed and checked.

Bucket and object names are held to GCS's naming rules here, before any connection is made:
a name GCS would refuse can never succeed, so retrying it would only waste the retry deadline.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

__all__ = [
    "ProxyTarget",
    "check_bucket_name",
    "check_object_name",
    "parse_gs_url",
    "parse_proxy_address",
    "proxy_addresses",
]

_BUCKET_CHARACTERS: Final = re.compile(r"[a-z0-9][a-z0-9._-]*[a-z0-9]")
_DOTTED_QUAD: Final = re.compile(r"\d{1,3}(\.\d{1,3}){3}")
_MAX_OBJECT_NAME_BYTES: Final = 1024

#: One proxy (``"HOST:PORT"`` or ``(host, port)``), several separated by commas
#: (``"A:1,B:2"``), or a sequence of them. A host name that resolves to several addresses
#: is tried address by address when connecting.
ProxyTarget = str | tuple[str, int] | Sequence[str | tuple[str, int]]


def parse_proxy_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as a pair; ValueError with a clear message otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT for the proxy, got {text!r}")
    return host, int(port)


def proxy_addresses(target: ProxyTarget) -> list[tuple[str, int]]:
    """The proxies to try, in order of preference; ValueError if there are none or one is bad."""
    if isinstance(target, str):
        items: Sequence[str | tuple[str, int]] = [part.strip() for part in target.split(",")]
    elif isinstance(target, tuple) and len(target) == 2 and isinstance(target[1], int):
        items = [(str(target[0]), target[1])]
    else:
        items = list(target)
    addresses = [parse_proxy_address(item) if isinstance(item, str) else item for item in items]
    if not addresses:
        raise ValueError("expected at least one proxy address")
    return addresses


def parse_gs_url(url: str) -> tuple[str, str]:
    """``gs://bucket/object/name`` as ``(bucket, name)``; ValueError (saying why) otherwise.

    Both names must be ones GCS accepts (:func:`check_bucket_name`, :func:`check_object_name`).
    """
    rest = url.removeprefix("gs://")
    bucket, _, name = rest.partition("/")
    if rest == url or not bucket or not name:
        raise ValueError(f"expected gs://BUCKET/OBJECT, got {_quoted(url)}")
    check_bucket_name(bucket)
    check_object_name(name)
    return bucket, name


def check_bucket_name(bucket: str) -> None:
    """ValueError unless GCS accepts ``bucket`` as a bucket name.

    3-63 characters (up to 222 with dots, 63 between dots) of lowercase letters, digits,
    ``-``, ``_`` and ``.``, starting and ending with a letter or digit; not an IP address;
    not starting with ``goog`` nor containing ``google``.
    """
    problem = ""
    if not 3 <= len(bucket) <= (222 if "." in bucket else 63):
        problem = "must be 3 to 63 characters long (222 with dots)"
    elif not _BUCKET_CHARACTERS.fullmatch(bucket):
        problem = (
            "may hold only lowercase letters, digits, '-', '_' and '.', and must start and"
            " end with a letter or digit"
        )
    elif any(not part or len(part) > 63 for part in bucket.split(".")):
        problem = "must have 1 to 63 characters between dots"
    elif _DOTTED_QUAD.fullmatch(bucket):
        problem = "must not be an IP address"
    elif bucket.startswith("goog") or "google" in bucket:
        problem = "must not start with 'goog' nor contain 'google'"
    if problem:
        raise ValueError(f"invalid bucket name {_quoted(bucket)}: {problem}")


def check_object_name(name: str) -> None:
    """ValueError unless GCS accepts ``name`` as an object name.

    1-1024 bytes of UTF-8, no control characters, not ``.`` or ``..``, and not under
    ``.well-known/acme-challenge/``.
    """
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate, from a file name that is not UTF-8
        raise ValueError(f"invalid object name {_quoted(name)}: must be valid UTF-8") from None
    problem = ""
    if not 1 <= size <= _MAX_OBJECT_NAME_BYTES:
        problem = f"must be 1 to {_MAX_OBJECT_NAME_BYTES} bytes of UTF-8, not {size}"
    elif any(ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0 for char in name):
        problem = "must not contain control characters"
    elif name in {".", ".."}:
        problem = "must not be '.' or '..'"
    elif name.startswith(".well-known/acme-challenge/"):
        problem = "must not start with '.well-known/acme-challenge/'"
    if problem:
        raise ValueError(f"invalid object name {_quoted(name)}: {problem}")


def _quoted(text: str, limit: int = 80) -> str:
    """``text`` for a one-line message: escaped (no control characters) and cut short."""
    shown = text if len(text) <= limit else text[:limit] + "..."
    return ascii(shown) if not shown.isprintable() else repr(shown)
