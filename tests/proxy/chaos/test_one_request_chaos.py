"""``rup chaos`` with one-request uploads: a share of the small uploads is sent whole as one
PUT_OBJECT (the client's path for small objects, up to the run's 2 MiB), under the same
faults on both legs, and verified like any other.

Real components only, as in test_chaos.py.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from proxy.chaos.report import Verdict
from proxy.chaos.run import run_chaos
from proxy.chaos.settings import ChaosSettings
from proxy.chaos.workload import (
    FAULT_MIXES,
    ChunkGeometry,
    Precondition,
    UploadSpec,
    plan_uploads,
)
from proxy.cli.chaos import configure, settings_from
from reliablewriter import MiB

pytestmark = pytest.mark.slow


def test_small_uploads_without_a_precondition_go_whole_and_the_rest_is_unchanged() -> None:
    geometry = ChunkGeometry()

    def plan(share: float) -> list[UploadSpec]:
        return plan_uploads(
            uploads=150, seed=9, max_size=8 * MiB, connections=4, mix=FAULT_MIXES["moderate"],
            intensity=1.0, geometry=geometry, precondition_share=0.3, composite_share=0.25,
            one_request_share=share,
        )  # fmt: skip

    none, every = plan(0.0), plan(1.0)
    assert not any(spec.one_request for spec in none)
    eligible = [
        spec.size <= geometry.put_object
        and spec.precondition is Precondition.NONE
        and not spec.composite
        for spec in every
    ]
    assert [spec.one_request for spec in every] == eligible
    assert 0 < sum(eligible) < len(every)
    # Drawn last: which uploads go whole changes nothing else about any of them.
    assert [dataclasses.replace(spec, one_request=False) for spec in every] == none


def test_uploads_sent_whole_under_faults_are_all_verified() -> None:
    settings = ChaosSettings(
        uploads=40, seed=5, max_size=2 * MiB, connections=3, concurrency=6, deadline=60.0,
        composite_share=0.0, one_request_share=1.0,
    )  # fmt: skip

    report = run_chaos(settings)

    assert report.passed, report.as_dict()["broken"] or report.leaks
    sent_whole = [o for o in report.outcomes if o.one_request]
    assert len(sent_whole) >= 20
    planned = {spec.index: spec for spec in settings.uploads_to_run()}
    for outcome in sent_whole:
        assert planned[outcome.index].precondition is Precondition.NONE
        assert outcome.verdict is Verdict.VERIFIED, outcome
    assert report.one_request() == {"uploads": len(sent_whole), "verified": len(sent_whole)}
    assert sum(report.client_faults["faults"].values()) > 0


def test_the_command_line_asks_for_uploads_sent_whole() -> None:
    parser = argparse.ArgumentParser()
    configure(parser)

    assert settings_from(parser.parse_args([])).one_request_share == 0.25
    assert settings_from(parser.parse_args(["--one-request-share", "1"])).one_request_share == 1
    with pytest.raises(ValueError, match="one-request-share"):
        settings_from(parser.parse_args(["--one-request-share", "-1"]))
    assert "--one-request-share 0.5" in ChaosSettings(one_request_share=0.5).replay_command()
