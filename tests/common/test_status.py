"""Domain errors -> statuses -> what a client reads, over a real server on loopback running the one
interceptor every service runs (common.interceptors), with a tiny generic servicer that raises each
kind of error: the code, the message, the google.rpc details (common.status) and the `retry-after`
trailer, for unary and streamed calls, before and during the stream."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from common.errors import (
    BY_STATUS,
    DOMAIN,
    Cancelled,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from common.interceptors import Call, LayeredInterceptor, add_trailing_metadata
from common.status import details_of, error_from_rpc, to_status

SERVICE = "test.status.Errors"
# What the servicer raises, by the request's bytes (a name of BY_STATUS, or a named case).
RICH = InvalidArgument(
    "requests[3]: box is empty: give x_min < x_max and y_min < y_max",
    violations=[("requests[3]", "box is empty"), ("requests[3].box", "x_min 5 >= x_max 5")],
    quota=[("images", "at most 10000 per stream")],
    info={"stored_images": "3", "stored_products": "2"},
    reason="BAD_BOX",
    retry_after_s=3.0,
)


def _error(name: bytes) -> ServiceError:
    if name == b"rich":
        return RICH
    return BY_STATUS[name.decode()](f"{name.decode().lower()}: what went wrong and how to fix it")


def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    if request == b"plain-abort":
        # A status without details, as a server outside the suite (or grpc itself) sends one.
        context.abort(grpc.StatusCode.ABORTED, "aborted without details")
    raise _error(request)


def _stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield b"first"
    raise _error(request)  # during the stream, after one message


def _client_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    received = list(requests)
    raise ResourceExhausted(
        f"{len(received)} messages; at most 1 per stream", quota=[("messages", "at most 1")], retry_after_s=0.2
    )


@contextlib.contextmanager
def _trailer_layer(call: Call) -> Iterator[None]:
    """Sets a trailer before the method runs, as the telemetry layer sets x-request-id."""
    add_trailing_metadata(call.context, ("x-layer", "kept"))
    yield


@pytest.fixture(scope="module")
def channel() -> Iterator[grpc.Channel]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[LayeredInterceptor([_trailer_layer])])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(_unary),
                    "Stream": grpc.unary_stream_rpc_method_handler(_stream),
                    "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as opened:
        yield opened
    server.stop(None)


def failed(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


@pytest.mark.parametrize("name", sorted(BY_STATUS))
def test_every_error_kind_ends_the_call_with_its_code_message_and_reason(channel, name):
    error = failed(lambda: channel.unary_unary(f"/{SERVICE}/Unary")(name.encode(), timeout=5))
    assert error.code() == getattr(grpc.StatusCode, name)
    assert error.details() == f"{name.lower()}: what went wrong and how to fix it"
    details = details_of(error)
    assert details.reason == BY_STATUS[name].reason == name
    assert (details.info, details.violations, details.quota, details.retry_after_s) == ({}, [], [], None)
    trailers = dict(error.trailing_metadata() or ())
    assert "retry-after" not in trailers and trailers["x-layer"] == "kept"


def test_every_detail_comes_back_as_sent_with_the_retry_after_trailer(channel):
    error = failed(lambda: channel.unary_unary(f"/{SERVICE}/Unary")(b"rich", timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details() == RICH.message
    details = details_of(error)
    assert details.reason == "BAD_BOX"
    assert details.info == {"stored_images": "3", "stored_products": "2"}
    assert details.violations == [("requests[3]", "box is empty"), ("requests[3].box", "x_min 5 >= x_max 5")]
    assert details.quota == [("images", "at most 10000 per stream")]
    assert details.retry_after_s == 3.0
    trailers = dict(error.trailing_metadata())
    assert trailers["retry-after"] == "3"
    assert trailers["x-layer"] == "kept"  # what a layer set before the error stays


def test_the_status_a_server_sends_is_what_to_status_builds(channel):
    error = failed(lambda: channel.unary_unary(f"/{SERVICE}/Unary")(b"rich", timeout=5))
    sent = dict(error.trailing_metadata())["grpc-status-details-bin"]
    expected = to_status(RICH)
    assert sent == dict(expected.trailing_metadata)["grpc-status-details-bin"]
    assert expected.code == grpc.StatusCode.INVALID_ARGUMENT and expected.details == RICH.message


def test_an_error_during_a_stream_ends_it_with_its_details_after_the_messages_sent(channel):
    received = []

    def drain():
        for message in channel.unary_stream(f"/{SERVICE}/Stream")(b"NOT_FOUND", timeout=5):
            received.append(message)

    error = failed(drain)
    assert received == [b"first"]
    assert error.code() == grpc.StatusCode.NOT_FOUND and error.details().startswith("not_found: ")
    assert details_of(error).reason == "NOT_FOUND"


def test_a_client_stream_refusal_carries_quota_and_a_whole_second_retry_after(channel):
    error = failed(lambda: channel.stream_unary(f"/{SERVICE}/ClientStream")(iter([b"a", b"b"]), timeout=5))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error.details() == "2 messages; at most 1 per stream"
    details = details_of(error)
    assert details.quota == [("messages", "at most 1")] and details.retry_after_s == pytest.approx(0.2)
    assert dict(error.trailing_metadata())["retry-after"] == "1"  # never 0: at least a second


def test_a_status_without_details_reads_as_empty_details(channel):
    error = failed(lambda: channel.unary_unary(f"/{SERVICE}/Unary")(b"plain-abort", timeout=5))
    assert error.code() == grpc.StatusCode.ABORTED and error.details() == "aborted without details"
    details = details_of(error)
    assert (details.reason, details.info, details.violations, details.quota) == ("", {}, [], [])


def test_a_dependencys_error_is_re_raised_with_its_code_and_details(channel):
    error = failed(lambda: channel.unary_unary(f"/{SERVICE}/Unary")(b"rich", timeout=5))
    again = error_from_rpc(error, "index at 127.0.0.1:1: " + error.details())
    assert type(again) is InvalidArgument and again.message.endswith(RICH.message)
    assert (again.reason, again.info, again.violations, again.quota, again.retry_after_s) == (
        RICH.reason,
        RICH.info,
        RICH.violations,
        RICH.quota,
        RICH.retry_after_s,
    )
    assert type(error_from_rpc(failed(lambda: channel.unary_unary(f"/{SERVICE}/Unary")(b"NOT_FOUND", timeout=5)))) is (
        NotFound
    )
    assert type(error_from_rpc(failed(lambda: channel.unary_unary(f"/{SERVICE}/Unary")(b"CANCELLED", timeout=5)))) is (
        Cancelled
    )
    # A code with no domain class is the dependency's failure: UNAVAILABLE, with its message.
    aborted = error_from_rpc(failed(lambda: channel.unary_unary(f"/{SERVICE}/Unary")(b"plain-abort", timeout=5)))
    assert type(aborted) is Unavailable and aborted.message == "aborted without details"


def test_the_error_info_names_the_suites_domain(channel):
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    error = failed(lambda: channel.unary_unary(f"/{SERVICE}/Unary")(b"rich", timeout=5))
    status = rpc_status.from_call(error)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info) and info.domain == DOMAIN
