"""The installed rup's version, for ``rup --version`` and the ``rup_build_info`` metric."""

from __future__ import annotations

from importlib import metadata

__all__ = ["DISTRIBUTION", "version"]

#: the name rup is installed under (``pip install reliable-upload-proxy``)
DISTRIBUTION = "reliable-upload-proxy"


def version() -> str:
    """The installed distribution's version (``0+unknown`` when run from a bare tree)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+unknown"
