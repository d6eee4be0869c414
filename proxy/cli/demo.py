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
from proxy.chaos.demo import (
    DEFAULT_CLIENT_FAULTS,
    DEFAULT_GCS_FAULTS,
    DemoReport,
    demo_object_url,
    run_demo,
)
from proxy.cli.progress import UploadBar
from proxy.cli.sizes import format_rate, format_size, parse_size
from proxy.client import UploadError

__all__ = ["EXIT_CODES", "HELP", "configure", "describe_plan", "explain", "run"]

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
        return FaultPlan(seed=args.seed), FaultPlan(seed=args.seed + 1)
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
            UploadBar(demo_object_url(size, args.seed), total=size)
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
    print(json.dumps(report.as_dict()) if args.json else explain(report))
    return 0 if report.verified else 1


# -- the plain-words report -----------------------------------------------------------------

#: plan parameters that are byte counts, and those that are milliseconds
_BYTE_PARAMETERS = frozenset({"after", "at", "bytes", "rate", "size", "variation", "trigger_bytes"})
_MS_PARAMETERS = frozenset({"ms", "jitter", "delay_ms"})
_DIRECTIONS = {"up": "on the way up", "down": "on the way down"}
#: what a parameter is called in words, where its name alone would read oddly
_WORDS = {"ms": "delay", "delay_ms": "delay between pieces"}


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def describe_plan(text: str) -> list[str]:
    """A fault plan (as the report carries it) in words, one toxic a line, sizes in IEC
    units: ``reset_peer on the way up: after 24 MiB, on 50% of connections``."""
    plan = FaultPlan.parse(text)
    lines = []
    for toxic in plan.toxics:
        defaults = type(toxic)()
        details = []
        for field in dataclasses.fields(toxic):
            value = getattr(toxic, field.name)
            if field.name in ("direction", "toxicity") or value == getattr(defaults, field.name):
                continue
            if field.name in _BYTE_PARAMETERS:
                shown = format_size(value) + ("/s" if field.name == "rate" else "")
            elif field.name in _MS_PARAMETERS:
                shown = f"{value:g} ms"
            else:
                shown = f"{value:g}" if isinstance(value, float) else str(value)
            details.append(f"{_WORDS.get(field.name, field.name.replace('_', ' '))} {shown}")
        share = (
            "on every connection"
            if toxic.toxicity >= 1
            else (f"on {toxic.toxicity:.0%} of connections")
        )
        details.append(share)
        direction = _DIRECTIONS[toxic.direction.value]
        lines.append(f"{toxic.NAME} {direction}: {', '.join(details)}")
    return lines or ["none"]


def _client_leg(report: DemoReport) -> list[str]:
    """One line per kind of fault on the client's leg: what it did, what caught it, its cost."""
    injected: dict[str, int] = report.client_faults["faults"]
    resent = report.client_resent_bytes
    lines = []
    for kind, count in sorted(injected.items()):
        if not count:
            continue
        if kind == "corrupt":
            caught = report.client_errors.get("BAD_CRC", 0)
            lines.append(
                f"{_plural(count, 'corrupted frame')}: each caught by its CRC32C at the proxy "
                f"({caught} BAD_CRC), cost {format_size(resent.get('bad_crc', 0))} resent"
            )
        elif kind in ("reset_peer", "limit_data", "timeout", "limit_time", "slow_close"):
            lines.append(
                f"{_plural(count, 'connection')} cut ({kind}): the client reconnected "
                f"({_plural(report.client_reconnects, 'reconnect')}) and resent what was not "
                f"acknowledged, cost {format_size(resent.get('connection_lost', 0))} resent"
            )
        elif kind in ("latency", "bandwidth", "slicer", "stall", "loss"):
            lines.append(f"{_plural(count, 'delay')} ({kind}): cost time only, no bytes resent")
        else:
            lines.append(f"{kind} x{count}")
    return lines


def _gcs_leg(report: DemoReport) -> list[str]:
    injected: dict[str, int] = report.gcs_faults["faults"]
    retries = {cause: n for cause, n in report.proxy_gcs_retries.items() if n}
    lines = []
    for kind, count in sorted(injected.items()):
        if not count:
            continue
        if kind in ("latency", "bandwidth", "slicer", "stall", "loss"):
            lines.append(f"{_plural(count, 'delay')} ({kind}): cost time only")
            continue
        causes = ", ".join(f"{cause} {n}" for cause, n in retries.items()) or "none"
        lines.append(
            f"{_plural(count, 'GCS connection')} cut ({kind}): the proxy's writer asked GCS "
            f"what it had committed and resumed from there (retries by cause: {causes}); "
            "the client resent nothing for it"
        )
    return lines


def explain(report: DemoReport) -> str:
    """What the demo did and what came of it, in plain lines and IEC units."""
    connections = _plural(report.connections, "connection")
    planned = FaultPlan.parse(report.client_plan).toxics or FaultPlan.parse(report.gcs_plan).toxics
    lines = [
        f"rup demo: uploading {format_size(report.size)} over {connections} to an in-process "
        "proxy, which streams it into an embedded GCS endpoint"
        + ("; faults are injected on both legs" if planned else ", without faults")
        + "; then the object is read back and compared.",
        "planned faults, client -> proxy:",
        *(f"  {line}" for line in describe_plan(report.client_plan)),
        "planned faults, proxy -> GCS:",
        *(f"  {line}" for line in describe_plan(report.gcs_plan)),
        f"uploaded in {report.elapsed:.1f} s ({format_rate(report.throughput)})"
        + (
            f", as {report.segments} segments stored in parallel and composed into one object"
            if report.segments
            else ", through one GCS resumable session"
        ),
        "what happened, client -> proxy "
        f"(over {_plural(report.client_faults['connections'], 'connection')}):",
        *(f"  {line}" for line in _client_leg(report) or ["no fault struck"]),
        "what happened, proxy -> GCS "
        f"(over {_plural(report.gcs_faults['connections'], 'connection')}):",
        *(f"  {line}" for line in _gcs_leg(report) or ["no fault struck"]),
    ]
    if report.verified:
        lines.append(
            "VERIFIED: size and crc32c match GCS, and the downloaded copy matches byte for byte"
        )
    else:
        lines.append(f"NOT VERIFIED: {report.problem}")
    return "\n".join(lines)
