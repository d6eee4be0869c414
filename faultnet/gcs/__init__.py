"""A strict GCS JSON API endpoint with storage-testbench-style scripted faults.

``GcsServer`` is what rup's tests, ``rup demo`` and ``rup serve`` use as their GCS.
It holds resumable uploads to real GCS's rules (see :mod:`faultnet.gcs.resumable`) and
injects the faults a retry test scripts (see :mod:`faultnet.gcs.retry_test`).
"""

from faultnet.gcs.errors import GcsApiError
from faultnet.gcs.model import ObjectInfo, SessionInfo
from faultnet.gcs.resumable import UPLOAD_QUANTUM
from faultnet.gcs.server import GcsServer
from faultnet.gcs.store import Store

__all__ = ["UPLOAD_QUANTUM", "GcsApiError", "GcsServer", "ObjectInfo", "SessionInfo", "Store"]
