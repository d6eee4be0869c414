"""Outcomes of a chaos run and its report, as rich tables or as JSON.

Every upload ends with a :class:`Verdict`. Three verdicts keep the promise (the object is
exactly the source; or the upload was refused or failed with a clear error and left nothing
behind); the others break it, and any one of them fails the run.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import math
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from rich.console import Console
from rich.table import Table

from reliablewriter import MiB

__all__ = [
    "ChaosReport",
    "UploadOutcome",
    "Verdict",
    "percentile",
]

#: smaller uploads are too short for their throughput to mean anything
_THROUGHPUT_MIN_SIZE: Final = 1 * MiB


class Verdict(enum.Enum):
    """How one upload ended."""

    VERIFIED = "verified"  # GCS holds exactly the source
    REFUSED = "refused"  # a stale ifGenerationMatch was refused; the previous object is intact
    FAILED_CLEANLY = "failed cleanly"  # a clear error, and nothing was left behind
    CORRUPT = "CORRUPT"  # the upload succeeded but GCS holds something else
    LEFT_BEHIND = "LEFT BEHIND"  # the upload failed but changed what GCS holds
    WRONGLY_ACCEPTED = "WRONGLY ACCEPTED"  # a stale ifGenerationMatch replaced the object
    HUNG = "HUNG"  # no answer within the per-upload deadline
    CRASHED = "CRASHED"  # an unexpected exception, from the client library or the harness

    @property
    def keeps_promise(self) -> bool:
        return self in (Verdict.VERIFIED, Verdict.REFUSED, Verdict.FAILED_CLEANLY)


@dataclass(frozen=True)
class UploadOutcome:
    """One upload's verdict, plus what it cost."""

    index: int
    name: str
    size: int
    verdict: Verdict
    #: how its client connections met their faults (see proxy.chaos.workload.ClientLeg)
    client_leg: str = ""
    #: for failures: the proxy's error code or the exception type
    cause: str = ""
    #: for broken promises: what differs, in one sentence
    problem: str = ""
    elapsed: float = 0.0
    bytes_sent: int = 0
    reconnects: int = 0
    resent_bytes_by_cause: Mapping[str, int] = field(default_factory=dict)
    errors_by_code: Mapping[str, int] = field(default_factory=dict)
    scripted_faults: tuple[str, ...] = ()
    #: the segments a composite object was composed from (0: one resumable session)
    segments: int = 0
    #: sent whole, as one PUT_OBJECT
    one_request: bool = False
    #: streamed in large frames (``ChunkGeometry.large_frame``)
    large_frames: bool = False
    #: how often the client process was stopped by a process fault and run again
    client_restarts: int = 0
    #: of those reruns, how many said they resumed the interrupted upload (the others had
    #: been stopped before they kept a resume record, and started over)
    client_resumes: int = 0
    #: for unexpected exceptions: the traceback, for whoever replays the upload
    detail: str = ""

    @classmethod
    def crashed(cls, index: int, name: str, size: int, exc: Exception) -> UploadOutcome:
        """An upload whose client or judge raised what nothing expected: a bug to replay."""
        return cls(
            index, name, size, Verdict.CRASHED, cause=type(exc).__name__,
            problem=f"unexpected exception: {exc!r}",
            detail="".join(traceback.format_exception(exc)),
        )  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["verdict"] = self.verdict.value
        data["resent_bytes_by_cause"] = dict(self.resent_bytes_by_cause)
        data["errors_by_code"] = dict(self.errors_by_code)
        data["scripted_faults"] = list(self.scripted_faults)
        return data


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` within 0..1); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def _tally(items: Iterable[Mapping[str, int]]) -> dict[str, int]:
    total: collections.Counter[str] = collections.Counter()
    for item in items:
        total.update(item)
    return dict(sorted(total.items()))


@dataclass(frozen=True)
class ChaosReport:
    """Everything a run found out; :meth:`as_dict` is what ``--json`` writes."""

    settings: Mapping[str, Any]
    outcomes: tuple[UploadOutcome, ...]
    elapsed: float
    client_faults: Mapping[str, Any]
    gcs_faults: Mapping[str, Any]
    proxy_retries_by_cause: Mapping[str, int]
    #: problems with the run as a whole: leaked tasks, a proxy that would not stop, ...
    leaks: tuple[str, ...] = ()
    rss_start: int = 0
    rss_end: int = 0
    #: (uploads finished, process RSS in bytes), sampled through the run
    rss_samples: tuple[tuple[int, int], ...] = ()
    replay: str = ""
    #: process faults carried out, by kind (``proxy SIGKILL``, ``client SIGINT``, ...)
    process_faults: Mapping[str, int] = field(default_factory=dict)
    #: where the processes of a process-fault run left their output
    logs: str = ""
    #: markers of discarded composite uploads left in the temporary namespace (kept for the
    #: token lifetime by design, so not a leak)
    discarded_markers: int = 0
    #: segments left in the temporary namespace where the run allows them (by design, after
    #: a process fault: the proxy's sweep removes them after the token lifetime)
    temporaries_left: int = 0

    @property
    def broken(self) -> list[UploadOutcome]:
        return [o for o in self.outcomes if not o.verdict.keeps_promise]

    @property
    def passed(self) -> bool:
        """No broken promise and nothing leaked."""
        return not self.broken and not self.leaks

    @property
    def verified_share(self) -> float:
        """Verified uploads out of those expected to succeed (refusals are expected)."""
        expected = [o for o in self.outcomes if o.verdict is not Verdict.REFUSED]
        if not expected:
            return 1.0
        return sum(o.verdict is Verdict.VERIFIED for o in expected) / len(expected)

    def verdicts(self) -> dict[str, int]:
        counts = collections.Counter(o.verdict.value for o in self.outcomes)
        return {
            verdict.value: counts[verdict.value] for verdict in Verdict if counts[verdict.value]
        }

    def failures_by_cause(self) -> dict[str, int]:
        counts = collections.Counter(
            f"{o.verdict.value}: {o.cause}" if o.cause else o.verdict.value
            for o in self.outcomes
            if o.verdict is not Verdict.VERIFIED
        )
        return dict(sorted(counts.items()))

    def scripted_faults(self) -> dict[str, int]:
        counts = collections.Counter(f for o in self.outcomes for f in o.scripted_faults)
        return dict(sorted(counts.items()))

    def client_retries(self) -> dict[str, int]:
        """Client reconnects, plus bytes it resent by cause, and proxy errors it saw."""
        retries = {"reconnects": sum(o.reconnects for o in self.outcomes)}
        restarts = sum(o.client_restarts for o in self.outcomes)
        if restarts:
            retries["process restarts"] = restarts
            retries["process restarts that resumed"] = sum(o.client_resumes for o in self.outcomes)
        for code, count in _tally(o.errors_by_code for o in self.outcomes).items():
            retries[f"error {code}"] = count
        return retries

    def resent_bytes_by_cause(self) -> dict[str, int]:
        return _tally(o.resent_bytes_by_cause for o in self.outcomes)

    def latency_percentiles(self) -> dict[str, float]:
        """Seconds to complete, over every upload that finished."""
        times = [o.elapsed for o in self.outcomes if o.verdict is Verdict.VERIFIED]
        return {f"p{p}": round(percentile(times, p / 100), 4) for p in (50, 90, 99)}

    def throughput_percentiles(self) -> dict[str, float]:
        """MiB/s per upload, over verified uploads of at least 1 MiB."""
        rates = [
            o.size / o.elapsed / MiB
            for o in self.outcomes
            if o.verdict is Verdict.VERIFIED and o.size >= _THROUGHPUT_MIN_SIZE and o.elapsed > 0
        ]
        return {f"p{p}": round(percentile(rates, p / 100), 2) for p in (50, 90, 99)}

    def one_request(self) -> dict[str, int]:
        """Uploads sent whole as one PUT_OBJECT: how many, and how many were verified."""
        return self._verified_of([o for o in self.outcomes if o.one_request])

    def large_frames(self) -> dict[str, int]:
        """Uploads streamed in large frames: how many, and how many were verified."""
        return self._verified_of([o for o in self.outcomes if o.large_frames])

    @staticmethod
    def _verified_of(outcomes: list[UploadOutcome]) -> dict[str, int]:
        return {
            "uploads": len(outcomes),
            "verified": sum(o.verdict is Verdict.VERIFIED for o in outcomes),
        }

    def composite(self) -> dict[str, int]:
        """Composite uploads: verified ones, and the segments they were composed from."""
        composed = [o for o in self.outcomes if o.segments > 0]
        return {
            "verified": sum(o.verdict is Verdict.VERIFIED for o in composed),
            "segments": sum(o.segments for o in composed),
            "discarded_markers": self.discarded_markers,
            "temporaries_left": self.temporaries_left,
        }

    @property
    def bytes_verified(self) -> int:
        return sum(o.size for o in self.outcomes if o.verdict is Verdict.VERIFIED)

    def as_dict(self) -> dict[str, Any]:
        def finite(values: dict[str, float]) -> dict[str, float | None]:
            return {k: (None if math.isnan(v) else v) for k, v in values.items()}

        return {
            "passed": self.passed,
            "settings": dict(self.settings),
            "elapsed_s": round(self.elapsed, 3),
            "uploads": len(self.outcomes),
            "verdicts": self.verdicts(),
            "verified_share": round(self.verified_share, 4),
            "failures_by_cause": self.failures_by_cause(),
            "faults_injected": {
                "client_leg": dict(self.client_faults),
                "gcs_leg": dict(self.gcs_faults),
                "gcs_scripted": self.scripted_faults(),
                **({"processes": dict(self.process_faults)} if self.process_faults else {}),
            },
            "retries": {
                "client": self.client_retries(),
                "client_resent_bytes_by_cause": self.resent_bytes_by_cause(),
                "proxy_to_gcs_by_cause": dict(self.proxy_retries_by_cause),
            },
            "bytes": {
                "verified": self.bytes_verified,
                "client_sent": sum(o.bytes_sent for o in self.outcomes),
                "client_leg_up": self.client_faults.get("bytes_up", 0),
                "gcs_leg_up": self.gcs_faults.get("bytes_up", 0),
            },
            "composite": self.composite(),
            "one_request": self.one_request(),
            "large_frames": self.large_frames(),
            "time_to_complete_s": finite(self.latency_percentiles()),
            "throughput_mib_s": finite(self.throughput_percentiles()),
            "rss": {
                "start_bytes": self.rss_start,
                "end_bytes": self.rss_end,
                "samples": [list(sample) for sample in self.rss_samples],
            },
            "leaks": list(self.leaks),
            "broken": [o.as_dict() for o in self.broken],
            "replay": self.replay,
            **({"logs": self.logs} if self.logs else {}),
            "outcomes": [o.as_dict() for o in self.outcomes],
        }

    def render(self, console: Console) -> None:
        """Print the report tables, and the broken uploads with the replay command."""
        summary = Table(title="rup chaos", show_header=False, title_justify="left")
        summary.add_column("what", style="bold")
        summary.add_column("value")
        uploads = len(self.outcomes)
        summary.add_row("uploads", f"{uploads} in {self.elapsed:.1f} s")
        for verdict, count in self.verdicts().items():
            summary.add_row(f"  {verdict}", f"{count} ({count / max(uploads, 1):.1%})")
        summary.add_row(
            "verified share", f"{self.verified_share:.1%} of uploads expected to succeed"
        )
        summary.add_row("bytes verified", f"{self.bytes_verified / MiB:.1f} MiB")
        composite = self.composite()
        summary.add_row(
            "composite",
            f"{composite['verified']} verified uploads of {composite['segments']} segments;"
            f" {composite['discarded_markers']} discarded markers,"
            f" {composite['temporaries_left']} segments left for the sweep",
        )
        one_request = self.one_request()
        summary.add_row(
            "one request",
            f"{one_request['verified']} of {one_request['uploads']} uploads sent whole as one"
            " PUT_OBJECT verified",
        )
        large_frames = self.large_frames()
        summary.add_row(
            "large frames",
            f"{large_frames['verified']} of {large_frames['uploads']} uploads streamed in"
            " large frames (pieces shrink when connections are cut) verified",
        )
        summary.add_row(
            "bytes moved",
            f"{self.client_faults.get('bytes_up', 0) / MiB:.1f} MiB client -> proxy,"
            f" {self.gcs_faults.get('bytes_up', 0) / MiB:.1f} MiB proxy -> GCS",
        )
        lat, thr = self.latency_percentiles(), self.throughput_percentiles()
        summary.add_row(
            "time to complete",
            "  ".join(f"{k} {v:.3f} s" for k, v in lat.items() if not math.isnan(v)) or "-",
        )
        summary.add_row(
            "throughput (>= 1 MiB)",
            "  ".join(f"{k} {v:.1f} MiB/s" for k, v in thr.items() if not math.isnan(v)) or "-",
        )
        summary.add_row(
            "process RSS",
            f"{self.rss_start / MiB:.0f} MiB at start, {self.rss_end / MiB:.0f} at end",
        )
        console.print(summary)

        counts = Table(title="faults, retries and failures", title_justify="left")
        counts.add_column("kind")
        counts.add_column("name")
        counts.add_column("count", justify="right")
        rows: list[tuple[str, Mapping[str, int]]] = [
            ("fault, client leg", self.client_faults.get("faults", {})),
            ("fault, GCS leg", self.gcs_faults.get("faults", {})),
            ("fault, GCS scripted", self.scripted_faults()),
            ("fault, process", self.process_faults),
            ("retry, client", self.client_retries()),
            ("resent KiB, client", {k: v // 1024 for k, v in self.resent_bytes_by_cause().items()}),
            ("retry, proxy -> GCS", self.proxy_retries_by_cause),
            ("not verified", self.failures_by_cause()),
        ]
        for kind, values in rows:
            for name, count in values.items():
                counts.add_row(kind, name, str(count))
        console.print(counts)

        for outcome in self.broken:
            console.print(
                f"[red]upload {outcome.index} ({outcome.name}, {outcome.size} B):"
                f" {outcome.verdict.value}: {outcome.problem or outcome.cause}[/red]"
            )
        for leak in self.leaks:
            console.print(f"[red]leak: {leak}[/red]")
        if self.passed:
            console.print("[green]PASSED: every upload kept the promise[/green]")
        else:
            console.print(f"[red]FAILED[/red]; replay with: {self.replay}")
            if self.logs:
                console.print(f"the processes' output is in {self.logs}")
