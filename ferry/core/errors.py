"""One exception tree for every Ferry service, each class carrying its gRPC status.

Servicers only raise; one server interceptor (``ferry.core.grpcserver``) turns a
``FerryError`` into its status and message, and anything else into INTERNAL with
a generic message while the details go to the log. The client turns statuses
back into the same classes, so a caller catches ``NotFound`` whether the error
was raised locally or three hops away.

    FerryError
    ├── InvalidArgument      INVALID_ARGUMENT   bad shape, dtype, name, spec
    ├── NotFound             NOT_FOUND          unknown model, version, job
    ├── AlreadyExists        ALREADY_EXISTS
    ├── FailedPrecondition   FAILED_PRECONDITION  job not finished, checkpoint missing
    ├── Unavailable          UNAVAILABLE        model not ready, no healthy worker, draining
    ├── ResourceExhausted    RESOURCE_EXHAUSTED queue full, over a size or rate limit
    ├── DeadlineExceeded     DEADLINE_EXCEEDED
    ├── Cancelled            CANCELLED
    ├── Unauthenticated      UNAUTHENTICATED
    ├── PermissionDenied     PERMISSION_DENIED
    ├── Unimplemented        UNIMPLEMENTED
    └── Internal             INTERNAL
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

import grpc

# The trailing-metadata key that carries an error's ``reason``: a decision a caller acts on
# (retry elsewhere or not) travels as data, never as a prefix of the message.
REASON_KEY = "ferry-error-reason"


class FerryError(Exception):
    """Base of every error Ferry raises on purpose; ``code`` is what the caller sees, ``reason``
    (when set) a machine-readable refinement sent beside it."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    reason: str = ""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(FerryError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(FerryError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(FerryError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(FerryError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(FerryError):
    code = grpc.StatusCode.UNAVAILABLE


class ModelUnavailable(Unavailable):
    """The worker is fine but this model (or version) cannot serve here now: loading, unloading,
    failed. A gateway does not count it against the worker's health."""

    reason = "model-unavailable"


class ResourceExhausted(FerryError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


# A write that failed for want of space: the disk (ENOSPC) or the writer's quota (EDQUOT).
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def store_full(err: BaseException, where: str | os.PathLike[str]) -> ResourceExhausted | None:
    """The RESOURCE_EXHAUSTED for a write into the store at ``where`` that failed with ENOSPC or
    EDQUOT, or None for any other error. The one place a full disk gets its message."""
    if not isinstance(err, OSError) or err.errno not in DISK_FULL_ERRNOS:
        return None
    name = errno.errorcode[err.errno]
    return ResourceExhausted(
        f"the store at {os.fspath(where)} is full: {err.strerror or os.strerror(err.errno)} ({name}); "
        "nothing was kept, free space and retry"
    )


@contextlib.contextmanager
def store_full_is_exhausted(where: str | os.PathLike[str]) -> Iterator[None]:
    """Turn ENOSPC / EDQUOT raised inside the block into ``store_full``'s ResourceExhausted."""
    try:
        yield
    except OSError as err:
        full = store_full(err, where)
        if full is None:
            raise
        raise full from err


class DeadlineExceeded(FerryError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(FerryError):
    code = grpc.StatusCode.CANCELLED


class Unauthenticated(FerryError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(FerryError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unimplemented(FerryError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(FerryError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[FerryError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Unavailable,
        ResourceExhausted,
        DeadlineExceeded,
        Cancelled,
        Unauthenticated,
        PermissionDenied,
        Unimplemented,
        Internal,
    )
}


def error_for_status(code: grpc.StatusCode, message: str, reason: str = "") -> FerryError:
    """The Ferry exception a client raises for a status (and reason) a server answered."""
    cls = ModelUnavailable if reason == ModelUnavailable.reason else _BY_CODE.get(code, FerryError)
    err = cls(message)
    if cls is FerryError:
        err.code = code
    return err


# Each status's HTTP twin, for the REST front door (the KServe v2 REST protocol's choices where
# it names one: 400 for a bad request, 404 for an unknown model). 499 is the de facto "client
# closed the request"; it is only ever logged, the client is gone.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status that answers a call which would have ended with ``code`` over gRPC."""
    return HTTP_STATUS.get(code, 500)
