"""What every ``rup`` command shares: ``HOST:PORT`` arguments, one-line failures, exit codes.

It lives in faultnet because faultnet's two commands (``rup faultproxy``, ``rup gcs-server``)
need it and faultnet never imports :mod:`proxy`; rup's own commands import it from here.
"""

from __future__ import annotations

import argparse
import errno
from collections.abc import Mapping

from faultnet.addresses import Address, format_address
from faultnet.addresses import parse_address as _parse_address

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "HelpFormatter",
    "exit_codes_epilog",
    "listen_failure",
    "os_reason",
    "parse_address",
    "port_number",
]

EXIT_OK = 0
#: the command could not start (a port taken, a file missing or unusable) or failed running
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_MAX_PORT = 65535


def parse_address(text: str) -> Address:
    """Read ``HOST:PORT`` (``[V6ADDR]:PORT`` for IPv6, port 0 for any free one); an
    ``argparse`` type, whose message says what is wrong."""
    _, _, port = text.rpartition(":")
    if port.isascii() and port.isdigit() and int(port) > _MAX_PORT:
        raise argparse.ArgumentTypeError(
            f"port {int(port)} is out of range in {text!r} (1-{_MAX_PORT}, or 0 for any free port)"
        )
    try:
        return _parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def port_number(text: str) -> int:
    """A port (0 for any free one); an ``argparse`` type."""
    if not (text.isascii() and text.isdigit()) or int(text) > _MAX_PORT:
        raise argparse.ArgumentTypeError(
            f"expected a port from 1 to {_MAX_PORT} (or 0 for any free port), got {text!r}"
        )
    return int(text)


def os_reason(exc: OSError) -> str:
    """Why an operating-system call failed, in a few words and without a traceback:
    ``address already in use``, ``permission denied: /var/lib/rup``..."""
    reason = (exc.strerror or str(exc) or type(exc).__name__).lower()
    if exc.errno == errno.EADDRINUSE:
        reason = "address already in use (another process listens there)"
    elif exc.errno in (errno.EACCES, errno.EPERM) and exc.filename is None:
        reason = "permission denied (ports below 1024 need privileges)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        reason = "no such address on this machine"
    if exc.filename is not None:
        reason = f"{reason}: {exc.filename}"
    return reason


def listen_failure(address: tuple[str, int], exc: OSError) -> str:
    """The one line for a listener that could not be opened on ``address``."""
    return f"cannot listen on {format_address(address)}: {os_reason(exc)}"


def exit_codes_epilog(codes: Mapping[int, str]) -> str:
    """An ``exit codes:`` table for a command's ``--help`` (with :class:`HelpFormatter`)."""
    return "exit codes:\n" + "\n".join(f"  {code:<4} {meaning}" for code, meaning in codes.items())


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps epilogs' line breaks, and adds ``(default: X)`` to an option's help unless it
    already says its default or has none worth saying (``None``, ``False``, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        default = action.default
        if (
            "default" in help_text
            or not action.option_strings
            or default is None
            or default is False
            or default in ((), [], "")
            or default is argparse.SUPPRESS  # --help, --version
        ):
            return help_text
        return f"{help_text} (default: %(default)s)"
