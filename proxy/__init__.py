"""rup's proxy: the trio server, the client library and the ``rup`` command line."""

from proxy.backend import Backend, GcsTarget, open_backend
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
from proxy.config import ServerSettings
from proxy.server import ProxyServer, serve, serve_in_background

__all__ = [
    "Backend",
    "ChecksumMismatchError",
    "ClientSettings",
    "GcsTarget",
    "ProxyServer",
    "ProxyUnreachableError",
    "ReconnectPolicy",
    "ServerSettings",
    "Upload",
    "UploadError",
    "UploadProgress",
    "UploadRejectedError",
    "UploadResult",
    "connect_upload",
    "open_backend",
    "serve",
    "serve_in_background",
    "upload_file",
    "upload_stream",
]
