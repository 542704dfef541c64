"""Domain errors: logic modules raise these, and one server interceptor (common.interceptors) turns
each into its gRPC status, with its details as `google.rpc` messages (common.status).

Logic stays free of gRPC: a module says *what* went wrong (the caller's input, a missing thing, a
limit, a dependency) and the message says what to fix. Where a client can act on more than the
message, the error carries it as structured details:
- `violations`: the request fields at fault (`google.rpc.BadRequest`), e.g. ("items[3].box", "...");
- `quota`: the limits exceeded (`google.rpc.QuotaFailure`), e.g. ("top_k", "at most 1000");
- `info`: machine-readable facts (`google.rpc.ErrorInfo` metadata), e.g. {"stored_images": "12"} for
  an ingestion that stored 12 images before the one refused;
- `retry_after_s`: when a retry may succeed (`google.rpc.RetryInfo`, also the `retry-after` header).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# google.rpc.ErrorInfo.domain of every error this suite raises.
DOMAIN = "mps.visual-search"


class ServiceError(Exception):
    """Base class; `status` is the name of the grpc.StatusCode it maps to, `reason` the
    ErrorInfo reason (UPPER_SNAKE_CASE) a client may branch on."""

    status = "INTERNAL"
    reason = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        violations: Sequence[tuple[str, str]] = (),
        quota: Sequence[tuple[str, str]] = (),
        info: Mapping[str, str] | None = None,
        reason: str | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.violations = list(violations)
        self.quota = list(quota)
        self.info = dict(info or {})
        if reason is not None:
            self.reason = reason
        self.retry_after_s = retry_after_s

    def reworded(self, message: str) -> ServiceError:
        """An error of the same kind (its nearest class taking the common arguments, e.g.
        FailedPrecondition for a BrokenDatabase) and details, with another message (e.g. one
        naming the item)."""
        kind = next(c for c in type(self).__mro__ if c is ServiceError or "__init__" not in vars(c))
        again = kind(
            message,
            violations=self.violations,
            quota=self.quota,
            info=self.info,
            reason=self.reason,
            retry_after_s=self.retry_after_s,
        )
        return again


class InvalidArgument(ServiceError):
    status = reason = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    status = reason = "NOT_FOUND"


class ResourceExhausted(ServiceError):
    status = reason = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    status = reason = "UNAVAILABLE"


class DeadlineExceeded(ServiceError):
    status = reason = "DEADLINE_EXCEEDED"


class Internal(ServiceError):
    status = reason = "INTERNAL"


class Cancelled(ServiceError):
    """The caller went away (cancelled, or its deadline passed) before the call was done."""

    status = reason = "CANCELLED"


class FailedPrecondition(ServiceError):
    """The call is well formed but the state it needs is not there (e.g. a database that could not
    be loaded); the message says what state and how to get out of it."""

    status = reason = "FAILED_PRECONDITION"


class Unimplemented(ServiceError):
    """The method exists in the contract but not on this server (e.g. a shard's RPC on a router)."""

    status = reason = "UNIMPLEMENTED"


class Unauthenticated(ServiceError):
    status = reason = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    status = reason = "PERMISSION_DENIED"


# By status name, for errors that come back from another service (common.status.error_from_rpc).
BY_STATUS: dict[str, type[ServiceError]] = {
    cls.status: cls
    for cls in (
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Internal,
        Cancelled,
        FailedPrecondition,
        Unimplemented,
        Unauthenticated,
        PermissionDenied,
    )
}


def quote(value: str | bytes, limit: int = 64) -> str:
    """`value` as a message may show it: its repr, cut to `limit` characters with how long it
    really was ('...'…(N bytes)), so a message never echoes unbounded input."""
    size = len(value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value)
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}…({size} bytes)"
