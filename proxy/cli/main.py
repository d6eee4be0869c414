"""The ``rup`` command line: one entry point, one module per subcommand.

Each subcommand module follows the contract in :mod:`proxy.cli`'s docstring: ``HELP`` (one
line), ``configure(parser)`` (adds its arguments) and ``run(args) -> int`` (the exit code),
and ``EXIT_CODES`` (code -> meaning) for its ``--help`` and ``rup --help``.
rup's own commands live in :mod:`proxy.cli`; faultnet's two live in faultnet. Only the
chosen command's module is imported (``rup --help`` imports them all to list their exit
codes), so ``rup faultproxy`` starts fast and does not depend on the proxy or the GCS
client being importable.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from faultnet.cli_support import EXIT_INTERRUPTED, EXIT_USAGE, HelpFormatter
from proxy.version import version

__all__ = ["COMMANDS", "command_parser", "main"]

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


def _exit_codes_of_every_command() -> str:
    """``rup --help``'s table: the codes every command shares, then each command's own."""
    shared = {0: "success", 2: "usage error (bad arguments)", 130: "interrupted (Ctrl-C)"}
    lines = ["exit codes (each command's --help has its own table):"]
    lines += [f"  {code:<4} {meaning}" for code, meaning in shared.items()]
    for name, (module_name, _) in COMMANDS.items():
        codes = getattr(importlib.import_module(module_name), "EXIT_CODES", {})
        for code, meaning in codes.items():
            if code not in shared:
                lines.append(f"  {code:<4} {name}: {meaning}")
    return "\n".join(lines)


def _top_level_parser(*, with_exit_codes: bool) -> argparse.ArgumentParser:
    epilog = (
        "commands:\n"
        + "\n".join(f"  {name:<12} {summary}" for name, (_, summary) in COMMANDS.items())
        + "\n\nRun 'rup COMMAND --help' for a command's options."
    )
    if with_exit_codes:
        epilog += "\n\n" + _exit_codes_of_every_command()
    parser = argparse.ArgumentParser(
        prog="rup",
        description="rup, the reliable-upload proxy: multi-connection uploads into GCS.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=epilog,
    )
    parser.add_argument("--version", action="version", version=f"rup {version()}")
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="see below")
    return parser


def command_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    """The parser of command ``name``, configured by its module, and the module."""
    module_name, summary = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"rup {name}", description=module.HELP or summary, formatter_class=HelpFormatter
    )
    module.configure(parser)
    # after configure, which may have asked for raw epilogs only: HelpFormatter keeps them too
    parser.formatter_class = HelpFormatter
    return parser, module


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list:
        _top_level_parser(with_exit_codes=False).print_help(sys.stderr)
        return EXIT_USAGE
    if args_list[0] not in COMMANDS:
        # argparse prints --help or --version and exits 0, or "invalid choice" and exits 2.
        wants_help = args_list[0] in ("-h", "--help")
        _top_level_parser(with_exit_codes=wants_help).parse_args(args_list[:1])
        return EXIT_USAGE
    parser, module = command_parser(args_list[0])
    args = parser.parse_args(args_list[1:])
    try:
        code: int = module.run(args)  # type: ignore[attr-defined]
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
    return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
