"""A strict GCS JSON API endpoint with storage-testbench-style scripted faults.

``GcsServer`` is what rup's tests, ``rup demo`` and ``rup serve`` use as their GCS.
It holds resumable uploads to real GCS's rules (see :mod:`faultnet.gcs.resumable`) and
injects the faults a retry test scripts (see :mod:`faultnet.gcs.retry_test`).

One job per module:

* ``server``: threads, sockets, the access token; turns failures into responses.
* ``http11``: the HTTP/1.1 wire (the ingest fast path), with byte-exact fault hooks.
* ``api``: routes JSON API requests to handlers; where scripted faults apply.
* ``resumable``: the rules of a resumable session's chunks (what is kept, what is final).
* ``store``: the index and GCS's invariants (names, generations, preconditions, TTL).
* ``storage``: the interface the store keeps its bytes and records through, with two
  implementations: ``memory`` and ``disk`` (crash-safe, hashed file names).
* ``model``: the records (objects, buckets, sessions) as frozen values.
* ``names``: GCS's naming and metadata limits. ``digest``: CRC32C and MD5 off the ingest path.
* ``retry_test``: storage-testbench's scripted faults. ``errors``: the JSON error.
* ``command``: ``rup gcs-server``. ``clients``: google-cloud-storage clients for it.
"""

from faultnet.gcs.errors import GcsApiError
from faultnet.gcs.model import ObjectInfo, SessionInfo
from faultnet.gcs.resumable import UPLOAD_QUANTUM
from faultnet.gcs.server import GcsServer
from faultnet.gcs.store import Store

__all__ = ["UPLOAD_QUANTUM", "GcsApiError", "GcsServer", "ObjectInfo", "SessionInfo", "Store"]
