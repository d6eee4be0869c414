"""rup's proxy: the trio server, the client library and the ``rup`` command line."""

# -- client library (proxy.client, proxy.blocking) ------------------------------------------
from proxy.client import (
    ChecksumMismatchError,
    ClientSettings,
    ProxyUnreachableError,
    ReconnectPolicy,
    Upload,
    UploadError,
    UploadProgress,
    UploadRejectedError,
    UploadResult,
    connect_upload,
    upload_file,
    upload_stream,
)

__all__ = [
    "ChecksumMismatchError",
    "ClientSettings",
    "ProxyUnreachableError",
    "ReconnectPolicy",
    "Upload",
    "UploadError",
    "UploadProgress",
    "UploadRejectedError",
    "UploadResult",
    "connect_upload",
    "upload_file",
    "upload_stream",
]
