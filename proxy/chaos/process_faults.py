"""Process faults: which process dies, how, when, and for how long; all drawn from the seed.

:class:`ProcessFaultSchedule` is the sans-IO half: an endless, seeded sequence of
:class:`PlannedFault` (wait this long, then do this to that process, and keep it down so
long). :class:`ProcessSaboteur` is the half that acts: it kills or stops the proxy and the
GCS endpoint (:class:`~proxy.chaos.processes.Supervised`) and starts them again with the
same arguments, and kills the ``rup upload`` processes a run registers with it; the run
reruns those, so that they resume.

The schedule is seeded, so the moments and kinds of faults replay; which upload a client
fault hits depends on which are running at that moment, so it may differ between runs.
"""

from __future__ import annotations

import datetime
import enum
import random
import signal
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Final

import trio

from proxy.chaos.processes import ProcessExitedError, Supervised

__all__ = [
    "INTERRUPTED_EXIT_CODES",
    "PlannedFault",
    "ProcessFault",
    "ProcessFaultSchedule",
    "ProcessSaboteur",
]

#: how a ``rup upload`` ends when a client fault stopped it: 130 (it handled Ctrl-C),
#: -SIGINT (Ctrl-C came before it could handle it), -SIGKILL
INTERRUPTED_EXIT_CODES: Final = frozenset({130, -signal.SIGINT, -signal.SIGKILL})
#: how long a stopped server gets to exit on SIGTERM before it counts as hung
_STOP_PATIENCE: Final = 30.0
#: how long a restarted server gets to listen again
_START_PATIENCE: Final = 30.0
#: a client younger than this is still starting Python: a fault there tests nothing of
#: rup's, so client faults pick among older ones
_CLIENT_MIN_AGE: Final = 1.0


class ProcessFault(enum.Enum):
    """One kind of process fault: which process, and which signal."""

    PROXY_KILL = "proxy SIGKILL"
    PROXY_TERM = "proxy SIGTERM"
    GCS_KILL = "gcs SIGKILL"
    GCS_TERM = "gcs SIGTERM"
    CLIENT_KILL = "client SIGKILL"
    CLIENT_INT = "client SIGINT"

    @property
    def target(self) -> str:
        """``proxy``, ``gcs`` or ``client``."""
        return self.value.split()[0]

    @property
    def signal(self) -> signal.Signals:
        return signal.Signals[self.value.split()[1]]


@dataclass(frozen=True)
class PlannedFault:
    """Wait ``after`` seconds, then strike with ``fault``; the victim stays down ``down`` s.

    ``pick`` (in 0..1) chooses the client among those running, in order of upload index.
    """

    after: float
    fault: ProcessFault
    down: float
    pick: float


@dataclass(frozen=True)
class ProcessFaultSchedule:
    """Process faults at random moments, on average ``interval`` seconds apart."""

    seed: int
    interval: float
    max_down: float

    def __post_init__(self) -> None:
        if not self.interval > 0:
            raise ValueError(f"the process fault interval must be positive, got {self.interval}")
        if not self.max_down >= 0:
            raise ValueError(f"the longest time down must not be negative, got {self.max_down}")

    def faults(self) -> Iterator[PlannedFault]:
        """The schedule, endless; the same for the same seed, interval and max_down."""
        rng = random.Random(f"rup-chaos:{self.seed}:process-faults")
        kinds = list(ProcessFault)
        while True:
            yield PlannedFault(
                after=rng.expovariate(1 / self.interval),
                fault=rng.choice(kinds),
                down=rng.uniform(0, self.max_down),
                pick=rng.random(),
            )


class ProcessSaboteur:
    """Carries out a :class:`ProcessFaultSchedule` against a run's processes.

    ``servers`` maps ``proxy`` and ``gcs`` to their supervised processes. The run registers
    each running ``rup upload`` with :meth:`client_started` / :meth:`client_ended`;
    :meth:`client_ended` says how long a client this saboteur stopped must stay down before
    its rerun (``None``: it ended on its own). ``before_proxy_fault`` runs just before the
    proxy is signalled (the run reads its counters then, before a kill loses them).
    """

    def __init__(
        self,
        schedule: ProcessFaultSchedule,
        servers: dict[str, Supervised],
        *,
        before_proxy_fault: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._schedule = schedule
        self._servers = servers
        self._before_proxy_fault = before_proxy_fault
        self._clients: dict[int, tuple[Supervised, float]] = {}
        self._stopped_clients: dict[int, float] = {}
        #: faults carried out, by kind
        self.counts: dict[str, int] = {fault.value: 0 for fault in ProcessFault}
        #: what went wrong with the servers themselves: a SIGTERM not obeyed, a failed start
        self.problems: list[str] = []
        #: every strike and restart, as lines stamped like the servers' logs (for a run that
        #: failed: which process was down when)
        self.timeline: list[str] = []

    def _note(self, what: str) -> None:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
        self.timeline.append(f"{stamp} {what}")

    def client_started(self, index: int, process: Supervised) -> None:
        self._clients[index] = (process, trio.current_time())

    def client_ended(self, index: int) -> float | None:
        """Forget the client of upload ``index``; how long to keep it down, if this stopped it."""
        self._clients.pop(index, None)
        return self._stopped_clients.pop(index, None)

    async def run(self) -> None:
        """Strike, fault after fault, until cancelled. A server being restarted when the
        cancellation comes is still started again (shielded, and bounded) before this
        returns, so a run never ends with its proxy or endpoint down by this hand."""
        for planned in self._schedule.faults():
            await trio.sleep(planned.after)
            if planned.fault.target == "client":
                self._strike_client(planned)
            else:
                with trio.CancelScope(shield=True):
                    await self._strike_server(planned)

    def _strike_client(self, planned: PlannedFault) -> None:
        settled = trio.current_time() - _CLIENT_MIN_AGE
        running = sorted(
            index
            for index, (process, started) in self._clients.items()
            if process.running and started <= settled
        )
        if not running:
            return
        index = running[min(int(planned.pick * len(running)), len(running) - 1)]
        self._stopped_clients[index] = planned.down
        self._clients[index][0].send_signal(planned.fault.signal)
        self.counts[planned.fault.value] += 1
        self._note(f"{planned.fault.value} (upload {index}), down {planned.down:.2f} s")

    async def _strike_server(self, planned: PlannedFault) -> None:
        process = self._servers[planned.fault.target]
        if not process.running:
            return
        if planned.fault.target == "proxy" and self._before_proxy_fault is not None:
            await self._before_proxy_fault()
        process.send_signal(planned.fault.signal)
        self.counts[planned.fault.value] += 1
        self._note(planned.fault.value)
        with trio.move_on_after(_STOP_PATIENCE) as patience:
            code = await process.wait()
        self._note(f"{process.name} exited ({code}); down {planned.down:.2f} s, then restarted")
        if patience.cancelled_caught:
            self.problems.append(
                f"{process.name} did not exit within {_STOP_PATIENCE:.0f} s of"
                f" {planned.fault.signal.name}"
            )
            process.send_signal(signal.SIGKILL)
            await process.wait()
        elif planned.fault.signal is signal.SIGTERM and code != 0:
            self.problems.append(f"{process.name} exited {code} after SIGTERM, not 0")
        await trio.sleep(planned.down)
        try:
            await process.start(ready_timeout=_START_PATIENCE)
        except (OSError, trio.TooSlowError, ProcessExitedError) as exc:
            self.problems.append(f"{process.name} did not start again: {exc!r}")
        else:
            self._note(f"{process.name} accepting again")
