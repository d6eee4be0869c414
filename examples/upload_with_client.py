"""Upload a file through a running ``rup serve`` with rup's client library.

    rup serve                       # listens on 127.0.0.1:7400
    python examples/upload_with_client.py big.iso gs://bucket/big.iso

``RUP_PROXY`` (default 127.0.0.1:7400) says where the proxy listens, ``RUP_AUTH_TOKEN`` the
bearer token it wants, if any. The async API (``proxy.client.upload_file``) takes the same
arguments; this is its blocking twin.
"""

import os
import sys

from proxy.client import ClientSettings, UploadOptions
from proxy.client.blocking import upload_file

path, url = sys.argv[1:3]
options = UploadOptions(
    proxy=os.environ.get("RUP_PROXY", "127.0.0.1:7400"),
    auth=os.environ.get("RUP_AUTH_TOKEN", ""),
    settings=ClientSettings(connections=4),
)
result = upload_file(path, url, options)
print(f"stored {url}: {result.size} bytes, generation {result.generation}")
