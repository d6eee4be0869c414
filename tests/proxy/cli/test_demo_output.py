"""``rup demo`` in plain words: what it does, each fault kind with what caught it and what it
cost, sizes in IEC units; and the one sizes helper behind every human-readable size."""

from __future__ import annotations

import re
import subprocess

import pytest

from proxy.cli.demo import describe_plan
from proxy.cli.sizes import format_rate, format_size, parse_size
from tests.proxy.cli.commands import run_rup


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (24 * 1024**2, "24 MiB"),
        (int(1.5 * 1024**3), "1.5 GiB"),
        (3 * 1024**4, "3 TiB"),
    ],
)
def test_sizes_are_shown_in_iec_units_and_read_back(size: int, text: str) -> None:
    assert format_size(size) == text
    assert parse_size(text.replace(" ", "")) == size


def test_rates_are_iec_per_second() -> None:
    assert format_rate(137.7 * 1024**2) == "137.7 MiB/s"


def test_a_plan_is_described_in_words_with_human_sizes() -> None:
    lines = describe_plan(
        "seed=1; reset_peer:up(after=25165824)~0.5; corrupt:up(at=5242880); latency:down(ms=1)"
    )
    assert lines == [
        "reset_peer on the way up: after 24 MiB, on 50% of connections",
        "corrupt on the way up: at 5 MiB, on every connection",
        "latency on the way down: delay 1 ms, on every connection",
    ]
    assert describe_plan("seed=3") == ["none"]


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return run_rup("demo", "--size", "8M", *args, timeout=120)


def test_demo_explains_each_fault_kind_what_caught_it_and_its_cost() -> None:
    result = _demo(
        "--connections", "2",
        "--client-faults", "corrupt:up(at=1m); reset_peer:up(after=3m)",
        "--gcs-faults", "reset_peer:up(after=5m)",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("rup demo: uploading 8 MiB over 2 connections to an in-process proxy")
    assert "  corrupt on the way up: at 1 MiB, on every connection\n" in out
    assert "  reset_peer on the way up: after 3 MiB, on every connection\n" in out
    corrupted = re.search(
        r"(\d+) corrupted frames?: each caught by its CRC32C at the proxy \((\d+) BAD_CRC\), "
        r"cost ([0-9.]+ [KMG]iB) resent",
        out,
    )
    assert corrupted is not None, out
    assert corrupted.group(1) == corrupted.group(2) != "0"  # every corruption was caught
    assert re.search(r"\d+ connections? cut \(reset_peer\): the client reconnected", out), out
    assert re.search(r"\d+ GCS connections? cut \(reset_peer\): the proxy's writer", out), out
    assert re.search(r"uploaded in [0-9.]+ s \([0-9.]+ [KMG]iB/s\)", out), out
    assert "MB/s" not in out
    assert re.search(r"=\d{5,}", out) is None  # no raw byte counts from the plan syntax
    assert out.rstrip().endswith("VERIFIED: size and crc32c match GCS, and the downloaded copy "
                                 "matches byte for byte")  # fmt: skip


def test_demo_without_faults_says_so_and_counts_in_the_singular() -> None:
    result = _demo("--no-faults", "--connections", "1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "over 1 connection to" in out
    assert "without faults" in out
    assert "seed=" not in out
    assert "1 connections" not in out
    assert out.count("no fault struck") == 2
