"""Running ``rup`` as an operator does: a child process, its exit code and its output."""

from __future__ import annotations

import subprocess
import sys

__all__ = ["run_rup"]


def run_rup(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m proxy.cli ARGS`` to its end (bounded by ``timeout`` seconds)."""
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
