"""The router over BLCF databases, real shards on loopback: both layouts answer as one shard does,
with and without spatial re-ranking (grouped, batched, after deletes change idf); the word layout
re-ranks its summed first stage on one shard, query expansion included; bad input is refused by
the router itself; a dead word-range shard degrades the answer, flagged, still re-ranked."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from common.blcf_codec import AssignmentMap
from common.config import load_config
from common.proto_convert import dense_to_proto
from index_server.config import IndexConfig
from index_server.convert import hit_of, scored_item
from index_server.merge import merge_reranked, merge_top_k
from index_server.server import create_bundle
from mps.common.v1 import common_pb2
from mps.index.v1 import index_pb2, index_pb2_grpc
from tests.index_server.helpers import Cluster, blcf, planted, random_maps

VOCABULARY = 600
FINGERPRINT = 5
SpatialRerank = index_pb2.SpatialRerank


@pytest.fixture()
def single():
    bundle = create_bundle(load_config(IndexConfig, "index", environ={}, port=0, data_dir=""))
    channel = grpc.insecure_channel(f"127.0.0.1:{bundle.port}")
    yield index_pb2_grpc.IndexServiceStub(channel)
    channel.close()
    bundle.server.stop(None)


def catalogue(rng) -> tuple[list[index_pb2.AddRequest], list[AssignmentMap]]:
    """Random maps in groups, and photos holding planted instances (the queries re-ranking helps)."""
    maps = random_maps(rng, 240, VOCABULARY, FINGERPRINT)
    instances = [
        AssignmentMap(rng.integers(0, VOCABULARY, (4, 4)).astype(np.uint16), VOCABULARY, FINGERPRINT, 128, 128)
        for _ in range(3)
    ]
    photos = [
        planted(rng, m, VOCABULARY, at=(2 + 2 * i, 4 * i), fingerprint=FINGERPRINT) for i, m in enumerate(instances)
    ]
    adds = [
        index_pb2.AddRequest(
            item_id=f"m{i}", database="maps", signature=blcf(m), group_id=f"g{i % 30}", metadata={"n": str(i)}
        )
        for i, m in enumerate(maps + photos)
    ]
    return adds, instances + random_maps(rng, 4, VOCABULARY, FINGERPRINT, empty=0.2)


def search(stub, query, top_k=10, one_per_group=False, rerank=None):
    request = index_pb2.SearchRequest(
        database="maps", signature=blcf(query), top_k=top_k, one_per_group=one_per_group, spatial_rerank=rerank
    )
    chunks = list(stub.Search(request, timeout=20))
    return chunks[0], [item for chunk in chunks for item in chunk.items]


def assert_same(got, expected):
    assert [i.item_id for i in got] == [i.item_id for i in expected]
    np.testing.assert_allclose([i.score for i in got], [i.score for i in expected], atol=1e-5)
    np.testing.assert_allclose([i.first_stage_score for i in got], [i.first_stage_score for i in expected], atol=1e-5)
    assert [i.reranked for i in got] == [i.reranked for i in expected]
    assert [(i.window.x_min, i.window.y_min, i.window.x_max, i.window.y_max) for i in got] == [
        (i.window.x_min, i.window.y_min, i.window.x_max, i.window.y_max) for i in expected
    ]
    assert [(i.group_id, dict(i.metadata)) for i in got] == [(i.group_id, dict(i.metadata)) for i in expected]


def test_the_word_layout_answers_as_one_shard(single):
    """Every word-range shard holds every item's whole map and the database's df, so the summed
    partial cosines are the cosines, and one shard re-ranks the top K as the single shard does."""
    rng = np.random.default_rng(0)
    adds, queries = catalogue(rng)
    cluster = Cluster("word", shards=3)
    try:
        assert cluster.stub.Add(iter(adds), timeout=30).added == len(adds) == single.Add(iter(adds), timeout=30).added
        held = [
            {d.name: d.items for d in cluster.direct(a[0]).Stats(index_pb2.StatsRequest(), timeout=5).databases}
            for a in cluster.addresses
        ]
        assert [h["maps"] for h in held] == [243] * 3  # every shard holds every map
        reranks = [None, SpatialRerank(top_k=12), SpatialRerank(top_k=4), SpatialRerank(top_k=12, query_expansion=3)]
        for query in queries:
            for rerank in reranks:
                for one_per_group in (False, True):
                    first, got = search(cluster.stub, query, 10, one_per_group, rerank)
                    assert not first.degraded
                    assert_same(got, search(single, query, 10, one_per_group, rerank)[1])
        # A planted instance comes first once re-ranked, found where it was planted.
        _, found = search(cluster.stub, queries[1], 5, rerank=SpatialRerank(top_k=40))
        assert found[0].item_id == "m241" and found[0].reranked
        assert (found[0].window.x_min, found[0].window.y_min) == pytest.approx((4 * 32, 4 * 32))
        # Batches, and after deletes (idf and norms change on every shard alike).
        batch = index_pb2.SearchBatchRequest(
            database="maps", signatures=[blcf(q) for q in queries[:3]], top_k=8, spatial_rerank=SpatialRerank(top_k=8)
        )
        got_batch, expected_batch = cluster.stub.SearchBatch(batch, timeout=20), single.SearchBatch(batch, timeout=20)
        for got_hits, expected_hits in zip(got_batch.results, expected_batch.results, strict=True):
            assert_same(list(got_hits.items), list(expected_hits.items))
        delete = index_pb2.DeleteRequest(database="maps", item_ids=[f"m{i}" for i in range(0, 240, 4)])
        assert cluster.stub.Delete(delete, timeout=10).deleted == single.Delete(delete, timeout=10).deleted == 60
        for query in queries[:4]:
            assert_same(
                search(cluster.stub, query, 10, rerank=SpatialRerank(top_k=12))[1],
                search(single, query, 10, rerank=SpatialRerank(top_k=12))[1],
            )
        # Groups' attributes reach every shard (each filters by its own copy), the count is the items'.
        update = index_pb2.UpdateGroupsRequest(
            database="maps",
            groups=[
                index_pb2.GroupAttributes(group_id=f"g{n}", attributes=common_pb2.ProductAttributes(tags=["red"]))
                for n in range(0, 30, 3)
            ],
        )
        assert cluster.stub.UpdateGroups(update, timeout=10).updated == single.UpdateGroups(update, timeout=10).updated
        red = index_pb2.SearchRequest(
            database="maps",
            signature=blcf(queries[0]),
            top_k=6,
            filter=common_pb2.Filter(all_tags=["red"]),
            spatial_rerank=SpatialRerank(top_k=6),
        )
        got = [i for chunk in cluster.stub.Search(red, timeout=20) for i in chunk.items]
        assert got and all(int(i.group_id[1:]) % 3 == 0 for i in got)
        assert_same(got, [i for chunk in single.Search(red, timeout=20) for i in chunk.items])
        stats = {d.name: d.items for d in cluster.stub.Stats(index_pb2.StatsRequest(), timeout=5).databases}
        assert stats == {"maps": 183}
    finally:
        cluster.close()


def test_the_item_layout_merges_the_shards_answers_exactly():
    """Each item-range shard weighs words by its own items' idf (a shard cannot know the others'
    df), so the router's answer is not the single shard's; it is exactly what the shards' answers
    make: the first stage's top K over all shards, by first-stage score, re-ranked, then the rest."""
    rng = np.random.default_rng(0)
    adds, queries = catalogue(rng)
    cluster = Cluster("item", shards=3)
    try:
        assert cluster.stub.Add(iter(adds), timeout=30).added == len(adds)
        direct = [cluster.direct(a[0]) for a in cluster.addresses]
        held = [{d.name: d.items for d in s.Stats(index_pb2.StatsRequest(), timeout=5).databases} for s in direct]
        assert sum(h["maps"] for h in held) == 243 and max(h["maps"] for h in held) < 243
        for query in queries:
            for rerank in (None, SpatialRerank(top_k=12), SpatialRerank(top_k=4)):
                for one_per_group in (False, True):
                    first, got = search(cluster.stub, query, 10, one_per_group, rerank)
                    assert not first.degraded
                    depth = max(10, rerank.top_k) if rerank is not None else 10
                    answers = [[hit_of(i) for i in search(s, query, depth, one_per_group, rerank)[1]] for s in direct]
                    merged = (
                        merge_reranked(answers, 10, rerank.top_k, one_per_group)
                        if rerank is not None
                        else merge_top_k(answers, 10, one_per_group)
                    )
                    assert_same(got, [scored_item(h) for h in merged])
                    if rerank is not None:  # the global first stage's top K are re-ranked, first
                        reranked = [i for i in got if i.reranked]
                        assert got[: len(reranked)] == reranked and len(reranked) == min(rerank.top_k, len(got))
        _, found = search(cluster.stub, queries[1], 5, rerank=SpatialRerank(top_k=40))
        assert found[0].item_id == "m241" and found[0].reranked
        _, expanded = search(cluster.stub, queries[0], 10, rerank=SpatialRerank(top_k=10, query_expansion=2))
        assert all(i.reranked for i in expanded)  # expansion is each shard's own (over its best windows)
        assert [(-i.score, i.item_id) for i in expanded] == sorted((-i.score, i.item_id) for i in expanded)
    finally:
        cluster.close()


def test_the_router_refuses_bad_spatial_reranking_itself():
    cluster = Cluster("word", shards=2)
    try:
        query = random_maps(np.random.default_rng(1), 1, VOCABULARY, FINGERPRINT)[0]
        cases = [
            (
                index_pb2.SearchRequest(
                    database="x", signature=dense_to_proto(np.ones(4)), spatial_rerank=SpatialRerank(top_k=3)
                ),
                "applies to signature_kind_blcf signatures and databases, not signature_kind_deep",
            ),
            (
                index_pb2.SearchRequest(database="x", signature=blcf(query), spatial_rerank=SpatialRerank(top_k=201)),
                "top_k 201 is above the limit of 200",
            ),
            (
                index_pb2.SearchRequest(
                    database="x",
                    signature=blcf(query),
                    spatial_rerank=SpatialRerank(top_k=3, candidate_keys=[1], candidate_scores=[0.5]),
                ),
                "a router re-ranks its own first stage",
            ),
        ]
        for request, says in cases:
            with pytest.raises(grpc.RpcError) as caught:
                list(cluster.stub.Search(request, timeout=10))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert says in caught.value.details().lower(), caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            cluster.stub.SearchBatch(
                index_pb2.SearchBatchRequest(
                    database="x",
                    signatures=[blcf(query)],
                    spatial_rerank=SpatialRerank(top_k=3, query_expansion=4),
                ),
                timeout=10,
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "query_expansion 4 is above spatial_rerank.top_k 3" in caught.value.details()
    finally:
        cluster.close()


def test_a_dead_word_range_shard_degrades_the_answer_which_is_still_reranked():
    rng = np.random.default_rng(2)
    adds, queries = catalogue(rng)
    cluster = Cluster("word", shards=3, default_timeout_s=3.0)
    try:
        cluster.stub.Add(iter(adds), timeout=30)
        cluster.bundles[2].server.stop(None)
        first, got = search(cluster.stub, queries[0], 5, rerank=SpatialRerank(top_k=5))
        assert first.degraded and [(r.first, r.end) for r in first.missing_word_ranges] == [(400, 600)]
        assert got and all(i.reranked for i in got)
    finally:
        cluster.close()
