"""Helpers to call a servicer in-process through grpcio-testing."""

from __future__ import annotations

from typing import Any

import grpc
import grpc_testing

from common.errors import ServiceError


class _Mapped:
    """The servicer, with a ServiceError raised by a method ending the call with its code and
    message, as the server's interceptor does (grpcio-testing runs no interceptor; the google.rpc
    details are the interceptor's own tests' business)."""

    def __init__(self, servicer: Any):
        self._servicer = servicer

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._servicer, name)

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return method(request, context)
            except ServiceError as error:
                # Not context.abort: grpcio-testing's raises a bare Exception and logs it as a crash.
                context.set_code(getattr(grpc.StatusCode, error.status))
                context.set_details(error.message)
                return None

        return call


def unary(servicer: Any, service_descriptor: Any, method: str, request: Any, timeout: float = 10.0) -> tuple:
    """Invokes one unary RPC -> (response, code, details)."""
    server = grpc_testing.server_from_dictionary(
        {service_descriptor: _Mapped(servicer)}, grpc_testing.strict_real_time()
    )
    rpc = server.invoke_unary_unary(service_descriptor.methods_by_name[method], (), request, timeout)
    response, _, code, details = rpc.termination()
    return response, code, details
