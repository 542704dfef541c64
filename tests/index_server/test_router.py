"""The router in front of real shards over loopback: both layouts merge to what one shard answers
(grouped searches and batches too), replicas share reads and all take writes, deletes by group count
each item once, and a dead or stalled shard degrades a search, flagged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from common.bow_codec import BagOfWords
from common.config import REPO_ROOT, load_config
from common.local_suite import free_port, wait_serving
from common.proto_convert import dense_to_proto
from common.status import details_of
from index_server.config import IndexConfig, RouterConfig
from index_server.domain import item_key, word_range_of
from index_server.merge import shard_of
from index_server.server import create_bundle, create_router_bundle
from mps.common.v1 import common_pb2
from mps.index.v1 import index_pb2, index_pb2_grpc
from tests.index_server import helpers
from tests.index_server.helpers import Cluster, bow

VOCABULARY = 300


def random_bags(rng, count):
    return helpers.random_bags(rng, count, VOCABULARY, codebook=7, longest=120)


@pytest.fixture()
def single():
    config = load_config(IndexConfig, "index", environ={}, port=0, data_dir="")
    bundle = create_bundle(config)
    channel = grpc.insecure_channel(f"127.0.0.1:{bundle.port}")
    yield index_pb2_grpc.IndexServiceStub(channel)
    channel.close()
    bundle.server.stop(None)


def search(stub, database, signature, top_k=10, timeout=10):
    chunks = list(
        stub.Search(index_pb2.SearchRequest(database=database, signature=signature, top_k=top_k), timeout=timeout)
    )
    return chunks[0], [(i.item_id, i.score, dict(i.metadata)) for c in chunks for i in c.items]


def assert_same(got, expected):
    assert [g[0] for g in got] == [e[0] for e in expected]
    np.testing.assert_allclose([g[1] for g in got], [e[1] for e in expected], atol=1e-5)
    assert [g[2] for g in got] == [e[2] for e in expected]


@pytest.mark.parametrize("layout", ["item", "word"])
def test_merge_across_shards_equals_a_single_shard(layout, single):
    rng = np.random.default_rng(3)
    bags = random_bags(rng, 300)
    vectors = rng.normal(size=(200, 16)).astype(np.float32)
    adds = [
        index_pb2.AddRequest(item_id=f"b{i}", database="bags", signature=bow(b), metadata={"n": str(i)})
        for i, b in enumerate(bags)
    ]
    adds += [
        index_pb2.AddRequest(item_id=f"d{i}", database="dense", signature=dense_to_proto(v))
        for i, v in enumerate(vectors)
    ]
    cluster = Cluster(layout, shards=3)
    try:
        assert cluster.stub.Add(iter(adds), timeout=20).added == len(adds) == single.Add(iter(adds), timeout=20).added
        # The items really are spread: by item, or by word (every shard holds a share of each bag).
        held = [
            {d.name: d.items for d in cluster.direct(a[0]).Stats(index_pb2.StatsRequest(), timeout=5).databases}
            for a in cluster.addresses
        ]
        if layout == "item":
            assert sum(h["bags"] for h in held) == 300 and max(h["bags"] for h in held) < 150
        else:
            assert [h["bags"] for h in held] == [300, 300, 300]
        assert sum(h["dense"] for h in held) == 200  # dense databases are spread by item in both layouts
        stats = {d.name: d.items for d in cluster.stub.Stats(index_pb2.StatsRequest(), timeout=5).databases}
        assert stats == {"bags": 300, "dense": 200}

        for query in random_bags(rng, 8) + bags[:2]:
            first, got = search(cluster.stub, "bags", bow(query), top_k=25)
            assert not first.degraded
            assert_same(got, search(single, "bags", bow(query), top_k=25)[1])
        for vector in rng.normal(size=(5, 16)).astype(np.float32):
            assert_same(
                search(cluster.stub, "dense", dense_to_proto(vector))[1],
                search(single, "dense", dense_to_proto(vector))[1],
            )

        # Delete then search never returns the item, whichever shards held it.
        response = cluster.stub.Delete(
            index_pb2.DeleteRequest(database="bags", item_ids=["b0", "b1", "nope"]), timeout=5
        )
        assert response.deleted == 2 and list(response.not_found) == ["nope"]
        assert all(i[0] not in ("b0", "b1") for i in search(cluster.stub, "bags", bow(bags[0]), top_k=300)[1])
    finally:
        cluster.close()


def test_bad_input_through_the_router_gets_the_shards_status():
    cluster = Cluster("word", shards=2)
    try:
        cluster.stub.Add(
            iter(
                [
                    index_pb2.AddRequest(
                        item_id="a", database="bags", signature=bow(BagOfWords.from_words([1, 2], VOCABULARY, 7))
                    )
                ]
            ),
            timeout=5,
        )
        cases = [
            ("shoes", bow(BagOfWords.from_words([1], VOCABULARY, 7)), grpc.StatusCode.NOT_FOUND, "shoes"),
            (
                "bags",
                dense_to_proto(np.ones(4, np.float32)),
                grpc.StatusCode.INVALID_ARGUMENT,
                "not SIGNATURE_KIND_DEEP",
            ),
            ("bags", bow(BagOfWords.from_words([1], 500, 7)), grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
            (
                "bags",
                common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BOW),
                grpc.StatusCode.INVALID_ARGUMENT,
                "empty",
            ),
            ("", bow(BagOfWords.from_words([1], VOCABULARY, 7)), grpc.StatusCode.INVALID_ARGUMENT, "database"),
        ]
        for database, signature, code, fragment in cases:
            with pytest.raises(grpc.RpcError) as error:
                search(cluster.stub, database, signature)
            assert error.value.code() == code and fragment in error.value.details(), (database, error.value.details())
        with pytest.raises(grpc.RpcError) as error:
            cluster.stub.Add(
                iter(
                    [
                        index_pb2.AddRequest(
                            item_id="b", database="bags", signature=bow(BagOfWords.from_words([1], VOCABULARY, 7))
                        ),
                        index_pb2.AddRequest(item_id="c", database="bags"),
                    ]
                ),
                timeout=5,
            )
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "item #1" in error.value.details() and "nothing of this stream was added" in error.value.details()
        # All or nothing: b, forwarded to the shards before c was refused, is not stored either.
        assert {i[0] for i in search(cluster.stub, "bags", bow(BagOfWords.from_words([1], VOCABULARY, 7)))[1]} == {"a"}
        # A box with NaN is refused by the router itself, before any shard commits.
        bad_box = index_pb2.AddRequest(
            item_id="d",
            database="bags",
            signature=bow(BagOfWords.from_words([1], VOCABULARY, 7)),
            box=common_pb2.Box(x_min=float("nan"), x_max=5, y_max=5),
        )
        with pytest.raises(grpc.RpcError) as error:
            cluster.stub.Add(
                iter(
                    [
                        index_pb2.AddRequest(
                            item_id="e", database="bags", signature=bow(BagOfWords.from_words([2], VOCABULARY, 7))
                        ),
                        bad_box,
                    ]
                ),
                timeout=5,
            )
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "box has NaN" in error.value.details()
        assert "nothing of this stream was added" in error.value.details()
        assert {i[0] for i in search(cluster.stub, "bags", bow(BagOfWords.from_words([1, 2], VOCABULARY, 7)))[1]} == {
            "a"
        }
    finally:
        cluster.close()


def test_replicas_share_searches_and_all_take_writes():
    cluster = Cluster("item", shards=2, replicas=2)
    rng = np.random.default_rng(4)
    bags = random_bags(rng, 60)
    try:
        cluster.stub.Add(
            iter(
                [index_pb2.AddRequest(item_id=f"b{i}", database="bags", signature=bow(b)) for i, b in enumerate(bags)]
            ),
            timeout=10,
        )
        for number, replicas in enumerate(cluster.addresses):
            counts = [cluster.direct(a).Stats(index_pb2.StatsRequest(), timeout=5).databases[0].items for a in replicas]
            expected = sum(shard_of(f"b{i}", 2) == number for i in range(60))
            assert counts == [expected, expected]
        # One replica of each shard down: searches go to the other one, complete and not degraded.
        expected = search(cluster.stub, "bags", bow(bags[5]))[1]
        cluster.bundles[0].server.stop(None)
        cluster.bundles[3].server.stop(None)
        for _ in range(6):
            first, got = search(cluster.stub, "bags", bow(bags[5]))
            assert not first.degraded and got == expected
        # A write reaches one replica of each shard: done (the others catch up on return, see
        # test_replication.py); with no replica of a shard: refused, naming it, so the caller re-sends.
        assert (
            cluster.stub.Add(
                iter(
                    [index_pb2.AddRequest(item_id=f"n{i}", database="bags", signature=bow(bags[i])) for i in range(10)]
                ),
                timeout=10,
            ).added
            == 10
        )
        cluster.bundles[1].server.stop(None)
        with pytest.raises(grpc.RpcError) as error:
            cluster.stub.Add(
                iter(
                    [index_pb2.AddRequest(item_id=f"m{i}", database="bags", signature=bow(bags[i])) for i in range(10)]
                ),
                timeout=10,
            )
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "shard 0" in error.value.details()
        assert "re-send" in error.value.details()
    finally:
        cluster.close()


@pytest.fixture()
def shard_processes(tmp_path):
    """Three word-range shard processes (so one can be killed or stopped for real)."""
    processes, addresses = [], []
    for number in range(3):
        port = free_port()
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "index_server",
                    "--port",
                    str(port),
                    "--data-dir",
                    str(tmp_path / f"s{number}"),
                    "--word-shard-index",
                    str(number),
                    "--word-shard-count",
                    "3",
                    "--log-level",
                    "WARNING",
                ],
                cwd=REPO_ROOT,
            )
        )
        addresses.append(f"127.0.0.1:{port}")
    try:
        for process, address in zip(processes, addresses):
            wait_serving(address, process)
        yield processes, addresses
    finally:
        for process in processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
                process.kill()
            process.wait()


@pytest.mark.parametrize("fault", ["killed", "stalled", "killed_in_flight"])
def test_a_dead_or_late_shard_gives_flagged_results_of_the_other_ranges(shard_processes, fault):
    processes, addresses = shard_processes
    router = create_router_bundle(
        load_config(
            RouterConfig,
            "index_router",
            environ={},
            port=0,
            layout="word",
            shards=[[a] for a in addresses],
            reply_reserve_s=0.05,
        )
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{router.port}")
    stub = index_pb2_grpc.IndexServiceStub(channel)
    rng = np.random.default_rng(5)
    bags = random_bags(rng, 200)
    try:
        stub.Add(
            iter(
                [index_pb2.AddRequest(item_id=f"b{i}", database="bags", signature=bow(b)) for i, b in enumerate(bags)]
            ),
            timeout=20,
        )
        query = bags[9]
        assert search(stub, "bags", bow(query))[1][0][0] == "b9"
        if fault == "killed":
            processes[1].kill()
            processes[1].wait()
        else:
            os.kill(processes[1].pid, signal.SIGSTOP)  # alive, but answers nothing before the deadline
        if fault == "killed_in_flight":  # the shard dies while the router waits on its stream
            threading.Timer(0.5, processes[1].kill).start()
        started = time.monotonic()
        first, got = search(stub, "bags", bow(query), top_k=20, timeout=2 if fault == "stalled" else 8)
        if fault == "killed_in_flight":
            assert time.monotonic() - started < 4  # answered on the kill, long before the deadline
        assert first.degraded and list(first.missing_shards) == []
        lo, hi = word_range_of(1, 3, VOCABULARY)
        assert [(r.first, r.end) for r in first.missing_word_ranges] == [(lo, hi)]
        assert "shard 1" in first.degraded_reason
        # Exact over the words that answered: chi2 overlap summed over the other two ranges.
        keep = lambda b: (b.words < lo) | (b.words >= hi)  # noqa: E731
        q = query.histogram()
        scores = {}
        for i, bag in enumerate(bags):
            x = bag.histogram()
            common, qi, xi = np.intersect1d(query.words[keep(query)], bag.words, return_indices=True)
            terms = 4 * q[keep(query)][qi] * x[xi] / (q[keep(query)][qi] + x[xi])
            if len(common):
                scores[f"b{i}"] = terms.sum() / 2
        expected = sorted(scores.items(), key=lambda t: (-t[1], t[0]))[:20]
        assert [g[0] for g in got] == [e[0] for e in expected]
        np.testing.assert_allclose([g[1] for g in got], [e[1] for e in expected], atol=1e-5)
    finally:
        channel.close()
        router.server.stop(None)
        router.on_stop()


def test_word_layout_asks_only_the_shards_holding_the_query_words():
    cluster = Cluster("word", shards=3)
    try:
        bags = [BagOfWords.from_words([1, 2, 150 + i], VOCABULARY, 7) for i in range(5)]
        cluster.stub.Add(
            iter(
                [index_pb2.AddRequest(item_id=f"b{i}", database="bags", signature=bow(b)) for i, b in enumerate(bags)]
            ),
            timeout=5,
        )
        cluster.bundles[2].server.stop(None)  # words [200, 300): no query word lives there
        first, got = search(cluster.stub, "bags", bow(BagOfWords.from_words([1, 152], VOCABULARY, 7)))
        assert not first.degraded and got[0][0] == "b2"
    finally:
        cluster.close()


def product_adds(rng, products=40):
    """Several images per product in both kinds' databases, each product's images spread over the
    stream (round-robin), so that they reach each shard interleaved with other products.
    Every ninth product's images have no group (each its own)."""
    per_product = {p: int(rng.integers(1, 6)) for p in range(products)}
    adds, bags, vectors, group_of = [], {}, {}, {}
    for n in range(max(per_product.values())):
        for p, count in per_product.items():
            if n >= count:
                continue
            item_id, group = (f"solo{p}-{n}", "") if p % 9 == 0 else (f"p{p}-{n}", f"p{p}")
            bags[item_id], vectors[item_id], group_of[item_id] = random_bags(rng, 1)[0], rng.normal(size=16), group
            box = np.array([n, p, n + 1, p + 1], np.float32) if n % 2 else None
            adds.append(helpers.add_request(item_id, "bags", bags[item_id], group, box, n=str(n)))
            adds.append(helpers.add_request(item_id, "dense", vectors[item_id], group, box, n=str(n)))
    return adds, bags, vectors, group_of


def assert_same_items(got, expected):
    """Same ids, groups, boxes and metadata in the same order; scores to float32 rounding."""
    assert [(i.item_id, i.group_id, dict(i.metadata)) for i in got] == [
        (i.item_id, i.group_id, dict(i.metadata)) for i in expected
    ]
    assert [i.box if i.HasField("box") else None for i in got] == [
        i.box if i.HasField("box") else None for i in expected
    ]
    np.testing.assert_allclose([i.score for i in got], [i.score for i in expected], atol=1e-5)


@pytest.mark.parametrize("layout", ["item", "word"])
def test_grouped_search_batches_and_group_deletes_through_the_router_equal_one_shard(layout, single):
    rng = np.random.default_rng(21)
    adds, bags, vectors, group_of = product_adds(rng)
    cluster = Cluster(layout, shards=3, replicas=2)
    try:
        assert cluster.stub.Add(iter(adds), timeout=20).added == len(adds) == single.Add(iter(adds), timeout=20).added
        if layout == "item":  # every image of a product on its product's shard, whatever its batch
            for number, replicas in enumerate(cluster.addresses):
                held = (
                    cluster.direct(replicas[0])
                    .Lookup(index_pb2.LookupRequest(database="bags", keys=[item_key(i) for i in bags]), timeout=5)
                    .items
                )
                assert {i.item_id for i in held} == {i for i, g in group_of.items() if shard_of(i, 3, g) == number}
        bag_queries = [bow(b) for b in random_bags(rng, 4)] + [bow(bags["p1-0"]), bow(bags["solo0-0"])]
        dense_queries = [dense_to_proto(v) for v in rng.normal(size=(4, 16)).astype(np.float32)]
        dense_queries.append(dense_to_proto(vectors["p2-0"].astype(np.float32)))
        for database, queries in (("bags", bag_queries), ("dense", dense_queries)):
            for grouped in (False, True):
                batch = helpers.search_batch(cluster.stub, database, queries, top_k=12, one_per_group=grouped)
                assert not batch.degraded and len(batch.results) == len(queries)
                for query, hits in zip(queries, batch.results):  # each answer is that query's Search
                    first, items = helpers.search(cluster.stub, database, query, 12, grouped)
                    assert not first.degraded
                    assert_same_items(hits.items, items)
                    assert_same_items(items, helpers.search(single, database, query, 12, grouped)[1])
                    if grouped:
                        assert len(items) == 12 and len({i.group_id or i.item_id for i in items}) == 12
        for query in random_bags(rng, 3):  # against brute force too, not only against one shard
            _, items = helpers.search(cluster.stub, "bags", bow(query), 10, one_per_group=True)
            expected = helpers.grouped_reference(helpers.bow_scores(query, bags), group_of, 10)
            assert [i.item_id for i in items] == [e[0] for e in expected]

        gone = [i for i, g in group_of.items() if g in ("p1", "p2")] + ["solo9-0"]
        for database in ("bags", "dense"):  # counted once per item, not per shard or replica
            response = cluster.stub.Delete(
                index_pb2.DeleteRequest(
                    database=database, item_ids=["p1-0", "nope"], group_ids=["p1", "p2", "solo9-0", "p-none"]
                ),
                timeout=5,
            )
            assert response.deleted == len(gone) and list(response.not_found) == ["nope"]
            assert list(response.groups_not_found) == ["p-none"]
        for item_id in gone:
            for database, query in (("bags", bow(bags[item_id])), ("dense", dense_to_proto(vectors[item_id]))):
                _, items = helpers.search(cluster.stub, database, query, 300, one_per_group=True)
                assert not {"p1", "p2", "solo9-0"} & {i.group_id or i.item_id for i in items}
    finally:
        cluster.close()


@pytest.mark.parametrize("layout", ["item", "word"])
def test_a_search_batch_with_a_shard_down_is_flagged_like_search(layout):
    rng = np.random.default_rng(22)
    adds, _bags, _, _ = product_adds(rng, products=20)
    cluster = Cluster(layout, shards=3)
    try:
        cluster.stub.Add(iter(a for a in adds if a.database == "bags"), timeout=10)
        cluster.bundles[1].server.stop(None)
        # Words all over the vocabulary, so that every query needs every word range.
        queries = [bow(BagOfWords.from_words(rng.integers(0, VOCABULARY, 40), VOCABULARY, 7)) for _ in range(3)]
        batch = helpers.search_batch(cluster.stub, "bags", queries, top_k=8, one_per_group=True)
        assert batch.degraded and "shard 1" in batch.degraded_reason
        if layout == "item":
            assert list(batch.missing_shards) == [1] and not batch.missing_word_ranges
        else:
            assert [(r.first, r.end) for r in batch.missing_word_ranges] == [word_range_of(1, 3, VOCABULARY)]
        for query, hits in zip(queries, batch.results):
            first, items = helpers.search(cluster.stub, "bags", query, 8, one_per_group=True)
            assert first.degraded and (list(first.missing_shards), list(first.missing_word_ranges)) == (
                list(batch.missing_shards),
                list(batch.missing_word_ranges),
            )
            assert_same_items(hits.items, items)
        with pytest.raises(grpc.RpcError) as error:
            helpers.search_batch(cluster.stub, "bags", [], top_k=8)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as error:
            helpers.search_batch(cluster.stub, "bags", queries * 100, top_k=8)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "256" in error.value.details()
    finally:
        cluster.close()


def shard_bundle(**settings):
    """One in-memory shard with the given IndexConfig settings."""
    return create_bundle(load_config(IndexConfig, "index", environ={}, port=0, data_dir="", **settings))


def test_a_shards_refusal_reaches_the_caller_with_its_details():
    """A refusal that is the caller's fault is passed on with the shard's code and google.rpc
    details (here a QuotaFailure naming the shard's own limit, lower than the router's)."""
    shard = shard_bundle(max_batch=2, max_items_per_stream=3)
    address = f"127.0.0.1:{shard.port}"
    router = create_router_bundle(
        load_config(RouterConfig, "index_router", environ={}, port=0, layout="item", shards=[[address]])
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{router.port}")
    stub = index_pb2_grpc.IndexServiceStub(channel)
    try:
        queries = [dense_to_proto(np.full(4, i + 1, np.float32)) for i in range(3)]
        with pytest.raises(grpc.RpcError) as error:
            stub.SearchBatch(index_pb2.SearchBatchRequest(database="dense", signatures=queries), timeout=10)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "3 queries are above this shard's batch limit of 2" in error.value.details()
        details = details_of(error.value)
        assert details.reason == "RESOURCE_EXHAUSTED"
        assert details.quota == [("max_batch", "at most 2 queries per SearchBatch")]

        adds = [
            index_pb2.AddRequest(item_id=f"d{i}", database="dense", signature=dense_to_proto(np.full(4, i + 1.0)))
            for i in range(4)
        ]
        with pytest.raises(grpc.RpcError) as error:
            stub.Add(iter(adds), timeout=10)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.value.details().startswith(f"shard 0 ({address}): send at most 3 items per Add stream")
        assert details_of(error.value).quota == [("max_items_per_stream", "at most 3 items per Add stream")]
        # All or nothing: the shard stored none of the stream, and says so through the router.
        with pytest.raises(grpc.RpcError) as error:
            search(stub, "dense", adds[0].signature)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert "database 'dense' does not exist on any shard" in error.value.details()
        assert details_of(error.value).reason == "NOT_FOUND"
    finally:
        channel.close()
        router.server.stop(None)
        router.on_stop()
        shard.server.stop(None)


def test_word_shards_listed_out_of_order_are_refused_not_merged():
    """A word-range shard that holds other words than the router expects fails the search in the
    worker thread that reads its partial scores; the caller gets FAILED_PRECONDITION, saying how
    to list the shards, not a merge of the wrong words."""
    shards = [shard_bundle(word_shard_index=n, word_shard_count=2) for n in (1, 0)]  # listed backwards
    addresses = [[f"127.0.0.1:{s.port}"] for s in shards]
    router = create_router_bundle(
        load_config(RouterConfig, "index_router", environ={}, port=0, layout="word", shards=addresses)
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{router.port}")
    stub = index_pb2_grpc.IndexServiceStub(channel)
    try:
        bag = bow(BagOfWords.from_words([1, 200], VOCABULARY, 7))
        assert stub.Add(iter([index_pb2.AddRequest(item_id="a", database="bags", signature=bag)]), timeout=5).added == 1
        with pytest.raises(grpc.RpcError) as error:
            search(stub, "bags", bag)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error.value.details() == (
            "shard 0 holds words [150, 300) but the router expects [0, 150): "
            "list the shards in word_shard_index order, with word_shard_count 2"
        )
        # A shard's own RPCs are not a router's.
        with pytest.raises(grpc.RpcError) as error:
            stub.Lookup(index_pb2.LookupRequest(database="bags", keys=[item_key("a")]), timeout=5)
        assert (
            error.value.code() == grpc.StatusCode.UNIMPLEMENTED and "Lookup is a shard's RPC" in error.value.details()
        )
        with pytest.raises(grpc.RpcError) as error:
            list(stub.PartialScores(index_pb2.PartialScoresRequest(database="bags", signature=bag), timeout=5))
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "PartialScores is a shard's RPC" in error.value.details()
    finally:
        channel.close()
        router.server.stop(None)
        router.on_stop()
        for shard in shards:
            shard.server.stop(None)


def test_the_router_loads_no_storage():
    """The router is a stateless proxy: importing it loads neither the catalogue nor the storage
    and search libraries a shard needs."""
    code = (
        "import json, sys, index_server.router; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('faiss', 'lmdb') "
        "or m in ('index_server.catalogue', 'index_server.store', 'index_server.dense', 'index_server.inverted'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    # The check itself sees such a module once it is loaded.
    loaded = subprocess.run(
        [sys.executable, "-c", code.replace("index_server.router;", "index_server.router, index_server.catalogue;")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "index_server.catalogue" in loaded.stdout and "lmdb" in loaded.stdout, loaded.stderr
