"""The engine of ``rup chaos --process-faults``: every process of the system, killed at will.

The strict GCS endpoint runs as ``rup gcs-server --data-dir``, the proxy as ``rup serve``
(with a token key that survives its restarts) and every upload as ``rup upload FILE`` with
a state dir of its own, each a child process (:mod:`proxy.chaos.processes`). Network faults
stay on both legs: each upload's client connections pass through a chaos proxy with that
upload's plan, and the proxy's connections to GCS through one with the run's GCS-leg plan
(:func:`~proxy.chaos.workload.gcs_leg_plan`). The GCS-side scripted faults of the
in-process run are left out: they need the proxy's requests tagged per upload, which only a
proxy in this process can do. On top of those, a
:class:`~proxy.chaos.process_faults.ProcessSaboteur` kills (SIGKILL) or stops (SIGTERM) the
proxy and the endpoint at seeded moments and starts them again with the same arguments, and
kills (SIGKILL) or interrupts (SIGINT) clients, which are then run again, unchanged, to
resume.

Every upload is judged as in the in-process run: the object verified byte for byte, or a
clean failure that left GCS as it was. After the last upload the run also checks that
nothing is left: no upload or connection in the proxy, no partial session file in the
endpoint's data dir, no object in the bucket, no resume record of a completed upload, and
that both servers stop cleanly on SIGTERM. Composite uploads' segments may be left in the
temporary namespace only when a process fault struck (a killed client's rerun starts a new
upload, a killed proxy leaves what it was writing; the proxy's sweep removes them after
the token lifetime): the report counts them.
"""

from __future__ import annotations

import base64
import collections
import json
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, TypeVar

import requests
import trio
from google.api_core import exceptions as api_exceptions

from faultnet.counters import FaultCountersDict
from faultnet.gcs.clients import anonymous_client
from faultnet.tcpproxy import open_chaos_proxy
from proxy.chaos.metrics import counts_by_label, merged_fault_counts, process_rss, scrape
from proxy.chaos.process_faults import (
    INTERRUPTED_EXIT_CODES,
    ProcessFaultSchedule,
    ProcessSaboteur,
)
from proxy.chaos.processes import ProcessExitedError, Supervised, free_port, supervised
from proxy.chaos.report import ChaosReport, UploadOutcome, Verdict
from proxy.chaos.settings import BUCKET, ChaosSettings
from proxy.chaos.source import ObjectSource
from proxy.chaos.verify import (
    Failed,
    Stored,
    delete_object,
    judge_upload,
    left_temporaries,
    put_previous,
    verify_object,
)
from proxy.chaos.workload import FAULT_MIXES, ClientLeg, Precondition, UploadSpec, gcs_leg_plan
from proxy.chaos.workload import if_generation_match as generation_to_match
from proxy.server.backend import pooled_session
from proxy.server.keys import generate_key_text

__all__ = ["run_with_process_faults"]

#: ``rup upload``'s exit status for a refused ifGenerationMatch
_EXIT_PRECONDITION: Final = 4
#: how long the servers get to stop on SIGTERM at the end of the run
_SHUTDOWN_PATIENCE: Final = 20.0
_POLL: Final = 0.2
#: the judge's calls to an endpoint that may be down: attempts, and the pause between them
#: (together well past the longest --max-down plus a restart)
_JUDGE_ATTEMPTS: Final = 150
_JUDGE_RETRY_DELAY: Final = 0.5
_T = TypeVar("_T")
#: what a rerun ``rup upload`` says when it picks up its interrupted upload
_RESUMED: Final = "resuming the interrupted upload"


class _ClientCrashedError(Exception):
    """``rup upload`` ended without the one summary line ``--json`` promises."""


@dataclass
class _ClientRuns:
    """How one upload's ``rup upload`` fared, across its reruns."""

    restarts: int = 0
    resumes: int = 0
    summary: dict[str, Any] = field(default_factory=dict)


class _ProcessRun:
    """One process-fault run: its processes, its saboteur, and the outcomes so far."""

    def __init__(
        self,
        settings: ChaosSettings,
        specs: list[UploadSpec],
        directory: Path,
        on_outcome: Callable[[UploadOutcome], None] | None,
    ) -> None:
        self.settings = settings
        self.specs = specs
        self.directory = directory
        self.on_outcome = on_outcome
        gcs_port, self.proxy_port, metrics_port = free_port(), free_port(), free_port()
        self.gcs_data = directory / "gcs"
        self.gcs = Supervised(
            "gcs",
            ["gcs-server", "--port", str(gcs_port), "--data-dir", str(self.gcs_data),
             "--session-ttl", f"{settings.session_ttl:g}"],
            directory,
            port=gcs_port,
        )  # fmt: skip
        self.gcs_address = ("127.0.0.1", gcs_port)
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self._metrics_port = metrics_port
        # One key for every start, so a restarted proxy opens the tokens of the last one.
        self._proxy_env = {"RUP_TOKEN_KEY": generate_key_text()}
        self.proxy: Supervised | None = None
        self.judge = anonymous_client(f"http://127.0.0.1:{gcs_port}", http=pooled_session()).bucket(
            BUCKET
        )
        self.saboteur: ProcessSaboteur | None = None
        self.outcomes: list[UploadOutcome] = []
        self.client_leg_counts: list[FaultCountersDict] = []
        self.gcs_leg_counts: FaultCountersDict | None = None
        self.proxy_retries: collections.Counter[str] = collections.Counter()
        self.leaks: list[str] = []
        self.discarded_markers = 0
        self.temporaries_left = 0

    # -- the run ----------------------------------------------------------------------------

    async def run(self) -> None:
        """The whole run; a server that cannot start ends it, as a leak (see the logs)."""
        try:
            await self._run()
        except (ProcessExitedError, trio.TooSlowError) as exc:
            self.leaks.append(f"the run could not start its servers: {exc}")

    async def _run(self) -> None:
        mix = FAULT_MIXES[self.settings.faults]
        plan = gcs_leg_plan(
            mix, self.settings.intensity, self.settings.max_size, self.settings.seed
        )
        async with supervised(self.gcs):
            await self.gcs.start()
            async with open_chaos_proxy(self.gcs_address, plan) as gcs_leg:
                host, port = gcs_leg.address
                self.proxy = Supervised(
                    "proxy",
                    ["serve", "--listen", f"127.0.0.1:{self.proxy_port}",
                     "--gcs-endpoint", f"http://{host}:{port}", "--create-buckets",
                     "--metrics", f"127.0.0.1:{self._metrics_port}",
                     *self.settings.serve_arguments()],
                    self.directory,
                    port=self.proxy_port,
                    env=self._proxy_env,
                )  # fmt: skip
                async with supervised(self.proxy):
                    await self.proxy.start()
                    await _against_gcs(self._create_bucket)
                    await self._uploads_under_process_faults(self.proxy)
                    await self._settle(self.proxy)
                    await self._stop(self.proxy)
                self.gcs_leg_counts = gcs_leg.counters.as_dict()
            await self._stop(self.gcs)

    def fault_counts(self) -> dict[str, int]:
        """The process faults carried out, by kind."""
        return {} if self.saboteur is None else dict(self.saboteur.counts)

    def _create_bucket(self) -> None:
        if not self.judge.exists():
            self.judge.create()

    async def _uploads_under_process_faults(self, proxy: Supervised) -> None:
        schedule = ProcessFaultSchedule(
            self.settings.seed, self.settings.process_fault_interval, self.settings.max_down
        )
        self.saboteur = ProcessSaboteur(
            schedule, {"proxy": proxy, "gcs": self.gcs}, before_proxy_fault=self._read_retries
        )
        limiter = trio.Semaphore(self.settings.concurrency)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.saboteur.run)
            async with trio.open_nursery() as uploads:
                for spec in self.specs:
                    await limiter.acquire()
                    uploads.start_soon(self._one, spec, limiter)
            # The saboteur finishes a restart it has begun before it obeys (see its run).
            nursery.cancel_scope.cancel()
        self.leaks += self.saboteur.problems
        timeline = "".join(f"{line}\n" for line in self.saboteur.timeline)
        (self.directory / "faults.log").write_text(timeline)

    async def _read_retries(self) -> None:
        """Add the proxy's retry counters to the run's, before a fault resets them."""
        try:
            families = await trio.to_thread.run_sync(scrape, self.metrics_url)
        except requests.RequestException:
            return  # a proxy still starting; its counters are near zero
        self.proxy_retries.update(counts_by_label(families.get("rup_gcs_retries", [])))

    # -- one upload ---------------------------------------------------------------------------

    async def _one(self, spec: UploadSpec, limiter: trio.Semaphore) -> None:
        try:
            outcome = await self._judged_upload(spec)
        except Exception as exc:
            # Record, don't propagate: one broken upload must not hide the others' verdicts.
            outcome = replace(
                UploadOutcome.crashed(spec.index, spec.name, spec.size, exc),
                large_frames=spec.large_frames,
            )
        finally:
            limiter.release()
        self.outcomes.append(outcome)
        if self.on_outcome is not None:
            self.on_outcome(outcome)

    async def _judged_upload(self, spec: UploadSpec) -> UploadOutcome:
        source = self.directory / "sources" / f"{spec.index:05d}.bin"
        state = self.directory / "state" / f"{spec.index:05d}"
        await trio.to_thread.run_sync(_write_source, spec.source, source)
        try:
            previous_generation = None
            if spec.previous is not None:
                previous_generation = await _against_gcs(
                    put_previous, self.judge, spec.name, spec.previous
                )
            runs = _ClientRuns()
            started = trio.current_time()
            generation = generation_to_match(spec.precondition, previous_generation)
            with trio.move_on_after(self.settings.deadline) as deadline:
                ending = await self._through_client_leg(spec, source, state, generation, runs)
            base = _base_outcome(spec, trio.current_time() - started, runs)
            if deadline.cancelled_caught:
                return replace(
                    base, verdict=Verdict.HUNG, cause="deadline",
                    problem=f"no result within the {self.settings.deadline:.0f} s deadline",
                )  # fmt: skip
            outcome = await _against_gcs(
                judge_upload, self.judge, spec, base, ending, previous_generation
            )
            if runs.restarts and _refused_for_its_own_object(spec, ending):
                # A run stopped after its upload completed, before it could say so: the
                # rerun's ifGenerationMatch no longer names the live generation, and is
                # refused. No byte was lost if GCS holds exactly the source.
                problem = await _against_gcs(verify_object, self.judge, spec.name, spec.source)
                if not problem:
                    outcome = replace(base, cause="stored by a run stopped before it said so")
            if outcome.verdict is Verdict.VERIFIED and _files_under(state):
                return replace(
                    outcome,
                    verdict=Verdict.LEFT_BEHIND,
                    problem="the object verified, but rup upload kept its resume record",
                )
            return outcome
        finally:
            source.unlink(missing_ok=True)
            with trio.CancelScope(shield=True):
                await _against_gcs(delete_object, self.judge, spec.name)

    async def _through_client_leg(
        self,
        spec: UploadSpec,
        source: Path,
        state: Path,
        generation: int | None,
        runs: _ClientRuns,
    ) -> Stored | Failed:
        """Run ``rup upload`` through this upload's chaos proxy, rerunning it after each
        process fault, until it ends on its own."""
        async with open_chaos_proxy(("127.0.0.1", self.proxy_port), spec.client_plan) as leg:
            try:
                host, port = leg.address
                arguments = [
                    "upload", str(source), f"gs://{BUCKET}/{spec.name}",
                    "--proxy", f"{host}:{port}",
                    "--connections", str(spec.connections),
                    "--frame-size", str(self.settings.geometry.frame_for(spec)),
                    # outlasts any time down of the proxy or the endpoint
                    "--retry-deadline", f"{self.settings.deadline / 2:g}",
                    "--json",
                    "--verbose",  # each failed attempt, in the logs kept for a failed run
                ]  # fmt: skip
                if generation is not None:
                    arguments += ["--if-generation-match", str(generation)]
                if not spec.composite:
                    arguments.append("--single-session")
                client = Supervised(
                    f"upload-{spec.index:05d}",
                    arguments,
                    self.directory / "clients",
                    env={"XDG_STATE_HOME": str(state)},
                )
                return await self._until_it_ends(spec.index, client, runs)
            finally:
                self.client_leg_counts.append(leg.counters.as_dict())

    async def _until_it_ends(
        self, index: int, client: Supervised, runs: _ClientRuns
    ) -> Stored | Failed:
        assert self.saboteur is not None
        async with supervised(client):
            while True:
                await client.start()
                self.saboteur.client_started(index, client)
                try:
                    code = await client.wait()
                finally:
                    down = self.saboteur.client_ended(index)
                if runs.restarts and _RESUMED in client.stderr():
                    runs.resumes += 1
                summary = _summary(client)
                if summary is not None and summary.get("ok") is True:
                    # It said the object is stored: that is how it ended, even if a
                    # fault struck between that line and its exit.
                    return _ending(0, summary, runs)
                if down is not None and code in INTERRUPTED_EXIT_CODES:
                    runs.restarts += 1
                    await trio.sleep(down)
                    continue
                if summary is None or code == 0:
                    raise _ClientCrashedError(f"rup upload exited {code} without its summary")
                return _ending(code, summary, runs)

    # -- the end of the run ----------------------------------------------------------------

    async def _settle(self, proxy: Supervised) -> None:
        """Wait (bounded) for the proxy and the endpoint to let go; what they keep leaked."""
        for process in (proxy, self.gcs):
            if not process.running:
                self.leaks.append(f"the {process.name} exited by itself ({process.returncode})")
        with trio.move_on_after(self.settings.settle_time):
            while await self._still_held():  # noqa: ASYNC110 - nothing to wait on but time
                await trio.sleep(_POLL)
        self.leaks += await self._still_held()
        await self._read_retries()
        segments_left, markers = await _against_gcs(
            left_temporaries, self.judge, self.settings.composite_policy().temp_prefix
        )
        self.discarded_markers = len(markers)
        if segments_left and not self.fault_counts():
            self.leaks.append(f"{len(segments_left)} temporary objects of composite uploads left")
        else:
            # A process killed midway leaves segments to the proxy's sweep, by design.
            self.temporaries_left = len(segments_left)

    async def _still_held(self) -> list[str]:
        held = []
        try:
            families = await trio.to_thread.run_sync(scrape, self.metrics_url)
        except requests.RequestException as exc:
            return [f"the proxy's metrics could not be read: {exc}"]
        for gauge, what in (
            ("rup_active_uploads", "uploads still active"),
            ("rup_connections", "client connections still open"),
        ):
            value = sum(s.value for f in families.get(gauge, []) for s in f.samples)
            if value:
                held.append(f"{value:.0f} {what} in the proxy")
        parts = sorted(self.gcs_data.glob("sessions/*.part"))
        if parts:
            held.append(f"{len(parts)} partial session files left in the endpoint's data dir")
        objects = await _against_gcs(self._objects_left)
        if objects:
            held.append(f"{objects} objects left in the bucket")
        return held

    def _objects_left(self) -> int:
        """Objects outside the temporary namespace (judged once the run settled)."""
        temporary = self.settings.composite_policy().temp_prefix
        return sum(1 for blob in self.judge.list_blobs() if not blob.name.startswith(temporary))

    async def _stop(self, process: Supervised) -> None:
        """SIGTERM, as an operator's stop: it must exit 0 in time."""
        if not process.running:
            return
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(_SHUTDOWN_PATIENCE) as patience:
            code = await process.wait()
        if patience.cancelled_caught:
            self.leaks.append(f"the {process.name} did not stop within {_SHUTDOWN_PATIENCE:.0f} s")
        elif code != 0:
            self.leaks.append(f"the {process.name} exited {code} on SIGTERM, not 0")


async def _against_gcs(function: Callable[..., _T], *args: Any) -> _T:
    """Blocking ``function(*args)`` in a worker thread, run again while the endpoint is
    down (a process fault may have struck it; the judge waits that out, bounded)."""
    for _ in range(_JUDGE_ATTEMPTS - 1):
        try:
            return await trio.to_thread.run_sync(function, *args)
        except (requests.ConnectionError, api_exceptions.ServerError, api_exceptions.RetryError):
            await trio.sleep(_JUDGE_RETRY_DELAY)
    return await trio.to_thread.run_sync(function, *args)


def _write_source(source: ObjectSource, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        for block in source.blocks():
            file.write(block)


def _files_under(directory: Path) -> list[Path]:
    return [path for path in directory.rglob("*") if path.is_file()]


def _summary(client: Supervised) -> dict[str, Any] | None:
    """The one JSON line ``rup upload --json`` printed last, if it did."""
    for line in reversed(client.stdout().splitlines()):
        if line.startswith("{"):
            try:
                summary: dict[str, Any] = json.loads(line)
            except ValueError:
                return None
            return summary
    return None


def _ending(code: int, summary: dict[str, Any], runs: _ClientRuns) -> Stored | Failed:
    """How ``rup upload`` said its upload ended, in its ``--json`` summary."""
    runs.summary = summary
    if code == 0:
        crc32c = int.from_bytes(base64.b64decode(summary["crc32c"]), "big")
        return Stored(int(summary["generation"]), crc32c, int(summary["size"]))
    return Failed(
        cause=f"exit {code}",
        message=str(summary.get("error", "")),
        precondition_failed=code == _EXIT_PRECONDITION,
    )


def _refused_for_its_own_object(spec: UploadSpec, ending: Stored | Failed) -> bool:
    return (
        isinstance(ending, Failed)
        and ending.precondition_failed
        and spec.precondition in (Precondition.ABSENT, Precondition.CURRENT)
    )


def _base_outcome(spec: UploadSpec, elapsed: float, runs: _ClientRuns) -> UploadOutcome:
    summary = runs.summary
    return UploadOutcome(
        spec.index, spec.name, spec.size, Verdict.VERIFIED,
        client_leg=ClientLeg.CHAOS_PROXY.value, elapsed=elapsed,
        bytes_sent=int(summary.get("bytes_sent", 0)),
        reconnects=int(summary.get("reconnects", 0)),
        resent_bytes_by_cause=dict(summary.get("resent_bytes", {})),
        errors_by_code=dict(summary.get("errors", {})),
        segments=int(summary.get("segments", 0)),
        client_restarts=runs.restarts,
        client_resumes=runs.resumes,
        large_frames=spec.large_frames,
    )  # fmt: skip


def run_with_process_faults(
    settings: ChaosSettings,
    *,
    on_outcome: Callable[[UploadOutcome], None] | None = None,
) -> ChaosReport:
    """Run every upload of ``settings`` with every process under faults; blocking.

    The processes' output is kept in a temporary directory, removed if the run passed and
    named in the report (``logs``) if it did not.
    """
    specs = settings.uploads_to_run()
    directory = Path(tempfile.mkdtemp(prefix="rup-chaos-"))
    started = time.monotonic()
    rss_start = process_rss()
    run_state = _ProcessRun(settings, specs, directory, on_outcome)
    trio.run(run_state.run)
    outcomes = tuple(sorted(run_state.outcomes, key=lambda outcome: outcome.index))
    broken = tuple(o.index for o in outcomes if not o.verdict.keeps_promise)
    report = ChaosReport(
        settings=settings.as_dict(),
        outcomes=outcomes,
        elapsed=time.monotonic() - started,
        client_faults=merged_fault_counts(*run_state.client_leg_counts),
        gcs_faults=dict(run_state.gcs_leg_counts or merged_fault_counts()),
        proxy_retries_by_cause=dict(sorted(run_state.proxy_retries.items())),
        leaks=tuple(run_state.leaks),
        rss_start=rss_start,
        rss_end=process_rss(),
        replay=settings.replay_command(broken),
        process_faults={k: v for k, v in run_state.fault_counts().items() if v},
        logs=str(directory),
        discarded_markers=run_state.discarded_markers,
        temporaries_left=run_state.temporaries_left,
    )
    if report.passed:
        shutil.rmtree(directory, ignore_errors=True)
        report = replace(report, logs="")
    return report
