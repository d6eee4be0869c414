"""The rup client library: upload a file or a stream through the proxy over N connections.

It imports only :mod:`protocol` of rup's packages (an import contract checks it), so a
program that uploads does not load the server, google-cloud-storage or cryptography.
"""

from proxy.client.upload import (
    ChecksumMismatchError,
    ClientSettings,
    Connector,
    ProxyUnreachableError,
    ReconnectPolicy,
    Upload,
    UploadError,
    UploadProgress,
    UploadRejectedError,
    UploadResult,
    connect_upload,
    parse_gs_url,
    parse_proxy_address,
    upload_file,
    upload_stream,
)

__all__ = [
    "ChecksumMismatchError",
    "ClientSettings",
    "Connector",
    "ProxyUnreachableError",
    "ReconnectPolicy",
    "Upload",
    "UploadError",
    "UploadProgress",
    "UploadRejectedError",
    "UploadResult",
    "connect_upload",
    "parse_gs_url",
    "parse_proxy_address",
    "upload_file",
    "upload_stream",
]
