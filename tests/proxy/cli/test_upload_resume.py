"""``rup upload FILE`` resumes after Ctrl-C or a kill: real subprocesses, real signals.

The proxy runs in a thread of the test process, behind a faultnet proxy that limits each
connection's upload bandwidth, so that a signal lands partway through the upload. The proxy's
own metrics say how many payload bytes it received, which is how the tests know what it held
when the client died and how much was sent twice.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from faultnet.gcs import GcsServer
from faultnet.plan import FaultPlan
from proxy.cli.main import main
from proxy.cli.upload_state import FileIdentity, ResumeRecord, ResumeStore
from proxy.server.settings import ServerSettings
from reliablewriter import RetryPolicy, WriterSettings
from tests.proxy.cli.proxy_thread import ThreadedProxy, proxy_in_thread, stored

KiB = 1024
MiB = 1024 * KiB
#: the proxy's credit window for one upload: what a resume may send twice, at most
WINDOW = 4 * MiB
SIZE = 16 * MiB


class SlowProxy:
    """A :class:`ThreadedProxy` whose metrics tell how many payload bytes it received."""

    def __init__(self, proxy: ThreadedProxy) -> None:
        self.address = proxy.address
        self._server = proxy.server

    def received(self) -> int:
        """WriteAt payload bytes the proxy has received and verified, over all uploads."""
        value = self._server.metrics.registry.get_sample_value("rup_received_bytes_total")
        return int(value or 0)

    def settled(self) -> int:
        """:meth:`received`, once it has stopped growing (relayed bytes have landed)."""
        last, stable_since = self.received(), time.monotonic()
        while time.monotonic() - stable_since < 0.5:
            time.sleep(0.05)
            now = self.received()
            if now != last:
                last, stable_since = now, time.monotonic()
        return last


@pytest.fixture
def slow_proxy(gcs_server: GcsServer) -> Iterator[SlowProxy]:
    """A proxy with a 4 MiB window behind a 2 MiB/s-per-connection link, in a thread."""
    settings = ServerSettings(
        max_frame_size=256 * KiB,
        upload_buffer_limit=WINDOW,
        min_upload_window=1 * MiB,
        shutdown_grace=0.5,
        writer=WriterSettings(
            min_chunk_size=256 * KiB,
            max_chunk_size=1 * MiB,
            buffer_limit=WINDOW,
            retry=RetryPolicy(initial_delay=0.01, max_delay=0.2, deadline=30.0),
        ),
    )
    with proxy_in_thread(gcs_server, settings, FaultPlan.parse("bandwidth:up(rate=2m)")) as proxy:
        yield SlowProxy(proxy)


@pytest.fixture
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state" / "rup"


@pytest.mark.parametrize(
    ("interruption", "exit_code"), [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGINT, 130)]
)
def test_an_interrupted_upload_resumes_and_resends_at_most_one_window(
    slow_proxy: SlowProxy,
    gcs_server: GcsServer,
    state_home: Path,
    tmp_path: Path,
    interruption: signal.Signals,
    exit_code: int,
) -> None:
    data = os.urandom(SIZE)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    url = f"gs://cmd/resumed-{interruption.name}.bin"
    command = [sys.executable, "-m", "proxy.cli", "upload", str(path), url]
    command += ["--proxy", slow_proxy.address, "--json"]
    before = slow_proxy.received()

    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    give_up = time.monotonic() + 60
    while slow_proxy.received() - before < 2 * WINDOW:  # well under way, far from done
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < give_up
        time.sleep(0.01)
    first.send_signal(interruption)
    _, first_err = first.communicate(timeout=30)
    assert first.returncode == exit_code, first_err.decode()
    if interruption is signal.SIGINT:
        assert "interrupted; rerun the same command to resume" in first_err.decode()
    (record,) = state_home.glob("upload-*.json")
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert stat.S_IMODE(state_home.stat().st_mode) == 0o700
    held = slow_proxy.settled() - before
    assert 2 * WINDOW <= held < SIZE - WINDOW

    second = subprocess.run(command, capture_output=True, timeout=120, check=False)
    assert second.returncode == 0, second.stderr.decode()
    assert "resuming the interrupted upload" in second.stderr.decode()
    summary = json.loads(second.stdout)
    assert stored(gcs_server, "cmd", url.rpartition("/")[2]) == data
    # The rerun sent what the proxy lacked, plus at most one window; nothing twice beyond it.
    assert summary["bytes_sent"] <= SIZE - held + WINDOW
    assert slow_proxy.received() - before - SIZE <= WINDOW
    assert summary["restarts"] == 0
    assert not list(state_home.glob("upload-*.json"))  # completed: the record is gone


def _leave_record(store: ResumeStore, path: Path, url: str, token: bytes) -> None:
    store.save(ResumeRecord(FileIdentity.of(path), url, token, confirmed=((0, 1024),)))


def test_a_changed_file_starts_over_and_says_so(
    slow_proxy: SlowProxy,
    gcs_server: GcsServer,
    state_home: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "small.bin"
    path.write_bytes(os.urandom(300 * KiB))
    store = ResumeStore(state_home)
    _leave_record(store, path, "gs://cmd/changed.bin", b"an old token")
    data = os.urandom(200 * KiB)
    path.write_bytes(data)  # another size: another file
    argv = ["upload", str(path), "gs://cmd/changed.bin", "--proxy", slow_proxy.address]
    assert main([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    assert "changed since the interrupted upload: starting over" in captured.err
    assert json.loads(captured.out)["bytes_sent"] == len(data)
    assert stored(gcs_server, "cmd", "changed.bin") == data
    assert not list(state_home.glob("upload-*.json"))


@pytest.mark.parametrize("no_resume", [False, True])
def test_a_token_the_proxy_cannot_resume_or_no_resume_starts_afresh(
    slow_proxy: SlowProxy,
    gcs_server: GcsServer,
    state_home: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_resume: bool,
) -> None:
    data = os.urandom(300 * KiB)
    path = tmp_path / "small.bin"
    path.write_bytes(data)
    _leave_record(ResumeStore(state_home), path, "gs://cmd/afresh.bin", b"not a real token")
    argv = ["upload", str(path), "gs://cmd/afresh.bin", "--proxy", slow_proxy.address, "--json"]
    assert main([*argv, "--no-resume"] if no_resume else argv) == 0
    captured = capsys.readouterr()
    if no_resume:
        assert "resuming" not in captured.err
        assert "cannot resume" not in captured.err
    else:
        assert "resuming the interrupted upload" in captured.err
        # version 2 names it TOKEN_NOT_RESUMABLE (version 1: BAD_TOKEN)
        assert "cannot resume the interrupted upload (TOKEN_NOT_RESUMABLE" in captured.err
        assert "starting a new one" in captured.err
        assert "not a real token" not in captured.err  # the token is a secret
    assert json.loads(captured.out)["bytes_sent"] == len(data)
    assert stored(gcs_server, "cmd", "afresh.bin") == data
    assert not list(state_home.glob("upload-*.json"))


def test_a_file_changed_during_the_upload_fails_in_one_line_and_forgets_the_record(
    slow_proxy: SlowProxy, state_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "moving.bin"
    path.write_bytes(os.urandom(SIZE))
    before = slow_proxy.received()

    def touch_once_under_way() -> None:
        give_up = time.monotonic() + 30
        while slow_proxy.received() - before < WINDOW and time.monotonic() < give_up:
            time.sleep(0.01)
        os.utime(path, ns=(0, 0))

    toucher = threading.Thread(target=touch_once_under_way, daemon=True)
    toucher.start()
    code = main(["upload", str(path), "gs://cmd/moving.bin", "--proxy", slow_proxy.address])
    toucher.join(timeout=30)
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "the file changed while it was being uploaded" in err
    assert not list(state_home.glob("upload-*.json"))  # it can never resume: forgotten
