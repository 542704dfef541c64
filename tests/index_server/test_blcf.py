"""BLCF databases: exact tf-idf cosine against brute force (as items come and go, through merges,
compaction and snapshots), word-range partial cosines that add up, and spatial re-ranking (every
window against a brute-force scan, a planted instance found with its box, query expansion against
a brute-force expansion, a router's candidates)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from common.blcf_codec import AssignmentMap
from common.config import ConfigError, load_config
from index_server.blcf import BlcfIndex, Rerank, WindowSpec
from index_server.config import IndexConfig, RouterConfig
from index_server.domain import Filter, ProductAttributes, SignatureError, item_key
from tests.index_server.helpers import (
    blcf_scores,
    cosine,
    grouped_reference,
    planted,
    random_maps,
    tfidf_idf,
    tfidf_vector,
    ungrouped_reference,
    window_scores,
)

VOCABULARY = 400


def filled(rng, count=300, empty=0.1, **kwargs) -> tuple[BlcfIndex, dict[str, AssignmentMap]]:
    index = BlcfIndex(VOCABULARY, 1, **kwargs)
    maps = {f"item-{i}": m for i, m in enumerate(random_maps(rng, count, VOCABULARY, empty=empty))}
    for item_id, amap in maps.items():
        index.add(item_id, amap, {"id": item_id})
    return index, maps


def assert_exact(index: BlcfIndex, query: AssignmentMap, maps: dict[str, AssignmentMap], top_k: int = 20) -> None:
    hits = index.search(query, top_k)
    expected = ungrouped_reference(blcf_scores(query, maps), top_k)
    assert [h.item_id for h in hits] == [i for i, _ in expected]
    np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], atol=2e-6)
    assert all(not h.reranked and h.window is None and h.first_stage_score is None for h in hits)


def cells_of(amap: AssignmentMap, window) -> tuple[int, int, int, int]:
    """The cells (row0, column0, row1, column1) of a window in pixels (the inverse of cell_box)."""
    x0, y0, x1, y1 = window
    sx, sy = amap.width / amap.columns, amap.height / amap.rows
    return round(y0 / sy), round(x0 / sx), round(y1 / sy), round(x1 / sx)


def test_equals_brute_force_tfidf_cosine():
    rng = np.random.default_rng(0)
    index, maps = filled(rng)
    for query in random_maps(rng, 15, VOCABULARY, empty=0.2) + [maps["item-3"]]:
        assert_exact(index, query, maps)
    hit = index.search(maps["item-3"], 1)[0]
    assert hit.item_id == "item-3" and hit.score == pytest.approx(1, abs=1e-6)
    # Every item, not only a top k.
    got = {h.item_id: h.score for h in index.search(maps["item-9"], len(maps))}
    expected = blcf_scores(maps["item-9"], maps)
    assert set(got) == set(expected)
    np.testing.assert_allclose([got[i] for i in expected], list(expected.values()), atol=2e-6)


def test_idf_follows_deletes_readds_merges_and_compaction():
    rng = np.random.default_rng(1)
    index, maps = filled(rng, 200)
    queries = random_maps(rng, 6, VOCABULARY)
    for item_id in [f"item-{i}" for i in range(0, 200, 3)]:
        assert index.delete(item_id)
        del maps[item_id]
    for query in queries:
        assert_exact(index, query, maps)  # N and df shrank: every norm changed
    for i, amap in enumerate(random_maps(rng, 40, VOCABULARY)):
        item_id = f"item-{3 * i}" if i % 2 else f"new-{i}"  # re-adds of deleted ids, and new ones
        assert not index.add(item_id, amap, {})
        maps[item_id] = amap
    assert index.add("item-1", maps["item-2"], {})  # a replacement: the old bag leaves df
    maps["item-1"] = maps["item-2"]
    for query in queries:
        assert_exact(index, query, maps)
    index.merge()
    for query in queries:
        assert_exact(index, query, maps)
    index.compact()
    assert index.dead_rows() == 0
    for query in queries:
        assert_exact(index, query, maps)
    df = index.document_frequency()
    expected = np.zeros(VOCABULARY, np.int64)
    for amap in maps.values():
        expected[np.unique(amap.words[amap.words != 0xFFFF])] += 1
    np.testing.assert_array_equal(df, expected)


def test_a_lone_item_is_found():
    # idf = log(1 + N / df) weighs a word every item holds (log 2): a database of one item answers.
    index = BlcfIndex(VOCABULARY, 1)
    amap = random_maps(np.random.default_rng(2), 1, VOCABULARY)[0]
    index.add("only", amap, {})
    assert [(h.item_id, round(h.score, 5)) for h in index.search(amap, 5)] == [("only", 1.0)]
    assert [h.item_id for h in index.search(amap, 5, rerank=Rerank(5))] == ["only"]


def test_word_range_partial_cosines_add_up_to_the_cosine():
    rng = np.random.default_rng(3)
    maps = {f"item-{i}": m for i, m in enumerate(random_maps(rng, 150, VOCABULARY))}
    whole = BlcfIndex(VOCABULARY, 1)
    shards = [BlcfIndex(VOCABULARY, 1, (VOCABULARY * s // 3, VOCABULARY * (s + 1) // 3)) for s in range(3)]
    for item_id, amap in maps.items():
        for index in [whole, *shards]:
            index.add(item_id, amap, {})
    for index in [whole, *shards]:  # idf changes in every shard alike
        index.delete("item-7")
    del maps["item-7"]
    for query in random_maps(rng, 8, VOCABULARY):
        totals: dict[int, float] = {}
        for shard in shards:
            keys, sums = shard.partial_scores_by_key(query)
            for key, value in zip(keys.tolist(), sums.tolist()):
                totals[key] = totals.get(key, 0.0) + value
        expected = {item_key(i): s for i, s in blcf_scores(query, maps).items()}
        assert set(totals) == set(expected)
        np.testing.assert_allclose([totals[k] for k in expected], list(expected.values()), atol=2e-6)
        keys, sums = whole.partial_scores_by_key(query)  # one shard of every word: the cosine itself
        np.testing.assert_allclose(sums, [expected[k] for k in keys.tolist()], atol=2e-6)


def test_grouped_and_filtered_search():
    rng = np.random.default_rng(4)
    index = BlcfIndex(VOCABULARY, 1)
    maps = {f"item-{i}": m for i, m in enumerate(random_maps(rng, 120, VOCABULARY))}
    group_of = {item_id: f"g{i % 17}" for i, item_id in enumerate(maps)}
    for item_id, amap in maps.items():
        index.add(item_id, amap, {}, group_of[item_id])
    index.set_attributes("g3", ProductAttributes(tags=frozenset({"red"})))
    for query in random_maps(rng, 5, VOCABULARY):
        scores = blcf_scores(query, maps)
        got = [(h.item_id, h.score) for h in index.search(query, 6, one_per_group=True)]
        expected = grouped_reference(scores, group_of, 6)
        assert [i for i, _ in got] == [i for i, _ in expected]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=2e-6)
        red = index.search(query, 50, filter=Filter(all_tags=frozenset({"red"})), rerank=Rerank(3))
        assert red and all(group_of[h.item_id] == "g3" for h in red)


def test_every_window_is_scored_as_brute_force_finds():
    """The integral-histogram kernel against a scan of every window (words seen once and many times,
    empty cells, strides that do not divide the map)."""
    rng = np.random.default_rng(5)
    for windows in (WindowSpec(), WindowSpec((0.3, 0.5, 1.0), stride=2), WindowSpec((0.2,), stride=3)):
        index, maps = filled(rng, 120, empty=0.15, windows=windows)
        idf = tfidf_idf(list(maps.values()), VOCABULARY)
        for query in random_maps(rng, 4, VOCABULARY, empty=0.3):
            hits = index.search(query, 15, rerank=Rerank(15))
            assert len(hits) == 15 and all(h.reranked for h in hits)
            q = tfidf_vector(query.words, idf)
            for hit in hits:
                amap = maps[hit.item_id]
                scanned = window_scores(q, amap, idf, windows)
                best = max(score for score, _ in scanned)
                assert hit.score == pytest.approx(best, abs=2e-6)
                # The box is a window scoring that best (the first such one, where one is clearly first).
                chosen = next(box for score, box in scanned if score >= best - 1e-9)
                assert hit.window == pytest.approx(amap.cell_box(*chosen))
                whole = cosine(q, tfidf_vector(amap.words, idf))
                assert hit.first_stage_score == pytest.approx(whole, abs=2e-6)
                assert hit.score >= whole - 2e-6  # the whole map is a window
            assert [(-h.score, h.item_id) for h in hits] == sorted((-h.score, h.item_id) for h in hits)


def test_reranking_finds_an_instance_in_a_corner_of_a_larger_photo():
    rng = np.random.default_rng(6)
    instance = AssignmentMap(rng.integers(0, VOCABULARY, (6, 6)).astype(np.uint16), VOCABULARY, 1, 192, 192)
    index, _ = filled(rng, 200, empty=0.0)
    catalogue_photo = planted(rng, instance, VOCABULARY, (14, 14), at=(8, 8))
    index.add("photo", catalogue_photo, {})
    # A distractor sharing half the instance's words fills its whole (small) map: the first stage
    # ranks it above the photo, whose instance is diluted by 160 background cells.
    distractor = AssignmentMap(instance.words[:3].copy(), VOCABULARY, 1, 192, 96)
    index.add("distractor", distractor, {})
    first = index.search(instance, 5)
    assert [h.item_id for h in first[:2]] == ["distractor", "photo"]
    hits = index.search(instance, 5, rerank=Rerank(5))
    top = hits[0]
    assert top.item_id == "photo" and top.reranked
    assert catalogue_photo.cell_box(8, 8, 14, 14) == (256, 256, 448, 448)
    assert top.window == pytest.approx((256, 256, 448, 448))
    assert top.first_stage_score == pytest.approx(first[1].score)
    assert top.score > 0.99 > top.first_stage_score + 0.3  # the window is the instance; the whole map is not
    assert hits[1].item_id == "distractor" and hits[1].score == pytest.approx(hits[1].first_stage_score, abs=1e-6)
    # The rest follow in first-stage order, not re-ranked, and top_k below K cuts the re-ranked list.
    assert [h.item_id for h in index.search(instance, 1, rerank=Rerank(5))] == ["photo"]
    partly = index.search(instance, 5, rerank=Rerank(1))
    assert partly[0].item_id == "distractor" and partly[0].reranked and not any(h.reranked for h in partly[1:])
    assert [h.item_id for h in partly[1:]] == [h.item_id for h in first[1:]]


def test_query_expansion_is_the_average_of_unit_query_and_best_windows():
    rng = np.random.default_rng(7)
    index, maps = filled(rng, 150)
    idf = tfidf_idf(list(maps.values()), VOCABULARY)
    query = random_maps(rng, 1, VOCABULARY)[0]
    plain = index.search(query, 10, rerank=Rerank(10))
    expanded = index.search(query, 10, rerank=Rerank(10, 3))
    assert expanded == index.search(query, 10, rerank=Rerank(10, 3))  # deterministic
    assert [h.score for h in expanded] != [h.score for h in plain]
    # Brute force: the best windows of the first 3 re-ranked items, unit vectors, averaged with the
    # unit query; each of the 10 re-scored by its best window for that.
    q = tfidf_vector(query.words, idf)
    units = [q / np.linalg.norm(q)]
    for hit in plain[:3]:
        amap = maps[hit.item_id]
        row0, column0, row1, column1 = cells_of(amap, hit.window)
        window = tfidf_vector(amap.words[row0:row1, column0:column1], idf)
        units.append(window / np.linalg.norm(window))
    mean = np.mean(units, axis=0)
    reference = sorted(
        ((-max(s for s, _ in window_scores(mean, maps[h.item_id], idf)), h.item_id) for h in plain),
    )
    assert [h.item_id for h in expanded] == [i for _, i in reference]
    np.testing.assert_allclose([h.score for h in expanded], [-s for s, _ in reference], atol=2e-6)
    assert [h.first_stage_score for h in expanded] == [
        {p.item_id: p.first_stage_score for p in plain}[h.item_id] for h in expanded
    ]


def test_candidates_are_rescored_exactly_as_given():
    rng = np.random.default_rng(8)
    index, maps = filled(rng, 100)
    query = random_maps(rng, 1, VOCABULARY)[0]
    ranked = index.search(query, 8, rerank=Rerank(8))
    first = index.search(query, 8)
    index.delete(first[5].item_id)  # gone meanwhile: left out
    keys = np.array([item_key(h.item_id) for h in first] + [item_key("nowhere")], np.uint64)
    given = np.array([h.score for h in first] + [0.5], np.float32)
    # A delete changed idf: compare with a fresh re-rank of the same candidates in this state.
    got = index.search(query, 8, rerank=Rerank(9, 0, (keys, given)))
    assert {h.item_id for h in got} == {h.item_id for h in first} - {first[5].item_id}
    assert all(h.reranked for h in got)
    assert {h.item_id: h.first_stage_score for h in got} == {
        h.item_id: pytest.approx(h.score) for h in first if h.item_id != first[5].item_id
    }
    index.add(first[5].item_id, maps[first[5].item_id], {"id": first[5].item_id})
    again = index.search(query, 8, rerank=Rerank(8, 0, (keys[:8], given[:8])))
    assert [(h.item_id, h.score, h.window) for h in again] == [(h.item_id, h.score, h.window) for h in ranked]


def test_snapshot_restores_the_same_answers():
    rng = np.random.default_rng(9)
    index, maps = filled(rng, 150)
    for i in range(0, 150, 5):
        index.delete(f"item-{i}")
    index.add("boxed", maps["item-1"], {"k": "v"}, group_id="g", box=np.array([1, 2, 3, 4], np.float32))
    queries = random_maps(rng, 4, VOCABULARY)
    restored = BlcfIndex.from_state(index.state())
    for query in queries:
        for rerank in (None, Rerank(10), Rerank(10, 2)):
            assert restored.search(query, 12, rerank=rerank) == index.search(query, 12, rerank=rerank)
    restored.add("later", maps["item-2"], {})  # the restored pools grow as before
    index.add("later", maps["item-2"], {})
    index.compact()
    again = BlcfIndex.from_state(index.state())
    for query in queries:
        assert again.search(query, 12, rerank=Rerank(10, 2)) == restored.search(query, 12, rerank=Rerank(10, 2))
    assert len(again) == len(index) == 122


def test_signatures_of_another_vocabulary_are_refused():
    index = BlcfIndex(VOCABULARY, 1)
    other = AssignmentMap(np.zeros((2, 2), np.uint16), VOCABULARY, 2, 10, 10)
    with pytest.raises(SignatureError, match="re-sign with the same vocabulary"):
        index.add("x", other, {})
    with pytest.raises(SignatureError, match=r"401-word BLCF vocabulary 00000001; this database holds .* 400-word"):
        index.search(AssignmentMap(np.zeros((2, 2), np.uint16), VOCABULARY + 1, 1, 10, 10), 3)


def test_searches_while_items_come_and_go_see_a_consistent_state():
    rng = np.random.default_rng(10)
    index, maps = filled(rng, 150)
    queries = random_maps(rng, 3, VOCABULARY)
    extra = random_maps(rng, 150, VOCABULARY)
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                for query in queries:
                    hits = index.search(query, 10, rerank=Rerank(10, 2))
                    assert all(0 <= h.score <= 1 + 1e-6 and h.reranked for h in hits)
        except BaseException as exc:  # reported in the test's thread
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for reader in readers:
        reader.start()
    for i, amap in enumerate(extra):
        index.add(f"extra-{i}", amap, {})
        maps[f"extra-{i}"] = amap
        if i % 3 == 0:
            index.delete(f"item-{i}")
            del maps[f"item-{i}"]
        if i % 50 == 49:
            index.compact()
    stop.set()
    for reader in readers:
        reader.join()
    assert not errors, errors
    for query in queries:
        assert_exact(index, query, maps)


def test_window_spec_and_its_configuration():
    assert WindowSpec().sizes(14) == [4, 6, 8, 10, 12, 14]
    assert WindowSpec().sizes(3) == [1, 2, 3] and WindowSpec((0.5,)).sizes(9) == [5, 9]  # the whole map always
    config = load_config(IndexConfig, "index", environ={}, rerank_window_fractions=[0.5, 1], rerank_window_stride=2)
    assert config.windows() == WindowSpec((0.5, 1.0), 2) and config.max_rerank_k == 200
    flags = load_config(IndexConfig, "index", ["--rerank-window-fractions", "[0.3, 0.6]", "--max-rerank-k", "50"], {})
    assert flags.windows().fractions == (0.3, 0.6) and flags.max_rerank_k == 50
    for bad, says in (
        ({"rerank_window_fractions": []}, "rerank_window_fractions []: give at least one"),
        ({"rerank_window_fractions": [0.5, 1.5]}, "each in (0, 1]"),
        ({"rerank_window_stride": 0}, "rerank_window_stride 0 is below 1"),
        ({"max_rerank_k": -1}, "max_rerank_k"),
    ):
        with pytest.raises(ConfigError) as caught:
            load_config(IndexConfig, "index", environ={}, **bad)
        assert says in str(caught.value)
    with pytest.raises(ConfigError, match="max_rerank_k"):
        load_config(RouterConfig, "index_router", environ={}, max_rerank_k=-5)
