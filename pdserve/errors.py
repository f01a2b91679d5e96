"""The exception hierarchy shared by every pdserve process.

Each class names the one gRPC status code it maps to (``pdserve.rpc`` does the
mapping at the server edge, the SDK maps codes back). This module imports
neither grpc nor torch.
"""

from __future__ import annotations


class PdserveError(Exception):
    """Base class; ``status`` is the gRPC status code name."""

    status = "INTERNAL"


class InvalidArgument(PdserveError):
    """The request broke a limit; the message names the field and the limit."""

    status = "INVALID_ARGUMENT"


class NotFound(PdserveError):
    """An id (request, transfer) the server does not know."""

    status = "NOT_FOUND"


class ResourceExhausted(PdserveError):
    """The server is full; retrying later may succeed, ``retry_after_ms`` says when (None: no estimate)."""

    status = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class FailedPrecondition(PdserveError):
    """The server is not in a state to do this (e.g. a GPU-only call on a CPU instance)."""

    status = "FAILED_PRECONDITION"


class Unavailable(PdserveError):
    """No instance can serve the request now."""

    status = "UNAVAILABLE"


class DataLoss(PdserveError):
    """A KV transfer was corrupt or incomplete."""

    status = "DATA_LOSS"


class Cancelled(PdserveError):
    """The request was cancelled."""

    status = "CANCELLED"


class DeadlineExceeded(PdserveError):
    """The request ran out of time."""

    status = "DEADLINE_EXCEEDED"


class Unauthenticated(PdserveError):
    """The caller did not prove who it is (no API key, a wrong one, no client certificate)."""

    status = "UNAUTHENTICATED"


class Internal(PdserveError):
    """A bug or an unexpected failure inside a service."""

    status = "INTERNAL"


BY_STATUS: dict[str, type[PdserveError]] = {
    cls.status: cls
    for cls in (
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        FailedPrecondition,
        Unavailable,
        DataLoss,
        Cancelled,
        DeadlineExceeded,
        Unauthenticated,
        Internal,
    )
}


def error_for_status(status: str, message: str, retry_after_ms: int | None = None) -> PdserveError:
    """The exception for a status code name (``PdserveError`` for unmapped codes)."""
    cls = BY_STATUS.get(status, PdserveError)
    err = cls(message, retry_after_ms) if cls is ResourceExhausted else cls(message)
    if cls is PdserveError:
        err.status = status
    return err
