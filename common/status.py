"""Domain errors <-> gRPC statuses with `google.rpc` details (grpc's examples/python/errors).

The server side (`abort_with`) is called by the one interceptor every service runs
(common.interceptors); the client side (`details_of`, `error_from_rpc`) lets a caller read the
details, and a proxy (the router, the gateway) pass on a dependency's refusal as its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from common.errors import BY_STATUS, DOMAIN, ServiceError, Unavailable


def to_status(error: ServiceError) -> grpc.Status:
    """The error as a grpc.Status: its code, its message, and a google.rpc.Status in the
    `grpc-status-details-bin` trailer holding ErrorInfo, then BadRequest, QuotaFailure and
    RetryInfo where the error has them."""
    details = [error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.info)]
    if error.violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in error.violations
                ]
            )
        )
    if error.quota:
        details.append(
            error_details_pb2.QuotaFailure(
                violations=[error_details_pb2.QuotaFailure.Violation(subject=s, description=d) for s, d in error.quota]
            )
        )
    if error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for detail in details:
        message = any_pb2.Any()
        message.Pack(detail)
        packed.append(message)
    status = status_pb2.Status(code=getattr(code_pb2, error.status), message=error.message, details=packed)
    return rpc_status.to_status(status)


def abort_with(context: grpc.ServicerContext, error: ServiceError) -> NoReturn:
    """Ends the call with the error's status and details (raises, as context.abort does)."""
    status = to_status(error)
    retry = () if error.retry_after_s is None else (("retry-after", str(max(1, round(error.retry_after_s)))),)
    # Not context.abort_with_status: it replaces the trailing metadata set so far (x-request-id...).
    existing = tuple(context.trailing_metadata() or ())
    context.set_trailing_metadata((*existing, *retry, *status.trailing_metadata))
    context.abort(status.code, status.details)
    raise AssertionError("unreachable: abort raises")  # grpc types it as returning None


@dataclass
class Details:
    """What a client can read from a failed call beyond its code and message."""

    reason: str = ""
    info: dict[str, str] = field(default_factory=dict)
    violations: list[tuple[str, str]] = field(default_factory=list)
    quota: list[tuple[str, str]] = field(default_factory=list)
    retry_after_s: float | None = None


def details_of(error: grpc.RpcError) -> Details:
    """The google.rpc details of a failed call (empty when the server sent none)."""
    found = Details()
    status = rpc_status.from_call(error)
    if status is None:
        return found
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            found.reason, found.info = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.violations = [(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quota = error_details_pb2.QuotaFailure()
            detail.Unpack(quota)
            found.quota = [(v.subject, v.description) for v in quota.violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            found.retry_after_s = retry.retry_delay.ToNanoseconds() / 1e9
    return found


def error_from_rpc(error: grpc.RpcError, message: str | None = None) -> ServiceError:
    """A dependency's failed call as this service's own error: the same code and details, with
    `message` (default: the dependency's) in place of its message. A code with no domain class
    (UNKNOWN, ABORTED...) becomes UNAVAILABLE: the dependency failed, not the caller."""
    code = error.code()
    text = error.details() if message is None else message
    kind = BY_STATUS.get(code.name if code is not None else "", Unavailable)
    details = details_of(error)
    return kind(
        text or "",
        violations=details.violations,
        quota=details.quota,
        info=details.info,
        retry_after_s=details.retry_after_s,
        **({"reason": details.reason} if details.reason else {}),
    )
