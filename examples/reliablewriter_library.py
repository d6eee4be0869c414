"""Write an object with ReliableWriter, the fault-surviving resumable writer, from Python.

    STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT python examples/reliablewriter_library.py \
        BUCKET OBJECT < data

Reads stdin in 1 MiB pieces and writes them in order; closing the writer completes the
object. With real GCS, drop STORAGE_EMULATOR_HOST and use your usual credentials.
"""

import sys

from google.cloud import storage

from reliablewriter import open_blocking_writer

bucket_name, object_name = sys.argv[1:3]
bucket = storage.Client().bucket(bucket_name)
with open_blocking_writer(bucket, object_name) as writer:
    while piece := sys.stdin.buffer.read(1024 * 1024):
        writer.write(piece)
    info = writer.close()  # completes the object (leaving the block would too)
print(f"stored {info.size} bytes, generation {info.generation}")
