"""Byte counts as people type them (``256M``, ``1.5GiB``, ``4096``) and read them (``1.5 MiB``).

The one place the command line turns sizes into text and back: binary units throughout
(KiB, MiB, GiB, TiB: powers of 1024), for sizes and for rates (``MiB/s``).
"""

from __future__ import annotations

import re

__all__ = ["format_rate", "format_size", "parse_size"]

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def parse_size(text: str) -> int:
    """``256M``, ``1.5GiB``, ``4096``... as a byte count (powers of 1024)."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"expected a size such as 256M or 1G, got {text!r}")
    scale = 1024 ** "_kmgt".index(match.group(2).lower() or "_")
    return int(float(match.group(1)) * scale)


def format_size(size: float) -> str:
    """``1.5 MiB``, ``24 MiB``, ``512 B``: the largest binary unit that keeps the number at
    least 1, with one decimal unless it is whole."""
    value = float(size)
    unit = _UNITS[0]
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            break
        value /= 1024
    if unit == "B" or value == int(value):
        return f"{value:.0f} {unit}"
    return f"{value:.1f} {unit}"


def format_rate(bytes_per_second: float) -> str:
    """A transfer rate in binary units: ``137.7 MiB/s``."""
    return f"{format_size(bytes_per_second)}/s"
