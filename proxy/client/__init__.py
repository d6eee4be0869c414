"""The rup client library: upload a file or a stream through the proxy over N connections.

It imports only :mod:`protocol` of rup's packages (an import contract checks it), so a
program that uploads does not load the server, google-cloud-storage or cryptography.
:mod:`proxy.client.blocking` has the same entry points for code without trio.

Modules, one job each: ``api`` (entry points), ``upload`` (the caller's handle),
``lifecycle`` (the state table), ``transfer`` (connection slots), ``channel`` (one
connection), ``ledger`` (byte bookkeeping), ``sources`` (file and stream data),
``settings`` (policy and options), ``results``, ``names`` and ``errors``.
"""

from proxy.client.api import connect_upload, upload_file, upload_stream
from proxy.client.errors import (
    ChecksumMismatchError,
    ProxyUnreachableError,
    UploadError,
    UploadRejectedError,
)
from proxy.client.lifecycle import UploadState
from proxy.client.names import ProxyTarget, parse_gs_url, parse_proxy_address, proxy_addresses
from proxy.client.results import UploadProgress, UploadResult
from proxy.client.settings import ClientSettings, Connector, RetryPolicy, UploadOptions
from proxy.client.upload import Upload

__all__ = [
    "ChecksumMismatchError",
    "ClientSettings",
    "Connector",
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
    "parse_gs_url",
    "parse_proxy_address",
    "proxy_addresses",
    "upload_file",
    "upload_stream",
]
