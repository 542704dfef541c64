"""The inverted index: exact chi-squared against brute force, live updates, compaction, grouped
search (one item per group) against a brute-force reference."""

import numpy as np
import pytest

from common.bow_codec import BagOfWords
from common.photos import load_photo
from index_server.domain import Hit, SignatureError, item_key
from index_server.inverted import BowIndex
from tests.helpers import chi2
from tests.index_server import helpers
from tests.index_server.helpers import bow_scores, grouped_reference, ungrouped_reference


def random_bags(rng, count, vocabulary=500, codebook=1):
    return helpers.random_bags(rng, count, vocabulary, codebook)


def brute_force(query, items, top_k):
    # Only items sharing at least one word are found (chi2 < 2; rounding can leave others just below 2).
    scored = [
        (chi2(query, bag), item_id) for item_id, bag in items.items() if np.intersect1d(query.words, bag.words).size
    ]
    return sorted(scored)[:top_k]


def assert_exact(index, query, items, top_k=10):
    hits = index.search(query, top_k)
    expected = brute_force(query, items, top_k)
    assert [h.item_id for h in hits] == [i for _, i in expected]
    np.testing.assert_allclose([2 - 2 * h.score for h in hits], [d for d, _ in expected], atol=1e-5)  # float32 sums


def test_equals_brute_force_on_random_bags():
    rng = np.random.default_rng(0)
    bags = random_bags(rng, 400)
    index = BowIndex(500, 1)
    items = {}
    for i, bag in enumerate(bags):
        index.add(f"item-{i}", bag, {"n": str(i)})
        items[f"item-{i}"] = bag
    for query in random_bags(rng, 20):
        assert_exact(index, query, items, top_k=25)
    assert index.search(bags[7], 1)[0].item_id == "item-7" and index.search(bags[7], 1)[0].score == pytest.approx(1)


def test_equals_brute_force_on_real_signatures(bow_extractor):
    index, items = BowIndex(5000, bow_extractor.codebook.fingerprint), {}
    for name in ("astronaut", "chelsea", "coffee", "rocket", "china.jpg", "flower.jpg", "retina"):
        photo = load_photo(name)
        h, w = photo.shape[:2]
        for part, crop in enumerate((photo, photo[: h // 2], photo[h // 2 :], photo[:, : w // 2])):
            items[f"{name}-{part}"] = bag = bow_extractor.bag(crop)
            index.add(f"{name}-{part}", bag, {})
    for query in (bow_extractor.bag(load_photo("coffee")[50:350, 100:500]), items["china.jpg-1"]):
        assert_exact(index, query, items)


def test_delete_replace_and_compaction_keep_results_exact():
    rng = np.random.default_rng(1)
    bags = random_bags(rng, 300)
    index, items = BowIndex(500, 1), {}
    for i, bag in enumerate(bags):
        index.add(f"i{i}", bag, {})
        items[f"i{i}"] = bag
    for i in range(0, 300, 3):
        assert index.delete(f"i{i}")
        del items[f"i{i}"]
    assert not index.delete("i0") and len(index) == 200
    assert index.add("i1", bags[0], {"v": "2"})  # replaced
    items["i1"] = bags[0]
    queries = random_bags(rng, 10) + [bags[0], bags[3]]
    for query in queries:
        assert_exact(index, query, items, top_k=50)
        assert all(h.item_id != "i3" for h in index.search(query, 300))
    index.compact()
    assert index.dead_rows() == 0 and len(index) == 200
    for query in queries:
        assert_exact(index, query, items, top_k=50)
    index.add("new", bags[3], {})
    assert index.search(bags[3], 1)[0].item_id == "new"


def test_word_range_gives_partial_sums_that_add_up():
    rng = np.random.default_rng(2)
    bags = random_bags(rng, 100)
    whole, low, high = BowIndex(500, 1), BowIndex(500, 1, (0, 100)), BowIndex(500, 1, (100, 500))
    for i, bag in enumerate(bags):
        for index in (whole, low, high):
            index.add(str(i), bag, {})
    query = random_bags(rng, 1)[0]
    total = np.zeros(100)
    for index in (low, high):
        rows, partial = index.partial_scores(query)
        total[rows] += partial
    rows, expected = whole.partial_scores(query)
    np.testing.assert_allclose(total[rows], expected, atol=1e-6)


def test_refuses_other_codebooks_and_vocabularies():
    index = BowIndex(500, 1)
    with pytest.raises(SignatureError, match="codebook"):
        index.add("x", BagOfWords.from_words([1, 2], 500, 2), {})
    with pytest.raises(SignatureError, match="vocabulary"):
        index.search(BagOfWords.from_words([1, 2], 600, 1), 5)


def test_merging_the_tail_in_the_background_keeps_results_exact(monkeypatch):
    import index_server.inverted as inverted

    monkeypatch.setattr(inverted, "MERGE_FLOOR", 500)  # merge every few items
    rng = np.random.default_rng(4)
    bags = random_bags(rng, 600)
    index, items = BowIndex(500, 1), {}
    queries = random_bags(rng, 5)
    for i, bag in enumerate(bags):
        index.add(f"i{i}", bag, {})
        items[f"i{i}"] = bag
        if i % 7 == 0:
            index.delete(f"i{i // 2}")
            items.pop(f"i{i // 2}", None)
        if i % 100 == 99:
            for query in queries:  # searches run while merges run
                assert_exact(index, query, items, top_k=20)
    index.merge()
    assert index._tail.postings == 0 and len(index._base) > 0
    for query in queries:
        assert_exact(index, query, items, top_k=20)


def test_state_round_trip_and_lookup_by_key():
    from index_server.domain import item_key

    rng = np.random.default_rng(5)
    bags = random_bags(rng, 100)
    index = BowIndex(500, 1, (0, 250))
    for i, bag in enumerate(bags):
        index.add(f"i{i}", bag, {"n": str(i)})
    index.delete("i4")
    copy = BowIndex.from_state(index.state())
    assert copy.word_range == (0, 250) and len(copy) == 99 and "i4" not in copy
    for query in random_bags(rng, 5):
        assert copy.search(query, 10) == index.search(query, 10)
        keys, sums = copy.partial_scores_by_key(query)
        found = copy.lookup(keys)
        assert set(found) == set(keys.tolist())
        _rows, expected = index.partial_scores(query)
        assert sorted(sums.tolist()) == pytest.approx(sorted(expected.tolist()))
    assert copy.lookup(np.array([item_key("i7"), item_key("i4")], np.uint64)) == {
        item_key("i7"): Hit("i7", 0.0, {"n": "7"})
    }


def test_stop_word_variant_skips_only_the_words_most_items_hold():
    rng = np.random.default_rng(6)
    bags = [BagOfWords.from_words(np.concatenate([[0, 0, 1], rng.integers(2, 500, 30)]), 500, 1) for _ in range(200)]
    exact, variant = BowIndex(500, 1), BowIndex(500, 1, max_word_share=0.5)
    for i, bag in enumerate(bags):
        exact.add(f"i{i}", bag, {})
        variant.add(f"i{i}", bag, {})
    df = variant.document_frequency()
    assert df[0] == df[1] == 200 and df[2:].max() < 100
    query = bags[3]
    q = query.histogram()
    expected = {}
    for i, bag in enumerate(bags):  # the overlap over every query word except 0 and 1
        common, qi, xi = np.intersect1d(query.words, bag.words, return_indices=True)
        keep = common >= 2
        x = bag.histogram()[xi][keep]
        if keep.any():
            expected[f"i{i}"] = float(np.sum(4 * q[qi][keep] * x / (q[qi][keep] + x))) / 2
    hits = variant.search(query, 10)
    assert [h.item_id for h in hits] == [i for i, _ in sorted(expected.items(), key=lambda t: (-t[1], t[0]))[:10]]
    np.testing.assert_allclose([h.score for h in hits], sorted(expected.values(), reverse=True)[:10], atol=1e-5)
    assert hits[0].item_id == "i3" and exact.search(query, 1)[0].score > hits[0].score  # exact is untouched


def grouped_catalogue(rng, groups=60, vocabulary=500):
    """Groups of 1-6 images each (some items with no group, some images exact duplicates of another
    of their group, so that a group's best can tie), with boxes on some."""
    index, bags, group_of = BowIndex(vocabulary, 1), {}, {}
    for g in range(groups):
        images = random_bags(rng, int(rng.integers(1, 7)), vocabulary)
        names = [f"g{g}-img{n}" for n in range(len(images))]
        if g % 5 == 0:  # a duplicate image, added last but first by id: it wins its group's tie
            images.append(images[0])
            names.append(f"g{g}-dup")
        for n, (name, bag) in enumerate(zip(names, images)):
            item_id, group = (f"solo-{g}-{n}", "") if g % 11 == 0 else (name, f"g{g}")
            box = np.array([n, g, n + 10, g + 20], np.float32) if n % 2 else None
            index.add(item_id, bag, {"g": str(g)}, group, box)
            bags[item_id], group_of[item_id] = bag, group
    return index, bags, group_of


def test_one_per_group_equals_brute_force_each_group_once_by_its_best_image():
    rng = np.random.default_rng(7)
    index, bags, group_of = grouped_catalogue(rng)
    groups = {group_of[i] or i for i in bags}
    queries = random_bags(rng, 10) + [bags["g5-img0"], bags["g10-img1"]]
    for top_k in (1, 5, 20, 1000):
        for query in queries:
            hits = index.search(query, top_k, one_per_group=True)
            expected = grouped_reference(bow_scores(query, bags), group_of, top_k)
            assert [h.item_id for h in hits] == [i for i, _ in expected]
            np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], atol=1e-5)
            assert len({h.group for h in hits}) == len(hits)
            touching = {group_of[i] or i for i in bow_scores(query, bags)}
            assert len(hits) == min(top_k, len(touching)) and len(touching) <= len(groups)
    # The duplicate ties its original: the smaller id wins, though its row comes later.
    hit = index.search(bags["g5-img0"], 1, one_per_group=True)[0]
    assert (hit.item_id, hit.group_id, hit.score) == ("g5-dup", "g5", pytest.approx(1.0))
    assert [h.item_id for h in index.search(bags["g5-img0"], 2)] == ["g5-dup", "g5-img0"]
    assert index.search(random_bags(rng, 1)[0], 0, one_per_group=True) == []


def test_groups_survive_deletes_compaction_and_snapshots():
    rng = np.random.default_rng(8)
    index, bags, group_of = grouped_catalogue(rng)
    assert index.group_size("g3") == sum(group_of[i] == "g3" for i in bags) and index.group_size("nope") == 0
    assert index.group_size("solo-0-0") == 1  # an item without a group is the group named by its id
    doomed = [i for i in bags if group_of[i] == "g3" or i == "solo-0-0"]
    assert index.delete_groups(["g3", "solo-0-0", "nope"]) == len(doomed) > 1
    for item_id in doomed:
        del bags[item_id]
    assert index.group_size("g3") == 0 and "g3-img0" not in index and len(index) == len(bags)
    index.add("g4-img0", bags["g2-img0"], {}, "g2")  # replaced: moves to another group
    bags["g4-img0"], group_of["g4-img0"] = bags["g2-img0"], "g2"
    queries = random_bags(rng, 6)
    for stage in ("live", "compacted", "restored"):
        if stage == "compacted":
            index.compact()
        if stage == "restored":
            index = BowIndex.from_state(index.state())
        for query in queries:
            expected = grouped_reference(bow_scores(query, bags), group_of, 15)
            hits = index.search(query, 15, one_per_group=True)
            assert [h.item_id for h in hits] == [i for i, _ in expected], stage
        assert index.delete_groups(["g3"]) == 0 and index.group_size("g2") == sum(group_of[i] == "g2" for i in bags)
        box = index.search(bags["g7-img1"], 1)[0]
        assert box.item_id == "g7-img1" and box.group_id == "g7"
        np.testing.assert_array_equal(box.box, np.array([1, 7, 11, 27], np.float32))
    keys, _, groups = index.partial_scores_with_groups(bags["g2-img0"])
    assert item_key("g2") in set(groups.tolist()) and len(keys) == len(groups)


def test_a_snapshot_from_before_groups_loads_with_every_item_its_own_group():
    rng = np.random.default_rng(9)
    bags = random_bags(rng, 80)
    index = BowIndex(500, 1)
    for i, bag in enumerate(bags):
        index.add(f"i{i}", bag, {"n": str(i)})
    index.delete("i3")
    old = {k: v for k, v in index.state().items() if k not in ("groups", "group_names", "boxes", "attributes")}
    assert sorted(old) == ["config", "counts", "ids", "inv_total", "keys", "live", "metadata", "offsets", "rows"]
    copy = BowIndex.from_state(old)
    assert len(copy) == 79 and copy.group_size("i5") == 1 and copy.group_size("i3") == 0
    for query in random_bags(rng, 5):
        hits = copy.search(query, 10)
        assert hits == index.search(query, 10) == copy.search(query, 10, one_per_group=True)
        assert all(h.group_id == "" and h.box is None for h in hits)
    copy.add("i7", bags[8], {}, "pair")
    copy.add("i8", bags[8], {}, "pair")
    assert next(h.item_id for h in copy.search(bags[8], 2, one_per_group=True)) == "i7"
    assert copy.delete_groups(["pair"]) == 2 and "i8" not in copy


def test_search_batch_answers_each_query_exactly():
    rng = np.random.default_rng(10)
    index, bags, group_of = grouped_catalogue(rng, groups=30)
    queries = random_bags(rng, 5)
    for grouped in (False, True):
        for query, hits in zip(queries, index.search_batch(queries, 7, grouped)):
            scores = bow_scores(query, bags)
            expected = grouped_reference(scores, group_of, 7) if grouped else ungrouped_reference(scores, 7)
            assert [h.item_id for h in hits] == [i for i, _ in expected]
    with pytest.raises(SignatureError, match="vocabulary"):
        index.search_batch([queries[0], BagOfWords.from_words([1], 600, 1)], 5)
