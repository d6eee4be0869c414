"""``rup demo``: upload a generated object through an in-process proxy under faults.

The command line only: :func:`proxy.chaos.demo.run_demo` does the work; exit codes in
:data:`EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from typing import Final

from faultnet.cli_support import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    exit_codes_epilog,
)
from faultnet.plan import FaultPlan, PlanSyntaxError
from proxy.chaos.demo import DEFAULT_CLIENT_FAULTS, DEFAULT_GCS_FAULTS, demo_object_url, run_demo
from proxy.cli.progress import UploadBar
from proxy.cli.sizes import parse_size
from proxy.client import UploadError

__all__ = ["EXIT_CODES", "HELP", "configure", "run"]

HELP: Final = "upload a generated object through an in-process proxy under faults, and verify it"

EXIT_CODES: Final = {
    EXIT_OK: "the object was verified",
    EXIT_FAILED: "the upload failed or the object did not verify",
    EXIT_USAGE: "usage error",
    EXIT_INTERRUPTED: "interrupted",
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = exit_codes_epilog(EXIT_CODES)
    parser.add_argument(
        "--size", default="256M", metavar="SIZE",
        help="object size in bytes, or with a binary unit: 64M (MiB), 1G (GiB)",
    )  # fmt: skip
    parser.add_argument(
        "--connections", type=int, default=4, metavar="N", help="client connections"
    )
    parser.add_argument(
        "--client-faults",
        default=DEFAULT_CLIENT_FAULTS,
        metavar="PLAN",
        help=f"fault plan for client -> proxy (default: {DEFAULT_CLIENT_FAULTS!r})",
    )
    parser.add_argument(
        "--gcs-faults",
        default=DEFAULT_GCS_FAULTS,
        metavar="PLAN",
        help=f"fault plan for proxy -> GCS (default: {DEFAULT_GCS_FAULTS!r})",
    )
    parser.add_argument("--no-faults", action="store_true", help="run with both plans empty")
    parser.add_argument(
        "--seed", type=int, default=1, metavar="SEED", help="seed for the data and both plans"
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")


def _plans(args: argparse.Namespace) -> tuple[FaultPlan, FaultPlan]:
    if args.no_faults:
        return FaultPlan(seed=args.seed), FaultPlan(seed=args.seed)
    client = dataclasses.replace(FaultPlan.parse(args.client_faults), seed=args.seed)
    gcs = dataclasses.replace(FaultPlan.parse(args.gcs_faults), seed=args.seed + 1)
    return client, gcs


def run(args: argparse.Namespace) -> int:
    try:
        size = parse_size(args.size)
        client_plan, gcs_plan = _plans(args)
    except (ValueError, PlanSyntaxError) as exc:
        print(f"rup demo: {exc}", file=sys.stderr)
        return 2
    if args.connections < 1:
        print("rup demo: --connections must be at least 1", file=sys.stderr)
        return 2
    show_progress = not args.json and sys.stderr.isatty()
    try:
        with (
            UploadBar(demo_object_url(size, args.seed))
            if show_progress
            else contextlib.nullcontext() as bar
        ):
            report = run_demo(
                size=size,
                connections=args.connections,
                client_plan=client_plan,
                gcs_plan=gcs_plan,
                seed=args.seed,
                progress=bar.update if bar is not None else None,
            )
    except UploadError as exc:
        print(f"rup demo: upload failed: {exc.message}", file=sys.stderr)
        if args.json:
            print(json.dumps({"verified": False, "problem": exc.message}))
        return 1
    print(json.dumps(report.as_dict()) if args.json else report.as_text())
    return 0 if report.verified else 1
