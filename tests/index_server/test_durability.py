"""Durability of a shard process for real: kill -9 loses nothing acknowledged; restart recovers."""

from __future__ import annotations

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
from index_server.catalogue import Catalogue
from index_server.convert import item_of, signature_value
from index_server.domain import item_key
from index_server.store import ShardStore
from mps.common.v1 import common_pb2
from mps.index.v1 import index_pb2, index_pb2_grpc
from tests.helpers import free_port
from tests.index_server.helpers import start_shard

VOCABULARY = 400


def bag_add(i: int, rng) -> index_pb2.AddRequest:
    bag = BagOfWords.from_words(rng.integers(0, VOCABULARY, 40), VOCABULARY, 3)
    return index_pb2.AddRequest(
        item_id=f"b{i}",
        database="bags",
        metadata={"i": str(i)},
        signature=common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BOW, bow=encode(bag)),
    )


def present(stub, ids: list[str]) -> set[str]:
    response = stub.Lookup(index_pb2.LookupRequest(database="bags", keys=[item_key(i) for i in ids]), timeout=10)
    return {i.item_id for i in response.items}


def test_kill_9_during_ingest_loses_nothing_acknowledged(tmp_path):
    port = free_port()
    # Snapshots every 300 operations, so the kill may also land in one.
    process = start_shard(tmp_path, port, "--snapshot-every", "300")
    acked: list[str] = []
    deleted: list[str] = []
    # A delete in flight at the kill may or may not have been logged: its item may be either way.
    unacknowledged_delete: list[str] = []
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
                    unacknowledged_delete[:] = [f"b{i}"]
                    stub.Delete(index_pb2.DeleteRequest(database="bags", item_ids=[f"b{i}"]), timeout=10)
                    deleted.append(f"b{i}")
                    unacknowledged_delete.clear()
                i += 25
        except grpc.RpcError:
            pass  # the kill: whatever was in flight was never acknowledged
        finally:
            channel.close()

    writer = threading.Thread(target=ingest)
    writer.start()
    deadline = time.monotonic() + 60
    while len(acked) < 1500:
        if not writer.is_alive() or time.monotonic() > deadline:
            process.kill()
            stop.set()
            writer.join()
            pytest.fail(f"only {len(acked)} of 1500 items were acknowledged before the kill was due (60 s)")
        time.sleep(0.05)
    process.kill()  # SIGKILL, mid-stream
    process.wait()
    stop.set()
    writer.join()

    process = start_shard(tmp_path, port)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = index_pb2_grpc.IndexServiceStub(channel)
            alive = [i for i in acked if i not in set(deleted) | set(unacknowledged_delete)]
            assert present(stub, alive) == set(alive)
            assert present(stub, deleted) == set()
            stats = stub.Stats(index_pb2.StatsRequest(), timeout=5).databases[0]
            assert len(alive) <= stats.items <= len(alive) + 25  # at most the unacknowledged batch
            # Recovered items are searchable with their metadata.
            rng = np.random.default_rng(0)
            query = [bag_add(j, rng) for j in range(2)][1]
            hits = [
                i
                for c in stub.Search(
                    index_pb2.SearchRequest(database="bags", signature=query.signature, top_k=1), timeout=5
                )
                for i in c.items
            ]
            assert hits[0].item_id == "b1" and hits[0].metadata["i"] == "1"
    finally:
        process.terminate()
        process.wait()


def test_clean_restart_recovers_both_kinds_from_the_snapshot(tmp_path):
    port = free_port()
    process = start_shard(tmp_path, port)
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = index_pb2_grpc.IndexServiceStub(channel)
        stub.Add(iter([bag_add(i, rng) for i in range(100)]), timeout=10)
        stub.Add(
            iter(
                [
                    index_pb2.AddRequest(item_id=f"d{i}", database="dense", signature=dense_to_proto(v))
                    for i, v in enumerate(vectors)
                ]
            ),
            timeout=10,
        )
        stub.Delete(index_pb2.DeleteRequest(database="dense", item_ids=["d3"]), timeout=10)
        before = [
            (i.item_id, i.score)
            for c in stub.Search(
                index_pb2.SearchRequest(database="dense", signature=dense_to_proto(vectors[3]), top_k=5), timeout=5
            )
            for i in c.items
        ]
    process.terminate()  # SIGTERM: drains, then snapshots
    assert process.wait(timeout=30) == 0
    process = start_shard(tmp_path, port)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = index_pb2_grpc.IndexServiceStub(channel)
            stats = {d.name: d.items for d in stub.Stats(index_pb2.StatsRequest(), timeout=5).databases}
            assert stats == {"bags": 100, "dense": 49}
            after = [
                (i.item_id, i.score)
                for c in stub.Search(
                    index_pb2.SearchRequest(database="dense", signature=dense_to_proto(vectors[3]), top_k=5), timeout=5
                )
                for i in c.items
            ]
            assert after == before and "d3" not in dict(after)
    finally:
        process.terminate()
        process.wait()


def test_a_second_process_on_the_same_data_dir_is_refused(tmp_path):
    port = free_port()
    process = start_shard(tmp_path, port)
    try:
        second = subprocess.run(
            [sys.executable, "-m", "index_server", "--port", str(free_port()), "--data-dir", str(tmp_path)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode != 0 and "in use by another index shard process" in second.stderr
    finally:
        process.terminate()
        process.wait()


@pytest.mark.parametrize("snapshot_every", [1, 1000])
def test_catalogue_recovers_in_process(tmp_path, snapshot_every):
    """Snapshot + log tail, or log only: the same answers after reopening."""
    rng = np.random.default_rng(2)
    catalogue = Catalogue(store=ShardStore(tmp_path, 1 << 30), snapshot_every=snapshot_every)
    items = [item_of(bag_add(i, rng)) for i in range(200)]
    catalogue.add(items[:120])
    catalogue.delete("bags", ["b5", "b6", "missing"])
    catalogue.add(items[120:])
    catalogue.add([item_of(bag_add(7, rng))])  # replaces b7
    _, index = catalogue.get("bags")
    queries = [BagOfWords.from_words(rng.integers(0, VOCABULARY, 30), VOCABULARY, 3) for _ in range(5)]
    expected = [[(h.item_id, h.score, h.metadata) for h in index.search(q, 20)] for q in queries]
    catalogue.close(snapshot=False)  # as a crash would: no final snapshot
    reopened = Catalogue(store=ShardStore(tmp_path, 1 << 30))
    _, index = reopened.get("bags")
    assert len(index) == 198 and "b5" not in index and "b7" in index
    assert [[(h.item_id, h.score, h.metadata) for h in index.search(q, 20)] for q in queries] == expected
    reopened.close()


def product_adds(rng, products: int = 20, images: int = 3) -> tuple[list[index_pb2.AddRequest], dict[str, str]]:
    """`images` images per product in both kinds' databases, a box on each; item id -> product."""
    adds, group_of = [], {}
    for p in range(products):
        for n in range(images):
            item_id = f"p{p}-{n}"
            bag = BagOfWords.from_words(rng.integers(0, VOCABULARY, 40), VOCABULARY, 3)
            box = common_pb2.Box(x_min=n, y_min=p, x_max=n + 10, y_max=p + 10)
            adds.append(
                index_pb2.AddRequest(
                    item_id=item_id,
                    database="bags",
                    group_id=f"p{p}",
                    box=box,
                    signature=common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BOW, bow=encode(bag)),
                )
            )
            adds.append(
                index_pb2.AddRequest(
                    item_id=item_id,
                    database="dense",
                    group_id=f"p{p}",
                    box=box,
                    signature=dense_to_proto(rng.normal(size=8).astype(np.float32)),
                )
            )
            group_of[item_id] = f"p{p}"
    return adds, group_of


def test_a_delete_by_group_is_durable_across_kill_9(tmp_path):
    port = free_port()
    process = start_shard(tmp_path, port)
    adds, group_of = product_adds(np.random.default_rng(3))
    gone = [i for i, g in group_of.items() if g in ("p1", "p2")]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = index_pb2_grpc.IndexServiceStub(channel)
            stub.Add(iter(adds), timeout=10)
            for database in ("bags", "dense"):
                response = stub.Delete(
                    index_pb2.DeleteRequest(database=database, group_ids=["p1", "p2", "p99"]), timeout=10
                )
                assert response.deleted == len(gone) == 6 and list(response.groups_not_found) == ["p99"]
    finally:
        process.kill()  # SIGKILL right after the acknowledgement: no snapshot, the log has it all
        process.wait()
    process = start_shard(tmp_path, port)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = index_pb2_grpc.IndexServiceStub(channel)
            kept = [i for i in group_of if i not in gone]
            assert present(stub, kept) == set(kept) and present(stub, gone) == set()
            stats = {d.name: d.items for d in stub.Stats(index_pb2.StatsRequest(), timeout=5).databases}
            assert stats == {"bags": 54, "dense": 54}
            dense = [a for a in adds if a.database == "dense"]
            for add in dense[:9]:  # products 0, 1, 2: the deleted ones are never found again
                items = [
                    i
                    for c in stub.Search(
                        index_pb2.SearchRequest(
                            database="dense", signature=add.signature, top_k=100, one_per_group=True
                        ),
                        timeout=5,
                    )
                    for i in c.items
                ]
                assert not {"p1", "p2"} & {i.group_id for i in items} and len(items) == 18
                if add.group_id == "p0":  # recovered with its group and its box
                    assert (items[0].item_id, items[0].group_id, items[0].box) == (add.item_id, "p0", add.box)
    finally:
        process.terminate()
        process.wait()


@pytest.mark.parametrize("snapshot_every", [1, 1000])
def test_catalogue_replays_group_deletes_as_it_applied_them(tmp_path, snapshot_every):
    """Recovery goes through the live apply path: groups, boxes and deletes by group come back."""
    catalogue = Catalogue(store=ShardStore(tmp_path, 1 << 30), snapshot_every=snapshot_every)
    adds, _group_of = product_adds(np.random.default_rng(4), products=10)
    catalogue.add(map(item_of, adds[:30]))
    deleted = catalogue.delete("bags", ["p0-0", "nope"], ["p0", "p3", "p9"])
    assert deleted == (6, ["nope"], ["p9"], [])  # p0-0 is counted once; p9 has no image yet
    catalogue.add(map(item_of, adds[30:]))
    assert catalogue.add([item_of(adds[6])]) == (1, 1)  # p1-0 again: replaced
    expected = {}
    for name in ("bags", "dense"):
        _, database = catalogue.get(name)
        expected[name] = [
            database.search(catalogue_value(a), 30, grouped)
            for a in adds[:12]
            if a.database == name
            for grouped in (False, True)
        ]
    catalogue.close(snapshot=False)  # as a crash would: no final snapshot
    reopened = Catalogue(store=ShardStore(tmp_path, 1 << 30))
    for name in ("bags", "dense"):
        _, database = reopened.get(name)
        assert [
            database.search(catalogue_value(a), 30, grouped)
            for a in adds[:12]
            if a.database == name
            for grouped in (False, True)
        ] == expected[name]
    _, bags = reopened.get("bags")
    assert bags.group_size("p0") == bags.group_size("p3") == 0 and bags.group_size("p9") == 3 and len(bags) == 24
    reopened.close()


def catalogue_value(add: index_pb2.AddRequest):
    return signature_value(add.signature)
