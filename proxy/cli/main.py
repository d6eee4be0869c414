"""The ``rup`` command line: one entry point, one module per subcommand.

Each subcommand module follows the contract in :mod:`proxy.cli`'s docstring: ``HELP`` (one
line), ``configure(parser)`` (adds its arguments) and ``run(args) -> int`` (the exit code).
rup's own commands live in :mod:`proxy.cli`; faultnet's two live in faultnet. Only the
chosen command's module is imported, so ``rup faultproxy`` starts fast and does not depend
on the proxy or the GCS client being importable.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["COMMANDS", "main"]

#: subcommand name -> (module that implements it, one-line summary for ``rup --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("proxy.cli.demo", "upload a generated object through faults, and verify it"),
    "serve": ("proxy.cli.serve", "run the proxy server"),
    "keygen": ("proxy.cli.keygen", "print a new upload-token key for RUP_TOKEN_KEY"),
    "upload": ("proxy.cli.upload", "upload a file or stdin through a proxy"),
    "gcs-server": ("faultnet.gcs.command", "run the strict GCS endpoint with scripted faults"),
    "faultproxy": ("faultnet.tcpproxy_command", "run the TCP chaos proxy"),
    "chaos": ("proxy.cli.chaos", "run many uploads under faults and verify every byte"),
    "sweep": ("proxy.cli.sweep", "delete interrupted composite uploads' temporary objects"),
}


def _top_level_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rup",
        description="rup, the reliable-upload proxy: multi-connection uploads into GCS.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(f"  {name:<12} {summary}" for name, (_, summary) in COMMANDS.items())
        + "\n\nRun 'rup COMMAND --help' for a command's options.",
    )
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="see below")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    top = _top_level_parser()
    if not args_list:
        top.print_help(sys.stderr)
        return 2
    if args_list[0] not in COMMANDS:
        # argparse prints --help, or "invalid choice" and exits 2.
        top.parse_args(args_list[:1])
        return 2
    name, rest = args_list[0], args_list[1:]
    module_name, summary = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"rup {name}", description=module.HELP or summary)
    module.configure(parser)
    args = parser.parse_args(rest)
    try:
        code: int = module.run(args)
    except BaseExceptionGroup as group:
        # Ctrl-C inside a trio nursery arrives grouped; anything else in the group is real.
        interrupts, others = group.split(KeyboardInterrupt)
        if interrupts is None or others is not None:
            raise
        return _interrupted()
    except KeyboardInterrupt:
        return _interrupted()
    return code


def _interrupted() -> int:
    print("rup: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
