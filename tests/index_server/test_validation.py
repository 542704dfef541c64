"""What a shard and the router refuse, and the exact counts they reply, over loopback: names,
metadata, dimensions, values, top_k, items per stream; a refused stream stores nothing."""

import grpc
import numpy as np
import pytest

from common.config import load_config
from common.errors import InvalidArgument
from common.names import MAX_NAME_BYTES, check_name
from common.proto_convert import dense_to_proto
from common.status import details_of
from index_server.config import IndexConfig
from index_server.server import create_server
from mps.index.v1 import index_pb2, index_pb2_grpc
from tests.index_server.helpers import Cluster, add_request, random_bags, search


@pytest.fixture()
def stub():
    server, port = create_server(
        load_config(IndexConfig, "index", environ={}, port=0, data_dir="", max_items_per_stream=50)
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield index_pb2_grpc.IndexServiceStub(channel)
    channel.close()
    server.stop(None)


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster("item", shards=2, max_items_per_stream=50)
    yield cluster
    cluster.close()


def dense(item_id, values, database="tops", **metadata):
    return add_request(item_id, database, np.asarray(values, np.float32), **metadata)


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


def stats(stub):
    return {d.name: d.items for d in stub.Stats(index_pb2.StatsRequest(), timeout=5).databases}


@pytest.mark.parametrize("name", ["shoes", "cell phone.deep", "Schuhe/größe:42", "a@b+c_d-e.f", "x" * MAX_NAME_BYTES])
def test_names_that_are_allowed(name):
    check_name("database", name)


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("", "database is required"),
        ("a\0b", "U+0000"),
        ("x" * (MAX_NAME_BYTES + 1), "above the limit of 128"),
        ("é" * 65, "130 UTF-8 bytes"),
        (" shoes", "whitespace"),
        ("shoes\n", "whitespace"),
        ("a\tb", "U+0009"),
        ("a  b", "second space"),
        ("a;b", "';'"),
        ("\u202e", "U+202E"),
    ],
)
def test_names_that_are_refused_say_the_rule(name, fragment):
    with pytest.raises(InvalidArgument) as error:
        check_name("database", name)
    assert fragment in str(error.value) and "letters, digits" in str(error.value)
    assert len(str(error.value)) < 400


@pytest.mark.parametrize("via", ["shard", "router"])
def test_bad_database_names_are_refused_before_anything_is_stored(stub, cluster, via):
    target = stub if via == "shard" else cluster.stub
    for name, fragment in (
        ("bad\0name", "database name 'bad\\x00name' has character '\\x00' (U+0000) at position 3"),
        ("n" * 600, "is 600 UTF-8 bytes, above the limit of 128"),
        (" padded", "database name ' padded' starts or ends with whitespace"),
    ):
        error = refused(lambda name=name: target.Add(iter([dense("a", [1, 0], database=name)]), timeout=5))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "item #0 ('a')" in error.details()
        assert fragment in error.details() and len(error.details()) < 600, error.details()
    assert "bad" not in str(stats(target))


@pytest.mark.parametrize("via", ["shard", "router"])
@pytest.mark.parametrize(
    "metadata, fragment",
    [
        ({f"k{i}": "v" for i in range(65)}, "65 keys, above the limit of 64"),
        ({"k" * 129: "v"}, "above the limit of 128"),
        ({"title": "v" * 4097}, "value of key 'title' is 4097 UTF-8 bytes, above the limit of 4096"),
        ({f"k{i}": "v" * 4000 for i in range(5)}, "above the limit of 16384 per item"),
    ],
)
def test_metadata_over_a_limit_is_refused_naming_item_key_and_limit(stub, cluster, via, metadata, fragment):
    target = stub if via == "shard" else cluster.stub
    error = refused(
        lambda: target.Add(iter([dense("ok", [1, 0], "meta"), dense("fat", [0, 1], "meta", **metadata)]), timeout=5)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "item #1 ('fat')" in error.details() and fragment in error.details(), error.details()
    assert "meta" not in stats(target)  # nor "ok", sent before it


@pytest.mark.parametrize("via", ["shard", "router"])
def test_a_dense_dimension_over_the_cap_is_refused(stub, cluster, via):
    target = stub if via == "shard" else cluster.stub
    error = refused(lambda: target.Add(iter([dense("big", np.ones(4097))]), timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "4097 values, above the limit of 4096 dimensions" in error.details()


def test_a_refused_first_add_creates_no_database(stub):
    """The refused item's dimension used to create the database, and a later valid Add was refused."""
    error = refused(lambda: stub.Add(iter([dense("a", [1, 0, 0]), dense("b", [0, 0, 0])]), timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "item #1 ('b'): signature is all zeros: cosine similarity is undefined for it; nothing of this stream was added"
    )
    assert stats(stub) == {}
    assert (
        refused(lambda: search(stub, "tops", dense_to_proto(np.ones(3, np.float32)))).code()
        == grpc.StatusCode.NOT_FOUND
    )
    assert stub.Add(iter([dense("c", [1, 0, 0, 0])]), timeout=5).added == 1  # 4-d: the first valid one decides


def test_one_stream_gives_a_new_database_one_shape(stub):
    error = refused(lambda: stub.Add(iter([dense("a", [1, 0]), dense("b", [1, 0, 0])]), timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "item #1 ('b')" in error.details() and "first item for it has a deep signature of 2 values" in error.details()
    )
    assert stats(stub) == {}


def test_huge_and_tiny_values_are_normalised_not_zeroed(stub):
    """float32 squares overflow above ~1.8e19: the norm was inf, and the stored vector all zeros."""
    stub.Add(iter([dense("huge", [3e38, 3e38, 0]), dense("tiny", [0, 1e-30, 1e-30]), dense("x", [0, 0, 1])]), timeout=5)
    _, items = search(stub, "tops", dense_to_proto(np.array([1, 1, 0], np.float32)), top_k=3)
    assert items[0].item_id == "huge" and items[0].score == pytest.approx(1.0, abs=1e-5)
    _, items = search(stub, "tops", dense_to_proto(np.array([0, 1, 1], np.float32)), top_k=1)
    assert items[0].item_id == "tiny" and items[0].score == pytest.approx(1.0, abs=1e-5)
    for values, reason in (
        ([np.nan, 1, 0], "signature has NaN or infinite values"),
        ([np.inf, 1, 0], "signature has NaN or infinite values"),
        ([0, 0, 0], "signature is all zeros: cosine similarity is undefined for it"),
    ):
        error = refused(lambda values=values: stub.Add(iter([dense("bad", values)]), timeout=5))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == f"item #0 ('bad'): {reason}; nothing of this stream was added"


@pytest.mark.parametrize("via", ["shard", "router"])
def test_top_k_over_the_limit_is_invalid_argument(stub, cluster, via):
    target = stub if via == "shard" else cluster.stub
    target.Add(iter([dense("a", [1, 0], "topk")]), timeout=5)
    query = dense_to_proto(np.array([1, 0], np.float32))
    for call in (
        lambda: search(target, "topk", query, top_k=1001),
        lambda: target.SearchBatch(
            index_pb2.SearchBatchRequest(database="topk", signatures=[query], top_k=1001), timeout=5
        ),
    ):
        error = refused(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "top_k 1001 is above the limit of 1000: ask for at most 1000" in error.details()
        # The limit, for a client to act on without parsing the message (the router passes it on).
        assert details_of(error).quota == [("max_top_k", "at most 1000 results per query")]


def test_not_found_names_no_other_database(stub):
    for i in range(30):
        stub.Add(iter([dense("a", [1, 0], f"secret-{i}")]), timeout=5)
    query = dense_to_proto(np.array([1, 0], np.float32))
    for call in (
        lambda: search(stub, "missing", query),
        lambda: stub.Delete(index_pb2.DeleteRequest(database="missing", item_ids=["a"]), timeout=5),
        lambda: stub.Lookup(index_pb2.LookupRequest(database="missing", keys=[1]), timeout=5),
    ):
        error = refused(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND and "secret" not in error.details()
        assert "'missing' does not exist" in error.details() and "first Add" in error.details()


@pytest.mark.parametrize("via", ["shard", "router"])
def test_items_per_stream_are_capped_and_nothing_of_a_longer_stream_is_stored(stub, cluster, via):
    target = stub if via == "shard" else cluster.stub
    error = refused(lambda: target.Add(iter([dense(f"i{i}", [1, i], "capped") for i in range(51)]), timeout=10))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "send at most 50 items per Add stream; split the ingest into several streams" in error.details()
    # The limit, for a client to act on without parsing the message (the router passes it on).
    assert details_of(error).quota == [("max_items_per_stream", "at most 50 items per Add stream")]
    assert "capped" not in stats(target)
    assert target.Add(iter([dense(f"i{i}", [1, i], "capped") for i in range(50)]), timeout=10).added == 50


@pytest.mark.parametrize("via", ["shard", "router"])
def test_counts_are_exact_with_an_id_sent_twice(stub, cluster, via):
    target = stub if via == "shard" else cluster.stub
    bags = random_bags(np.random.default_rng(0), 3, 500)
    once = target.Add(iter([add_request("a", "counts", bags[0]), add_request("a", "counts", bags[1])]), timeout=5)
    assert (once.added, once.replaced) == (1, 1)  # not 2 added
    again = target.Add(
        iter(
            [
                add_request("a", "counts", bags[2]),
                add_request("b", "counts", bags[2]),
                add_request("b", "counts", bags[0]),
                add_request("c", "counts", bags[1]),
            ]
        ),
        timeout=5,
    )
    assert (again.added, again.replaced) == (3, 2)  # a (stored before) and b (twice) replaced
    assert stats(target)["counts"] == 3
    deleted = target.Delete(index_pb2.DeleteRequest(database="counts", item_ids=["a", "a", "b", "zz", "zz"]), timeout=5)
    assert deleted.deleted == 2 and list(deleted.not_found) == ["zz"]
