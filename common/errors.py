"""Domain errors: logic modules raise these; the servicer turns each into its gRPC status code.

Logic stays free of gRPC: a pipeline says *what* went wrong (the caller's input, a missing thing, a
limit, a dependency) and the message says what to fix; `common.serving.abort_on` maps it.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class; `status` is the name of the grpc.StatusCode it maps to."""

    status = "INTERNAL"


class InvalidArgument(ServiceError):
    status = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    status = "NOT_FOUND"


class ResourceExhausted(ServiceError):
    status = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    status = "UNAVAILABLE"


class DeadlineExceeded(ServiceError):
    status = "DEADLINE_EXCEEDED"


class Internal(ServiceError):
    status = "INTERNAL"


class Cancelled(ServiceError):
    """The caller went away (cancelled, or its deadline passed) before the call was done."""

    status = "CANCELLED"


class FailedPrecondition(ServiceError):
    """The call is well formed but the state it needs is not there (e.g. a database that could not
    be loaded); the message says what state and how to get out of it."""

    status = "FAILED_PRECONDITION"


def quote(value: str | bytes, limit: int = 64) -> str:
    """`value` as a message may show it: its repr, cut to `limit` characters with how long it
    really was ('...'…(N bytes)), so a message never echoes unbounded input."""
    size = len(value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value)
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}…({size} bytes)"
