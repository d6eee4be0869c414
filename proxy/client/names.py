"""Where an upload goes: the proxy's address and the ``gs://`` destination, parsed and checked."""

from __future__ import annotations

__all__ = ["parse_gs_url", "parse_proxy_address"]


def parse_proxy_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as a pair; ValueError with a clear message otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT for the proxy, got {text!r}")
    return host, int(port)


def parse_gs_url(url: str) -> tuple[str, str]:
    """``gs://bucket/object/name`` as ``(bucket, name)``; ValueError otherwise."""
    rest = url.removeprefix("gs://")
    bucket, _, name = rest.partition("/")
    if rest == url or not bucket or not name:
        raise ValueError(f"expected gs://BUCKET/OBJECT, got {url!r}")
    return bucket, name
