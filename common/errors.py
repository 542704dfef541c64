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
