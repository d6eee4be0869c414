"""rup chaos as a benchmark: throughput against fault intensity, and a long soak's memory.

* Default run: plain ``rup chaos`` (200 uploads, moderate faults, in-process endpoint),
  timed against the 2-minute target; the claim is its time as a ratio to the target.
* Intensity sweep: the same seeded chaos run (the moderate fault mix, scaled by
  ``--intensity`` 0, 0.5, 1, 2 and 4), 40 uploads of up to 16 MiB each. Aggregate
  throughput is verified bytes over wall time, verification included.
  The claim is the throughput under faults as a ratio to the same run without faults.
* Soak: ``rup chaos --uploads 2000`` (200 with ``--quick``): the default fault mix and
  sizes up to 64 MiB, sampling the process's RSS as uploads finish. The claim is the RSS
  at the end as a ratio to the RSS once a tenth of the uploads had finished (flat memory:
  close to 1.0), with every upload verified.

For the sweep and the soak the strict GCS endpoint runs as ``rup gcs-server`` in a
process of its own (``rup chaos --gcs-endpoint``), so the RSS measured is that of the
client and the proxy, which share this process, and they share no GIL with the endpoint. Run
``python -m bench.bench_soak --uploads 100`` for a quick run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, Final

from bench._rup_process import rup_process
from proxy.chaos.report import ChaosReport, Verdict
from proxy.chaos.run import run_chaos
from proxy.chaos.settings import ChaosSettings
from reliablewriter import MiB

__all__ = ["main", "run"]

INTENSITIES: Final = (0.0, 0.5, 1.0, 2.0, 4.0)
SWEEP_UPLOADS: Final = 40
QUICK_SWEEP_UPLOADS: Final = 24
SWEEP_MAX_SIZE: Final = 16 * MiB
SOAK_UPLOADS: Final = 2000
QUICK_SOAK_UPLOADS: Final = 200
SEED: Final = 2026
#: the issue's target for a plain ``rup chaos`` (200 uploads, moderate faults) on 2 cores
DEFAULT_RUN_TARGET_SECONDS: Final = 120.0
RESULTS: Final = Path(__file__).resolve().parent / "results" / "soak.json"


def _sweep(uploads: int, gcs_url: str) -> list[dict[str, Any]]:
    # The first run of a process pays for imports, thread pools and connection set-up;
    # a small run first keeps that out of the no-faults baseline.
    run_chaos(ChaosSettings(uploads=4, seed=SEED, max_size=MiB, gcs_endpoint=gcs_url))
    points = []
    for intensity in INTENSITIES:
        settings = ChaosSettings(
            uploads=uploads,
            seed=SEED,
            max_size=SWEEP_MAX_SIZE,
            intensity=intensity,
            gcs_endpoint=gcs_url,
        )
        report = run_chaos(settings)
        points.append(
            {
                "intensity": intensity,
                "uploads": len(report.outcomes),
                "passed": report.passed,
                "verified_share": round(report.verified_share, 4),
                "seconds": round(report.elapsed, 2),
                "throughput_mib_s": round(report.bytes_verified / MiB / report.elapsed, 2),
                "faults": sum(report.client_faults["faults"].values())
                + sum(report.gcs_faults["faults"].values())
                + sum(report.scripted_faults().values()),
                "not_verified": _not_verified(report, settings),
            }
        )
    return points


def _not_verified(report: ChaosReport, settings: ChaosSettings) -> list[str]:
    """Each upload not verified (refusals aside) with its replay command, then any leak."""
    local = dataclasses.replace(settings, gcs_endpoint=None)  # the endpoint will be gone
    return [
        f"upload {o.index}: {o.verdict.value}: {o.problem}"
        f" (replay: {local.replay_command((o.index,))})"
        for o in report.outcomes
        if o.verdict not in (Verdict.VERIFIED, Verdict.REFUSED)
    ] + list(report.leaks)


def _soak(uploads: int, gcs_url: str) -> dict[str, Any]:
    settings = ChaosSettings(uploads=uploads, seed=SEED)
    report = run_chaos(dataclasses.replace(settings, gcs_endpoint=gcs_url))
    samples = [list(sample) for sample in report.rss_samples]
    # Buffers, thread stacks and allocator arenas grow to their working size over the first
    # uploads; a leak shows as growth after that, so the baseline is the RSS a tenth in.
    warm = [rss for finished, rss in samples if finished >= uploads // 10]
    baseline = warm[0] if warm else report.rss_start
    data = report.as_dict()
    return {
        "uploads": len(report.outcomes),
        "passed": report.passed,
        "verified_share": data["verified_share"],
        "verdicts": data["verdicts"],
        "seconds": data["elapsed_s"],
        "bytes_verified": report.bytes_verified,
        "time_to_complete_s": data["time_to_complete_s"],
        "throughput_mib_s": data["throughput_mib_s"],
        "rss_start_bytes": report.rss_start,
        "rss_warm_bytes": baseline,
        "rss_end_bytes": report.rss_end,
        "rss_peak_bytes": max([s[1] for s in samples] or [report.rss_end]),
        "rss_samples": samples,
        "not_verified": _not_verified(report, settings),
    }


def _default_run() -> dict[str, Any]:
    """Plain ``rup chaos``: its own in-process endpoint, every default."""
    report = run_chaos(ChaosSettings())
    return {
        "uploads": len(report.outcomes),
        "passed": report.passed,
        "verified_share": round(report.verified_share, 4),
        "seconds": round(report.elapsed, 2),
        "target_seconds": DEFAULT_RUN_TARGET_SECONDS,
        "time_ratio_to_target": round(report.elapsed / DEFAULT_RUN_TARGET_SECONDS, 3),
        "not_verified": _not_verified(report, ChaosSettings()),
    }


def run(quick: bool, uploads: int | None = None) -> dict[str, Any]:
    """The default run, the sweep and the soak; also writes :data:`RESULTS`."""
    with rup_process("gcs-server", "--port", "0") as (_, gcs_url):
        # the soak first, so its RSS starts from a fresh process
        soak = _soak(uploads or (QUICK_SOAK_UPLOADS if quick else SOAK_UPLOADS), gcs_url)
        sweep = _sweep(QUICK_SWEEP_UPLOADS if quick else SWEEP_UPLOADS, gcs_url)
    default = _default_run()
    clean = sweep[0]["throughput_mib_s"] or float("nan")
    result: dict[str, Any] = {
        "benchmark": "soak",
        "default_run": default,
        "intensity_sweep": sweep,
        "ratio_to_no_faults": {
            f"intensity_{point['intensity']:g}": round(point["throughput_mib_s"] / clean, 3)
            for point in sweep[1:]
        },
        "soak": soak,
        "rss_end_ratio_to_warm": round(soak["rss_end_bytes"] / max(soak["rss_warm_bytes"], 1), 3),
        "every_promise_kept": default["passed"]
        and all(p["passed"] for p in sweep)
        and soak["passed"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_soak", description=__doc__)
    parser.add_argument(
        "--uploads",
        type=int,
        help=f"soak uploads (default {SOAK_UPLOADS}; {QUICK_SOAK_UPLOADS} with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="a short run")
    args = parser.parse_args(argv)
    result = run(args.quick, args.uploads)
    default = result["default_run"]
    print(
        f"rup chaos (defaults): {default['uploads']} uploads in {default['seconds']:.0f} s,"
        f" {default['time_ratio_to_target']:.2f}x the {DEFAULT_RUN_TARGET_SECONDS:.0f} s target,"
        f" verified {default['verified_share']:.1%}"
    )
    print("chaos throughput against fault intensity (moderate mix x intensity):")
    for point in result["intensity_sweep"]:
        ratio = point["throughput_mib_s"] / (result["intensity_sweep"][0]["throughput_mib_s"] or 1)
        print(
            f"  x{point['intensity']:<4g} {point['throughput_mib_s']:7.1f} MiB/s"
            f"  {ratio:5.2f}x no faults   {point['faults']:5d} faults"
            f"   verified {point['verified_share']:.1%}"
        )
    soak = result["soak"]
    print(
        f"soak: {soak['uploads']} uploads in {soak['seconds']:.0f} s, verified"
        f" {soak['verified_share']:.1%}; RSS {soak['rss_start_bytes'] / MiB:.0f} MiB at start,"
        f" {soak['rss_warm_bytes'] / MiB:.0f} MiB a tenth in, {soak['rss_end_bytes'] / MiB:.0f}"
        f" MiB at the end ({result['rss_end_ratio_to_warm']:.2f}x a tenth in)"
    )
    print(f"  written to {RESULTS}")
    return 0 if result["every_promise_kept"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
