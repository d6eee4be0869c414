"""Running ``rup`` as an operator does: a child process, its exit code and its output."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

__all__ = ["read_line", "run_rup", "rup_process"]


def run_rup(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m proxy.cli ARGS`` to its end (bounded by ``timeout`` seconds)."""
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@asynccontextmanager
async def rup_process(*args: str) -> AsyncIterator[tuple[trio.Process, bytearray]]:
    """``python -m proxy.cli ARGS`` running while in the block, with the bytearray that its
    stderr is gathered into. The block must wait for the process to end (its stderr ends
    then); leaving early by an exception kills and reaps it."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "proxy.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    logs = bytearray()
    try:
        assert process.stderr is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_all, process.stderr, logs)
            yield process, logs
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                await pipe.aclose()


async def read_line(process: trio.Process) -> str:
    """The next line the process writes to stdout (bounded: 30 s)."""
    assert process.stdout is not None
    line = b""
    with trio.fail_after(30):
        while not line.endswith(b"\n"):
            chunk = await process.stdout.receive_some(1)
            if not chunk:
                break
            line += chunk
    return line.decode()


async def _read_all(stream: trio.abc.ReceiveStream, into: bytearray) -> None:
    while chunk := await stream.receive_some(65536):
        into += chunk
