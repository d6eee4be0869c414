"""``rup chaos``: many uploads under faults on every leg, each one judged byte for byte.

A run starts the strict GCS endpoint (or uses ``--gcs-endpoint``) and a proxy in this
process, then uploads ``--uploads`` objects through it, ``--concurrency`` at a time, while

* each upload's client -> proxy connections suffer its own fault plan, applied by
  faultnet.stream in the client or, for a quarter of the uploads, by a faultnet.tcpproxy
  chaos proxy relaying real sockets,
* each upload's proxy -> GCS HTTP connections suffer another (faultnet.transport, routed per
  upload by :class:`~proxy.chaos.routing.UploadRouter`), and
* some uploads get GCS-side scripted faults (retry-test instructions: 503s, resets, stalls,
  short ranges, broken final responses; with ``--faults harsh`` also expired sessions and a
  lying server).

Sizes go from 0 B to ``--max-size``, sizes one byte either side of every quantum, frame,
chunk and window edge always included; some uploads use ``ifGenerationMatch``. Every
upload ends in one of the verdicts of :class:`~proxy.chaos.report.Verdict`: verified
against the regenerated source (size, CRC32C and every byte), or refused / failed with a
clear error while GCS holds what it held before. Anything else (corruption, a duplicate
byte, an object left behind, a hang past ``--deadline``, a task still running after the
proxy stopped) fails the run: exit status 1, with the command that replays the failing
uploads. With ``--strict`` a clean failure of an upload that should have succeeded fails
the run too. Exit status 2 means bad arguments.

With ``--process-faults`` the GCS endpoint (``rup gcs-server --data-dir``), the proxy
(``rup serve``) and every client (``rup upload``) run as processes of their own, and on top
of the network faults the run kills (SIGKILL) or stops (SIGTERM) the servers at seeded
moments, keeps them down up to ``--max-down`` seconds and starts them again with the same
arguments, and kills (SIGKILL) or interrupts (SIGINT) clients, which are rerun to resume
(:mod:`proxy.chaos.process_run`). The report counts each kind of process fault; a run also
fails if anything is left in the proxy, in the endpoint's data dir (partial session files
wait out the endpoint's session TTL first), in the bucket, or in a completed client's state.

Everything an upload meets is derived from ``--seed`` and its index (see
:mod:`proxy.chaos.workload`), so ``--seed S --only 17`` reruns upload 17 with the same size,
data and faults (their timing, and so the outcome of a race, may still differ). This module
is the command line; :mod:`proxy.chaos.run` runs the uploads.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Final

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from faultnet.cli_support import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    exit_codes_epilog,
)
from proxy.chaos.report import ChaosReport, UploadOutcome, Verdict
from proxy.chaos.run import run_chaos
from proxy.chaos.settings import ChaosSettings
from proxy.chaos.workload import FAULT_MIXES
from proxy.cli.sizes import parse_size

__all__ = [
    "EXIT_CODES",
    "HELP",
    "ChaosSettings",
    "configure",
    "run",
    "run_chaos",
    "settings_from",
]

HELP: Final = "run many uploads under faults on every leg, and verify every byte"

EXIT_CODES: Final = {
    EXIT_OK: "every upload kept its promise (verified, or failed cleanly without --strict)",
    EXIT_FAILED: "a promise was broken (or, with --strict, an upload failed); the replay "
    "command is printed",
    EXIT_USAGE: "usage error",
    EXIT_INTERRUPTED: "interrupted",
}


# -- the command ---------------------------------------------------------------------------


def _indexes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected indexes such as 3,17,42, got {text!r}"
        ) from None


def configure(parser: argparse.ArgumentParser) -> None:
    defaults = ChaosSettings()
    parser.epilog = exit_codes_epilog(EXIT_CODES)
    parser.add_argument(
        "--uploads", type=int, default=defaults.uploads, metavar="N", help="how many uploads"
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, metavar="SEED",
        help="decides every size, byte and fault; the same seed replays the same run",
    )  # fmt: skip
    parser.add_argument(
        "--max-size", default="64M", metavar="SIZE",
        help="largest object (64M: 64 MiB); sizes run from 0 B to it",
    )  # fmt: skip
    parser.add_argument(
        "--connections",
        type=int,
        default=defaults.connections,
        metavar="N",
        help="most connections per upload (each upload uses 1..N)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=defaults.concurrency, metavar="N",
        help="uploads in flight at once",
    )  # fmt: skip
    parser.add_argument(
        "--faults", default=defaults.faults, choices=list(FAULT_MIXES),
        help="the fault mix (harsh adds faults no upload survives)",
    )  # fmt: skip
    parser.add_argument(
        "--intensity", type=float, default=defaults.intensity, metavar="X",
        help="scales every fault probability (0 turns faults off)",
    )  # fmt: skip
    parser.add_argument(
        "--deadline", type=float, default=defaults.deadline, metavar="SECONDS",
        help="an upload taking longer counts as hung",
    )  # fmt: skip
    parser.add_argument(
        "--generation-match", type=float, default=defaults.precondition_share, metavar="SHARE",
        help="share of uploads that use ifGenerationMatch (0..1)",
    )  # fmt: skip
    parser.add_argument(
        "--composite-share", type=float, default=defaults.composite_share, metavar="SHARE",
        help="share of uploads the proxy stores as segments composed at the end (0..1); the"
        " others ask for one session",
    )  # fmt: skip
    parser.add_argument(
        "--one-request-share", type=float, default=defaults.one_request_share,
        metavar="SHARE",
        help="share of the uploads that fit one PUT_OBJECT (2 MiB here) and use no"
        " ifGenerationMatch sent whole as one, not streamed (0..1)",
    )  # fmt: skip
    parser.add_argument(
        "--large-frame-share", type=float, default=defaults.large_frame_share,
        metavar="SHARE",
        help="share of the streamed uploads that cut their frames at 1 MiB instead of"
        " 256 KiB, so that connections cut mid-frame make the client's pieces shrink (0..1)",
    )  # fmt: skip
    parser.add_argument(
        "--composite", action="store_true",
        help="store every upload as a composite upload (--composite-share 1); composite"
        " uploads get no scripted GCS faults (their segments' requests name no upload)",
    )  # fmt: skip
    parser.add_argument(
        "--gcs-endpoint", metavar="URL",
        help="an external GCS endpoint (e.g. storage-testbench) instead of the embedded one",
    )  # fmt: skip
    parser.add_argument(
        "--portable-faults", action="store_true",
        help="script only the GCS faults storage-testbench knows too (use with it)",
    )  # fmt: skip
    parser.add_argument(
        "--process-faults", action="store_true",
        help="run the proxy, the GCS endpoint (on disk) and every client as processes, and"
        " kill or restart them at seeded moments; clients are rerun to resume",
    )  # fmt: skip
    parser.add_argument(
        "--process-fault-interval", type=float, default=defaults.process_fault_interval,
        metavar="SECONDS", help="with --process-faults: mean time between process faults",
    )  # fmt: skip
    parser.add_argument(
        "--max-down", type=float, default=defaults.max_down, metavar="SECONDS",
        help="with --process-faults: the longest a killed process stays down (0..60)",
    )  # fmt: skip
    parser.add_argument(
        "--only", type=_indexes, default=(), metavar="I,J,...", help="run only these uploads"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="also fail when an upload that should have succeeded failed cleanly",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _run_with_progress(settings: ChaosSettings) -> ChaosReport:
    """:func:`run_chaos` with a progress bar on stderr that counts broken promises."""
    uploads = len(settings.only) if settings.only else settings.uploads
    broken = 0
    with Progress(
        TextColumn("rup chaos"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[broken]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task("uploads", total=uploads, broken="")

        def advance(outcome: UploadOutcome) -> None:
            nonlocal broken
            broken += not outcome.verdict.keeps_promise
            progress.update(task, advance=1, broken=f"[red]{broken} broken[/red]" if broken else "")

        return run_chaos(settings, on_outcome=advance)


def settings_from(args: argparse.Namespace) -> ChaosSettings:
    """The settings the parsed command line asks for; ValueError when they cannot work."""
    return ChaosSettings(
        uploads=args.uploads,
        seed=args.seed,
        max_size=parse_size(args.max_size),
        connections=args.connections,
        concurrency=args.concurrency,
        faults=args.faults,
        intensity=args.intensity,
        deadline=args.deadline,
        precondition_share=args.generation_match,
        gcs_endpoint=args.gcs_endpoint,
        portable_faults=args.portable_faults,
        only=args.only,
        process_faults=args.process_faults,
        process_fault_interval=args.process_fault_interval,
        max_down=args.max_down,
        composite_share=1.0 if args.composite else args.composite_share,
        one_request_share=args.one_request_share,
        large_frame_share=args.large_frame_share,
    )


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
    except ValueError as exc:
        print(f"rup chaos: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # The chaos proxies warn of each upstream that refused: in a chaos run that is the
    # point (a proxy or endpoint down), and the report counts what it did to the uploads.
    logging.getLogger("faultnet").addHandler(logging.NullHandler())
    logging.getLogger("faultnet").propagate = False
    if args.json or not sys.stderr.isatty():
        report = run_chaos(settings)
    else:
        report = _run_with_progress(settings)
    if args.json:
        print(json.dumps(report.as_dict(), indent=None))
    else:
        report.render(Console())
    if not report.passed:
        print(f"rup chaos: FAILED; replay with: {report.replay}", file=sys.stderr)
        return EXIT_FAILED
    if args.strict and report.verified_share < 1.0:
        failed = tuple(o.index for o in report.outcomes if o.verdict is Verdict.FAILED_CLEANLY)
        print(
            f"rup chaos: {len(failed)} uploads failed (cleanly); replay with:"
            f" {settings.replay_command(failed)}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK
