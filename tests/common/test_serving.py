"""Server options every service shares: connections closed after max_connection_age_s, so clients
look the name up again (and reach replicas added since) while calls in flight finish."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from common.config import ServerConfig
from common.serving import connection_age_options, start_bundle

METHOD = "/test.Peer/Who"


def _peer_service(server: grpc.Server) -> None:
    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(float(request.decode() or 0))
        return context.peer().encode()

    handler = grpc.unary_unary_rpc_method_handler(who)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Peer", {"Who": handler})])


def test_connections_are_recycled_and_calls_in_flight_finish():
    bundle = start_bundle(
        ServerConfig(port=0, max_connection_age_s=0.5, access_log=False), _peer_service, [], name="test"
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{bundle.port}") as channel:
            who = channel.unary_unary(METHOD)
            first = who(b"0", timeout=10)
            with ThreadPoolExecutor(1) as pool:
                slow = pool.submit(who, b"1.5", timeout=10)  # outlives the connection's age
                time.sleep(1.0)
                later = who(b"0", timeout=10)
                assert slow.result() == first  # finished on the old connection
            assert later != first  # a new connection (another client port)
    finally:
        bundle.server.stop(None)


def test_no_age_for_zero():
    assert connection_age_options(0) == []
    assert connection_age_options(300) == [("grpc.max_connection_age_ms", 300_000)]
