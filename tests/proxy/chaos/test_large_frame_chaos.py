"""``rup chaos`` with large frames: a share of the streamed uploads cut their WriteAt frames
at 1 MiB instead of 256 KiB, so that connections reset mid-frame make the client's pieces
shrink (down to 256 KiB) and grow back, under the same faults on both legs.

Real components only, as in test_chaos.py.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from proxy.chaos.report import Verdict
from proxy.chaos.run import run_chaos
from proxy.chaos.settings import ChaosSettings
from proxy.chaos.workload import FAULT_MIXES, ChunkGeometry, UploadSpec, plan_uploads
from proxy.cli.chaos import configure, settings_from
from reliablewriter import MiB

pytestmark = pytest.mark.slow


def test_a_share_of_streamed_uploads_get_large_frames_and_the_rest_is_unchanged() -> None:
    geometry = ChunkGeometry()
    assert geometry.frame < geometry.large_frame <= geometry.put_object

    def plan(share: float) -> list[UploadSpec]:
        return plan_uploads(
            uploads=150, seed=9, max_size=8 * MiB, connections=4, mix=FAULT_MIXES["moderate"],
            intensity=1.0, geometry=geometry, precondition_share=0.3, composite_share=0.25,
            one_request_share=0.25, large_frame_share=share,
        )  # fmt: skip

    none, every = plan(0.0), plan(1.0)
    assert not any(spec.large_frames for spec in none)
    assert [spec.large_frames for spec in every] == [not spec.one_request for spec in every]
    # Drawn last: which uploads get large frames changes nothing else about any of them.
    assert [dataclasses.replace(spec, large_frames=False) for spec in every] == none


def test_uploads_in_large_frames_under_connection_resets_are_all_verified() -> None:
    settings = ChaosSettings(
        uploads=24, seed=3, max_size=6 * MiB, connections=3, concurrency=6, deadline=60.0,
        composite_share=0.0, one_request_share=0.0, large_frame_share=1.0,
    )  # fmt: skip

    report = run_chaos(settings)

    assert report.passed, report.as_dict()["broken"] or report.leaks
    streamed = [o for o in report.outcomes if o.large_frames]
    assert len(streamed) == 24
    verified = [o for o in streamed if o.verdict is Verdict.VERIFIED]
    assert len(verified) >= 20  # the rest refused as planned (preconditions, scripted faults)
    assert report.large_frames() == {"uploads": 24, "verified": len(verified)}
    assert report.client_faults["faults"].get("reset_peer", 0) > 0


def test_the_command_line_asks_for_large_frames() -> None:
    parser = argparse.ArgumentParser()
    configure(parser)

    assert settings_from(parser.parse_args([])).large_frame_share == 0.25
    assert settings_from(parser.parse_args(["--large-frame-share", "1"])).large_frame_share == 1
    with pytest.raises(ValueError, match="large-frame-share"):
        settings_from(parser.parse_args(["--large-frame-share", "1.5"]))
