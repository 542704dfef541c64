"""BLCF databases in a shard for real, over loopback: adds, searches with spatial re-ranking (what
comes back in each ScoredItem), batches, partial scores, lookups, groups, thumbnails, deletes,
stats; every bad input a clear INVALID_ARGUMENT; the log and snapshots (a restart answers the
same) and a replica's copy."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from common.blcf_codec import AssignmentMap
from common.config import load_config
from common.status import details_of
from index_server.blcf import BlcfIndex
from index_server.catalogue import Catalogue
from index_server.config import IndexConfig
from index_server.convert import item_of
from index_server.domain import Rerank, item_key
from index_server.server import create_server
from index_server.store import ShardStore
from mps.common.v1 import common_pb2
from mps.index.v1 import index_pb2, index_pb2_grpc
from tests.index_server.helpers import (
    add_request,
    blcf,
    blcf_scores,
    bow,
    planted,
    random_bags,
    random_maps,
    ungrouped_reference,
)

VOCABULARY = 500
SpatialRerank = index_pb2.SpatialRerank


@pytest.fixture()
def stub():
    server, port = create_server(load_config(IndexConfig, "index", environ={}, port=0, data_dir="", chunk_size=4))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield index_pb2_grpc.IndexServiceStub(channel)
    channel.close()
    server.stop(None)


def blcf_add(item_id: str, amap: AssignmentMap, database: str = "maps", **fields) -> index_pb2.AddRequest:
    return index_pb2.AddRequest(item_id=item_id, database=database, signature=blcf(amap), **fields)


def search(stub, query: AssignmentMap, database: str = "maps", top_k: int = 10, **fields) -> list[index_pb2.ScoredItem]:
    request = index_pb2.SearchRequest(database=database, signature=blcf(query), top_k=top_k, **fields)
    return [item for chunk in stub.Search(request, timeout=10) for item in chunk.items]


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def filled(stub, rng, count=120) -> dict[str, AssignmentMap]:
    maps = {f"m{i}": m for i, m in enumerate(random_maps(rng, count, VOCABULARY, fingerprint=9))}
    adds = [blcf_add(i, m, metadata={"n": i}, group_id=f"g{n % 10}") for n, (i, m) in enumerate(maps.items())]
    assert stub.Add(iter(adds), timeout=20).added == count
    return maps


def test_blcf_databases_over_grpc(stub):
    rng = np.random.default_rng(0)
    maps = filled(stub, rng)
    (stats,) = stub.Stats(index_pb2.StatsRequest(), timeout=5).databases
    assert (stats.kind, stats.items, stats.dimension, stats.groups) == (common_pb2.SIGNATURE_KIND_BLCF, 120, 500, 10)
    for query in random_maps(rng, 4, VOCABULARY, fingerprint=9, empty=0.2):
        got = search(stub, query, top_k=15)
        expected = ungrouped_reference(blcf_scores(query, maps), 15)
        assert [i.item_id for i in got] == [i for i, _ in expected]
        np.testing.assert_allclose([i.score for i in got], [s for _, s in expected], atol=2e-6)
        assert all(not i.reranked and not i.HasField("window") and i.first_stage_score == 0 for i in got)
        assert got[0].metadata["n"] == got[0].item_id
        # Re-ranked: the same items first-stage-scored, each with its best window inside its image.
        reranked = search(stub, query, top_k=15, spatial_rerank=SpatialRerank(top_k=15))
        assert {i.item_id for i in reranked} == {i.item_id for i in got}
        first = {i.item_id: i.score for i in got}
        for item in reranked:
            amap = maps[item.item_id]
            assert item.reranked and item.first_stage_score == pytest.approx(first[item.item_id], abs=1e-6)
            assert item.score >= item.first_stage_score - 1e-6
            box = item.window
            assert 0 <= box.x_min < box.x_max <= amap.width and 0 <= box.y_min < box.y_max <= amap.height
        assert [(-i.score, i.item_id) for i in reranked] == sorted((-i.score, i.item_id) for i in reranked)
        # A batch answers each query as Search does.
        batch = stub.SearchBatch(
            index_pb2.SearchBatchRequest(
                database="maps",
                signatures=[blcf(query)] * 2,
                top_k=15,
                spatial_rerank=SpatialRerank(top_k=15, query_expansion=2),
            ),
            timeout=10,
        )
        single = search(stub, query, top_k=15, spatial_rerank=SpatialRerank(top_k=15, query_expansion=2))
        assert [list(r.items) for r in batch.results] == [single, single]
    # Partial scores (one shard of every word: the cosines themselves), lookups, groups, deletes.
    query = random_maps(rng, 1, VOCABULARY, fingerprint=9)[0]
    chunks = list(stub.PartialScores(index_pb2.PartialScoresRequest(database="maps", signature=blcf(query)), timeout=5))
    keys, sums = np.frombuffer(chunks[0].keys, "<u8"), np.frombuffer(chunks[0].sums, "<f4")
    expected = {item_key(i): s for i, s in blcf_scores(query, maps).items()}
    np.testing.assert_allclose(sums, [expected[k] for k in keys.tolist()], atol=2e-6)
    assert (chunks[0].word_range.first, chunks[0].word_range.end) == (0, VOCABULARY)
    looked = stub.Lookup(index_pb2.LookupRequest(database="maps", keys=[item_key("m3")]), timeout=5)
    assert [(i.item_id, i.group_id) for i in looked.items] == [("m3", "g3")]
    grouped = search(stub, query, top_k=5, one_per_group=True, spatial_rerank=SpatialRerank(top_k=5))
    assert len({i.group_id for i in grouped}) == len(grouped) == 5 and all(i.reranked for i in grouped)
    listed = stub.ListGroups(index_pb2.ListGroupsRequest(database="maps", group_ids=["g3"]), timeout=5)
    assert len(listed.groups[0].items) == 12
    deleted = stub.Delete(index_pb2.DeleteRequest(database="maps", group_ids=["g3"]), timeout=5)
    assert deleted.deleted == 12
    maps = {i: m for n, (i, m) in enumerate(maps.items()) if n % 10 != 3}
    got = search(stub, query, top_k=20)
    expected_after = ungrouped_reference(blcf_scores(query, maps), 20)  # idf over the 108 left
    assert [i.item_id for i in got] == [i for i, _ in expected_after]
    np.testing.assert_allclose([i.score for i in got], [s for _, s in expected_after], atol=2e-6)


def test_an_instance_in_a_catalogue_photo_is_found_with_its_window(stub):
    rng = np.random.default_rng(1)
    filled(stub, rng, 80)
    # 4 x 6 cells: a window of the default sizes (4, 6, 8, ... of 14 cells), at the default stride
    # of 2 cells, fits it exactly.
    instance = AssignmentMap(rng.integers(0, VOCABULARY, (4, 6)).astype(np.uint16), VOCABULARY, 9, 192, 128)
    photo = planted(rng, instance, VOCABULARY, (14, 14), at=(2, 8), fingerprint=9)
    stub.Add(iter([blcf_add("photo", photo, thumbnail=b"jpeg")]), timeout=5)
    (top, *_) = search(stub, instance, top_k=5, spatial_rerank=SpatialRerank(top_k=20))
    assert top.item_id == "photo" and top.reranked and top.score > 0.99 > top.first_stage_score
    assert (top.window.x_min, top.window.y_min, top.window.x_max, top.window.y_max) == pytest.approx(
        photo.cell_box(2, 8, 6, 14)
    )
    images = stub.GetItemImages(index_pb2.GetItemImagesRequest(database="maps", item_ids=["photo"]), timeout=5)
    assert images.images[0].thumbnail == b"jpeg"


def test_bad_blcf_input_is_invalid_argument_saying_what_to_fix(stub):
    rng = np.random.default_rng(2)
    maps = filled(stub, rng, 20)
    stub.Add(iter([add_request("v", "deep", np.ones(4, np.float32))]), timeout=5)
    stub.Add(iter([add_request("b", "bags", random_bags(rng, 1, 50)[0])]), timeout=5)
    query = maps["m1"]
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    deep = common_pb2.Signature(
        kind=common_pb2.SIGNATURE_KIND_DEEP, dense=common_pb2.DenseVector(values_f32le=np.ones(4, "<f4").tobytes())
    )
    other_vocabulary = AssignmentMap(query.words, VOCABULARY, 10, 64, 64)
    pyramid = AssignmentMap(query.words, query.vocabulary, query.fingerprint, 64, 64, (query.words[:2, :2],))

    def raw(data: bytes) -> common_pb2.Signature:
        return common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BLCF, blcf=data)

    def search_call(database="maps", signature=None, **fields):
        request = index_pb2.SearchRequest(database=database, signature=signature or blcf(query), **fields)
        return lambda: list(stub.Search(request, timeout=5))

    cases = [
        (
            search_call("deep", deep, spatial_rerank=SpatialRerank(top_k=5)),
            "spatial_rerank applies to signature_kind_blcf databases",
        ),
        (
            search_call("bags", bow(random_bags(rng, 1, 50)[0]), spatial_rerank=SpatialRerank(top_k=5)),
            "'bags' is bag-of-words",
        ),
        (search_call(spatial_rerank=SpatialRerank(top_k=201)), "spatial_rerank.top_k 201 is above the limit of 200"),
        (
            search_call(spatial_rerank=SpatialRerank(top_k=3, query_expansion=4)),
            "query_expansion 4 is above spatial_rerank.top_k 3",
        ),
        (
            search_call(spatial_rerank=SpatialRerank(top_k=3, candidate_keys=[1, 2], candidate_scores=[0.5])),
            "1 scores for 2 candidate_keys",
        ),
        (
            search_call(spatial_rerank=SpatialRerank(top_k=1, candidate_keys=[1, 2], candidate_scores=[0.5, 0.4])),
            "more than spatial_rerank.top_k 1",
        ),
        (
            search_call(spatial_rerank=SpatialRerank(top_k=2, candidate_keys=[1], candidate_scores=[float("nan")])),
            "nan or infinite",
        ),
        (
            lambda: stub.SearchBatch(
                index_pb2.SearchBatchRequest(
                    database="maps",
                    signatures=[blcf(query)],
                    spatial_rerank=SpatialRerank(top_k=2, candidate_keys=[1], candidate_scores=[0.5]),
                ),
                timeout=5,
            ),
            "not allowed in a searchbatch",
        ),
        (search_call(signature=raw(b"\x01garbage")), "blcf signature: signature is 8 bytes"),
        (search_call(signature=raw(blcf(query).blcf[:-2])), "it is truncated"),
        (search_call(signature=raw(b"")), "a blcf signature carries blcf bytes"),
        (search_call(signature=blcf(other_vocabulary)), "re-sign with the same vocabulary"),
        (search_call("bags", blcf(query)), "holds signature_kind_bow signatures, not signature_kind_blcf"),
        (
            lambda: stub.Add(iter([blcf_add("x", other_vocabulary)]), timeout=5),
            "re-sign with the same vocabulary",
        ),
        (
            lambda: stub.Add(iter([blcf_add("x", pyramid)]), timeout=5),
            "a pyramid of 2 maps (a query by region); an item is the one map",
        ),
        (
            lambda: stub.Add(iter([blcf_add("x", query, database="deep")]), timeout=5),
            "holds signature_kind_deep signatures, not signature_kind_blcf",
        ),
        (
            lambda: stub.Add(
                iter([blcf_add("x", query, database="fresh"), blcf_add("y", other_vocabulary, database="fresh")]),
                timeout=5,
            ),
            "item #1 ('y')",
        ),
    ]
    for call, says in cases:
        error = refusal(call)
        assert error.code() == invalid, (says, error.details())
        assert says in error.details().lower(), (says, error.details())
    error = refusal(search_call(spatial_rerank=SpatialRerank(top_k=500)))
    assert details_of(error).quota == [("max_rerank_k", "at most 200 items re-ranked per query")]
    assert "fresh" not in {d.name for d in stub.Stats(index_pb2.StatsRequest(), timeout=5).databases}
    # A query may be a pyramid: its bag counts every level.
    assert [i.item_id for c in search_call(signature=blcf(pyramid))() for i in c.items][:1] == ["m1"]
    # An all-zero SpatialRerank asks for nothing, whatever the database.
    assert len(search_call("deep", deep, spatial_rerank=SpatialRerank())()) == 1


def test_the_log_and_snapshots_keep_blcf_databases(tmp_path):
    rng = np.random.default_rng(3)
    maps = random_maps(rng, 60, VOCABULARY, fingerprint=9)
    queries = random_maps(rng, 3, VOCABULARY, fingerprint=9)
    store = ShardStore(tmp_path, 1 << 30)
    catalogue = Catalogue(store=store)
    catalogue.add([item_of(blcf_add(f"m{i}", m, group_id=f"g{i % 4}")) for i, m in enumerate(maps)])
    catalogue.delete("maps", ["m0", "m1"], ["g3"])

    def answers(held: Catalogue) -> list:
        _, database = held.get("maps")
        assert isinstance(database, BlcfIndex)
        return [database.search(q, 10, rerank=Rerank(8, 2)) for q in queries]

    before = answers(catalogue)
    assert all(before) and all(h.reranked for hits in before for h in hits[:8])
    catalogue.close(snapshot=False)  # the log alone: replayed at start-up
    replayed = Catalogue(store=ShardStore(tmp_path, 1 << 30))
    assert answers(replayed) == before
    replayed.close()  # a snapshot (compacting the deleted rows), the log dropped
    restored = Catalogue(store=ShardStore(tmp_path, 1 << 30))
    assert answers(restored) == before
    # A replica's copy: the same state, the same answers.
    states, _ = restored.follow()
    replica = Catalogue()
    replica.begin_deferral()
    replica.install(states, [])
    assert answers(replica) == before
    restored.close()
