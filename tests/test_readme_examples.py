"""The runnable examples in ``examples/`` (quoted in the README) do what they say.

Each runs as a user runs it: a separate Python process, started outside the repository,
against an endpoint or a ``rup serve`` started fresh for the test; the bytes are read back.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.cloud import storage  # type: ignore[import-untyped]

from faultnet.gcs import GcsServer
from tests.proxy.server.processes import RupProcess, running

pytest_plugins = ["pytester"]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MiB = 1024 * 1024


def run_example(
    name: str, *args: str, cwd: Path, env: dict[str, str] | None = None, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    """Run ``examples/NAME`` with ``env`` on top of a copy of ours without any GCS override."""
    base = {k: v for k, v in os.environ.items() if k != "STORAGE_EMULATOR_HOST"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        input=stdin,
        capture_output=True,
        cwd=cwd,
        env={**base, **(env or {})},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done


@pytest.mark.parametrize("how", ["STORAGE_EMULATOR_HOST", "api_endpoint"])
def test_read_back_reads_an_object_of_the_endpoint(
    how: str, gcs_endpoint: GcsServer, gcs_bucket: str, gcs_client: storage.Client, tmp_path: Path
) -> None:
    data = os.urandom(3 * MiB + 17)
    gcs_client.bucket(gcs_bucket).blob("dir/obj").upload_from_string(data)
    if how == "api_endpoint":
        done = run_example("read_back.py", gcs_bucket, "dir/obj", gcs_endpoint.url, cwd=tmp_path)
    else:
        env = {"STORAGE_EMULATOR_HOST": gcs_endpoint.url}
        done = run_example("read_back.py", gcs_bucket, "dir/obj", cwd=tmp_path, env=env)
    assert done.stdout == data


def test_client_example_uploads_through_rup_serve_and_read_back_finds_it(tmp_path: Path) -> None:
    serve = RupProcess("serve", ["serve", "--listen", "127.0.0.1:0", "--gcs-open"], tmp_path)
    data = os.urandom(5 * MiB + 3)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    with running(serve):
        serve.start()
        host, port = serve.listening_on()
        gcs_url = serve.wait_for(r"embedded GCS endpoint \S+").split()[-1]
        env = {"RUP_PROXY": f"{host}:{port}"}
        uploaded = run_example(
            "upload_with_client.py", str(source), "gs://bkt/big.bin", cwd=tmp_path, env=env
        )
        read = run_example(
            "read_back.py", "bkt", "big.bin", cwd=tmp_path, env={"STORAGE_EMULATOR_HOST": gcs_url}
        )
    assert f"stored gs://bkt/big.bin: {len(data)} bytes" in uploaded.stdout.decode()
    assert read.stdout == data


def test_reliablewriter_example_writes_stdin_to_an_object(
    gcs_endpoint: GcsServer, gcs_bucket: str, gcs_client: storage.Client, tmp_path: Path
) -> None:
    data = os.urandom(2 * MiB + 5)
    env = {"STORAGE_EMULATOR_HOST": gcs_endpoint.url}
    done = run_example(
        "reliablewriter_library.py", gcs_bucket, "w.bin", cwd=tmp_path, env=env, stdin=data
    )
    assert f"stored {len(data)} bytes" in done.stdout.decode()
    assert gcs_client.bucket(gcs_bucket).blob("w.bin").download_as_bytes() == data


def test_the_fixture_example_passes_in_a_project_of_its_own(pytester: pytest.Pytester) -> None:
    shutil.copy(EXAMPLES / "test_with_rup_fixtures.py", pytester.path)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--timeout=60", timeout=120)
    result.assert_outcomes(passed=2)
