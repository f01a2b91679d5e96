"""Client SDK for the pdserve gateway: ``AsyncClient`` and ``Client`` (blocking).

It needs only grpcio and protobuf (no torch). Failed calls raise the
``pdserve.errors`` class for their status code, e.g. ``InvalidArgument``.
"""

from pdserve.errors import (
    DataLoss,
    DeadlineExceeded,
    InvalidArgument,
    PdserveError,
    ResourceExhausted,
    Unavailable,
)
from pdserve.sdk.client import AsyncClient, Chunk, Client, Completion

__all__ = [
    "AsyncClient",
    "Client",
    "Chunk",
    "Completion",
    "PdserveError",
    "InvalidArgument",
    "ResourceExhausted",
    "Unavailable",
    "DataLoss",
    "DeadlineExceeded",
]
