"""The default ports of rup's services, written once (the README and deploy/ agree, a test
checks deploy/): light to import, so that any command may use them."""

from __future__ import annotations

__all__ = ["METRICS_PORT", "PROXY_PORT"]

#: where ``rup serve`` takes client connections (``--listen``)
PROXY_PORT = 7400
#: where deploy/ serves ``/metrics``, ``/healthz`` and ``/readyz`` (``rup serve --metrics``)
METRICS_PORT = 9400
