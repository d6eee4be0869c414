"""The rup client library: upload a file or a stream through the proxy over N connections.

It imports only :mod:`protocol` of rup's packages (an import contract checks it), so a
program that uploads does not load the server, google-cloud-storage or cryptography.
:mod:`proxy.client.blocking` has the same entry points for code without trio.

Modules, one job each: ``api`` (entry points), ``upload`` (the caller's handle),
``lifecycle`` (the state table), ``transfer`` (connection slots), ``channel`` (one
connection), ``ledger`` (byte bookkeeping), ``sources`` (file and stream data),
``settings`` (policy and options), ``results``, ``names`` and ``errors``; ``pool`` (negotiated
connections kept across uploads) and ``many`` (one-request uploads of small objects and
:func:`upload_many`); ``composite`` (an upload the proxy stores as segments, then composes).
"""

from proxy.client.api import connect_upload, upload_file, upload_stream
from proxy.client.composite import CompositeUpload
from proxy.client.errors import (
    ChecksumMismatchError,
    ProxyUnreachableError,
    UploadError,
    UploadRejectedError,
)
from proxy.client.lifecycle import UploadState
from proxy.client.many import Outcome, put_bytes, put_file, upload_many
from proxy.client.names import ProxyTarget, parse_gs_url, parse_proxy_address, proxy_addresses
from proxy.client.pool import ConnectionPool, open_connection_pool
from proxy.client.results import UploadProgress, UploadResult
from proxy.client.settings import ClientSettings, Connector, RetryPolicy, UploadOptions
from proxy.client.upload import Upload

__all__ = [
    "ChecksumMismatchError",
    "ClientSettings",
    "CompositeUpload",
    "ConnectionPool",
    "Connector",
    "Outcome",
    "ProxyTarget",
    "ProxyUnreachableError",
    "RetryPolicy",
    "Upload",
    "UploadError",
    "UploadOptions",
    "UploadProgress",
    "UploadRejectedError",
    "UploadResult",
    "UploadState",
    "connect_upload",
    "open_connection_pool",
    "parse_gs_url",
    "parse_proxy_address",
    "proxy_addresses",
    "put_bytes",
    "put_file",
    "upload_file",
    "upload_many",
    "upload_stream",
]
