"""``rup chaos --process-faults``: real processes, real signals, every upload still judged.

The proxy (``rup serve``), the GCS endpoint (``rup gcs-server --data-dir``) and every client
(``rup upload``) run as processes; the run kills or stops them at seeded moments and starts
them again with the same arguments. Nothing is patched.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest

from proxy.chaos.process_faults import ProcessFault, ProcessFaultSchedule
from proxy.chaos.report import Verdict
from proxy.chaos.run import run_chaos
from proxy.chaos.settings import ChaosSettings
from proxy.cli.main import main
from reliablewriter import MiB

#: seed 193's first four process faults: proxy SIGTERM, gcs SIGKILL, client SIGINT and
#: SIGKILL, all within the first 4 s; the run takes about 15 s. The faults go on until the
#: last upload ends, and on two busy cores a restart of the endpoint takes up to 3 s: the
#: deadline (and the clients' retry deadline, half of it) leaves room for several of them
#: in a row.
SMALL = ChaosSettings(
    uploads=10,
    seed=193,
    max_size=2 * MiB,
    connections=3,
    concurrency=4,
    deadline=30.0,
    precondition_share=0.3,
    process_faults=True,
    process_fault_interval=0.8,
    max_down=0.5,
)


@pytest.mark.slow
def test_a_small_seeded_run_keeps_every_promise_while_processes_are_killed() -> None:
    report = run_chaos(SMALL)

    assert report.passed, report.as_dict()["broken"] or report.leaks
    not_stored = [
        o for o in report.outcomes if o.verdict not in (Verdict.VERIFIED, Verdict.REFUSED)
    ]
    assert not not_stored, [(o.index, o.verdict.value, o.problem) for o in not_stored]
    assert any(o.verdict is Verdict.REFUSED for o in report.outcomes)
    faults = report.process_faults
    for target in ("proxy", "gcs", "client"):
        assert sum(n for kind, n in faults.items() if kind.startswith(target)) >= 1, faults
    assert faults.get("proxy SIGKILL", 0) + faults.get("gcs SIGKILL", 0) >= 1, faults
    assert faults.get("proxy SIGTERM", 0) + faults.get("gcs SIGTERM", 0) >= 1, faults
    # a stopped client was run again (it may have been stopped before it kept a record)
    assert report.client_retries()["process restarts"] >= 1
    # network faults went on beside the process faults
    assert sum(report.client_faults["faults"].values()) > 0
    assert report.client_retries()["reconnects"] > 0
    assert "--process-faults" in report.replay
    assert report.logs == ""  # a passing run removes the processes' output


@pytest.mark.slow
def test_an_upload_past_its_deadline_fails_the_run_and_keeps_the_logs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        ["chaos", "--process-faults", "--uploads", "1", "--max-size", "0", "--faults", "none",
         "--deadline", "0.2", "--max-down", "0", "--json"]
    )  # fmt: skip

    assert code == 1
    captured = capsys.readouterr()
    assert '"verdict": "HUNG"' in captured.out
    assert '"logs": "' in captured.out
    logs = Path(captured.out.split('"logs": "', 1)[1].split('"', 1)[0])
    try:
        assert (logs / "proxy.err").exists()
        assert (logs / "gcs.err").exists()
    finally:
        shutil.rmtree(logs)


def test_the_schedule_is_the_seed_s_and_stays_within_its_bounds() -> None:
    def first(seed: int, count: int = 200) -> list[tuple[float, ProcessFault, float, float]]:
        schedule = ProcessFaultSchedule(seed, interval=2.0, max_down=3.0)
        return [
            (f.after, f.fault, f.down, f.pick) for f in itertools.islice(schedule.faults(), count)
        ]

    faults = first(7)
    assert faults == first(7)
    assert faults != first(8)
    assert {fault for _, fault, _, _ in faults} == set(ProcessFault)
    assert all(0 <= down <= 3.0 and 0 <= pick < 1 and after >= 0 for after, _, down, pick in faults)
    mean_gap = sum(after for after, _, _, _ in faults) / len(faults)
    assert 1.5 < mean_gap < 2.5


def test_each_fault_names_its_process_and_signal() -> None:
    assert [(f.target, f.signal.name) for f in ProcessFault] == [
        ("proxy", "SIGKILL"),
        ("proxy", "SIGTERM"),
        ("gcs", "SIGKILL"),
        ("gcs", "SIGTERM"),
        ("client", "SIGKILL"),
        ("client", "SIGINT"),
    ]


@pytest.mark.parametrize(
    "arguments",
    [
        ["--process-faults", "--max-down", "-1"],
        ["--process-faults", "--max-down", "61"],
        ["--process-faults", "--process-fault-interval", "0"],
        ["--process-faults", "--gcs-endpoint", "http://127.0.0.1:9"],
    ],
)
def test_bad_process_fault_arguments_exit_2(
    arguments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["chaos", *arguments]) == 2
    assert capsys.readouterr().err.startswith("rup chaos: ")
