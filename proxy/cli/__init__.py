"""The ``rup`` command line: :mod:`proxy.cli.main` plus one module per command.

Nothing imports this package (an import contract checks it); the ``rup`` script enters at
:func:`proxy.cli.main.main`, and ``python -m proxy.cli`` at :mod:`proxy.cli.__main__`.

The command contract
--------------------
Every command is one module, registered by name in :data:`proxy.cli.main.COMMANDS`,
that defines these names (``EXIT_CODES`` optional) and nothing else the dispatcher relies on:

``HELP: str``
    One line saying what the command does; the command's ``--help`` description.
``configure(parser: argparse.ArgumentParser) -> None``
    Adds the command's arguments (and epilog) to ``parser``, which the dispatcher made
    with ``prog="rup NAME"``. It parses nothing and has no side effects.
``run(args: argparse.Namespace) -> int``
    Does the work and returns the exit code: 0 for success, 2 for a usage error the parser
    could not catch, others as the command's epilog documents. It prints its own errors
    as one line (``rup NAME: ...``) rather than raising; Ctrl-C (bare, or grouped by a trio
    nursery) is turned into exit 130 by the dispatcher.
``EXIT_CODES: dict[int, str]``
    Code -> meaning, shown in the command's ``--help`` epilog and gathered by ``rup --help``.

A command module is thin: it turns arguments into a call of the room that does the work
(:mod:`proxy.server`, :mod:`proxy.client`, :mod:`proxy.chaos`) and the result into output
and an exit code. Only the chosen command's module is imported, so a command's imports
cost only that command; the top-level imports of a command module are kept to what it
needs (``rup faultproxy --help`` and ``rup gcs-server --help`` load neither
google-cloud-storage, prometheus-client nor cryptography: a test checks it).

The two fault-injection commands, ``rup gcs-server`` and ``rup faultproxy``, follow the
same contract but live in faultnet (:mod:`faultnet.gcs.command`,
:mod:`faultnet.tcpproxy_command`): faultnet is a library of its own that never imports
:mod:`proxy`, and its commands belong with it. ``proxy.cli`` registers them by module
name; a wrapper here would only re-export their three names.

Besides the command modules, ``progress`` (the upload progress bar), ``sizes``
(``256M``-style sizes read, IEC sizes and rates written), ``ports`` (the default ports,
written once) and ``upload_state`` (``rup upload``'s resume records) serve the commands.
What every command shares (``HOST:PORT`` arguments, one-line failures, the exit codes 0, 1,
2 and 130, the help formatter that shows defaults) is :mod:`faultnet.cli_support`, so that
faultnet's two commands use it too.
"""

__all__: list[str] = []
