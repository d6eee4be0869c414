"""``rup sweep``: delete the temporary objects that interrupted composite uploads left behind.

::

    rup sweep gs://bucket --older-than 24h                  # the default prefix, .rup/tmp/
    rup sweep gs://bucket/.rup/tmp/ --older-than 2h --dry-run
    rup sweep gs://bucket --older-than 0s --gcs-endpoint http://127.0.0.1:9000

An upload's temporaries are removed once its newest one is older than ``--older-than``
(:func:`reliablewriter.sweep.sweep_temporaries`); each removed object is printed, one per
line. Exit codes: 0 done (whether or not anything was removed), 1 GCS refused or failed,
2 bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from typing import Final

from faultnet.cli_support import EXIT_FAILED, EXIT_OK, EXIT_USAGE, exit_codes_epilog

__all__ = ["EXIT_CODES", "HELP", "configure", "parse_age", "run"]

HELP: Final = "delete interrupted composite uploads' temporary objects (older than an age)"

EXIT_CODES: Final = {
    EXIT_OK: "done, whether or not anything was removed",
    EXIT_FAILED: "GCS refused or failed",
    EXIT_USAGE: "bad arguments",
}

_AGE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*$", re.IGNORECASE)
_UNIT_SECONDS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_GS_URL = re.compile(r"^gs://(?P<bucket>[^/]+)(?:/(?P<prefix>.*))?$")


def parse_age(text: str) -> datetime.timedelta:
    """``90s``, ``30m``, ``24h``, ``7d`` (a bare number is seconds) as a duration."""
    match = _AGE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected an age such as 30m or 24h, got {text!r}")
    return datetime.timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()])


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Without --gcs-endpoint, real GCS with Application Default Credentials. A bearer for "
        "the endpoint may come from RUP_GCS_ACCESS_TOKEN.\n\n" + exit_codes_epilog(EXIT_CODES)
    )
    parser.add_argument(
        "location", metavar="gs://BUCKET[/PREFIX]",
        help="the bucket, and the temporary prefix if not the default .rup/tmp/",
    )  # fmt: skip
    parser.add_argument(
        "--older-than", type=parse_age, required=True, metavar="AGE",
        help="remove an upload's temporaries once its newest is this old (e.g. 24h)",
    )  # fmt: skip
    parser.add_argument("--gcs-endpoint", metavar="URL", help="a GCS JSON API endpoint")
    parser.add_argument("--project", metavar="PROJECT", help="GCS project (real GCS only)")
    parser.add_argument("--dry-run", action="store_true", help="list, do not delete")


def run(args: argparse.Namespace) -> int:
    from google.api_core import exceptions as api_exceptions

    from proxy.server.backend import GcsTarget, TargetKind, open_backend
    from reliablewriter.composite import DEFAULT_TEMP_PREFIX
    from reliablewriter.sweep import sweep_temporaries

    match = _GS_URL.match(args.location)
    if match is None:
        print(f"rup sweep: expected gs://BUCKET[/PREFIX], got {args.location!r}", file=sys.stderr)
        return 2
    prefix = match.group("prefix") or DEFAULT_TEMP_PREFIX
    if not prefix.endswith("/"):
        prefix += "/"
    target = GcsTarget(
        endpoint=args.gcs_endpoint,
        project=args.project,
        access_token=os.environ.get("RUP_GCS_ACCESS_TOKEN") or None,
        create_buckets=False,
    )
    if args.gcs_endpoint is None and target.resolve() is not TargetKind.REAL:
        print("rup sweep: no --gcs-endpoint and no GCS credentials", file=sys.stderr)
        return 2
    try:
        with open_backend(target) as backend:
            swept = sweep_temporaries(
                backend.bucket(match.group("bucket")),
                older_than=args.older_than,
                prefix=prefix,
                dry_run=args.dry_run,
            )
    except (api_exceptions.GoogleAPICallError, OSError) as exc:
        print(f"rup sweep: {type(exc).__name__}: GCS failed; nothing more removed", file=sys.stderr)
        return 1
    verb = "would remove" if args.dry_run else "removed"
    for item in swept:
        print(
            f"{verb} gs://{match.group('bucket')}/{item.name} "
            f"({item.size} bytes, {item.age_seconds:.0f} s old)",
            flush=True,
        )
    uploads = len({item.upload_id for item in swept})
    print(f"{verb} {len(swept)} objects of {uploads} interrupted uploads", flush=True)
    return 0
