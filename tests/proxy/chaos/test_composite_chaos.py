"""``rup chaos`` with composite uploads: a share of the run's uploads is stored as segments,
each verified like any other, and nothing may be left in the temporary namespace.

Real components only, as in test_chaos.py; the leftover check is proven to fail by planting
a temporary object between uploads and verdicts.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest
from google.cloud import storage  # type: ignore[import-untyped]

from faultnet.gcs import GcsServer
from faultnet.gcs.clients import anonymous_client
from proxy.chaos.report import Verdict
from proxy.chaos.run import run_chaos
from proxy.chaos.settings import BUCKET, ChaosSettings
from proxy.chaos.workload import FAULT_MIXES, ChunkGeometry, UploadSpec, plan_uploads
from proxy.cli.chaos import configure, settings_from
from reliablewriter import MiB

pytestmark = pytest.mark.slow

PREFIX = ChaosSettings().composite_policy().temp_prefix
SMALL = ChaosSettings(
    uploads=16, seed=4, max_size=3 * MiB, connections=3, concurrency=6, deadline=60.0
)


def test_a_share_of_the_uploads_is_composed_from_segments_and_nothing_is_left(
    gcs_server: GcsServer,
) -> None:
    settings = dataclasses.replace(SMALL, composite_share=0.5, gcs_endpoint=gcs_server.url)
    planned = {spec.index: spec.composite for spec in settings.uploads_to_run()}
    assert any(planned.values())
    assert not all(planned.values())

    report = run_chaos(settings)

    assert report.passed, report.as_dict()["broken"] or report.leaks
    verified = [o for o in report.outcomes if o.verdict is Verdict.VERIFIED]
    # The client got what it asked for: segments (1 MiB each) for a composite upload, one
    # session for the others.
    for outcome in verified:
        expected = max(1, -(-outcome.size // settings.geometry.segment))
        assert outcome.segments == (expected if planned[outcome.index] else 0), outcome
    assert any(o.segments > 1 for o in verified)
    assert report.composite()["segments"] == sum(o.segments for o in verified)
    assert sum(report.gcs_faults["faults"].values()) > 0
    leftover = anonymous_client(gcs_server.url).list_blobs(BUCKET, prefix=PREFIX)
    assert [blob.name for blob in leftover] == []


def _plant_temporaries(bucket: storage.Bucket, spec: UploadSpec) -> None:
    bucket.blob(f"{PREFIX}planted/3").upload_from_string(b"a segment nobody composed")
    bucket.blob(f"{PREFIX}gone/discarded").upload_from_string(b"")


def test_a_segment_left_behind_fails_the_run_and_a_discarded_marker_does_not() -> None:
    settings = dataclasses.replace(SMALL, uploads=2, faults="none", composite_share=1.0)

    report = run_chaos(settings, saboteur=_plant_temporaries)

    assert [o.verdict for o in report.outcomes] == [Verdict.VERIFIED] * 2
    assert not report.passed
    assert report.leaks == (
        f"1 temporary objects of composite uploads left behind: {PREFIX}planted/3",
    )
    assert report.discarded_markers == 1
    assert report.as_dict()["composite"]["discarded_markers"] == 1


def test_composite_uploads_get_no_scripted_gcs_faults_and_the_rest_is_unchanged() -> None:
    def plan(share: float) -> list[UploadSpec]:
        return plan_uploads(
            uploads=120, seed=9, max_size=64 * MiB, connections=4, mix=FAULT_MIXES["harsh"],
            intensity=1.0, geometry=ChunkGeometry(), composite_share=share,
        )  # fmt: skip

    none, some = plan(0.0), plan(0.5)
    assert not any(spec.composite for spec in none)
    assert 0 < sum(spec.composite for spec in some) < len(some)
    assert all(not spec.instructions for spec in some if spec.composite)
    # ...though some of them would have had some as single-session uploads.
    assert any(n.instructions for s, n in zip(some, none, strict=True) if s.composite)
    # Which uploads are composite changes nothing else about them but their scripted faults.
    assert [dataclasses.replace(s, composite=False, instructions=()) for s in some] == [
        dataclasses.replace(s, instructions=()) for s in none
    ]
    assert [s.instructions for s in some if not s.composite] == [
        n.instructions for s, n in zip(some, none, strict=True) if not s.composite
    ]


def test_the_command_line_asks_for_composite_uploads() -> None:
    parser = argparse.ArgumentParser()
    configure(parser)

    assert settings_from(parser.parse_args([])).composite_share == 0.25
    assert settings_from(parser.parse_args(["--composite"])).composite_share == 1.0
    assert settings_from(parser.parse_args(["--composite-share", "0"])).composite_share == 0.0
    with pytest.raises(ValueError, match="composite-share"):
        settings_from(parser.parse_args(["--composite-share", "2"]))
    settings = ChaosSettings(composite_share=0.6)
    assert "--composite-share 0.6" in settings.replay_command()
    assert "--segment-size-mib" in settings.serve_arguments()
