"""Replicas that heal: a replica killed while writes go on copies a fellow replica on return, serves
no reads until it has, and holds every write (and delete) made while it was down; the copy is
streamed in bounded chunks; the router's writes succeed while one replica is down."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.bow_codec import BagOfWords
from common.config import REPO_ROOT, load_config
from common.proto_convert import dense_to_proto
from index_server.catalogue import Catalogue
from index_server.config import IndexConfig
from index_server.domain import item_key
from index_server.replication import IncompleteCopy, WriteTracker, receive_copy, replication_stream
from index_server.server import create_bundle
from mps.index.v1 import index_pb2, index_pb2_grpc
from tests.helpers import free_port
from tests.index_server.helpers import Cluster, add_request, bow, item, search, search_batch

DIMENSION = 32
VOCABULARY = 500
SERVICE = "mps.index.v1.IndexService"


def vectors(seed: int, count: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, DIMENSION)).astype(np.float32)


def bags(seed: int, count: int) -> list[BagOfWords]:
    rng = np.random.default_rng(seed)
    return [BagOfWords.from_words(rng.integers(0, VOCABULARY, 30), VOCABULARY, 3) for _ in range(count)]


def top_ids(stub, database: str, queries: np.ndarray, top_k: int = 1) -> list[list[str]]:
    """Each query's top-k ids on `stub`, in SearchBatch calls of at most 200 queries."""
    found = []
    for start in range(0, len(queries), 200):
        response = search_batch(stub, database, [dense_to_proto(q) for q in queries[start : start + 200]], top_k=top_k)
        found += [[i.item_id for i in hits.items] for hits in response.results]
    return found


def looked_up(stub, ids: list[str]) -> set[str]:
    response = stub.Lookup(index_pb2.LookupRequest(database="bags", keys=[item_key(i) for i in ids]), timeout=10)
    return {i.item_id for i in response.items}


def health(address: str, service: str = SERVICE) -> int | None:
    """The replica's health for `service`, or None when it does not answer."""
    with grpc.insecure_channel(address) as channel:
        try:
            return (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                .status
            )
        except grpc.RpcError:
            return None


def wait_caught_up(address: str, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Until the replica's health is SERVING (tests.helpers.wait_serving would poll a
    NOT_SERVING replica without pausing)."""
    deadline = time.monotonic() + timeout_s
    while health(address, "") != health_pb2.HealthCheckResponse.SERVING:
        assert process.poll() is None, f"the replica at {address} exited with {process.returncode}"
        assert time.monotonic() < deadline, f"the replica at {address} did not catch up in {timeout_s} s"
        time.sleep(0.1)


def spawn_replica(data_dir: Path, port: int, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "index_server",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--log-level",
            "WARNING",
            *flags,
        ],
        cwd=REPO_ROOT,
    )


# -- the required scenario, with real processes ---------------------------------------------------


def test_a_replica_killed_while_writes_go_on_catches_up_before_it_serves_reads(tmp_path):
    """kill -9 one of two replicas; 1,000 writes (and deletes) through the router; on restart the
    replica refuses reads (the router reads the other one) until it has copied its peer; then
    every item is searchable on it, the deletes are applied, and it all survives another kill -9."""
    ports = [free_port(), free_port()]
    addresses = [f"127.0.0.1:{p}" for p in ports]
    # Both replicas name each other, as deployed: the first up copies the other one (empty too).
    processes = [
        spawn_replica(tmp_path / f"r{i}", ports[i], "--peers", addresses[1 - i], "--catch-up-tail-s", "0.5")
        for i in range(2)
    ]
    # On return, the source keeps sending writes for 5 s after its copy: the window tested below.
    tail = ["--catch-up-tail-s", "5"]
    router_port = free_port()
    processes.append(
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "index_server",
                "router",
                "--port",
                str(router_port),
                "--shards",
                json.dumps([addresses]),
                "--log-level",
                "ERROR",
            ],
            cwd=REPO_ROOT,
        )
    )
    channels = []

    def stub(address: str) -> index_pb2_grpc.IndexServiceStub:
        channels.append(grpc.insecure_channel(address))
        return index_pb2_grpc.IndexServiceStub(channels[-1])

    try:
        for process, address in zip(processes, addresses + [f"127.0.0.1:{router_port}"]):
            wait_caught_up(address, process)
        router = stub(f"127.0.0.1:{router_port}")
        before, during = vectors(0, 200), vectors(1, 1000)
        router.Add(
            iter([add_request(f"old{i}", "shoes", v, group_id=f"g{i % 50}", n=str(i)) for i, v in enumerate(before)]),
            timeout=30,
        )

        processes[1].kill()  # kill -9: replica 1 misses everything below
        processes[1].wait()
        for start in range(0, 1000, 100):
            response = router.Add(
                iter([add_request(f"new{i}", "shoes", during[i], n=str(i)) for i in range(start, start + 100)]),
                timeout=30,
            )
            assert response.added == 100  # acknowledged by replica 0 alone
        bow_items = bags(2, 60)
        router.Add(iter([add_request(f"b{i}", "bags", b) for i, b in enumerate(bow_items)]), timeout=30)
        deleted = [f"old{i}" for i in range(0, 200, 4)] + [f"new{i}" for i in range(0, 1000, 10)]
        response = router.Delete(index_pb2.DeleteRequest(database="shoes", item_ids=deleted), timeout=30)
        assert response.deleted == len(deleted)
        router.Delete(index_pb2.DeleteRequest(database="bags", item_ids=["b0", "b1"]), timeout=30)
        first, items = search(router, "shoes", dense_to_proto(during[7]))
        assert not first.degraded and items[0].item_id == "new7"

        processes[1] = spawn_replica(tmp_path / "r1", ports[1], "--peers", addresses[0], *tail)
        while (status := health(addresses[1])) is None:
            assert processes[1].poll() is None
            time.sleep(0.05)
        # Catching up: no reads here (the router's health-checked reads go to replica 0) ...
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            search(stub(addresses[1]), "shoes", dense_to_proto(during[3]))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"catching up from {addresses[0]}" in refused.value.details()
        for i in range(3, 200, 10):  # none of them deleted
            first, items = search(router, "shoes", dense_to_proto(during[i]))
            assert not first.degraded and items[0].item_id == f"new{i}"
        # ... while writes still go on, and reach it too.
        late = vectors(3, 30)
        router.Add(iter([add_request(f"late{i}", "shoes", v) for i, v in enumerate(late)]), timeout=30)
        router.Delete(index_pb2.DeleteRequest(database="shoes", item_ids=["late0", "new1"]), timeout=30)
        deleted += ["late0", "new1"]
        assert health(addresses[1]) == health_pb2.HealthCheckResponse.NOT_SERVING, (
            "caught up too early to test the writes made meanwhile: raise --catch-up-tail-s"
        )

        wait_caught_up(addresses[1], processes[1])
        assert health(addresses[1]) == health_pb2.HealthCheckResponse.SERVING

        def check_everything_on(replica: index_pb2_grpc.IndexServiceStub) -> None:
            ids = [f"old{i}" for i in range(200)] + [f"new{i}" for i in range(1000)] + [f"late{i}" for i in range(30)]
            queries = np.concatenate([before, during, late])
            gone = set(deleted)
            for item_id, found in zip(ids, top_ids(replica, "shoes", queries, top_k=3)):
                if item_id in gone:
                    assert item_id not in found
                else:
                    assert found[0] == item_id
            stats = {d.name: d.items for d in replica.Stats(index_pb2.StatsRequest(), timeout=10).databases}
            assert stats == {"shoes": len(ids) - len(gone), "bags": 58}
            assert looked_up(replica, [f"b{i}" for i in range(60)]) == {f"b{i}" for i in range(2, 60)}
            _, hits = search(replica, "bags", bow(bow_items[5]), top_k=1)
            assert hits[0].item_id == "b5"

        check_everything_on(stub(addresses[1]))
        check_everything_on(stub(addresses[0]))

        # The copy was installed durably: a kill -9 and a restart without peers keep all of it.
        processes[1].kill()
        processes[1].wait()
        processes[1] = spawn_replica(tmp_path / "r1", ports[1])
        wait_caught_up(addresses[1], processes[1])
        check_everything_on(stub(addresses[1]))
    finally:
        for channel in channels:
            channel.close()
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()


# -- the copy itself ----------------------------------------------------------------------------


def filled_catalogue() -> Catalogue:
    catalogue = Catalogue()
    catalogue.add([item(f"d{i}", "shoes", v, group_id=f"g{i % 7}", n=str(i)) for i, v in enumerate(vectors(10, 300))])
    catalogue.add([item(f"b{i}", "bags", b) for i, b in enumerate(bags(11, 200))])
    catalogue.delete("shoes", ["d3", "d4"])
    return catalogue


def test_a_copy_is_streamed_in_bounded_chunks_and_rebuilds_the_same_databases():
    source = filled_catalogue()
    messages = list(replication_stream(source, WriteTracker(), min_tail_s=0.0, chunk_bytes=4096, settle_timeout_s=1.0))
    assert len(messages) > 10 and max(m.ByteSize() for m in messages) <= 4096 + 200
    assert messages[-1].WhichOneof("part") == "done" and messages[-1].done.databases == 2
    states, records = receive_copy(iter(messages))
    replica = Catalogue()
    replica.begin_deferral()
    replica.install(states, records)
    assert not replica.deferring
    assert [(d.name, d.items) for d in replica.stats()] == [("bags", 200), ("shoes", 298)]
    for name in ("shoes", "bags"):
        _, ours = replica.get(name)
        _, theirs = source.get(name)
        assert ours.state() == theirs.state()
    with pytest.raises(IncompleteCopy, match=r"^the stream ended before its done message$"):
        receive_copy(iter(messages[:-1]))  # cut short: never installed


def test_writes_during_the_copy_reach_it_and_writes_deferred_on_the_replica_win():
    source = filled_catalogue()
    writes = WriteTracker()
    stream = replication_stream(source, writes, min_tail_s=0.3, chunk_bytes=1 << 16, settle_timeout_s=5.0)
    first = next(stream)  # the copy is taken: later writes go to its tail
    fresh = vectors(12, 3)
    source.add([item("d0", "shoes", fresh[0], tag="from the source")])
    source.add([item("late", "shoes", fresh[1])])
    source.delete("shoes", ["d5"])
    states, records = receive_copy(iter([first, *stream]))
    assert len(records) == 3

    replica = Catalogue()
    replica.begin_deferral()
    replica.add([item("d0", "shoes", fresh[2], tag="newest")])  # logged, not applied yet
    replica.delete("shoes", ["d6", "never-there"])
    assert replica.stats() == []  # nothing applied while catching up
    replica.install(states, records)
    _, shoes = replica.get("shoes")
    assert "late" in shoes and "d5" not in shoes and "d6" not in shoes and "d3" not in shoes
    hit = shoes.search(fresh[2], 1, False)[0]
    assert hit.item_id == "d0" and hit.metadata == {"tag": "newest"}


def test_a_copy_waits_for_the_writes_in_flight_when_it_began():
    source = filled_catalogue()
    writes = WriteTracker()
    release = threading.Event()

    def slow_write() -> None:
        with writes.track():  # began before the copy, commits after it
            release.wait()
            source.add([item("slow", "shoes", vectors(13, 1)[0])])

    writer = threading.Thread(target=slow_write)
    writer.start()
    time.sleep(0.05)
    threading.Timer(0.5, release.set).start()
    started = time.monotonic()
    _, records = receive_copy(
        replication_stream(source, writes, min_tail_s=0.0, chunk_bytes=1 << 16, settle_timeout_s=10.0)
    )
    writer.join()
    assert time.monotonic() - started >= 0.4 and len(records) == 1


# -- in-process replicas -----------------------------------------------------------------------


def shard(**overrides) -> tuple[object, index_pb2_grpc.IndexServiceStub, grpc.Channel]:
    bundle = create_bundle(load_config(IndexConfig, "index", environ={}, port=0, data_dir="", **overrides))
    channel = grpc.insecure_channel(f"127.0.0.1:{bundle.port}")
    return bundle, index_pb2_grpc.IndexServiceStub(channel), channel


def wait_healthy(bundle, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while health(f"127.0.0.1:{bundle.port}") != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "the replica did not finish catching up"
        time.sleep(0.05)


def test_a_replica_without_a_usable_peer_serves_what_it_holds():
    source, source_stub, source_channel = shard()
    source_stub.Add(iter([add_request(f"d{i}", "shoes", v) for i, v in enumerate(vectors(20, 10))]), timeout=10)
    started = []
    try:
        # A peer of another word range refuses (not a replica of this shard): no copy, at once.
        other, other_stub, other_channel = shard(
            peers=f"127.0.0.1:{source.port}", word_shard_index=1, word_shard_count=2, catch_up_tail_s=0.0
        )
        started.append((other, other_channel))
        wait_healthy(other, timeout_s=5)
        assert other_stub.Stats(index_pb2.StatsRequest(), timeout=5).databases == []
        # No peer reachable: it serves what it holds once catch_up_timeout_s has passed.
        lonely, lonely_stub, lonely_channel = shard(peers=f"127.0.0.1:{free_port()}", catch_up_timeout_s=1.0)
        started.append((lonely, lonely_channel))
        wait_healthy(lonely)
        assert lonely_stub.Stats(index_pb2.StatsRequest(), timeout=5).databases == []
        # A peer that can: copied over the real RPC.
        follower, follower_stub, follower_channel = shard(peers=f"127.0.0.1:{source.port}", catch_up_tail_s=0.0)
        started.append((follower, follower_channel))
        wait_healthy(follower)
        assert [(d.name, d.items) for d in follower_stub.Stats(index_pb2.StatsRequest(), timeout=5).databases] == [
            ("shoes", 10)
        ]
    finally:
        for bundle, channel in started + [(source, source_channel)]:
            channel.close()
            bundle.server.stop(None)


# -- the router's writes with a replica down -----------------------------------------------------


def test_router_writes_succeed_while_one_replica_of_each_shard_answers():
    cluster = Cluster("item", shards=2, replicas=2)
    strict = Cluster("item", shards=1, replicas=2, min_write_replicas=2)
    items = vectors(30, 40)
    try:
        cluster.bundles[1].server.stop(None)  # one replica of shard 0 down
        response = cluster.stub.Add(iter([add_request(f"d{i}", "shoes", v) for i, v in enumerate(items)]), timeout=10)
        assert response.added == 40 and response.replaced == 0
        response = cluster.stub.Delete(index_pb2.DeleteRequest(database="shoes", item_ids=["d1", "zz"]), timeout=10)
        assert response.deleted == 1 and list(response.not_found) == ["zz"]
        for i in range(0, 40, 5):
            first, hits = search(cluster.stub, "shoes", dense_to_proto(items[i]), top_k=1)
            assert not first.degraded and hits[0].item_id == f"d{i}"
        # Every replica of a shard down: refused, so the caller re-sends.
        cluster.bundles[0].server.stop(None)
        with pytest.raises(grpc.RpcError) as error:
            cluster.stub.Add(iter([add_request(f"e{i}", "shoes", v) for i, v in enumerate(items)]), timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        # Names the shard whose replicas all failed, and what to do.
        assert error.value.details().startswith(f"shard 0 ({', '.join(cluster.addresses[0])}) failed (UNAVAILABLE)")
        assert "re-send" in error.value.details(), error.value.details()
        # min_write_replicas=2: one replica down refuses the write.
        strict.bundles[1].server.stop(None)
        with pytest.raises(grpc.RpcError) as error:
            strict.stub.Add(iter([add_request("x", "shoes", items[0])]), timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error.value.details().startswith(f"shard 0 ({', '.join(strict.addresses[0])}) failed (UNAVAILABLE)")
        assert "re-send" in error.value.details(), error.value.details()
        with pytest.raises(grpc.RpcError) as error:
            list(cluster.stub.Replicate(index_pb2.ReplicateRequest(), timeout=10))
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        cluster.close()
        strict.close()
