"""Real ``rup`` processes for process-fault tests: started, signalled, restarted, read.

Each :class:`RupProcess` runs ``python -m proxy.cli ARGS`` with its output appended to
files (a pipe nobody reads could block the process), and can be started again with the
same arguments after a kill, as an operator's supervisor would. Nothing here patches
anything: tests see only what a user would see (exit codes, printed lines, log lines).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from proxy.chaos.processes import free_port

__all__ = ["RupProcess", "free_port", "running"]

#: how long a process gets to print a line it is waited for
_STARTUP_TIMEOUT = 30.0
_POLL = 0.02


class RupProcess:
    """One ``rup`` command, started as often as asked, its output kept in ``directory``."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        directory: Path,
        *,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.args = list(args)
        self.stdout_path = directory / f"{name}.out"
        self.stderr_path = directory / f"{name}.err"
        # A private state dir: a client resumes from its own runs, never from the user's.
        self.env = {**os.environ, "XDG_STATE_HOME": str(directory / "state"), **(env or {})}
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._stdout_from = 0
        self._stderr_from = 0

    def start(self) -> RupProcess:
        if self.popen is not None and self.popen.poll() is None:
            raise RuntimeError(f"{self.name} is still running")
        self._stdout_from = _size(self.stdout_path)
        self._stderr_from = _size(self.stderr_path)
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", *self.args],
                stdout=out,
                stderr=err,
                env=self.env,
            )
        self.starts += 1
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def stdout(self, *, all_runs: bool = False) -> str:
        """What this run (or every run) printed on stdout."""
        return _read(self.stdout_path, 0 if all_runs else self._stdout_from)

    def stderr(self, *, all_runs: bool = False) -> str:
        return _read(self.stderr_path, 0 if all_runs else self._stderr_from)

    def wait_for(self, pattern: str, *, stream: str = "stdout", timeout: float = 30.0) -> str:
        """The first match of ``pattern`` in this run's output, waiting for it to appear."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.stdout() if stream == "stdout" else self.stderr()
            found = re.search(pattern, text)
            if found is not None:
                return found.group(0)
            if self.popen is not None and self.popen.poll() is not None:
                text = self.stdout() if stream == "stdout" else self.stderr()
                found = re.search(pattern, text)
                if found is not None:
                    return found.group(0)
                raise AssertionError(
                    f"{self.name} exited ({self.popen.returncode}) before printing "
                    f"{pattern!r}:\n{self.stdout()}\n{self.stderr()}"
                )
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{self.name} did not print {pattern!r} in {timeout} s:\n"
                    f"{self.stdout()}\n{self.stderr()}"
                )
            time.sleep(_POLL)

    def listening_on(self) -> tuple[str, int]:
        """Where this run listens, from its ``listening on HOST:PORT`` line."""
        line = self.wait_for(r"listening on \S+:\d+", timeout=_STARTUP_TIMEOUT)
        host, _, port = line.split("listening on ", 1)[1].rpartition(":")
        return host, int(port)

    def send_signal(self, signum: signal.Signals) -> None:
        assert self.popen is not None
        self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout=timeout)

    def stop(self) -> None:
        """Kill this run if it still runs, and reap it."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=10)


@contextlib.contextmanager
def running(*processes: RupProcess) -> Iterator[None]:
    """Make sure every process is killed and reaped when the block ends, however it ends."""
    try:
        yield
    finally:
        for process in processes:
            process.stop()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            return file.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
