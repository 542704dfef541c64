"""Request ids across the services, structured log lines, and the Prometheus metrics endpoint."""

from __future__ import annotations

import json
import logging
import time
import urllib.request

import grpc
import numpy as np
import pytest

from common.config import load_config
from common.proto_convert import dense_to_proto
from common.telemetry import ContextThreadPoolExecutor, current_request_id, request_id_scope, setup_logging
from gateway.client import VisualSearchClient
from index_server.config import IndexConfig
from index_server.server import create_server
from mps.common.v1 import common_pb2
from mps.index.v1 import index_pb2, index_pb2_grpc
from tests.helpers import free_port


def test_the_request_id_reaches_every_service_and_comes_back(suite, coffee_png, caplog):
    caplog.set_level(logging.INFO, logger="mps.access")
    with VisualSearchClient(suite.addresses["gateway"], request_id="trace-me-42") as client:
        call = client._stub.MultiProductSearch.with_call  # the trailing metadata too
        from mps.gateway.v1 import gateway_pb2

        _, rpc = call(
            gateway_pb2.MultiProductSearchRequest(image=common_pb2.Image(encoded=coffee_png), top_k=1), timeout=60
        )
    assert dict(rpc.trailing_metadata())["x-request-id"] == "trace-me-42"
    methods = {
        r.fields["method"]
        for r in caplog.records
        if r.name == "mps.access" and getattr(r, "request_id", "") == "trace-me-42"
    }
    services = {method.split("/")[1] for method in methods}
    assert {
        "mps.gateway.v1.VisualSearchService",
        "mps.detector.v1.DetectorService",
        "mps.signature.v1.SignatureService",
    } <= services, methods


def test_a_call_without_a_request_id_gets_a_fresh_one(suite):
    with grpc.insecure_channel(suite.addresses["index"]) as channel:
        _, first = index_pb2_grpc.IndexServiceStub(channel).Stats.with_call(index_pb2.StatsRequest(), timeout=5)
        _, second = index_pb2_grpc.IndexServiceStub(channel).Stats.with_call(
            index_pb2.StatsRequest(), timeout=5, metadata=[("x-request-id", "bad id with spaces")]
        )
    ids = [dict(rpc.trailing_metadata())["x-request-id"] for rpc in (first, second)]
    assert all(len(i) == 32 for i in ids) and ids[0] != ids[1]  # an unsafe id is replaced


def test_pool_tasks_keep_the_submitters_request_id():
    with ContextThreadPoolExecutor(2) as pool, request_id_scope("abc"):
        assert pool.submit(current_request_id).result() == "abc"
    assert current_request_id() == ""


def test_json_log_lines_carry_service_and_request_id(capfd):
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup_logging("index", "INFO", "json")
        with request_id_scope("r-1"):
            logging.getLogger("x").info("hello %s", "world", extra={"fields": {"items": 3}})
        line = json.loads(capfd.readouterr().err.strip().splitlines()[-1])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert line["service"] == "index" and line["request_id"] == "r-1" and line["message"] == "hello world"
    assert line["items"] == 3 and line["level"] == "INFO"


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels} in the metrics")


def test_metrics_port_serves_rpc_counts_latency_and_index_items():
    port = free_port()
    server, grpc_port = create_server(
        load_config(IndexConfig, "index", environ={}, port=0, data_dir="", metrics_port=port)
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            index = index_pb2_grpc.IndexServiceStub(channel)
            before = scrape(port)
            index.Add(
                iter(
                    [
                        index_pb2.AddRequest(
                            item_id=f"i{i}", database="shoes", signature=dense_to_proto(np.ones(4, np.float32))
                        )
                        for i in range(3)
                    ]
                ),
                timeout=10,
            )
            index.Stats(index_pb2.StatsRequest(), timeout=5)
            with pytest.raises(grpc.RpcError) as error:
                list(index.Search(index_pb2.SearchRequest(database="missing"), timeout=5))
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
            assert error.value.details().startswith("database 'missing' does not exist on this shard")
            text = scrape(port)
        labels = {"server": "index", "grpc_service": "mps.index.v1.IndexService"}
        ok = sample(text, "grpc_server_handled_total", grpc_method="Stats", grpc_code="OK", **labels)
        assert ok >= 1 and (
            ("Stats" not in before)
            or ok > sample(before, "grpc_server_handled_total", grpc_method="Stats", grpc_code="OK", **labels) - 1
        )
        assert sample(text, "grpc_server_handled_total", grpc_method="Search", grpc_code="NOT_FOUND", **labels) >= 1
        assert sample(text, "grpc_server_handling_seconds_count", grpc_method="Stats", **labels) >= 1
        assert "process_resident_memory_bytes" in text
        assert sample(text, "mps_index_items", database="shoes") == 3
    finally:
        server.stop(None)


def test_the_router_exports_each_replicas_health():
    from index_server.config import RouterConfig
    from index_server.server import create_router_bundle

    shard, shard_port = create_server(load_config(IndexConfig, "index", environ={}, port=0, data_dir=""))
    dead = f"127.0.0.1:{free_port()}"
    metrics = free_port()
    router = create_router_bundle(
        load_config(
            RouterConfig, "router", environ={}, port=0, metrics_port=metrics, shards=[[f"127.0.0.1:{shard_port}", dead]]
        )
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            text = scrape(metrics)
            try:
                if sample(text, "mps_router_replica_up", replica=f"127.0.0.1:{shard_port}") == 1:
                    break
            except AssertionError:
                pass
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        assert sample(text, "mps_router_replica_up", shard="0", replica=dead) == 0
    finally:
        router.server.stop(None)
        router.on_stop()
        shard.stop(None)
