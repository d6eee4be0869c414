"""A rich progress bar for uploads: bytes, rate, retries and live connections.

While no connection to the proxy is up, the bar says so and counts the seconds:
``proxy unavailable, retrying (12 s)``; the client retries until its deadline.

It is fed :class:`~proxy.client.UploadProgress` snapshots through :meth:`UploadBar.update`,
which the client calls from its own task; rich redraws on its own timer, so a fast stream of
updates costs little.
"""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from proxy.client import UploadProgress

__all__ = ["UploadBar", "status_line"]


class UploadBar:
    """Shows one upload's progress on ``console`` (stderr by default) while in its ``with``."""

    def __init__(self, description: str, *, console: Console | None = None) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[connections]} conn  {task.fields[retries]} retries"),
            TextColumn("[yellow]{task.fields[status]}"),
            console=console or Console(stderr=True),
            transient=False,
        )
        self._description = description
        self._task: TaskID | None = None

    def __enter__(self) -> UploadBar:
        self._progress.start()
        self._task = self._progress.add_task(
            self._description, total=None, connections=0, retries=0, status=""
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def update(self, progress: UploadProgress) -> None:
        if self._task is None:
            return
        self._progress.update(
            self._task,
            total=progress.total,
            completed=progress.bytes_received,
            connections=progress.connections,
            retries=progress.reconnects,
            status=status_line(progress),
        )


def status_line(progress: UploadProgress) -> str:
    """What the bar says besides the numbers: empty while the proxy is reachable."""
    if progress.retrying_for is None:
        return ""
    return f"proxy unavailable, retrying ({progress.retrying_for:.0f} s)"
