"""The ``rup`` command line: :mod:`proxy.cli.main` plus one module per command.

Nothing imports this package; the ``rup`` script enters at :func:`proxy.cli.main.main`.
"""

__all__: list[str] = []
