"""``rup serve`` tells glibc to reuse freed receive buffers instead of faulting in fresh pages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from proxy.cli.serve import KEEP_FREED_MEMORY

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="glibc's malloc only",
)

#: Receives like the proxy's: 1 MiB asked, less delivered (the bytes object is shortened, so
#: glibc's dynamic threshold stays below 1 MiB), then freed once the data has been sent on.
#: Prints whether keep_freed_memory() said it told glibc, and the minor page faults the
#: receives cost after a warm-up.
_RECEIVES = """
import resource, socket, sys
from proxy.cli.serve import keep_freed_memory
told = keep_freed_memory() if sys.argv[1] == "keep" else None
a, b = socket.socketpair()
a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
block = b"x" * (600 * 1024)
def receive():
    a.sendall(block)
    got = 0
    while got < len(block):
        got += len(b.recv(1 << 20))
for _ in range(8):
    receive()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(64):
    receive()
print(told, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _receives(mode: str, **environment: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k not in KEEP_FREED_MEMORY}
    done = subprocess.run(
        [sys.executable, "-c", _RECEIVES, mode],
        env={**env, **environment},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    told, faults = done.stdout.split()
    return told, int(faults)


def test_freed_receive_buffers_are_reused_instead_of_faulted_in_again() -> None:
    _, plain_faults = _receives("plain")
    told, kept_faults = _receives("keep")
    assert told == "True"
    # 64 receives of 600 KiB: about 150 fresh pages each when every buffer is mapped afresh
    assert plain_faults > 64 * 100
    assert kept_faults < plain_faults / 10


def test_a_setting_given_in_the_environment_is_left_to_the_operator() -> None:
    given = {variable: str(128 * 1024) for variable in KEEP_FREED_MEMORY}
    told, _ = _receives("keep", **given)
    assert told == "False"
