"""Byte counts as people type them on a command line (``256M``, ``1.5GiB``, ``4096``)."""

from __future__ import annotations

import re

__all__ = ["parse_size"]

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``256M``, ``1.5GiB``, ``4096``... as a byte count (powers of 1024)."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"expected a size such as 256M or 1G, got {text!r}")
    scale = 1024 ** "_kmgt".index(match.group(2).lower() or "_")
    return int(float(match.group(1)) * scale)
