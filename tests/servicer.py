"""Helpers to call a servicer in-process through grpcio-testing."""

from __future__ import annotations

import grpc_testing


def unary(servicer, service_descriptor, method: str, request, timeout: float = 10.0):
    """Invokes one unary RPC -> (response, code, details)."""
    server = grpc_testing.server_from_dictionary({service_descriptor: servicer}, grpc_testing.strict_real_time())
    rpc = server.invoke_unary_unary(service_descriptor.methods_by_name[method], (), request, timeout)
    response, _, code, details = rpc.termination()
    return response, code, details
