"""Rich progress bars for uploads: one upload's (bytes, rate, retries and live connections), and
one line for many files (:class:`FilesBar`: files done, bytes, rate, failures).

While no connection to the proxy is up, the bar says so and counts the seconds:
``proxy unavailable, retrying (12 s)``; the client retries until its deadline.

It is fed :class:`~proxy.client.UploadProgress` snapshots through :meth:`UploadBar.update`,
which the client calls from its own task; rich redraws on its own timer, so a fast stream of
updates costs little.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from proxy.cli.sizes import format_rate
from proxy.client import UploadProgress

__all__ = ["FilesBar", "UploadBar", "status_line"]


class _RateColumn(ProgressColumn):
    """The transfer rate in IEC units (rich's own column counts in decimal MB/s)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else format_rate(speed), style="progress.data.speed")


def _byte_progress(first: TextColumn, *more: TextColumn, console: Console | None) -> Progress:
    """A rich Progress with ``first``, a bar, bytes, rate and time left, then ``more``."""
    return Progress(
        first,
        BarColumn(),
        DownloadColumn(binary_units=True),
        _RateColumn(),
        TimeRemainingColumn(),
        *more,
        console=console or Console(stderr=True),
        transient=False,
    )


class _LiveBar:
    """A progress display shown while in its ``with`` (subclasses add their one task)."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task: TaskID | None = None

    def _start(self, description: str, total: int | None, **fields: Any) -> None:
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, **fields)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._progress.stop()


class UploadBar(_LiveBar):
    """Shows one upload's progress on ``console`` (stderr by default) while in its ``with``.

    ``total`` (a file's size) is shown from the start; a stream's is learnt at its end. The
    count beside the connections is of reconnects, the word errors use too.
    """

    def __init__(
        self, description: str, *, total: int | None = None, console: Console | None = None
    ) -> None:
        super().__init__(
            _byte_progress(
                TextColumn("[bold]{task.description}"),
                TextColumn("{task.fields[connections]} conn  {task.fields[reconnects]} reconnects"),
                TextColumn("[yellow]{task.fields[status]}"),
                console=console,
            )
        )
        self._description = description
        self._total = total

    def __enter__(self) -> UploadBar:
        self._start(self._description, self._total, connections=0, reconnects=0, status="")
        return self

    def update(self, progress: UploadProgress) -> None:
        if self._task is None:
            return
        self._progress.update(
            self._task,
            total=progress.total if progress.total is not None else self._total,
            completed=progress.bytes_received,
            connections=progress.connections,
            reconnects=progress.reconnects,
            status=status_line(progress),
        )


def status_line(progress: UploadProgress) -> str:
    """What the bar says besides the numbers: empty while the proxy is reachable."""
    if progress.retrying_for is None:
        return ""
    return f"proxy unavailable, retrying ({progress.retrying_for:.0f} s)"


class FilesBar(_LiveBar):
    """One overall line for many files while in its ``with``; :meth:`note` prints a line
    (a failure, say) above it."""

    def __init__(self, files: int, total_bytes: int, *, console: Console | None = None) -> None:
        super().__init__(
            _byte_progress(
                TextColumn("[bold]{task.fields[files]}"),
                TextColumn("[red]{task.fields[failed]}"),
                console=console,
            )
        )
        self._files = files
        self._total_bytes = total_bytes

    def __enter__(self) -> FilesBar:
        self._start("", self._total_bytes, files=f"0/{self._files} files", failed="")
        return self

    def update(self, *, done: int, failed: int, bytes_done: int) -> None:
        if self._task is None:
            return
        self._progress.update(
            self._task,
            completed=bytes_done,
            files=f"{done}/{self._files} files",
            failed=f"{failed} failed" if failed else "",
        )

    def note(self, line: str) -> None:
        self._progress.console.print(line, markup=False, highlight=False)
