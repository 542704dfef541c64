"""The LMDB write-ahead log and snapshots, and the records the log holds (index_server.log_codec)."""

import numpy as np
import pytest

from common.bow_codec import BagOfWords, encode
from index_server import log_codec
from index_server.catalogue import Catalogue
from index_server.domain import Deletion, Item
from index_server.store import ShardStore, StoreLocked
from mps.common.v1 import common_pb2
from mps.index.v1 import index_pb2


def test_log_survives_reopening_and_a_snapshot_truncates_it(tmp_path):
    store = ShardStore(tmp_path, 1 << 26)
    assert store.append([b"a", b"b"]) == 2 and store.append([b"c"]) == 3
    store.close()
    store = ShardStore(tmp_path, 1 << 26)
    assert store.last_seq == 3 and list(store.replay(0)) == [(1, b"a"), (2, b"b"), (3, b"c")]
    assert list(store.replay(2)) == [(3, b"c")]
    store.write_snapshot(2, {"db": {"rows": b"\x01\x02", "ids": b""}})
    assert len(list(store.replay(0))) == 1 and list(store.replay(2)) == [(3, b"c")]
    assert store.read_snapshot() == (2, {"db": {"rows": b"\x01\x02", "ids": b""}})
    store.write_snapshot(3, {"other": {"x": b"y"}})  # replaces the whole snapshot
    assert store.read_snapshot() == (3, {"other": {"x": b"y"}}) and not list(store.replay(0))
    store.close()
    store = ShardStore(tmp_path, 1 << 26)
    assert store.last_seq == 3 and store.append([b"d"]) == 4  # numbering goes on after an empty log
    store.close()


def test_one_process_per_directory(tmp_path):
    store = ShardStore(tmp_path, 1 << 26)
    with pytest.raises(StoreLocked, match="in use"):
        ShardStore(tmp_path, 1 << 26)
    store.close()
    ShardStore(tmp_path, 1 << 26).close()


def test_log_records_keep_their_format_and_decode_to_the_operations_written(tmp_path):
    """A record is b"A" + AddRequest or b"D" + DeleteRequest, as every data directory holds them."""
    bag = BagOfWords.from_words(np.array([3, 3, 9]), 50, 7)
    box = np.array([1, 2, 3, 4], np.float32)
    for item in (
        Item("bags", "b", bag, {"k": "v"}, "g", box),
        Item("dense", "d", np.array([0.5, -1, 2], np.float32)),
    ):
        record = log_codec.encode(item)
        assert record[:1] == b"A" and index_pb2.AddRequest.FromString(record[1:]).item_id == item.item_id
        for again in (log_codec.decode(record), log_codec.decode(log_codec.from_message(log_codec.to_message(record)))):
            assert isinstance(again, Item)
            assert (again.database, again.item_id, again.metadata, again.group_id) == (
                item.database,
                item.item_id,
                item.metadata,
                item.group_id,
            )
            assert (again.box is None) == (item.box is None) and (item.box is None or np.array_equal(again.box, box))
            if isinstance(item.value, BagOfWords):
                assert isinstance(again.value, BagOfWords) and encode(again.value) == encode(item.value)
            else:
                assert isinstance(again.value, np.ndarray) and np.array_equal(again.value, item.value)
    deletion = Deletion("dense", ("d", "e"), ("g",))
    record = log_codec.encode(deletion)
    assert (
        record
        == b"D" + index_pb2.DeleteRequest(database="dense", item_ids=["d", "e"], group_ids=["g"]).SerializeToString()
    )
    assert log_codec.decode(record) == deletion and log_codec.database_of(record) == "dense"
    assert log_codec.unpack(log_codec.pack([record, b"", b"A"])) == [record, b"", b"A"]
    # Written before dense vectors went as bytes: the deprecated repeated float field, still read.
    old = (
        b"A"
        + index_pb2.AddRequest(
            item_id="old",
            database="dense",
            signature=common_pb2.Signature(
                kind=common_pb2.SIGNATURE_KIND_DEEP, dense=common_pb2.DenseVector(values=[0.0, 1.0, 0.0])
            ),
        ).SerializeToString()
    )
    store = ShardStore(tmp_path, 1 << 26)
    store.append([old, log_codec.encode(Item("dense", "new", np.array([1, 0, 0], np.float32)))])
    catalogue = Catalogue(store=store)
    _, dense = catalogue.get("dense")
    assert [h.item_id for h in dense.search(np.array([0, 1, 0], np.float32), 2)] == ["old", "new"]
    catalogue.close()
