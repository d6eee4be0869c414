"""What the upload bar shows: IEC units, the known total from the start, reconnects by name."""

from __future__ import annotations

import io

from rich.console import Console

from proxy.cli.progress import UploadBar
from proxy.client import UploadProgress

MiB = 1024 * 1024


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200, force_terminal=False, color_system=None), out


def _snapshot(received: int, *, total: int | None, reconnects: int = 0) -> UploadProgress:
    return UploadProgress(
        total=total, bytes_sent=received, bytes_received=received, committed=0,
        connections=4, reconnects=reconnects, resent_bytes=0,
    )  # fmt: skip


def test_a_files_total_is_shown_before_the_first_byte_is_acknowledged() -> None:
    console, out = _console()
    with UploadBar("gs://b/o", total=10 * MiB, console=console):
        pass
    assert "0.0/10.0 MiB" in out.getvalue()


def test_sizes_and_rates_are_iec_and_the_count_is_of_reconnects() -> None:
    console, out = _console()
    with UploadBar("gs://b/o", total=None, console=console) as bar:
        bar.update(_snapshot(3 * MiB, total=8 * MiB, reconnects=2))
        bar.update(_snapshot(8 * MiB, total=8 * MiB, reconnects=2))
    text = out.getvalue()
    assert "8.0/8.0 MiB" in text
    assert "2 reconnects" in text
    assert "MB/s" not in text  # rich's own decimal rate column is not used
