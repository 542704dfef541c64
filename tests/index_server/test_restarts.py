"""Bad input or damaged data must never keep a shard from starting: real shard processes restarted
on their data directory, and the snapshot format under names of any length or character."""

from __future__ import annotations

import json
import subprocess

import grpc
import lmdb
import numpy as np
import pytest

from common.bow_codec import BagOfWords
from common.config import load_config
from common.errors import InvalidArgument
from common.proto_convert import dense_to_proto
from index_server.catalogue import PENDING_BLOB, Catalogue
from index_server.config import RouterConfig
from index_server.dense import DenseDatabase
from index_server.server import create_router_bundle
from index_server.store import ShardStore
from mps.common.v1 import common_pb2
from mps.index.v1 import index_pb2, index_pb2_grpc
from tests.helpers import free_port
from tests.index_server.helpers import add_request, bow, item, random_bags, search, start_shard

# What every refused database name is told (common.names), after what is wrong with it.
NAME_RULE = "a database name is 1 to 128 UTF-8 bytes of letters, digits, single inner spaces and _-.:/@+"


class Shard:
    """A shard process on a data directory, restartable, with a stub on it."""

    process: subprocess.Popen
    channel: grpc.Channel
    stub: index_pb2_grpc.IndexServiceStub

    def __init__(self, data_dir, *flags: str):
        self.data_dir, self.port = data_dir, free_port()
        self.start(*flags)

    def start(self, *flags: str) -> None:
        self.process = start_shard(self.data_dir, self.port, *flags)
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{self.port}", options=[("grpc.max_send_message_length", 64 << 20)]
        )
        self.stub = index_pb2_grpc.IndexServiceStub(self.channel)

    def stop(self) -> None:
        """SIGTERM: the shard drains and writes a snapshot."""
        self.channel.close()
        self.process.terminate()
        assert self.process.wait(timeout=60) == 0

    def stats(self) -> dict[str, index_pb2.DatabaseStats]:
        return {d.name: d for d in self.stub.Stats(index_pb2.StatsRequest(), timeout=10).databases}


@pytest.fixture()
def shard(tmp_path):
    shards: list[Shard] = []

    def make(*flags: str) -> Shard:
        shards.append(Shard(tmp_path, *flags))
        return shards[-1]

    yield make
    for running in shards:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


def test_a_refused_name_or_dimension_leaves_the_shard_restartable(tmp_path, shard):
    """A NUL in a name split the snapshot key wrongly, a 600-byte name was over LMDB's key size, a
    1,048,577-d vector was over FAISS's read limit: each kept the shard from starting again."""
    running = shard()
    for name, fragment in (("bad\0name", "has character '\\x00' (U+0000)"), ("n" * 600, "is 600 UTF-8 bytes")):
        error = refused(lambda name=name: running.stub.Add(iter([add_request("a", name, np.ones(4))]), timeout=10))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in error.details() and NAME_RULE in error.details(), error.details()
    error = refused(lambda: running.stub.Add(iter([add_request("a", "huge", np.ones((1 << 20) + 1))]), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit of 4096 dimensions" in error.details()
    running.stub.Add(iter([add_request("a", "fine", np.ones(4))]), timeout=10)
    running.stop()
    running.start()
    assert {name: d.items for name, d in running.stats().items()} == {"fine": 1}


def test_a_database_faiss_cannot_read_back_is_set_aside_and_the_rest_served(tmp_path, shard):
    """Written when no cap refused it (here: by a catalogue in this process, which no servicer's
    checks guard; --max-dense-dimension now stops below 2**20), a 2**20+1-d index is refused by
    FAISS at the next start-up: that database is set aside, the others are served."""
    written = Catalogue(store=ShardStore(tmp_path, 1 << 30))
    written.add([item("big", "huge", np.ones((1 << 20) + 1))])
    written.add([item("a", "fine", np.array([1, 0], np.float32))])
    written.close()  # a snapshot of both
    running = shard()
    stats = running.stats()
    assert stats["fine"].items == 1 and not stats["fine"].broken_reason
    assert "out of range" in stats["huge"].broken_reason and stats["huge"].items == 0
    _, items = search(running.stub, "fine", dense_to_proto(np.array([1, 0], np.float32)))
    assert [i.item_id for i in items] == ["a"]
    error = refused(lambda: search(running.stub, "huge", dense_to_proto(np.ones(4, np.float32))))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "database 'huge' could not be loaded at start-up" in error.details()


def test_a_corrupted_snapshot_blob_sets_one_database_aside_and_keeps_its_data(tmp_path, shard):
    rng = np.random.default_rng(5)
    bags = random_bags(rng, 20, 300)
    running = shard()
    running.stub.Add(iter([add_request(f"b{i}", "bags", bag) for i, bag in enumerate(bags)]), timeout=10)
    running.stub.Add(iter([add_request(f"d{i}", "dense", rng.normal(size=8)) for i in range(10)]), timeout=10)
    running.stop()

    store = ShardStore(tmp_path, 1 << 30)
    seq, databases = store.read_snapshot()
    original = dict(databases["dense"])
    databases["dense"]["index"] = b"not a FAISS index"
    damaged = dict(databases["dense"])
    store.write_snapshot(seq, databases)
    store.close()

    running.start()
    stats = running.stats()
    assert stats["bags"].items == 20 and not stats["bags"].broken_reason
    assert "its snapshot state" in stats["dense"].broken_reason
    _, items = search(running.stub, "bags", add_request("q", "bags", bags[3]).signature, top_k=1)
    assert items[0].item_id == "b3"
    query = dense_to_proto(np.ones(8, np.float32))
    for call in (
        lambda: search(running.stub, "dense", query),
        lambda: running.stub.Add(iter([add_request("d99", "dense", np.ones(8))]), timeout=10),
        lambda: running.stub.Delete(index_pb2.DeleteRequest(database="dense", item_ids=["d1"]), timeout=10),
    ):
        error = refused(call)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "could not be loaded at start-up" in error.details() and "nothing is lost" in error.details()
    # Through a router: the other database is served, the set-aside one reported with its shard.
    router = create_router_bundle(
        load_config(RouterConfig, "index_router", environ={}, port=0, shards=[[f"127.0.0.1:{running.port}"]])
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{router.port}") as channel:
            routed = index_pb2_grpc.IndexServiceStub(channel)
            held = {d.name: d for d in routed.Stats(index_pb2.StatsRequest(), timeout=10).databases}
            assert held["dense"].broken_reason.startswith("shard 0: its snapshot state")
            assert held["bags"].items == 20 and not held["bags"].broken_reason
            assert search(routed, "bags", add_request("q", "bags", bags[3]).signature, top_k=1)[1][0].item_id == "b3"
    finally:
        router.server.stop(None)
        router.on_stop()
    running.stub.Add(iter([add_request("b20", "bags", bags[0])]), timeout=10)
    running.stop()  # a snapshot: the set-aside database is written back as it was stored

    store = ShardStore(tmp_path, 1 << 30)
    _, databases = store.read_snapshot()
    assert databases["dense"] == damaged
    databases["dense"] = original  # repaired (e.g. from a backup): served again, nothing lost
    store.write_snapshot(*[store.snapshot_seq(), databases])
    store.close()
    running.start()
    stats = running.stats()
    assert (stats["bags"].items, stats["dense"].items) == (21, 10)
    assert not stats["dense"].broken_reason


def test_a_failing_replay_sets_its_database_aside_with_every_logged_operation(tmp_path):
    store = ShardStore(tmp_path, 1 << 30)
    catalogue = Catalogue(store=store)
    catalogue.add([item("a", "good", np.array([1, 0], np.float32))])
    catalogue.add([item("x", "shaky", np.array([1, 0], np.float32))])
    catalogue.add([item("y", "shaky", np.array([0, 1], np.float32))])
    catalogue.close(snapshot=False)  # as a crash: the log holds everything
    store = ShardStore(tmp_path, 1 << 30)
    # A logged operation that cannot be applied any more (as a damaged log would hold).
    store.append([b"A" + add_request("z", "shaky", np.ones(3, np.float32)).SerializeToString()])
    catalogue = Catalogue(store=store)
    good, shaky = catalogue.stats()
    assert (good.name, good.items, good.broken_reason) == ("good", 1, "")
    assert (shaky.name, shaky.items) == ("shaky", 0)
    assert shaky.broken_reason.startswith("replaying logged operation #4: SignatureError: signature has 3 values")
    catalogue.close()  # snapshot: the log is dropped, shaky's operations are kept in its blobs
    store = ShardStore(tmp_path, 1 << 30)
    assert not list(store.replay(0))
    _, databases = store.read_snapshot()
    assert set(databases["shaky"]) == {PENDING_BLOB}
    catalogue = Catalogue(store=store)
    assert [(i.name, i.items, bool(i.broken_reason)) for i in catalogue.stats()] == [
        ("good", 1, False),
        ("shaky", 0, True),
    ]
    catalogue.close()


def test_snapshot_keys_hold_any_name(tmp_path):
    store = ShardStore(tmp_path, 1 << 30)
    names = ["a", "a\0b", "a\0", "\0", "n" * 5000, "ü/:@+ x"]
    databases = {name: {"kind": b"2", "config": name.encode()[:10], "ids": b"\0\1"} for name in names}
    store.write_snapshot(7, databases)
    assert store.read_snapshot() == (7, databases)
    store.close()


def write_format_1(path, seq: int, databases: dict[str, dict[str, bytes]]) -> None:
    """A snapshot as the shard wrote it before format 2: `name NUL blob` keys, no "format"."""
    env = lmdb.open(str(path / "snapshot"), map_size=1 << 30, subdir=True, max_dbs=2)
    blobs = env.open_db(b"blobs")
    with env.begin(write=True) as txn:
        for name, named in databases.items():
            for blob, value in named.items():
                txn.put(f"{name}\0{blob}".encode(), value, db=blobs)
        txn.put(b"meta", json.dumps({"seq": seq, "databases": sorted(databases)}).encode())
    env.close()


def test_a_data_dir_written_before_format_2_still_starts(tmp_path, shard):
    rng = np.random.default_rng(6)
    built = Catalogue()
    bags = random_bags(rng, 10, 300)
    built.add([item(f"b{i}", "bags", bag) for i, bag in enumerate(bags)])
    states = {
        name: {**database.state(), "kind": str(kind).encode()} for name, (kind, database) in built._databases.items()
    }
    odd = DenseDatabase(2)  # a name no shard accepts now, which format 1 stored (and split wrongly)
    odd.add("v", np.array([1, 0], np.float32), {})
    states["odd\0name"] = {**odd.state(), "kind": str(common_pb2.SIGNATURE_KIND_DEEP).encode()}
    (tmp_path / "snapshot").mkdir()
    write_format_1(tmp_path, 0, states)
    running = shard()
    assert {name: d.items for name, d in running.stats().items()} == {"bags": 10, "odd\0name": 1}
    _, items = search(running.stub, "bags", add_request("q", "bags", bags[4]).signature, top_k=1)
    assert items[0].item_id == "b4"
    # A database stored before names were checked stays reachable, and writable, by its name.
    running.stub.Add(iter([add_request("w", "odd\0name", np.array([0, 1], np.float32))]), timeout=10)
    running.stop()
    running.start()
    assert {name: d.items for name, d in running.stats().items()} == {"bags": 10, "odd\0name": 2}


def test_a_word_count_no_posting_holds_is_refused_before_it_is_logged(tmp_path, shard):
    """Refused only when the item was applied, after it was logged, it made the first item of a new
    bag-of-words database fail to apply at every start-up, which set that database aside."""
    counted = BagOfWords(np.array([1, 2], np.int32), np.array([70_000, 1], np.uint32), 300, 3)
    catalogue = Catalogue(store=ShardStore(tmp_path, 1 << 30))
    with pytest.raises(InvalidArgument) as error:
        catalogue.add(
            [item("fine", "bags", random_bags(np.random.default_rng(7), 1, 300, 3)[0]), item("x", "bags", counted)]
        )
    assert str(error.value) == (
        "item #1 ('x'): a word count above 65535 does not fit a posting; nothing of this stream was added"
    )
    assert catalogue.stats() == [] and catalogue.store is not None and not list(catalogue.store.replay(0))
    catalogue.close()
    running = shard()
    error = refused(lambda: running.stub.Add(iter([add_request("x", "bags", counted)]), timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        error.details()
        == "item #0 ('x'): a word count above 65535 does not fit a posting; nothing of this stream was added"
    )
    running.stub.Add(iter([add_request("y", "bags", BagOfWords.from_words(np.array([1, 2]), 300, 3))]), timeout=10)
    running.stop()
    running.start()
    assert {name: (d.items, d.broken_reason) for name, d in running.stats().items()} == {"bags": (1, "")}
    _, items = search(running.stub, "bags", bow(BagOfWords.from_words(np.array([1, 2]), 300, 3)), top_k=1)
    assert [i.item_id for i in items] == ["y"]
