"""Reading what a ``rup`` command running in a subprocess prints."""

from __future__ import annotations

import trio

__all__ = ["read_lines"]


async def read_lines(stream: trio.abc.ReceiveStream, count: int) -> list[str]:
    """The first ``count`` lines the stream carries; fails if it ends before them."""
    received = b""
    while received.count(b"\n") < count:
        chunk = await stream.receive_some()
        assert chunk, f"the output ended after {received!r}"
        received += chunk
    return received.decode().splitlines()[:count]
