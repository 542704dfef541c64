"""One server interceptor that runs every call through layers (telemetry, auth, limits), in order.

A layer is a function of the call (`Call`) returning a context manager that is entered before the
servicer's method runs and left after it has finished: for a streamed answer, after the last
message. Layers run in the thread that serves the call (grpc calls interceptors in its polling
thread, where neither contextvars nor the caller's identity would reach the method), so a layer
may set context variables, time the call, or refuse it by raising a domain error.

It is the one place where errors become statuses: a `common.errors.ServiceError` raised by a layer
or by the method (or by the logic it calls), before or during a streamed answer, ends the call
with its code, message and google.rpc details (common.status). Servicers never call
`context.abort` themselves. A request that is not a valid protobuf message is INVALID_ARGUMENT
(grpc's own answer is INTERNAL "Exception deserializing request!").
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from common.errors import InvalidArgument, ServiceError
from common.status import abort_with


@dataclass
class Call:
    """What the layers know about one call; layers may add to `principal` and `labels`."""

    method: str
    context: grpc.ServicerContext
    # time.monotonic() when the call reached the server (queue time = start - arrived).
    arrived: float
    # Who is calling: set by the auth layer (a client's name, "internal", or the peer's address).
    principal: str = ""
    labels: dict[str, str] = field(default_factory=dict)


Layer = Callable[[Call], contextlib.AbstractContextManager[None]]

# Methods of grpc's own services: served, metered, but never authenticated or limited.
INFRASTRUCTURE = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def is_infrastructure(method: str) -> bool:
    return method.startswith(INFRASTRUCTURE)


class _Malformed:
    """A request whose bytes did not parse as the method's message."""

    def __init__(self, error: Exception):
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as error:
            return _Malformed(error)

    return deserialize


def _refuse_malformed(method: str, context: grpc.ServicerContext, request: Any) -> None:
    if isinstance(request, _Malformed):
        raise InvalidArgument(
            f"the request is not a valid protobuf message for {method}: "
            f"{str(request.error)[:200]}; send a message generated from the .proto files"
        )


def _checked_stream(method: str, context: grpc.ServicerContext, requests: Iterator[Any]) -> Iterator[Any]:
    for request in requests:
        _refuse_malformed(method, context, request)
        yield request


class LayeredInterceptor(grpc.ServerInterceptor):
    def __init__(self, layers: Sequence[Layer]):
        self.layers = list(layers)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        arrived = time.monotonic()
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        layers = self.layers

        @contextlib.contextmanager
        def around(context: grpc.ServicerContext) -> Iterator[None]:
            call = Call(method, context, arrived)
            with contextlib.ExitStack() as stack:
                try:
                    for layer in layers:
                        stack.enter_context(layer(call))
                    yield
                except ServiceError as error:  # the one place a domain error becomes a status
                    abort_with(context, error)

        deserialize = _tolerant(handler.request_deserializer)
        serialize = handler.response_serializer
        if handler.unary_unary:
            unary_unary = handler.unary_unary

            def run_unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
                with around(context):
                    _refuse_malformed(method, context, request)
                    return unary_unary(request, context)

            return grpc.unary_unary_rpc_method_handler(run_unary_unary, deserialize, serialize)
        if handler.unary_stream:
            unary_stream = handler.unary_stream

            def run_unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                with around(context):
                    _refuse_malformed(method, context, request)
                    yield from unary_stream(request, context)

            return grpc.unary_stream_rpc_method_handler(run_unary_stream, deserialize, serialize)
        if handler.stream_unary:
            stream_unary = handler.stream_unary

            def run_stream_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                with around(context):
                    return stream_unary(_checked_stream(method, context, requests), context)

            return grpc.stream_unary_rpc_method_handler(run_stream_unary, deserialize, serialize)
        stream_stream = handler.stream_stream

        def run_stream_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            with around(context):
                yield from stream_stream(_checked_stream(method, context, requests), context)

        return grpc.stream_stream_rpc_method_handler(run_stream_stream, deserialize, serialize)


def add_trailing_metadata(context: grpc.ServicerContext, *pairs: tuple[str, str]) -> None:
    """Adds to the trailing metadata already set (set_trailing_metadata replaces it)."""
    existing = tuple(context.trailing_metadata() or ())
    context.set_trailing_metadata(existing + tuple(pairs))
