"""``rup`` commands as child processes that the chaos run kills and starts again.

A :class:`Supervised` process is one ``python -m proxy.cli ARGS`` command: started, signalled
(SIGKILL, SIGTERM, SIGINT), reaped, and started again with exactly the same arguments and
environment, as an operator's supervisor would. Its output is appended to two files in the
run's directory (a pipe nobody reads could block the process), so a broken run can be read
afterwards. Nothing is patched: the run sees only what an operator would see.

Every wait is bounded. Cancelling a wait partway leaves the process running; :meth:`stop`
(which :func:`supervised` calls however its block ends) kills and reaps it.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, Final

import trio

__all__ = ["ProcessExitedError", "Supervised", "free_port", "supervised"]

#: how often a start waits for the process to accept connections
_READY_POLL: Final = 0.05


class ProcessExitedError(Exception):
    """A supervised process exited while it was expected to come up."""


#: where the ports of restartable servers are drawn from: below Linux's ephemeral range
#: (32768-60999 by default), from which every ``bind(0)`` and outgoing connection takes its
#: port. A port drawn from that range could be handed to someone else (a chaos proxy of the
#: same run, say) while its server is down, and the restart would find it taken.
_SERVER_PORTS: Final = range(20000, 32000)
_PORT_DRAWS: Final = 200


def free_port() -> int:
    """A loopback port that is free now and stays out of the way of ephemeral ports, for a
    process restarted on the same one (see ``_SERVER_PORTS``)."""
    rng = random.Random()
    for _ in range(_PORT_DRAWS):
        port = rng.choice(_SERVER_PORTS)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use: draw again
            return port
    raise OSError(f"no free port among {_PORT_DRAWS} drawn from {_SERVER_PORTS}")


class Supervised:
    """One ``rup`` command, run as often as asked; its output kept in ``directory``.

    ``port``, when given, is where the command listens: :meth:`start` returns only once it
    accepts connections there.
    """

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        directory: Path,
        *,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.args = tuple(args)
        self.port = port
        directory.mkdir(parents=True, exist_ok=True)
        self.stdout_path = directory / f"{name}.out"
        self.stderr_path = directory / f"{name}.err"
        self._env = {**os.environ, **(env or {})}
        self._process: trio.Process | None = None
        self._stdout_from = 0
        self._stderr_from = 0

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self, *, ready_timeout: float = 30.0) -> None:
        """Start the command; with a ``port``, wait until it accepts connections there.

        Raises :class:`ProcessExitedError` if it exits first, TooSlowError past the timeout.
        """
        if self.running:
            raise RuntimeError(f"{self.name} is still running")
        out, err = self._open_output()  # local files: opening them does not block for long
        with out, err:
            self._stdout_from, self._stderr_from = out.tell(), err.tell()
            self._process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "proxy.cli", *self.args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self._env,
            )
        if self.port is not None:
            with trio.fail_after(ready_timeout):
                await self._until_listening(self.port)

    def _open_output(self) -> tuple[BinaryIO, BinaryIO]:
        return open(self.stdout_path, "ab"), open(self.stderr_path, "ab")

    async def _until_listening(self, port: int) -> None:
        while True:
            if not self.running:
                raise ProcessExitedError(
                    f"{self.name} exited ({self.returncode}) before listening on port {port};"
                    f" see {self.stderr_path}"
                )
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(_READY_POLL)
            else:
                await stream.aclose()
                return

    def send_signal(self, signum: signal.Signals) -> None:
        """Signal the running process (nothing if it has exited already)."""
        if self.running:
            assert self._process is not None
            self._process.send_signal(signum)

    async def wait(self) -> int:
        """Its exit status, once it exits (negative: the signal that ended it)."""
        assert self._process is not None
        return await self._process.wait()

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.returncode

    async def stop(self) -> None:
        """Kill it if it runs, and reap it."""
        if self._process is None:
            return
        if self._process.returncode is None:
            self._process.kill()
        with trio.move_on_after(10), trio.CancelScope(shield=True):
            await self._process.wait()

    def stdout(self) -> str:
        """What its latest run wrote to stdout."""
        return _read_from(self.stdout_path, self._stdout_from)

    def stderr(self, *, every_run: bool = False) -> str:
        """What its latest run (or every run, oldest first) wrote to stderr, where rup
        commands log."""
        return _read_from(self.stderr_path, 0 if every_run else self._stderr_from)


@contextlib.asynccontextmanager
async def supervised(*processes: Supervised) -> AsyncIterator[None]:
    """Kill and reap every process when the block ends, however it ends."""
    try:
        yield
    finally:
        for process in processes:
            await process.stop()


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            return file.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
