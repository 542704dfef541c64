"""A cancelled Add stream stores nothing, on a shard and through the router, over loopback.

How grpc python shows a client's cancel to a stream-unary servicer, measured here rather than
assumed: the request iterator either raises grpc.RpcError or simply ends as after a normal end of
the stream, with context.is_active() still True for a moment (common/streams.py); the shard must not
take the second for a completed stream (common.streams.client_stream raises Cancelled for both).
"""

import threading
import time
from collections import Counter
from concurrent import futures

import grpc
import numpy as np
import pytest

from common.config import load_config
from common.streams import StreamEnd
from index_server.config import IndexConfig
from index_server.server import create_bundle
from mps.index.v1 import index_pb2, index_pb2_grpc
from tests.index_server.helpers import Cluster, add_request, random_bags


def cancel_mid_stream(call, items, trial: int, after: int = 5) -> None:
    """Starts a stream of `items`, cancels it once `after` were sent (varying the moment)."""
    sent = threading.Event()

    def requests():
        for number, item in enumerate(items):
            if number == after:
                sent.set()
                time.sleep(0.02 if trial % 2 else 0.0005)
            yield item
        time.sleep(30)  # never half-closes: the stream is still open when it is cancelled

    future = call.future(requests(), timeout=20)
    assert sent.wait(10)
    time.sleep(0.002 * (trial % 4))
    future.cancel()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()


def test_grpc_ends_or_raises_a_cancelled_request_stream_and_stream_end_tells_them_apart():
    seen: list[tuple[str, bool]] = []

    def handler(request_iterator, context):
        end = StreamEnd(context)
        how = "ended"
        try:
            for _ in request_iterator:
                pass
        except grpc.RpcError:
            how = "raised"
        seen.append((how, end.completed(0.005)))
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("t.T", {"Add": grpc.stream_unary_rpc_method_handler(handler)}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        call = channel.stream_unary("/t.T/Add")
        for trial in range(40):
            cancel_mid_stream(call, [b"x"] * 10, trial)
        deadline = time.monotonic() + 5
        while len(seen) < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(seen) == 40
        # Either way, never taken for a completed stream; "ended" is the case is_active() alone misses.
        assert {completed for _, completed in seen} == {False}, Counter(seen)
        assert {how for how, _ in seen} <= {"raised", "ended"}
        seen.clear()
        for _ in range(5):
            call(iter([b"x"] * 3), timeout=5)
        assert seen == [("ended", True)] * 5
    finally:
        channel.close()
        server.stop(None)


def test_a_cancelled_add_stores_nothing_on_a_shard(tmp_path):
    bundle = create_bundle(load_config(IndexConfig, "index", environ={}, port=0, data_dir=str(tmp_path)))
    channel = grpc.insecure_channel(f"127.0.0.1:{bundle.port}")
    stub = index_pb2_grpc.IndexServiceStub(channel)
    rng = np.random.default_rng(0)
    try:
        for trial in range(30):
            cancel_mid_stream(
                stub.Add, [add_request(f"i{trial}-{n}", "cancelled", rng.normal(size=8)) for n in range(20)], trial
            )
        time.sleep(0.3)  # whatever the shard would do with them, it has done
        assert list(stub.Stats(index_pb2.StatsRequest(), timeout=5).databases) == []
        done = stub.Add(iter([add_request(f"j{n}", "cancelled", rng.normal(size=8)) for n in range(20)]), timeout=5)
        assert done.added == 20
    finally:
        channel.close()
        bundle.server.stop(None)
        bundle.on_stop()
    # And nothing of the cancelled streams is in the log either: a restart holds the 20.
    bundle = create_bundle(load_config(IndexConfig, "index", environ={}, port=0, data_dir=str(tmp_path)))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{bundle.port}") as channel:
            held = index_pb2_grpc.IndexServiceStub(channel).Stats(index_pb2.StatsRequest(), timeout=5).databases
            assert [(d.name, d.items) for d in held] == [("cancelled", 20)]
    finally:
        bundle.server.stop(None)
        bundle.on_stop()


@pytest.mark.parametrize("layout", ["item", "word"])
def test_a_cancelled_add_through_the_router_stores_nothing_on_any_shard(layout):
    cluster = Cluster(layout, shards=2, replicas=2)
    rng = np.random.default_rng(1)
    try:
        for trial in range(12):
            bags = random_bags(rng, 10, 500)
            items = [add_request(f"b{trial}-{n}", "bags", bag) for n, bag in enumerate(bags)] + [
                add_request(f"d{trial}-{n}", "dense", rng.normal(size=8)) for n in range(10)
            ]
            rng.shuffle(items)
            cancel_mid_stream(cluster.stub.Add, items, trial, after=12)
        time.sleep(0.5)
        for replicas in cluster.addresses:
            for address in replicas:
                assert list(cluster.direct(address).Stats(index_pb2.StatsRequest(), timeout=5).databases) == []
        done = cluster.stub.Add(iter([add_request("kept", "bags", random_bags(rng, 1, 500)[0])]), timeout=5)
        assert (done.added, done.replaced) == (1, 0)
    finally:
        cluster.close()
