"""The rup server: accepts client connections and streams each upload into GCS."""

from proxy.server.backend import Backend, GcsTarget, open_backend
from proxy.server.server import ProxyServer, serve, serve_in_background
from proxy.server.settings import ServerSettings

__all__ = [
    "Backend",
    "GcsTarget",
    "ProxyServer",
    "ServerSettings",
    "open_backend",
    "serve",
    "serve_in_background",
]
