"""``HOST:PORT`` addresses, read and written: the one place every command line and the chaos
proxy agree on (and cheap to import: the command line needs it on every start)."""

from __future__ import annotations

__all__ = ["Address", "format_address", "parse_address"]

#: a host and port, as trio and the socket module take them
Address = tuple[str, int]


def parse_address(text: str) -> Address:
    """Read ``HOST:PORT`` (``[V6ADDR]:PORT`` for IPv6); :class:`ValueError` if it is not."""
    host, colon, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def format_address(address: Address) -> str:
    """``HOST:PORT``, with brackets around an IPv6 host."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
