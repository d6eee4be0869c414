"""rup's proxy: the composition of protocol, reliablewriter and faultnet.

Four rooms, each with one job (see docs/architecture.md):

* :mod:`proxy.client`: the client library; imports only :mod:`protocol` of ours.
* :mod:`proxy.server`: the trio server that streams uploads into GCS.
* :mod:`proxy.chaos`: the chaos harness and the demo.
* :mod:`proxy.cli`: the ``rup`` command line; nothing imports it.

This package imports none of them, so ``import proxy.client`` costs only the client.
"""

__all__: list[str] = []
