"""Items' local features (two-stage retrieval): checked at Add, stored on disk with the item beside
its thumbnail (one blob per item: index_server.store.item_blob), replaced and deleted with it,
durable across restarts, carried by a replica's copy, and read back by GetItemImages (local_features,
no_thumbnails) from a shard, an in-memory shard and the router in both layouts."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from common.bow_codec import BagOfWords
from common.config import ConfigError
from common.local_features import EXTRACTOR, Features, from_proto, to_proto
from common.status import details_of
from index_server import log_codec
from index_server.catalogue import Catalogue
from index_server.config import IndexConfig, RouterConfig
from index_server.convert import item_of
from index_server.domain import Item, ProductAttributes
from index_server.replication import WriteTracker, receive_copy, replication_stream
from index_server.store import ITEM_BLOB_MAGIC, ShardStore, blob_parts, item_blob
from mps.common.v1 import common_pb2
from mps.index.v1 import index_pb2, index_pb2_grpc
from tests.index_server.helpers import Cluster, add_request, random_bags
from tests.index_server.test_attributes import Shard

VOCABULARY = 500


@pytest.fixture()
def shard():
    running = Shard()
    yield running
    running.close()


def features(seed: int, count: int = 256, width: int = 320, height: int = 240) -> common_pb2.LocalFeatures:
    """Random but well-formed ORB-like features (as common.local_features.extract makes them)."""
    rng = np.random.default_rng(seed)
    points = np.stack([rng.integers(0, width, count), rng.integers(0, height, count)], axis=1).astype(np.uint16)
    descriptors = rng.integers(0, 256, (count, 32), dtype=np.uint8)
    return to_proto(Features(EXTRACTOR, width, height, points, descriptors))


def adding(
    item_id: str,
    value: BagOfWords | np.ndarray,
    local: common_pb2.LocalFeatures | None = None,
    thumbnail: bytes = b"",
    group_id: str = "",
    database: str = "db",
) -> index_pb2.AddRequest:
    request = add_request(item_id, database, value, group_id)
    if local is not None:
        request.local_features.CopyFrom(local)
    request.thumbnail = thumbnail
    return request


def images(
    stub: index_pb2_grpc.IndexServiceStub,
    *ids: str,
    local_features: bool = True,
    no_thumbnails: bool = False,
    database: str = "db",
) -> dict[str, tuple[bytes, common_pb2.LocalFeatures | None]]:
    """item id -> (thumbnail, local features or None when unset), for the items found."""
    answer = stub.GetItemImages(
        index_pb2.GetItemImagesRequest(
            database=database, item_ids=list(ids), local_features=local_features, no_thumbnails=no_thumbnails
        ),
        timeout=10,
    )
    return {i.item_id: (i.thumbnail, i.local_features if i.HasField("local_features") else None) for i in answer.images}


def refusal(stub: index_pb2_grpc.IndexServiceStub, *requests: index_pb2.AddRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        stub.Add(iter(requests), timeout=10)
    return error.value


# -- one shard, with a store and in memory ---------------------------------------------------------


@pytest.mark.parametrize("in_memory", [False, True], ids=["store", "in-memory"])
def test_features_round_trip_are_replaced_and_deleted_with_their_item(tmp_path, in_memory):
    bags = random_bags(np.random.default_rng(1), 5, VOCABULARY)
    running = Shard("" if in_memory else tmp_path / "shard")
    stub = running.stub
    stub.Add(
        iter(
            [
                adding("both", bags[0], features(0), b"jpeg0", group_id="g"),
                adding("features-only", bags[1], features(1), group_id="g"),
                adding("thumbnail-only", bags[2], thumbnail=b"jpeg2"),
                adding("neither", bags[3]),
                adding("no-keypoints", bags[4], features(4, count=0)),
            ]
        ),
        timeout=10,
    )
    ids = ("both", "features-only", "thumbnail-only", "neither", "no-keypoints", "nope")
    assert images(stub, *ids) == {
        "both": (b"jpeg0", features(0)),
        "features-only": (b"", features(1)),
        "thumbnail-only": (b"jpeg2", None),
        "neither": (b"", None),
        "no-keypoints": (b"", features(4, count=0)),  # as added: an entry with no keypoints
    }
    # Features only when asked for; thumbnails left out when asked to.
    assert images(stub, "both", "thumbnail-only", local_features=False) == {
        "both": (b"jpeg0", None),
        "thumbnail-only": (b"jpeg2", None),
    }
    assert images(stub, "both", "thumbnail-only", no_thumbnails=True) == {
        "both": (b"", features(0)),
        "thumbnail-only": (b"", None),
    }
    assert from_proto(images(stub, "both")["both"][1]).nbytes == 256 * 36
    # Replaced: by other features (the thumbnail goes too: an Add replaces the whole item), by
    # none; deleted with their item, by id and by group.
    stub.Add(iter([adding("both", bags[0], features(9)), adding("no-keypoints", bags[4])]), timeout=10)
    assert images(stub, "both", "no-keypoints") == {"both": (b"", features(9)), "no-keypoints": (b"", None)}
    stub.Delete(index_pb2.DeleteRequest(database="db", group_ids=["g"]), timeout=10)  # both, features-only
    stub.Delete(index_pb2.DeleteRequest(database="db", item_ids=["thumbnail-only"]), timeout=10)
    stub.Add(iter([adding("both", bags[0]), adding("thumbnail-only", bags[2])]), timeout=10)  # back, bare
    assert images(stub, *ids) == {
        "both": (b"", None),
        "thumbnail-only": (b"", None),
        "neither": (b"", None),
        "no-keypoints": (b"", None),
    }
    running.close()


def test_features_survive_restarts_from_the_log_and_from_a_snapshot(tmp_path):
    bags = random_bags(np.random.default_rng(2), 4, VOCABULARY)
    catalogue = Catalogue(store=ShardStore(tmp_path / "shard", 1 << 30))
    catalogue.add(item_of(adding(f"i{n}", bag, features(n), f"jpeg{n}".encode())) for n, bag in enumerate(bags))
    catalogue.delete("db", ["i3"])
    # Stopped without a snapshot (as by kill -9): the log is replayed at start-up; its records hold
    # no features (the store holds them beside).
    catalogue.close(snapshot=False)
    store = ShardStore(tmp_path / "shard", 1 << 30)
    assert all(b"jpeg" not in record and len(record) < 2000 for _, record in store.replay(0))
    store.close()
    running = Shard(tmp_path / "shard")
    expected = {f"i{n}": (f"jpeg{n}".encode(), features(n)) for n in range(3)}
    assert images(running.stub, "i0", "i1", "i2", "i3") == expected
    running.close()  # a snapshot, which truncates the log: the features are kept
    running = Shard(tmp_path / "shard")
    assert images(running.stub, "i0", "i1", "i2", "i3") == expected
    running.close()


def test_the_log_keeps_no_features_and_a_replication_record_keeps_them():
    bag = BagOfWords.from_words(np.array([1, 2]), VOCABULARY, 1)
    serialized = features(3).SerializeToString()
    added = Item("db", "i", bag, {}, "g", None, ProductAttributes("p"), b"jpeg", serialized)
    record = log_codec.encode(added)
    for again in (record, log_codec.from_message(log_codec.to_message(record))):
        full = log_codec.decode(again)
        assert isinstance(full, Item) and (full.thumbnail, full.local_features) == (b"jpeg", serialized)
    stored = log_codec.decode(log_codec.without_thumbnail(record))
    assert isinstance(stored, Item) and (stored.thumbnail, stored.local_features) == (b"", b"")
    only = log_codec.encode(Item("db", "j", bag, local_features=serialized))
    assert len(log_codec.without_thumbnail(only)) < len(only) - 9000


def test_an_item_blob_reads_back_and_a_stored_raw_thumbnail_still_reads(tmp_path):
    """Stores written before local features hold raw thumbnails; a thumbnail that happens to start
    with the container's magic is wrapped, so it never reads as one."""
    serialized = features(5).SerializeToString()
    for thumbnail, local in [(b"\xff\xd8jpeg", b""), (b"", serialized), (b"\xff\xd8jpeg", serialized)]:
        blob = item_blob(thumbnail, local)
        assert blob is not None and blob_parts(blob) == (thumbnail, local)
        assert blob_parts(memoryview(blob), thumbnail=False) == (b"", local)
        assert blob_parts(blob, local_features=False) == (thumbnail, b"")
    assert item_blob(b"\xff\xd8jpeg", b"") == b"\xff\xd8jpeg"  # as every store held it
    assert item_blob(b"", b"") is None
    tricky = ITEM_BLOB_MAGIC + b"not a container"
    assert item_blob(tricky, b"") != tricky and blob_parts(item_blob(tricky, b"") or b"") == (tricky, b"")
    store = ShardStore(tmp_path / "store", 1 << 30)
    store.change_thumbnails([("db", "old", b"\xff\xd8raw"), ("db", "new", item_blob(b"t", serialized))])
    assert store.images("db", ["old", "new", "none"], local_features=True) == [
        (b"\xff\xd8raw", b""),
        (b"t", serialized),
        (b"", b""),
    ]
    assert store.thumbnails("db", ["old", "new"]) == [b"\xff\xd8raw", b"t"]
    store.close()


def test_a_replica_copy_carries_features(tmp_path):
    bags = random_bags(np.random.default_rng(6), 4, VOCABULARY)
    source = Catalogue(store=ShardStore(tmp_path / "source", 1 << 30))
    source.add(
        [
            Item("db", f"i{n}", bag, thumbnail=b"t" if n % 2 else b"", local_features=features(n).SerializeToString())
            for n, bag in enumerate(bags)
        ]
    )
    stream = replication_stream(source, WriteTracker(), 0.0, 4096, 1.0)  # blobs split over chunks
    first = next(stream)  # the state is taken: what follows is the tail
    source.add([Item("db", "later", bags[0], local_features=features(7).SerializeToString())])
    source.delete("db", ["i3"])
    copy = [first, *stream]
    for replica in (Catalogue(store=ShardStore(tmp_path / "replica", 1 << 30)), Catalogue()):  # and in memory
        replica.begin_deferral()
        states, records = receive_copy(iter(copy))
        replica.install(states, records)
        ids = ["i0", "i1", "i2", "i3", "later"]
        found = {i: (t, f) for i, t, f in replica.images("db", ids, local_features=True)}
        assert found == {
            "i0": (b"", features(0).SerializeToString()),
            "i1": (b"t", features(1).SerializeToString()),
            "i2": (b"", features(2).SerializeToString()),
            "later": (b"", features(7).SerializeToString()),
        }
        replica.close()
    source.close()


# -- bad input ---------------------------------------------------------------------------------------


def malformed() -> list[tuple[str, common_pb2.LocalFeatures, str, str]]:
    """(case, features, the BadRequest field, a fragment of the message)."""
    good = features(0, count=4)
    cases = []

    def case(name: str, field: str, says: str, **changes: object) -> None:
        message = common_pb2.LocalFeatures()
        message.CopyFrom(good)
        for key, value in changes.items():
            setattr(message, key, value)
        cases.append((name, message, field, says))

    case("no-extractor", "local_features.extractor", "must name the extractor", extractor="")
    case("odd-points", "local_features.points_u16le", "4 bytes a keypoint", points_u16le=good.points_u16le[:-1])
    case("short-descriptors", "local_features.descriptors", "4 keypoints of 32 bytes need 128", descriptors=b"x" * 100)
    case("descriptor-bytes-0", "local_features.descriptor_bytes", "is not in 1..128", descriptor_bytes=0)
    case("no-size", "local_features.width", "described size", width=0)
    case("outside", "local_features", "outside its width x height", width=1, height=1)
    case("600-keypoints", "local_features", "at most 512", points_u16le=b"\0" * 2400, descriptors=b"\0" * 19200)
    cases.append(("empty-message", common_pb2.LocalFeatures(), "local_features.extractor", "must name the extractor"))
    return cases


@pytest.mark.parametrize(("name", "local", "field", "says"), malformed(), ids=[c[0] for c in malformed()])
def test_malformed_features_are_refused_naming_the_item_and_the_fault(shard, name, local, field, says):
    bag = random_bags(np.random.default_rng(7), 1, VOCABULARY)[0]
    error = refusal(shard.stub, adding("fine", bag, features(1)), adding("bad-one", bag, local))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "item #1 ('bad-one')" in error.details() and says in error.details(), error.details()
    assert "nothing of this stream was added" in error.details()
    assert [f for f, _ in details_of(error).violations] == [field]
    with pytest.raises(grpc.RpcError) as missing:  # nothing was stored: not even the database
        images(shard.stub, "fine")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_features_over_the_limit_are_refused_by_the_shard_and_the_router(tmp_path):
    bag = random_bags(np.random.default_rng(8), 1, VOCABULARY)[0]
    small = Shard(max_local_features_bytes=100 * 36)
    error = refusal(small.stub, adding("big", bag, features(0, count=101)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "item #0 ('big')" in error.details() and "3636 bytes" in error.details()
    assert "limit of 3600" in error.details(), error.details()
    assert [q for q, _ in details_of(error).quota] == ["max_local_features_bytes"]
    small.stub.Add(iter([adding("fits", bag, features(0, count=100))]), timeout=10)
    small.close()
    # The router checks each item as a shard does, before forwarding it.
    cluster = Cluster("item", shards=2, max_local_features_bytes=100 * 36)
    try:
        error = refusal(cluster.stub, adding("big", bag, features(0, count=101)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "item #0 ('big')" in error.details()
        error = refusal(
            cluster.stub, adding("fine", bag, features(0, count=2)), adding("x", bag, common_pb2.LocalFeatures())
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "item #1 ('x')" in error.details()
        assert "local_features.extractor" in error.details()
    finally:
        cluster.close()


def test_the_limit_is_configured_and_checked():
    assert IndexConfig(max_local_features_bytes=0, data_dir="").max_local_features_bytes == 0
    assert IndexConfig(data_dir="").max_local_features_bytes == 512 * 132
    for cls in (IndexConfig, RouterConfig):
        with pytest.raises(ConfigError) as error:
            cls(max_local_features_bytes=-1)
        assert "max_local_features_bytes" in str(error.value)


# -- the router ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["item", "word"])
def test_features_through_the_router(layout):
    """Item layout: the owning shard stores them; word layout: every shard does (each gets the
    Add as sent), so any one answers. The router passes local_features and no_thumbnails on."""
    bags = random_bags(np.random.default_rng(9), 12, VOCABULARY)
    cluster = Cluster(layout, shards=2)
    try:
        cluster.stub.Add(
            iter([adding(f"i{n}", bag, features(n), f"jpeg{n}".encode()) for n, bag in enumerate(bags)]), timeout=10
        )
        ids = [f"i{n}" for n in range(12)]
        assert images(cluster.stub, *ids, "nope") == {i: (f"jpeg{n}".encode(), features(n)) for n, i in enumerate(ids)}
        assert images(cluster.stub, *ids, no_thumbnails=True) == {i: (b"", features(n)) for n, i in enumerate(ids)}
        assert images(cluster.stub, "i0", local_features=False) == {"i0": (b"jpeg0", None)}
        held = [set(images(cluster.direct(address), *ids)) for replicas in cluster.addresses for address in replicas]
        if layout == "word":
            assert held == [set(ids), set(ids)]
        else:
            assert held[0] | held[1] == set(ids) and not held[0] & held[1] and all(held)
        cluster.stub.Delete(index_pb2.DeleteRequest(database="db", item_ids=["i0", "i1"]), timeout=10)
        assert set(images(cluster.stub, *ids)) == set(ids[2:])
    finally:
        cluster.close()
