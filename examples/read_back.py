"""Read an object back from rup's embedded GCS endpoint with google-cloud-storage.

    rup serve --gcs-open              # prints "embedded GCS endpoint http://127.0.0.1:PORT"
    STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT python examples/read_back.py BUCKET OBJECT

Writes the object's bytes to stdout. Without STORAGE_EMULATOR_HOST, give the URL as a third
argument: it goes to ``client_options={"api_endpoint": URL}``.
"""

import sys

from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

bucket_name, object_name, *endpoint = sys.argv[1:]
if endpoint:  # an explicit endpoint, as for any GCS JSON API server
    client = storage.Client(
        project="local",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": endpoint[0]},
    )
else:  # STORAGE_EMULATOR_HOST: google-cloud-storage goes there, without credentials
    client = storage.Client()
blob = client.bucket(bucket_name).blob(object_name)
sys.stdout.buffer.write(blob.download_as_bytes())
