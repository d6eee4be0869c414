"""The ``rup`` command line: one entry point, one module per subcommand.

Each subcommand lives in the package that owns its behaviour and exposes three names:
``HELP`` (one line), ``configure(parser)`` (adds its arguments) and ``run(args) -> int``
(the exit code). This module only wires them together, so ``rup --help`` stays cheap to
read and each command stays next to the code it drives.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

__all__ = ["COMMANDS", "build_parser", "main"]

#: subcommand name -> module that implements it
COMMANDS: dict[str, str] = {
    "demo": "proxy.demo",
    "serve": "proxy.serve_command",
    "upload": "proxy.upload_command",
    "gcs-server": "faultnet.gcs.command",
    "faultproxy": "faultnet.tcpproxy_command",
    "chaos": "proxy.chaos",
}


def _load(module_name: str) -> ModuleType | None:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only a missing command module (or its package) means "not built"; a missing
        # dependency inside a command module is a real error and must surface.
        if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
            raise
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rup",
        description="rup, the reliable-upload proxy: multi-connection uploads into GCS.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = _load(module_name)
        if module is None:
            continue
        sub = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.configure(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args._run(args)
    except KeyboardInterrupt:
        print("rup: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
