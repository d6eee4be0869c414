"""``rup upload`` with several files and directories: names, content types, metadata, partial
failure and its exit code, ``--json`` lines. The proxy runs in a thread, as in test_upload."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from faultnet.gcs import GcsServer
from faultnet.gcs.clients import anonymous_client
from proxy.cli.main import main
from proxy.cli.upload import EXIT_PARTIAL, EXIT_PRECONDITION, EXIT_USAGE
from proxy.cli.upload_plan import PlanError, plan_uploads
from tests.proxy.cli.proxy_thread import AUTH_TOKEN, stored

TOKEN = AUTH_TOKEN
KiB = 1024
MiB = 1024 * KiB


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, bytes]:
    """site/index.html, site/data/points.json, site/data/big.bin (over one frame), site/old.txt."""
    files = {
        "site/index.html": b"<html>hi</html>",
        "site/data/points.json": b"[1, 2, 3]",
        "site/data/big.bin": os.urandom(2 * MiB + 3),
        "site/old.txt": b"already there",
    }
    for name, data in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def test_a_directory_with_one_object_refused_exits_partial(
    proxy_address: str,
    gcs_server: GcsServer,
    tree: dict[str, bytes],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ["--proxy", proxy_address, "--auth-token", TOKEN]
    old = tmp_path / "site" / "old.txt"
    assert main(["upload", str(old), "gs://cmd/pre/site/old.txt", *base, "--json"]) == 0
    capsys.readouterr()
    argv = ["upload", "-r", str(tmp_path / "site"), "gs://cmd/pre/", *base]
    argv += ["--no-clobber", "--json", "--jobs", "3", "--metadata", "team=web"]
    argv += ["--metadata", "build=7", "--frame-size", str(256 * KiB)]
    assert main(argv) == EXIT_PARTIAL
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    *objects, summary = lines
    assert {line["url"] for line in objects} == {f"gs://cmd/pre/{name}" for name in tree}
    refused = [line for line in objects if not line["ok"]]
    assert [line["url"] for line in refused] == ["gs://cmd/pre/site/old.txt"]
    assert refused[0]["exit_code"] == EXIT_PRECONDITION
    assert summary == {
        "ok": False,
        "summary": True,
        "objects": 4,
        "stored": 3,
        "failed": 1,
        "bytes": sum(len(data) for name, data in tree.items() if name != "site/old.txt"),
        "elapsed_s": summary["elapsed_s"],
        "exit_code": EXIT_PARTIAL,
    }
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1
    assert "gs://cmd/pre/site/old.txt" in errors[0]
    bucket = anonymous_client(gcs_server.url).bucket("cmd")
    for name, data in tree.items():
        assert stored(gcs_server, "cmd", f"pre/{name}") == data
    html = bucket.get_blob("pre/site/index.html")
    assert html.content_type == "text/html"
    assert html.metadata == {"team": "web", "build": "7"}
    assert bucket.get_blob("pre/site/data/points.json").content_type == "application/json"


def test_several_files_under_a_prefix_and_a_forced_content_type(
    proxy_address: str, gcs_server: GcsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = tmp_path / "a.txt", tmp_path / "b.csv"
    first.write_bytes(b"alpha")
    second.write_bytes(b"x,y\n")
    argv = ["upload", str(first), str(second), "gs://cmd/", "--proxy", proxy_address]
    argv += ["--auth-token", TOKEN, "--content-type", "application/x-test"]
    assert main(argv) == 0
    assert "stored 2 of 2 objects" in capsys.readouterr().err
    bucket = anonymous_client(gcs_server.url).bucket("cmd")
    assert bucket.get_blob("a.txt").download_as_bytes() == b"alpha"
    assert bucket.get_blob("b.csv").content_type == "application/x-test"


def test_every_object_refused_exits_with_their_code(
    proxy_address: str,
    tree: dict[str, bytes],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    site = str(tmp_path / "site")
    argv = ["upload", "-r", site, "gs://cmd/x/", "--proxy", proxy_address, "--auth-token", "no"]
    assert main([*argv, "--json"]) == 3  # all UNAUTHENTICATED: as one upload would exit
    capsys.readouterr()
    assert main(argv) == 3
    # nothing stored: no figures claiming a verified transfer
    assert f"stored 0 of {len(tree)} objects; {len(tree)} failed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "complaint"),
    [
        (["{site}", "gs://cmd/x/"], "use -r"),
        (["{site}/index.html", "{site}/old.txt", "gs://cmd/one"], "end the destination with /"),
        (["-", "{site}/old.txt", "gs://cmd/x/"], "stdin"),
        (["-r", "{site}", "gs://cmd/x/", "--metadata", "novalue"], "KEY=VALUE"),
        (["-r", "{site}", "gs://cmd/x/", "--no-clobber", "--if-generation-match", "3"], "one or"),
        (["{site}/nothing", "gs://cmd/x/"], "no such file"),
    ],
)
def test_usage_errors_exit_2(
    tree: dict[str, bytes],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    arguments: list[str],
    complaint: str,
) -> None:
    site = str(tmp_path / "site")
    argv = ["upload", *(a.format(site=site) for a in arguments), "--proxy", "127.0.0.1:9"]
    assert main(argv) == EXIT_USAGE
    assert complaint in capsys.readouterr().err


def test_the_plan_names_objects_by_relative_path(tree: dict[str, bytes], tmp_path: Path) -> None:
    site = tmp_path / "site"
    plan = plan_uploads([str(site) + "/", str(site / "old.txt")], "gs://bkt/p/", recursive=True)
    assert not plan.single
    assert [url for _, url in plan.pairs] == [
        "gs://bkt/p/site/index.html",
        "gs://bkt/p/site/old.txt",
        "gs://bkt/p/site/data/big.bin",
        "gs://bkt/p/site/data/points.json",
        "gs://bkt/p/old.txt",
    ]
    one = plan_uploads([str(site / "old.txt")], "gs://bkt/p/", recursive=False)
    assert one.single
    assert one.pairs == ((str(site / "old.txt"), "gs://bkt/p/old.txt"),)
    with pytest.raises(PlanError):
        plan_uploads(["-"], "gs://bkt/p/", recursive=False)


def test_with_several_files_a_file_gets_one_connection_per_8_mib(
    proxy_address: str, gcs_server: GcsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sizes = {"two.bin": 2 * MiB + 3, "eight.bin": 8 * MiB + 1}
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(os.urandom(size))
    base = ["--proxy", proxy_address, "--auth-token", TOKEN, "--frame-size", str(256 * KiB)]
    base += ["--connections", "4", "--json"]
    argv = ["upload", *(str(tmp_path / name) for name in sizes), "gs://cmd/spread/", *base]
    assert main(argv) == 0
    *objects, _ = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {line["url"]: line["connections"] for line in objects} == {
        "gs://cmd/spread/two.bin": 1,
        "gs://cmd/spread/eight.bin": 2,
    }
    # alone, a file has nothing else to keep connections busy: it gets all it is given
    assert main(["upload", str(tmp_path / "two.bin"), "gs://cmd/spread/alone.bin", *base]) == 0
    assert json.loads(capsys.readouterr().out)["connections"] == 4
    for name, size in sizes.items():
        assert len(stored(gcs_server, "cmd", f"spread/{name}")) == size
