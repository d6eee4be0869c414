"""The engine of ``rup chaos``: run every upload of a seeded workload and judge each one.

:func:`run_chaos` starts the strict GCS endpoint (or uses an external one) and a proxy in
this process, runs the uploads of :func:`~proxy.chaos.workload.plan_uploads` a few at a time
with their faults on every leg, and has :mod:`proxy.chaos.verify` judge what GCS holds after
each. Its :class:`~proxy.chaos.report.ChaosReport` says whether every promise was kept. The
command line around it is :mod:`proxy.cli.chaos`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Final

import trio
from google.cloud import storage  # type: ignore[import-untyped]

from faultnet.counters import FaultCounters, FaultCountersDict
from faultnet.gcs import GcsServer
from faultnet.gcs.clients import anonymous_client
from faultnet.plan import FaultPlan
from faultnet.tcpproxy import open_chaos_proxy
from protocol import ErrorCode
from proxy.chaos.connectors import faulty_connector, plain_connector
from proxy.chaos.metrics import counts_by_label, merged_fault_counts, process_rss
from proxy.chaos.process_run import run_with_process_faults
from proxy.chaos.report import ChaosReport, UploadOutcome, Verdict
from proxy.chaos.routing import RetryTestClient, UploadRouter
from proxy.chaos.settings import BUCKET, ORPHAN_TIMEOUT, ChaosSettings
from proxy.chaos.verify import (
    Failed,
    Stored,
    delete_object,
    judge_upload,
    left_temporaries,
    put_previous,
)
from proxy.chaos.workload import (
    FAULT_MIXES,
    ClientLeg,
    UploadSpec,
    gcs_leg_plan,
    if_generation_match,
)
from proxy.client import (
    Connector,
    UploadError,
    UploadOptions,
    UploadResult,
    connect_upload,
    open_connection_pool,
    put_bytes,
)
from proxy.server import ProxyServer, serve_in_background
from proxy.server.backend import Backend, TargetKind, pooled_session
from reliablewriter import KiB

__all__ = [
    "Saboteur",
    "lingering_in_proxy",
    "run_chaos",
]

#: how long the proxy gets to stop once every upload has ended, before it counts as a leak
_SHUTDOWN_DEADLINE: Final = 15.0
_WRITE_SIZE: Final = 256 * KiB
#: how long the proxy gets to let go of everything once every upload has ended
_SETTLE_DEADLINE: Final = ORPHAN_TIMEOUT + 5.0

#: called (in a worker thread) after an upload and before it is judged: tests use it to
#: tamper with GCS and prove that the judge notices
Saboteur = Callable[[storage.Bucket, UploadSpec], None]


def _live_tasks() -> set[trio.lowlevel.Task]:
    """Every task of this trio run."""
    found: set[trio.lowlevel.Task] = set()
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        if task is None or task in found:
            continue
        found.add(task)
        pending += [child for nursery in task.child_nurseries for child in nursery.child_tasks]
    return found


async def lingering_in_proxy(server: ProxyServer, *, patience: float) -> list[str]:
    """What ``server`` still holds after ``patience`` seconds: connections, active uploads.

    Called once every upload of a run has ended, when the proxy should let go at once.
    """

    def active_uploads() -> float:
        return server.metrics.registry.get_sample_value("rup_active_uploads") or 0.0

    with trio.move_on_after(patience):
        # The server has no event for "idle"; a short poll costs nothing at the end of a run.
        while server.connection_count or active_uploads():  # noqa: ASYNC110
            await trio.sleep(0.05)
    found = []
    if server.connection_count:
        found.append(f"{server.connection_count} client connections still open in the proxy")
    if active_uploads():
        found.append(f"{active_uploads():.0f} uploads still active in the proxy")
    return found


class _Run:
    """The state of one run inside trio: counters, clients, and the outcomes so far."""

    def __init__(
        self,
        settings: ChaosSettings,
        specs: list[UploadSpec],
        *,
        router: UploadRouter,
        backend: Backend,
        judge: storage.Bucket,
        retry_tests: RetryTestClient,
        client_counters: FaultCounters,
        saboteur: Saboteur | None,
        on_outcome: Callable[[UploadOutcome], None] | None,
    ) -> None:
        self.settings = settings
        self.specs = specs
        self.router = router
        self.backend = backend
        self.judge = judge
        self.retry_tests = retry_tests
        self.client_counters = client_counters
        self.saboteur = saboteur
        self.on_outcome = on_outcome
        self.outcomes: list[UploadOutcome] = []
        #: the client-leg counters of each upload that went through a chaos proxy
        self.chaos_proxy_counts: list[FaultCountersDict] = []
        self.rss_samples: list[tuple[int, int]] = []
        self._sample_every = max(1, len(specs) // 100)

    async def run(self) -> tuple[dict[str, int], list[str]]:
        """Every upload, then the proxy's retries by cause and anything that leaked."""
        leaks: list[str] = []
        tasks_before = _live_tasks()
        limiter = trio.Semaphore(self.settings.concurrency)
        with trio.CancelScope() as shutdown_scope:
            async with serve_in_background(self.settings.server_settings(), self.backend) as server:
                self.rss_samples.append((0, process_rss()))
                async with trio.open_nursery() as nursery:
                    for spec in self.specs:
                        await limiter.acquire()
                        nursery.start_soon(self._one, spec, server.address, limiter)
                # A hung upload was abandoned, not aborted: the proxy rightly keeps it
                # resumable. The run has failed anyway; only a clean run must leave nothing.
                if all(o.verdict is not Verdict.HUNG for o in self.outcomes):
                    leaks += await lingering_in_proxy(server, patience=_SETTLE_DEADLINE)
                retries = counts_by_label(server.metrics.retries.collect())
                # Only the shutdown itself runs under this deadline.
                shutdown_scope.deadline = trio.current_time() + _SHUTDOWN_DEADLINE
        if shutdown_scope.cancelled_caught:
            leaks.append(f"the proxy did not shut down within {_SHUTDOWN_DEADLINE:.0f} s")
        leftover = _live_tasks() - tasks_before
        if leftover:
            names = ", ".join(sorted(task.name for task in leftover))
            leaks.append(f"{len(leftover)} tasks still running after the proxy stopped: {names}")
        return retries, leaks

    async def _one(
        self, spec: UploadSpec, address: tuple[str, int], limiter: trio.Semaphore
    ) -> None:
        try:
            outcome = await self._judged_upload(spec, address)
        except Exception as exc:
            # Record, don't propagate: one broken upload must not hide the others' verdicts.
            # Clients must fail with UploadError; anything else is a bug worth a replay.
            outcome = dataclasses.replace(
                UploadOutcome.crashed(spec.index, spec.name, spec.size, exc),
                one_request=spec.one_request,
                large_frames=spec.large_frames,
            )
        finally:
            limiter.release()
        self.outcomes.append(outcome)
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        if len(self.outcomes) % self._sample_every == 0:
            self.rss_samples.append((len(self.outcomes), process_rss()))

    async def _judged_upload(self, spec: UploadSpec, address: tuple[str, int]) -> UploadOutcome:
        previous_generation = None
        if spec.previous is not None:
            previous_generation = await trio.to_thread.run_sync(
                put_previous, self.judge, spec.name, spec.previous
            )
        test_id = None
        if spec.instructions:
            test_id = await trio.to_thread.run_sync(self.retry_tests.create, spec.instructions)
        self.router.register(spec.name, spec.gcs_plan, test_id)
        result: UploadResult | None = None
        error: UploadError | None = None
        started = trio.current_time()
        try:
            with trio.move_on_after(self.settings.deadline) as deadline_scope:
                try:
                    result = await self._upload(
                        spec, address, if_generation_match(spec.precondition, previous_generation)
                    )
                except UploadError as exc:
                    error = exc
        finally:
            self.router.release(spec.name)
        elapsed = trio.current_time() - started
        fired: tuple[str, ...] = ()
        if test_id is not None:
            fired = tuple(
                await trio.to_thread.run_sync(self.retry_tests.fired, test_id, spec.instructions)
            )
        base = UploadOutcome(
            spec.index, spec.name, spec.size, Verdict.VERIFIED, client_leg=spec.client_leg.value,
            elapsed=elapsed, scripted_faults=fired, one_request=spec.one_request,
            large_frames=spec.large_frames,
        )  # fmt: skip
        if result is not None:
            base = dataclasses.replace(
                base,
                bytes_sent=result.bytes_sent,
                reconnects=result.reconnects,
                resent_bytes_by_cause=dict(result.resent_bytes_by_cause),
                errors_by_code=dict(result.errors_by_code),
                segments=result.segments,
            )
        if self.saboteur is not None:
            await trio.to_thread.run_sync(self.saboteur, self.judge, spec)
        try:
            if deadline_scope.cancelled_caught:
                return dataclasses.replace(
                    base,
                    verdict=Verdict.HUNG,
                    cause="deadline",
                    problem=f"no result within the {self.settings.deadline:.0f} s deadline",
                )
            ending = _ending(result, error)
            return await trio.to_thread.run_sync(
                judge_upload, self.judge, spec, base, ending, previous_generation
            )
        finally:
            await trio.to_thread.run_sync(delete_object, self.judge, spec.name)

    async def _upload(
        self, spec: UploadSpec, address: tuple[str, int], if_generation_match: int | None
    ) -> UploadResult:
        """Send the upload over its client leg; a chaos proxy lives as long as the upload."""
        if spec.client_leg is ClientLeg.FAULTY_STREAM:
            connector = faulty_connector(address, spec.client_plan, self.client_counters)
            return await self._send(spec, address, connector, if_generation_match)
        async with open_chaos_proxy(address, spec.client_plan) as chaos:
            try:
                connector = plain_connector(chaos.address)
                return await self._send(spec, address, connector, if_generation_match)
            finally:
                self.chaos_proxy_counts.append(chaos.counters.as_dict())

    async def _send(
        self,
        spec: UploadSpec,
        address: tuple[str, int],
        connector: Connector,
        if_generation_match: int | None,
    ) -> UploadResult:
        options = UploadOptions(
            proxy=address,
            settings=self.settings.client_settings(spec),
            connector=connector,
            if_generation_match=if_generation_match,
            expected_size=spec.size,
            single_session=not spec.composite,
        )
        url = f"gs://{BUCKET}/{spec.name}"
        if spec.one_request:
            data = b"".join(spec.source.blocks(_WRITE_SIZE))
            async with open_connection_pool(options, max_size=1) as pool:
                return await put_bytes(pool, data, url, options)
        async with connect_upload(url, options) as upload:
            for block in spec.source.blocks(_WRITE_SIZE):
                await upload.write(block)
            return await upload.complete()


def _ending(result: UploadResult | None, error: UploadError | None) -> Stored | Failed:
    """What the client library told the caller."""
    if result is not None:
        return Stored(result.generation, result.crc32c)
    assert error is not None
    return Failed(
        cause=error.code.name if error.code is not None else type(error).__name__,
        message=error.message,
        precondition_failed=error.code is ErrorCode.PRECONDITION_FAILED,
    )


@contextlib.contextmanager
def _gcs_endpoint(external: str | None) -> Iterator[tuple[str, TargetKind]]:
    if external is not None:
        yield external.rstrip("/"), TargetKind.ENDPOINT
        return
    with GcsServer() as server:
        yield server.url, TargetKind.EMBEDDED


def run_chaos(
    settings: ChaosSettings,
    *,
    saboteur: Saboteur | None = None,
    on_outcome: Callable[[UploadOutcome], None] | None = None,
) -> ChaosReport:
    """Run every upload of ``settings`` and judge each; blocking (it runs its own trio loop).

    ``on_outcome`` is called with each upload's verdict as it is reached, in the order
    uploads finish (from the trio thread; keep it quick). With ``settings.process_faults``
    the run is :func:`~proxy.chaos.process_run.run_with_process_faults` (no ``saboteur``:
    its clients are processes).
    """
    if settings.process_faults:
        if saboteur is not None:
            raise ValueError("a process-fault run takes no saboteur")
        return run_with_process_faults(settings, on_outcome=on_outcome)
    specs = settings.uploads_to_run()
    client_counters, gcs_counters = FaultCounters(), FaultCounters()
    started = time.monotonic()
    rss_start = process_rss()
    with _gcs_endpoint(settings.gcs_endpoint) as (url, kind):
        judge_client = anonymous_client(url, http=pooled_session())
        judge = judge_client.bucket(BUCKET)
        if not judge.exists():
            judge.create()
        router = UploadRouter(gcs_counters)
        composite = settings.composite_policy()
        router.route_temporaries(composite.temp_prefix, _segments_plan(settings))
        try:
            run_state = _Run(
                settings,
                specs,
                router=router,
                backend=Backend(anonymous_client(url, http=router), kind, url),
                judge=judge,
                retry_tests=RetryTestClient(url),
                client_counters=client_counters,
                saboteur=saboteur,
                on_outcome=on_outcome,
            )
            retries, leaks = trio.run(run_state.run)
        finally:
            router.close()
        # Every upload ended and the proxy stopped: nothing may be left but markers.
        segments_left, markers = left_temporaries(judge, composite.temp_prefix)
        if segments_left:
            leaks.append(_temporaries_leaked(segments_left))
    outcomes = tuple(sorted(run_state.outcomes, key=lambda outcome: outcome.index))
    broken = tuple(o.index for o in outcomes if not o.verdict.keeps_promise)
    return ChaosReport(
        settings=settings.as_dict(),
        outcomes=outcomes,
        elapsed=time.monotonic() - started,
        client_faults=merged_fault_counts(client_counters.as_dict(), *run_state.chaos_proxy_counts),
        gcs_faults=dict(gcs_counters.as_dict()),
        proxy_retries_by_cause=retries,
        leaks=tuple(leaks),
        rss_start=rss_start,
        rss_end=process_rss(),
        rss_samples=tuple(run_state.rss_samples),
        replay=settings.replay_command(broken),
        discarded_markers=len(markers),
    )


def _segments_plan(settings: ChaosSettings) -> FaultPlan:
    """The GCS-leg faults every composite upload's segments share (see routing)."""
    mix = FAULT_MIXES[settings.faults]
    return gcs_leg_plan(mix, settings.intensity, settings.geometry.segment, settings.seed)


def _temporaries_leaked(names: list[str]) -> str:
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return f"{len(names)} temporary objects of composite uploads left behind: {shown}"
