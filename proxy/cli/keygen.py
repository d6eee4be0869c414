"""``rup keygen``: print a new upload-token key.

Give the same key to every proxy instance that should resume the others' uploads, through
``RUP_TOKEN_KEY`` (the environment is not visible to other users, unlike the command line)::

    export RUP_TOKEN_KEY="$(rup keygen)"
    rup serve --listen 0.0.0.0:7400 --auth-token ... --gcs-endpoint ...

Exit code 0 (it cannot fail short of the interpreter).
"""

from __future__ import annotations

import argparse

from faultnet.cli_support import EXIT_OK, exit_codes_epilog
from proxy.server.keys import KEY_SIZE, generate_key_text

__all__ = ["EXIT_CODES", "HELP", "configure", "run"]

EXIT_CODES = {EXIT_OK: "the key was printed"}

HELP = f"print a new upload-token key ({KEY_SIZE} random bytes, base64url) for RUP_TOKEN_KEY"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Use it as RUP_TOKEN_KEY (or --token-key) on every proxy that should resume the "
        "others' uploads. Whoever has the key can forge upload tokens: keep it secret.\n\n"
        + exit_codes_epilog(EXIT_CODES)
    )


def run(args: argparse.Namespace) -> int:
    print(generate_key_text(), flush=True)
    return EXIT_OK
