"""Channels over several replicas (common/channels.py): the target gRPC is given for a list of
addresses, the service config's JSON, and, over loopback against real index shards, what that
config does: round_robin spreads calls, a replica whose health is NOT_SERVING gets none, and an
idempotent call refused UNAVAILABLE by one replica is answered by another."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from common.channels import (
    RETRY_ATTEMPTS,
    balanced_channel,
    balanced_options,
    channel_target,
    service_config,
    split_addresses,
)
from common.config import load_config
from common.serving import ServiceBundle, start_bundle
from index_server.catalogue import Catalogue
from index_server.config import IndexConfig
from index_server.domain import Item
from index_server.replication import ReplicaStatus
from index_server.server import POLICY
from index_server.service import IndexService
from mps.index.v1 import index_pb2, index_pb2_grpc

INDEX = index_pb2.DESCRIPTOR.services_by_name["IndexService"].full_name

# -- targets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "target"),
    [
        ("127.0.0.1:50051", "127.0.0.1:50051"),
        ("localhost:50051", "localhost:50051"),
        ("dns:///detector.internal:50051", "dns:///detector.internal:50051"),
        (" 10.0.0.1:1 ", "10.0.0.1:1"),
        ("10.0.0.1:1,10.0.0.2:1", "ipv4:10.0.0.1:1,10.0.0.2:1"),
        ("10.0.0.1:1, 10.0.0.2:2 ,", "ipv4:10.0.0.1:1,10.0.0.2:2"),
        (["10.0.0.1:1", "10.0.0.2:1"], "ipv4:10.0.0.1:1,10.0.0.2:1"),
        (["localhost:7"], "localhost:7"),
        ("[::1]:5000,[fe80::1]:5000", "ipv6:[::1]:5000,[fe80::1]:5000"),
    ],
)
def test_channel_target(given: str | list[str], target: str) -> None:
    assert channel_target(given) == target


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("", "no address given"),
        (" , ", "no address given"),
        ("a.internal:1,b.internal:1", "several replicas must be given as IP:port"),
        ("10.0.0.1:1,10.0.0.2", "'10.0.0.2' has no port"),
        ("10.0.0.1:1,10.0.0.2:x", "'10.0.0.2:x' has no port"),
        ("10.0.0.1:1,[::1]:1", "mix IPv4 and IPv6"),
    ],
)
def test_channel_target_refuses_what_grpc_cannot_resolve(given: str, says: str) -> None:
    with pytest.raises(ValueError, match=says.replace("[", r"\[").replace("]", r"\]")):
        channel_target(given)


def test_split_addresses() -> None:
    assert split_addresses(" a:1 ,b:2,, ") == ["a:1", "b:2"]
    assert split_addresses(["a:1", " "]) == ["a:1"]


# -- the service config -----------------------------------------------------------------------------


def test_service_config_json() -> None:
    config = service_config("mps.detector.v1.DetectorService", ["Detect", "ListModels"], attempts=3)
    assert config == {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": "mps.detector.v1.DetectorService"},
        "methodConfig": [
            {
                "name": [
                    {"service": "mps.detector.v1.DetectorService", "method": "Detect"},
                    {"service": "mps.detector.v1.DetectorService", "method": "ListModels"},
                ],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.02s",
                    "maxBackoff": "0.2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }


def test_service_config_without_retries_or_health() -> None:
    assert service_config("s.S", [], health=False) == {"loadBalancingConfig": [{"round_robin": {}}]}


@pytest.mark.parametrize("attempts", [0, 1, 6])
def test_service_config_refuses_attempts_grpc_ignores(attempts: int) -> None:
    with pytest.raises(ValueError, match="2 to 5 attempts"):
        service_config("s.S", ["M"], attempts=attempts)


def test_balanced_options_turn_retries_on_for_large_messages() -> None:
    options = dict(balanced_options(INDEX, ["Stats"], 32 << 20))
    assert json.loads(options["grpc.service_config"]) == service_config(INDEX, ["Stats"], RETRY_ATTEMPTS)
    assert options["grpc.enable_retries"] == 1
    # A request larger than the retry buffer is never retried: the buffer holds the largest message.
    assert options["grpc.per_rpc_retry_buffer_size"] == 32 << 20


# -- what it does, over loopback --------------------------------------------------------------------


def _shard(database: str, catching_up: bool = False) -> ServiceBundle:
    """A real index shard holding one deep database named `database`; `catching_up` refuses every
    read UNAVAILABLE while its health still says SERVING (a replica the channel cannot tell apart)."""
    catalogue = Catalogue()
    catalogue.add([Item(database, "item", np.ones(4, np.float32))])
    service = IndexService(catalogue, replica=ReplicaStatus(catching_up=catching_up, source="a test"))
    config = load_config(IndexConfig, "index", environ={}, port=0, data_dir="", access_log=False)
    return start_bundle(
        config, lambda s: index_pb2_grpc.add_IndexServiceServicer_to_server(service, s), [INDEX], policy=POLICY
    )


@pytest.fixture
def shards() -> Iterator[list[ServiceBundle]]:
    started: list[ServiceBundle] = []
    yield started
    for bundle in started:
        bundle.server.stop(None)


def _stats(addresses: list[str], idempotent: list[str], health: bool = True, calls: int = 20) -> list[str]:
    """Stats `calls` times over a balanced channel -> the database each answer names, or the failure."""
    config = load_config(IndexConfig, "index", environ={}, data_dir="")
    with balanced_channel(",".join(addresses), config, INDEX, idempotent, health=health) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        stub = index_pb2_grpc.IndexServiceStub(channel)
        seen = []
        for _ in range(calls):
            try:
                seen.append(stub.Stats(index_pb2.StatsRequest(), timeout=5).databases[0].name)
            except grpc.RpcError as exc:
                seen.append(exc.code().name)
        return seen


def test_round_robin_spreads_calls_over_every_replica(shards: list[ServiceBundle]) -> None:
    shards += [_shard("a.deep"), _shard("b.deep")]
    seen = _stats([f"127.0.0.1:{s.port}" for s in shards], ["Stats"])
    assert set(seen) == {"a.deep", "b.deep"}
    assert 5 <= seen.count("a.deep") <= 15


def test_a_replica_not_serving_gets_no_calls(shards: list[ServiceBundle]) -> None:
    shards += [_shard("refusing.deep", catching_up=True), _shard("good.deep")]
    addresses = [f"127.0.0.1:{s.port}" for s in shards]
    # Without health checking (and without retries) the refusing replica gets its share and fails it.
    assert "UNAVAILABLE" in _stats(addresses, [], health=False)
    shards[0].health.set(INDEX, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert set(_stats(addresses, [])) == {"good.deep"}


def test_an_idempotent_call_refused_unavailable_is_retried_on_another_replica(shards: list[ServiceBundle]) -> None:
    shards += [_shard("refusing.deep", catching_up=True), _shard("good.deep")]
    addresses = [f"127.0.0.1:{s.port}" for s in shards]
    assert set(_stats(addresses, ["Stats"])) == {"good.deep"}
    # The same calls, Stats not listed as idempotent: not retried.
    assert "UNAVAILABLE" in _stats(addresses, ["Search"])


def test_a_replica_gone_leaves_the_other_serving(shards: list[ServiceBundle]) -> None:
    shards += [_shard("a.deep"), _shard("b.deep")]
    addresses = [f"127.0.0.1:{s.port}" for s in shards]
    config = load_config(IndexConfig, "index", environ={}, data_dir="")
    with balanced_channel(addresses, config, INDEX, ["Stats"]) as channel:
        stub = index_pb2_grpc.IndexServiceStub(channel)
        assert stub.Stats(index_pb2.StatsRequest(), timeout=5, wait_for_ready=True).databases
        shards[0].server.stop(None).wait()
        seen = {stub.Stats(index_pb2.StatsRequest(), timeout=5).databases[0].name for _ in range(20)}
    assert seen == {"b.deep"}
