"""Imports point one way, and the light entry points stay light.

* The contracts in ``pyproject.toml`` (``[tool.importlinter]``), checked by import-linter's
  ``lint-imports``: crcmath imports nothing of ours, protocol and reliablewriter nothing but
  crcmath, faultnet never imports proxy, proxy.client imports only protocol (and crcmath
  through it), proxy.server never imports proxy.client, proxy.chaos or proxy.cli, and
  nothing imports proxy.cli.
* What an entry point costs: each runs in a fresh interpreter, which then lists the heavy
  modules it loaded. ``rup faultproxy --help`` and ``rup gcs-server --help`` must load
  neither google-cloud-storage, prometheus-client nor cryptography; ``import proxy.client``
  none of the server's dependencies.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: what only a server, a GCS client or a judge needs
_SERVER_SIDE = ("google.cloud.storage", "prometheus_client", "cryptography")
#: ...and besides those, what the client library must not load either
_NOT_FOR_THE_CLIENT = (
    *_SERVER_SIDE,
    "google",
    "requests",
    "urllib3",
    "h11",
    "rich",
    "reliablewriter",
    "faultnet",
    "proxy.server",
    "proxy.chaos",
    "proxy.cli",
)


def test_the_import_contracts_hold() -> None:
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports is not None, "import-linter is not installed (pip install -e .[test])"
    result = subprocess.run(
        [lint_imports, "--no-cache", "--no-logo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def _loaded_after(code: str, watched: tuple[str, ...]) -> list[str]:
    """Which of ``watched`` a fresh interpreter has in ``sys.modules`` after ``code``."""
    program = textwrap.dedent(code) + textwrap.dedent(
        f"""
        import json as _json, sys as _sys
        _sys.__stderr__.write(
            "LOADED " + _json.dumps([m for m in {watched!r} if m in _sys.modules]) + "\\n"
        )
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", program],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    lines = [line for line in result.stderr.splitlines() if line.startswith("LOADED ")]
    assert lines, result.stderr
    loaded: list[str] = json.loads(lines[-1].removeprefix("LOADED "))
    return loaded


@pytest.mark.parametrize("command", ["faultproxy", "gcs-server"])
def test_a_fault_injection_command_s_help_loads_no_server_side_library(command: str) -> None:
    code = f"""
        import contextlib, io
        from proxy.cli.main import main
        with contextlib.redirect_stdout(io.StringIO()) as out:
            try:
                main([{command!r}, "--help"])
            except SystemExit as exit_info:
                assert exit_info.code == 0, exit_info.code
        assert out.getvalue().startswith("usage: rup {command}"), out.getvalue()
    """
    assert _loaded_after(code, _SERVER_SIDE) == []


def test_the_client_library_loads_nothing_of_the_server_s() -> None:
    assert _loaded_after("import proxy.client", _NOT_FOR_THE_CLIENT) == []


def test_the_watch_list_would_see_a_heavy_import() -> None:
    # The check above is only as good as its means of seeing: the server does load them.
    assert _loaded_after("import proxy.server", _SERVER_SIDE) == list(_SERVER_SIDE)
