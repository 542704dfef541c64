"""The index shard for real, over loopback: adds, searches (grouped and batched), deletes (by group too)."""

import itertools

import grpc
import numpy as np
import pytest

from common.bow_codec import BagOfWords, encode
from common.config import load_config
from common.proto_convert import dense_to_proto
from common.status import details_of
from index_server.config import IndexConfig
from index_server.server import create_server
from mps.common.v1 import common_pb2
from mps.index.v1 import index_pb2, index_pb2_grpc
from tests.index_server import helpers
from tests.index_server.helpers import (
    add_request,
    as_tuples,
    bow,
    bow_scores,
    dense_scores,
    grouped_reference,
    random_bags,
)


@pytest.fixture()
def stub():
    server, port = create_server(
        load_config(IndexConfig, "index", environ={}, port=0, chunk_size=3, data_dir="", max_batch=4)
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield index_pb2_grpc.IndexServiceStub(channel)
    channel.close()
    server.stop(None)


def add(item_id, vector, database="tops", **metadata):
    return index_pb2.AddRequest(
        item_id=item_id,
        database=database,
        signature=dense_to_proto(np.asarray(vector, dtype=np.float32)),
        metadata=metadata,
    )


def search(stub, vector, database="tops", top_k=10):
    chunks = list(
        stub.Search(
            index_pb2.SearchRequest(
                database=database, signature=dense_to_proto(np.asarray(vector, dtype=np.float32)), top_k=top_k
            ),
            timeout=5,
        )
    )
    return chunks, [i for c in chunks for i in c.items]


def test_add_search_stream_delete_stats(stub):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(20, 8)).astype(np.float32)
    response = stub.Add(iter([add(f"p{i}", v, title=f"P{i}") for i, v in enumerate(vectors)]), timeout=5)
    assert response.added == 20 and response.replaced == 0
    chunks, items = search(stub, vectors[7], top_k=7)
    assert [len(c.items) for c in chunks] == [3, 3, 1]  # streamed in chunks of 3
    assert items[0].item_id == "p7" and items[0].score == pytest.approx(1.0, abs=1e-5)
    assert items[0].metadata["title"] == "P7"
    assert all(a.score >= b.score for a, b in itertools.pairwise(items))
    deleted = stub.Delete(index_pb2.DeleteRequest(database="tops", item_ids=["p7", "nope"]), timeout=5)
    assert deleted.deleted == 1 and list(deleted.not_found) == ["nope"]
    assert "p7" not in [i.item_id for i in search(stub, vectors[7])[1]]
    stats = stub.Stats(index_pb2.StatsRequest(), timeout=5)
    assert [(d.name, d.items, d.dimension) for d in stats.databases] == [("tops", 19, 8)]


def test_errors(stub):
    stub.Add(iter([add("a", [1, 0, 0])]), timeout=5)
    with pytest.raises(grpc.RpcError) as error:
        search(stub, [1, 0, 0], database="shoes")
    # Says how a database is created, and never which ones this shard holds.
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "'shoes'" in error.value.details()
    assert "first Add" in error.value.details() and "tops" not in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        search(stub, [1, 0, 0, 0])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == "signature has 4 values; this database holds 3-d vectors"
    with pytest.raises(grpc.RpcError) as error:
        list(
            stub.Search(
                index_pb2.SearchRequest(
                    database="tops", signature=common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_DEEP)
                ),
                timeout=5,
            )
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == "signature is empty: a deep signature carries dense.values_f32le (D float32)"
    with pytest.raises(grpc.RpcError) as error:
        search(stub, [1, 0, 0], top_k=100_000)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == "top_k 100000 is above the limit of 1000: ask for at most 1000"
    # The field at fault and the limit, for a client to act on without parsing the message.
    details = details_of(error.value)
    assert details.reason == "INVALID_ARGUMENT"
    assert details.violations == [("top_k", "100000 is above the limit of 1000")]
    assert details.quota == [("max_top_k", "at most 1000 results per query")]


def test_a_bad_item_mid_stream_stores_nothing_of_the_stream(stub):
    with pytest.raises(grpc.RpcError) as error:
        stub.Add(iter([add("a", [1, 0]), add("b", [0, 1]), add("c", [0, 0])]), timeout=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "item #2 ('c')" in error.value.details() and "nothing of this stream was added" in error.value.details()
    # Nor was its database created (with the refused stream's dimension): a 3-d one can be now.
    assert stub.Add(iter([add("d", [1, 0, 0])]), timeout=5).added == 1
    assert [i.item_id for i in search(stub, [1, 0, 0])[1]] == ["d"]


def bow_signature(words, counts=None, vocabulary=5000, codebook=11):
    counts = counts or [1] * len(words)
    bag = BagOfWords(np.asarray(words, np.int32), np.asarray(counts, np.uint32), vocabulary, codebook)
    return common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BOW, bow=encode(bag))


def test_bag_of_words_databases_over_grpc(stub):
    adds = [
        index_pb2.AddRequest(item_id=f"b{i}", database="bags", signature=bow_signature([i, i + 1, 100]))
        for i in range(10)
    ]
    assert stub.Add(iter(adds), timeout=5).added == 10
    query = bow_signature([3, 4, 100])
    items = [
        i
        for c in stub.Search(index_pb2.SearchRequest(database="bags", signature=query, top_k=4), timeout=5)
        for i in c.items
    ]
    assert items[0].item_id == "b3" and items[0].score == pytest.approx(1.0)
    assert {i.item_id for i in items[1:3]} == {"b2", "b4"}  # two words in common
    stub.Delete(index_pb2.DeleteRequest(database="bags", item_ids=["b3"]), timeout=5)
    items = [
        i for c in stub.Search(index_pb2.SearchRequest(database="bags", signature=query), timeout=5) for i in c.items
    ]
    assert "b3" not in {i.item_id for i in items} and len(items) == 9
    stats = {d.name: d for d in stub.Stats(index_pb2.StatsRequest(), timeout=5).databases}
    assert stats["bags"].kind == common_pb2.SIGNATURE_KIND_BOW and stats["bags"].dimension == 5000


@pytest.mark.parametrize(
    "signature, fragment",
    [
        (
            common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BOW),
            "signature is empty: a bag-of-words signature carries bow bytes",
        ),
        (common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BOW, bow=b"\x01garbage"), "bag-of-words signature: "),
        (
            bow_signature([1, 2], codebook=12),
            "signature was made with codebook 0000000c; this database holds codebook 0000000b signatures",
        ),
        (
            bow_signature([1, 2], vocabulary=6000),
            "signature uses a 6000-word vocabulary; this database holds 5000-word bags",
        ),
        (dense_to_proto(np.ones(8, np.float32)), "holds SIGNATURE_KIND_BOW signatures, not SIGNATURE_KIND_DEEP"),
        (bow_signature([1, 2], counts=[70_000, 1]), "a word count above 65535 does not fit a posting"),
    ],
)
def test_bad_bag_of_words_signatures_get_invalid_argument(stub, signature, fragment):
    stub.Add(iter([index_pb2.AddRequest(item_id="a", database="bags", signature=bow_signature([1, 2]))]), timeout=5)
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Search(index_pb2.SearchRequest(database="bags", signature=signature), timeout=5))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        stub.Add(iter([index_pb2.AddRequest(item_id="b", database="bags", signature=signature)]), timeout=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("item #0 ('b'): ") and fragment in error.value.details()
    assert error.value.details().endswith("; nothing of this stream was added")


def test_concurrent_adds_and_searches_under_load(tmp_path, monkeypatch):
    """Writers and readers at once over gRPC, durable store on, merges and snapshots running."""
    import threading

    import index_server.inverted as inverted
    from index_server.server import create_bundle

    monkeypatch.setattr(inverted, "MERGE_FLOOR", 2000)
    bundle = create_bundle(
        load_config(IndexConfig, "index", environ={}, port=0, data_dir=str(tmp_path), snapshot_every=400)
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{bundle.port}")
    stub = index_pb2_grpc.IndexServiceStub(channel)
    errors: list[BaseException] = []
    rng = np.random.default_rng(9)
    bags = {f"w{w}-{i}": rng.choice(5000, 60, replace=False) for w in range(3) for i in range(300)}

    def writer(w):
        try:
            for start in range(0, 300, 30):
                stub.Add(
                    iter(
                        [
                            index_pb2.AddRequest(
                                item_id=f"w{w}-{i}",
                                database="bags",
                                signature=bow_signature(bags[f"w{w}-{i}"].tolist()),
                            )
                            for i in range(start, start + 30)
                        ]
                    ),
                    timeout=30,
                )
        except BaseException as exc:
            errors.append(exc)

    def reader():
        try:
            for n in range(60):
                key = f"w{n % 3}-{n}"
                items = (
                    [
                        i
                        for c in stub.Search(
                            index_pb2.SearchRequest(
                                database="bags", signature=bow_signature(bags[key].tolist()), top_k=5
                            ),
                            timeout=30,
                        )
                        for i in c.items
                    ]
                    if n > 5
                    else []
                )
                assert len({i.item_id for i in items}) == len(items)
                assert all(a.score >= b.score for a, b in itertools.pairwise(items))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # before the first add
                errors.append(exc)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)] + [
        threading.Thread(target=reader) for _ in range(3)
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert stub.Stats(index_pb2.StatsRequest(), timeout=5).databases[0].items == 900
        for key in ("w0-0", "w1-150", "w2-299"):  # every item is findable by its own bag
            items = [
                i
                for c in stub.Search(
                    index_pb2.SearchRequest(database="bags", signature=bow_signature(bags[key].tolist()), top_k=1),
                    timeout=5,
                )
                for i in c.items
            ]
            assert items[0].item_id == key
    finally:
        channel.close()
        bundle.server.stop(None)
        bundle.on_stop()


def grouped_adds(rng, database, kind, groups=25):
    """Several images per group (a product), boxes on some, a few items with no group; returns the
    requests and each item's value and group."""
    adds, values, group_of = [], {}, {}
    for g in range(groups):
        for n in range(int(rng.integers(1, 6))):
            item_id, group = (f"{database}-solo{g}", "") if g % 7 == 0 else (f"{database}-g{g}-{n}", f"p{g}")
            value = (
                random_bags(rng, 1, 5000, codebook=11)[0] if kind == "bow" else rng.normal(size=8).astype(np.float32)
            )
            box = np.array([n, g, n + 1, g + 1], np.float32) if n % 2 else None
            adds.append(add_request(item_id, database, value, group, box, title=f"{g}/{n}"))
            values[item_id], group_of[item_id] = value, group
    return adds, values, group_of


def signature_of(value):
    return bow(value) if isinstance(value, BagOfWords) else dense_to_proto(value)


@pytest.mark.parametrize("kind", ["bow", "dense"])
def test_grouped_search_returns_each_product_once_by_its_best_image(stub, kind):
    rng = np.random.default_rng(11)
    adds, values, group_of = grouped_adds(rng, "shop", kind)
    response = stub.Add(iter(adds), timeout=10)
    # A solo item is sent once per image of its "group": one item, replaced by the later sends.
    sent_twice = {a.item_id for a in adds if sum(b.item_id == a.item_id for b in adds) > 1}
    assert (response.added, response.replaced) == (len(values), len(sent_twice))
    groups = {g or i for i, g in group_of.items()}
    queries = [values["shop-g3-1"]] + (
        [random_bags(rng, 1, 5000, codebook=11)[0] for _ in range(3)]
        if kind == "bow"
        else list(rng.normal(size=(3, 8)).astype(np.float32))
    )
    for query in queries:
        scores = bow_scores(query, values) if kind == "bow" else dense_scores(query, values)
        _, items = helpers.search(stub, "shop", signature_of(query), top_k=8, one_per_group=True)
        expected = grouped_reference(scores, group_of, 8)
        assert [i.item_id for i in items] == [e[0] for e in expected]
        np.testing.assert_allclose([i.score for i in items], [e[1] for e in expected], atol=1e-5)
        assert len(items) == 8 < len(groups)  # exactly top_k groups where that many exist
        assert len({i.group_id or i.item_id for i in items}) == 8
    _, items = helpers.search(stub, "shop", signature_of(values["shop-g3-1"]), top_k=1)
    assert items[0].item_id == "shop-g3-1" and items[0].group_id == "p3" and items[0].metadata["title"] == "3/1"
    assert (items[0].box.x_min, items[0].box.y_min, items[0].box.x_max, items[0].box.y_max) == (1, 3, 2, 4)
    _, items = helpers.search(stub, "shop", signature_of(values["shop-solo0"]), top_k=1)
    assert items[0].group_id == "" and not items[0].HasField("box")


@pytest.mark.parametrize("kind", ["bow", "dense"])
def test_delete_by_group_removes_every_image_of_the_product(stub, kind):
    rng = np.random.default_rng(12)
    adds, values, group_of = grouped_adds(rng, "shop", kind)
    stub.Add(iter(adds), timeout=10)
    in_p3 = sorted(i for i, g in group_of.items() if g == "p3")
    response = stub.Delete(
        index_pb2.DeleteRequest(database="shop", item_ids=[in_p3[0], "nope"], group_ids=["p3", "shop-solo7", "p-none"]),
        timeout=5,
    )
    assert response.deleted == len(in_p3) + 1  # an item named by id and by group counts once
    assert list(response.not_found) == ["nope"] and list(response.groups_not_found) == ["p-none"]
    for item_id in in_p3 + ["shop-solo7"]:
        _, items = helpers.search(stub, "shop", signature_of(values[item_id]), top_k=200)
        assert item_id not in {i.item_id for i in items} and "p3" not in {i.group_id for i in items}
    stats = stub.Stats(index_pb2.StatsRequest(), timeout=5).databases[0]
    assert stats.items == len(values) - len(in_p3) - 1
    again = stub.Delete(index_pb2.DeleteRequest(database="shop", group_ids=["p3"]), timeout=5)
    assert again.deleted == 0 and list(again.groups_not_found) == ["p3"]


def test_lookup_names_groups_and_boxes(stub):
    from index_server.domain import item_key

    rng = np.random.default_rng(13)
    adds, _, _ = grouped_adds(rng, "shop", "bow")
    stub.Add(iter(adds), timeout=10)
    found = {
        i.item_id: i
        for i in stub.Lookup(
            index_pb2.LookupRequest(database="shop", keys=[item_key("shop-g1-1"), item_key("shop-solo0")]), timeout=5
        ).items
    }
    assert found["shop-g1-1"].group_id == "p1" and found["shop-g1-1"].box.x_max == 2
    assert found["shop-solo0"].group_id == "" and not found["shop-solo0"].HasField("box")


@pytest.mark.parametrize("kind", ["bow", "dense"])
def test_search_batch_answers_each_query_as_search_does(stub, kind):
    rng = np.random.default_rng(14)
    adds, values, _ = grouped_adds(rng, "shop", kind)
    stub.Add(iter(adds), timeout=10)
    queries = [signature_of(v) for v in list(values.values())[:4]]  # the fixture's batch limit
    for grouped in (False, True):
        response = helpers.search_batch(stub, "shop", queries, top_k=5, one_per_group=grouped)
        assert not response.degraded and len(response.results) == len(queries)
        for query, hits in zip(queries, response.results):
            assert as_tuples(hits.items) == as_tuples(helpers.search(stub, "shop", query, 5, grouped)[1])


def test_search_batch_errors(stub):
    stub.Add(iter([add("a", [1, 0, 0])]), timeout=5)
    good = dense_to_proto(np.array([1, 0, 0], np.float32))
    cases = [
        ([], 5, grpc.StatusCode.INVALID_ARGUMENT, "signatures is empty: send at least one query"),
        ([good] * 5, 5, grpc.StatusCode.RESOURCE_EXHAUSTED, "batch limit of 4"),
        ([good, dense_to_proto(np.ones(4, np.float32))], 5, grpc.StatusCode.INVALID_ARGUMENT, "signature #1: "),
        ([good, bow_signature([1])], 5, grpc.StatusCode.INVALID_ARGUMENT, "not SIGNATURE_KIND_BOW"),
        ([good], 100_000, grpc.StatusCode.INVALID_ARGUMENT, "top_k 100000 is above the limit of 1000"),
    ]
    for signatures, top_k, code, fragment in cases:
        with pytest.raises(grpc.RpcError) as error:
            helpers.search_batch(stub, "tops", signatures, top_k=top_k)
        assert error.value.code() == code and fragment in error.value.details(), error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        helpers.search_batch(stub, "shoes", [good])
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert [i.item_id for i in helpers.search_batch(stub, "tops", [good] * 4).results[3].items] == ["a"]


def test_limits_exceeded_name_the_limit_in_a_quota_failure(stub):
    """RESOURCE_EXHAUSTED (and a top_k too large) carry google.rpc.QuotaFailure: which limit, how much."""
    stub.Add(iter([add("a", [1, 0, 0])]), timeout=5)
    good = dense_to_proto(np.array([1, 0, 0], np.float32))
    with pytest.raises(grpc.RpcError) as error:
        helpers.search_batch(stub, "tops", [good] * 5)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.value.details() == "5 queries are above this shard's batch limit of 4: split the batch"
    details = details_of(error.value)
    assert (details.reason, details.quota) == (
        "RESOURCE_EXHAUSTED",
        [("max_batch", "at most 4 queries per SearchBatch")],
    )


def test_an_answer_above_the_message_limit_is_refused_saying_how_to_ask_for_less():
    server, port = create_server(
        load_config(IndexConfig, "index", environ={}, port=0, data_dir="", max_message_bytes=20_000)
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = index_pb2_grpc.IndexServiceStub(channel)
    try:
        rng = np.random.default_rng(15)
        vectors = rng.normal(size=(20, 8)).astype(np.float32)
        # 20 items of ~1 kB of metadata: one query's top 10 fits, four queries' do not.
        stub.Add(iter([add(f"p{i}", v, note="n" * 1000) for i, v in enumerate(vectors)]), timeout=5)
        queries = [dense_to_proto(v) for v in vectors[:4]]
        assert len(helpers.search_batch(stub, "tops", queries[:1], top_k=10).results[0].items) == 10
        with pytest.raises(grpc.RpcError) as error:
            helpers.search_batch(stub, "tops", queries, top_k=10)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        message = error.value.details()
        assert message.startswith("the answer is ") and message.endswith(
            " bytes, above the message limit of 20000: send fewer queries per batch or ask for a smaller top_k"
        )
        assert int(message.removeprefix("the answer is ").split(" ")[0]) > 40_000
        details = details_of(error.value)
        assert (details.reason, details.quota) == (
            "RESOURCE_EXHAUSTED",
            [("max_message_bytes", "answers of at most 20000 bytes")],
        )
    finally:
        channel.close()
        server.stop(None)


def test_a_box_that_is_not_finite_is_refused(stub):
    request = add_request("a", "tops", np.ones(3, np.float32), "p", np.array([0, 0, np.inf, 1], np.float32))
    with pytest.raises(grpc.RpcError) as error:
        stub.Add(iter([add("ok", [1, 0, 0]), request]), timeout=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == (
        "item #1 ('a'): box has NaN or infinite coordinates; nothing of this stream was added"
    )
