"""Zero-copy, fault-surviving GCS resumable uploads for trio.

See ``docs/reliablewriter.md`` for the design and :func:`open_writer` to start.
"""

from .aio import AsyncWriter, open_async_writer
from .blocking import BlockingWriter, open_blocking_writer
from .cancel import CancelResult, cancel_session
from .composite import (
    DEFAULT_TEMP_PREFIX,
    CompositeSettings,
    CompositeWriter,
    complete_from_temporaries,
    open_composite_writer,
    temporary_name,
)
from .errors import (
    ChecksumMismatchError,
    IncompleteObjectError,
    NonRetryableHTTPError,
    RetriesExhaustedError,
    ServerRegressionError,
    SessionLostError,
    TooFragmentedError,
    UnexpectedResponseError,
    WindowExceededError,
    WriterAbortedError,
    WriterClosedError,
    WriterError,
)
from .fileobj import BlobFile, open_blob
from .handle import ResumeHandle
from .one_request import ObjectRequest, upload_in_one_request
from .results import ObjectInfo, WriterStats
from .settings import CHUNK_QUANTUM, ChecksumMode, KiB, MiB, RetryPolicy, WriterSettings
from .staged import PendingWrite
from .writer import ReliableWriter, open_writer

__all__ = [
    "CHUNK_QUANTUM",
    "DEFAULT_TEMP_PREFIX",
    "AsyncWriter",
    "BlobFile",
    "BlockingWriter",
    "CancelResult",
    "ChecksumMismatchError",
    "ChecksumMode",
    "CompositeSettings",
    "CompositeWriter",
    "IncompleteObjectError",
    "KiB",
    "MiB",
    "NonRetryableHTTPError",
    "ObjectInfo",
    "ObjectRequest",
    "PendingWrite",
    "ReliableWriter",
    "ResumeHandle",
    "RetriesExhaustedError",
    "RetryPolicy",
    "ServerRegressionError",
    "SessionLostError",
    "TooFragmentedError",
    "UnexpectedResponseError",
    "WindowExceededError",
    "WriterAbortedError",
    "WriterClosedError",
    "WriterError",
    "WriterSettings",
    "WriterStats",
    "cancel_session",
    "complete_from_temporaries",
    "open_async_writer",
    "open_blob",
    "open_blocking_writer",
    "open_composite_writer",
    "open_writer",
    "temporary_name",
    "upload_in_one_request",
]
