"""Durability of a shard process for real: kill -9 loses nothing acknowledged; restart recovers."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from common.bow_codec import BagOfWords, encode
from common.config import REPO_ROOT
from common.proto_convert import dense_to_proto
from gateway.demo import wait_serving
from index_server.inverted import item_key
from mps.common.v1 import common_pb2
from mps.index.v1 import index_pb2, index_pb2_grpc

VOCABULARY = 400


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(data_dir, port, *flags) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "index_server", "--port", str(port), "--data-dir",
                                str(data_dir), "--log-level", "WARNING", *flags], cwd=REPO_ROOT)
    wait_serving(f"127.0.0.1:{port}", process)
    return process


def bag_add(i: int, rng) -> index_pb2.AddRequest:
    bag = BagOfWords.from_words(rng.integers(0, VOCABULARY, 40), VOCABULARY, 3)
    return index_pb2.AddRequest(item_id=f"b{i}", database="bags", metadata={"i": str(i)},
                                signature=common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BOW, bow=encode(bag)))


def present(stub, ids: list[str]) -> set[str]:
    response = stub.Lookup(index_pb2.LookupRequest(database="bags", keys=[item_key(i) for i in ids]), timeout=10)
    return {i.item_id for i in response.items}


def test_kill_9_during_ingest_loses_nothing_acknowledged(tmp_path):
    port = free_port()
    # Snapshots every 300 operations, so the kill may also land in one.
    process = start(tmp_path, port, "--snapshot-every", "300")
    acked: list[str] = []
    deleted: list[str] = []
    stop = threading.Event()

    def ingest() -> None:
        rng = np.random.default_rng(0)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = index_pb2_grpc.IndexServiceStub(channel)
        i = 0
        try:
            while not stop.is_set():
                batch = [bag_add(i + j, rng) for j in range(25)]
                stub.Add(iter(batch), timeout=10)
                acked.extend(r.item_id for r in batch)
                if i % 100 == 0:
                    stub.Delete(index_pb2.DeleteRequest(database="bags", item_ids=[f"b{i}"]), timeout=10)
                    deleted.append(f"b{i}")
                i += 25
        except grpc.RpcError:
            pass  # the kill: whatever was in flight was never acknowledged
        finally:
            channel.close()

    writer = threading.Thread(target=ingest)
    writer.start()
    while len(acked) < 1500:
        time.sleep(0.05)
    process.kill()  # SIGKILL, mid-stream
    process.wait()
    stop.set()
    writer.join()

    process = start(tmp_path, port)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = index_pb2_grpc.IndexServiceStub(channel)
            alive = [i for i in acked if i not in set(deleted)]
            assert present(stub, alive) == set(alive)
            assert present(stub, deleted) == set()
            stats = stub.Stats(index_pb2.StatsRequest(), timeout=5).databases[0]
            assert len(alive) <= stats.items <= len(alive) + 25  # at most the unacknowledged batch
            # Recovered items are searchable with their metadata.
            rng = np.random.default_rng(0)
            query = [bag_add(j, rng) for j in range(2)][1]
            hits = [i for c in stub.Search(index_pb2.SearchRequest(database="bags", signature=query.signature,
                                                                    top_k=1), timeout=5) for i in c.items]
            assert hits[0].item_id == "b1" and hits[0].metadata["i"] == "1"
    finally:
        process.terminate()
        process.wait()


def test_clean_restart_recovers_both_kinds_from_the_snapshot(tmp_path):
    port = free_port()
    process = start(tmp_path, port)
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = index_pb2_grpc.IndexServiceStub(channel)
        stub.Add(iter([bag_add(i, rng) for i in range(100)]), timeout=10)
        stub.Add(iter([index_pb2.AddRequest(item_id=f"d{i}", database="dense", signature=dense_to_proto(v))
                       for i, v in enumerate(vectors)]), timeout=10)
        stub.Delete(index_pb2.DeleteRequest(database="dense", item_ids=["d3"]), timeout=10)
        before = [(i.item_id, i.score) for c in stub.Search(index_pb2.SearchRequest(
            database="dense", signature=dense_to_proto(vectors[3]), top_k=5), timeout=5) for i in c.items]
    process.terminate()  # SIGTERM: drains, then snapshots
    assert process.wait(timeout=30) == 0
    process = start(tmp_path, port)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = index_pb2_grpc.IndexServiceStub(channel)
            stats = {d.name: d.items for d in stub.Stats(index_pb2.StatsRequest(), timeout=5).databases}
            assert stats == {"bags": 100, "dense": 49}
            after = [(i.item_id, i.score) for c in stub.Search(index_pb2.SearchRequest(
                database="dense", signature=dense_to_proto(vectors[3]), top_k=5), timeout=5) for i in c.items]
            assert after == before and "d3" not in dict(after)
    finally:
        process.terminate()
        process.wait()


def test_a_second_process_on_the_same_data_dir_is_refused(tmp_path):
    port = free_port()
    process = start(tmp_path, port)
    try:
        second = subprocess.run([sys.executable, "-m", "index_server", "--port", str(free_port()),
                                 "--data-dir", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=60)
        assert second.returncode != 0 and "in use by another index shard process" in second.stderr
    finally:
        process.terminate()
        process.wait()


@pytest.mark.parametrize("snapshot_every", [1, 1000])
def test_catalogue_recovers_in_process(tmp_path, snapshot_every):
    """Snapshot + log tail, or log only: the same answers after reopening."""
    from index_server.catalogue import Catalogue
    from index_server.store import ShardStore

    rng = np.random.default_rng(2)
    catalogue = Catalogue(store=ShardStore(tmp_path, 1 << 30), snapshot_every=snapshot_every)
    adds = [bag_add(i, rng) for i in range(200)]
    catalogue.add(adds[:120])
    catalogue.delete("bags", ["b5", "b6", "missing"])
    catalogue.add(adds[120:])
    catalogue.add([bag_add(7, rng)])  # replaces b7
    _, index = catalogue.get("bags")
    queries = [BagOfWords.from_words(rng.integers(0, VOCABULARY, 30), VOCABULARY, 3) for _ in range(5)]
    expected = [[(h.item_id, h.score, h.metadata) for h in index.search(q, 20)] for q in queries]
    catalogue.close(snapshot=False)  # as a crash would: no final snapshot
    reopened = Catalogue(store=ShardStore(tmp_path, 1 << 30))
    _, index = reopened.get("bags")
    assert len(index) == 198 and "b5" not in index and "b7" in index
    assert [[(h.item_id, h.score, h.metadata) for h in index.search(q, 20)] for q in queries] == expected
    reopened.close()
