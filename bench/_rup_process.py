"""A ``rup`` command in a process of its own, for benchmarks that measure it from outside."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

__all__ = [
    "as_installed",
    "behind_profile",
    "process_cpu_seconds",
    "process_rss",
    "rup_process",
    "serve_address",
]


#: where the commands' compiled bytecode is kept between runs (see :func:`as_installed`)
_BYTECODE_CACHE = Path(tempfile.gettempdir()) / "rup-bench-bytecode"


def as_installed(environment: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environment`` (default: this process's) for a ``rup`` command that starts as an
    installed one does: from compiled bytecode.

    ``pip install`` compiles a package's modules once; a checkout run with
    ``PYTHONDONTWRITEBYTECODE`` (as CI sets it) would compile every module at every start,
    about 0.1 s of CPU that no user pays. The bytecode goes to a cache of the benchmarks'
    own, not beside the sources.
    """
    changed = dict(os.environ if environment is None else environment)
    changed.pop("PYTHONDONTWRITEBYTECODE", None)
    changed["PYTHONPYCACHEPREFIX"] = str(_BYTECODE_CACHE)
    return changed


def compile_commands() -> None:
    """Fill the bytecode cache of :func:`as_installed` for what ``rup upload`` and ``rup
    serve`` import, so the first timed run does not compile."""
    for command in ("upload", "serve"):
        subprocess.run(
            [sys.executable, "-m", "proxy.cli", command, "--help"],
            env=as_installed(), capture_output=True, check=True,
        )  # fmt: skip


@contextlib.contextmanager
def rup_process(*args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run ``rup ARGS``; yields the process and the first line it prints (where it listens).

    The process is terminated on exit, and killed if it does not stop within 15 s.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=as_installed(),
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"rup {' '.join(args)} exited before it was ready")
        yield process, line
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def serve_address(line: str) -> tuple[str, int]:
    """Where ``rup serve`` listens, from its first line (``rup serve: listening on HOST:PORT
    (gcs: URL)``)."""
    host, _, port = line.split("listening on ", 1)[1].split()[0].rpartition(":")
    return host, int(port)


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time process ``pid`` has used so far, all threads included
    (Linux: ``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss(pid: int, field: str = "VmHWM") -> int:
    """Process ``pid``'s peak (``VmHWM``) or current (``VmRSS``) resident memory, in bytes
    (Linux: ``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def behind_profile(address: str, profile: str, leg: str) -> Iterator[str]:
    """``address`` (HOST:PORT) behind ``rup faultproxy`` playing ``leg`` ("client" or "gcs")
    of network ``profile``; yields where it listens (HOST:PORT)."""
    with rup_process(
        "faultproxy", "--listen", "127.0.0.1:0", "--upstream", address,
        "--profile", profile, "--leg", leg,
    ) as (_, line):  # fmt: skip
        # "listening on HOST:PORT, relaying to HOST:PORT"
        yield line.split()[2].rstrip(",")
