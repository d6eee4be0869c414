"""The ``rup`` dispatcher: usage errors, help, and Ctrl-C however it arrives."""

from __future__ import annotations

import argparse
import importlib
import inspect
import subprocess
import sys
import types
from collections.abc import Callable

import pytest

from proxy.cli import main as cli


@pytest.fixture
def fake_command(monkeypatch: pytest.MonkeyPatch) -> Callable[[BaseException], None]:
    """Registers ``rup fake``, whose run() raises whatever the test sets."""
    module = types.ModuleType("rup_fake_command")
    raised: list[BaseException] = []

    def run(args: argparse.Namespace) -> int:
        raise raised[0]

    module.HELP = "a command for tests"  # type: ignore[attr-defined]
    module.configure = lambda parser: None  # type: ignore[attr-defined]
    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "fake", (module.__name__, "for tests"))
    return raised.append


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "commands:" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bogus"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert f"  {name} " in out


@pytest.mark.parametrize(
    "interrupt",
    [KeyboardInterrupt(), BaseExceptionGroup("from a nursery", [KeyboardInterrupt()])],
    ids=["bare", "grouped"],
)
def test_ctrl_c_exits_130(
    fake_command: Callable[[BaseException], None],
    interrupt: BaseException,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake_command(interrupt)
    assert cli.main(["fake"]) == 130
    assert capsys.readouterr().err == "rup: interrupted\n"


def test_a_real_error_beside_ctrl_c_is_not_swallowed(
    fake_command: Callable[[BaseException], None],
) -> None:
    fake_command(BaseExceptionGroup("mixed", [KeyboardInterrupt(), ValueError("real")]))
    with pytest.raises(BaseExceptionGroup) as group:
        cli.main(["fake"])
    assert group.group_contains(ValueError)


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_follows_the_contract_and_describes_itself_in_its_help(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    module = importlib.import_module(cli.COMMANDS[name][0])
    assert isinstance(module.HELP, str)
    assert module.HELP.strip()
    assert "\n" not in module.HELP
    assert list(inspect.signature(module.configure).parameters) == ["parser"]
    assert list(inspect.signature(module.run).parameters) == ["args"]

    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])

    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: rup {name}")
    assert " ".join(module.HELP.split()) in " ".join(out.split())


def test_rup_upload_starts_without_the_server_side_libraries() -> None:
    # A user may run it once per file: it must not pay for the GCS client, requests or
    # faultnet's machinery, which only the proxy and the chaos tools use.
    heavy = ["requests", "google.cloud.storage", "faultnet.tcpproxy", "faultnet.plan"]
    probe = (
        "import sys; from proxy.cli.main import command_parser; command_parser('upload');"
        f" print([m for m in {heavy!r} if m in sys.modules])"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout


def test_faultnet_names_are_there_when_used() -> None:
    import faultnet

    assert faultnet.FaultPlan is importlib.import_module("faultnet.plan").FaultPlan
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = faultnet.no_such_name
