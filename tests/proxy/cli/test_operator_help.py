"""What an operator reads before running anything: ``--help``, ``--version``, exit codes."""

from __future__ import annotations

import argparse

import pytest

from proxy.cli import main as cli
from proxy.version import version
from tests.proxy.cli.commands import run_rup

#: options whose default is worth stating but need not be a literal (a flag, a repeatable)
_NO_DEFAULT_NEEDED = (argparse._StoreTrueAction, argparse._AppendAction)


def _options(name: str) -> list[argparse.Action]:
    parser, _ = cli.command_parser(name)
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_option_of_every_command_has_help_and_its_default(name: str) -> None:
    parser, _ = cli.command_parser(name)
    rendered = parser.format_help()
    for action in _options(name):
        flag = action.option_strings[-1]
        assert (action.help or "").strip(), f"rup {name} {flag}: no help text"
        takes_value = action.nargs != 0
        if takes_value and action.choices is None:
            assert action.metavar, f"rup {name} {flag}: no metavar"
            assert str(action.metavar).isupper() or ":" in str(action.metavar), (
                f"rup {name} {flag}: metavar {action.metavar!r} is not a PLACEHOLDER"
            )
        if (
            takes_value
            and action.default not in (None, [], ())
            and not isinstance(action, _NO_DEFAULT_NEEDED)
        ):
            help_text = parser._get_formatter()._expand_help(action)
            assert "default" in help_text, f"rup {name} {flag}: default not shown"
    assert "exit codes" in rendered.lower(), f"rup {name} --help lists no exit codes"


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_time_and_size_options_say_their_unit_in_the_metavar(name: str) -> None:
    for action in _options(name):
        flag = action.option_strings[-1]
        if any(word in flag for word in ("timeout", "deadline", "wait", "interval")):
            assert action.metavar in ("SECONDS", "DURATION"), f"rup {name} {flag}"
        if flag.endswith("-mib"):
            assert action.metavar == "MIB", f"rup {name} {flag}"


def test_placeholders_are_the_same_everywhere() -> None:
    """One name per kind of value: e.g. DATA_DIR, never DIR in one command and DATA_DIR in
    another."""
    metavars: dict[str, set[str]] = {}
    for name in cli.COMMANDS:
        for action in _options(name):
            if action.metavar:
                metavars.setdefault(action.option_strings[-1], set()).add(str(action.metavar))
    assert metavars["--data-dir"] == {"DATA_DIR"}
    assert metavars["--listen"] == {"HOST:PORT"}
    assert "DIR" not in {m for ms in metavars.values() for m in ms}
    assert "TOKEN" not in {m for ms in metavars.values() for m in ms}


def test_version() -> None:
    result = run_rup("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"rup {version()}"
    assert version() != "0+unknown"  # the test tree is installed


def test_rup_help_lists_every_commands_exit_codes() -> None:
    result = run_rup("--help")
    assert result.returncode == 0
    out = result.stdout
    assert "exit codes" in out
    for line in ("  0    success", "  2    usage error", "  130  interrupted"):
        assert line in out
    for name in ("upload", "serve", "gcs-server", "faultproxy", "chaos"):
        assert f"  1    {name}: " in out, name
    assert "  7    upload: " in out
