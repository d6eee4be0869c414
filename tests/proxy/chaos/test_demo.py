"""``rup demo`` at reduced size: faults really happen on both legs, and the object verifies."""

from __future__ import annotations

import json

import pytest

from faultnet.plan import FaultPlan
from proxy.chaos.demo import run_demo
from proxy.cli.main import main
from proxy.cli.sizes import parse_size
from reliablewriter import MiB


def test_demo_verifies_the_object_despite_faults_on_both_legs() -> None:
    report = run_demo(
        size=16 * MiB,
        connections=4,
        # Thresholds scaled down with the object. With seed 14 the first client connection
        # gets a reset and a flipped payload byte, the second a reset, and the proxy's first
        # two HTTP connections to GCS a reset (FaultPlan.for_connection is deterministic).
        client_plan=FaultPlan.parse(
            "seed=14; reset_peer:up(after=2m)~0.5; corrupt:up(at=700k)~0.5"
        ),
        gcs_plan=FaultPlan.parse("seed=14; reset_peer:up(after=1500k)~0.5"),
    )
    assert report.verified, report.problem
    assert report.client_faults["faults"].get("reset_peer", 0) >= 1
    assert report.client_faults["faults"]["corrupt"] >= 1
    assert report.gcs_faults["faults"].get("reset_peer", 0) >= 1
    assert report.client_reconnects >= report.client_faults["faults"]["reset_peer"]
    assert report.client_errors.get("BAD_CRC", 0) + report.client_reconnects >= 2
    assert sum(report.proxy_gcs_retries.values()) >= 1
    assert report.verified


def test_the_default_plans_put_faults_on_both_legs(capsys: pytest.CaptureFixture[str]) -> None:
    # What `rup demo` promises with no fault options (default plans and seed), at 1/4 size.
    assert main(["demo", "--size", "64M", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verified"] is True
    assert sum(report["client_faults"]["faults"].values()) >= 1
    assert report["gcs_faults"]["faults"].get("reset_peer", 0) >= 1
    assert sum(report["proxy_gcs_retries"].values()) >= 1


def test_demo_command_prints_a_json_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--size", "3M", "--connections", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verified"] is True
    assert report["size"] == 3 * MiB
    assert report["throughput_mib_s"] > 0


def test_demo_refuses_a_bad_plan_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--client-faults", "explode:up(at=1)"]) == 2
    assert "unknown toxic" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "size"),
    [("256M", 256 * MiB), ("1G", 1024 * MiB), ("1.5k", 1536), ("4096", 4096), ("8MiB", 8 * MiB)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_parse_size_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="expected a size"):
        parse_size("lots")
