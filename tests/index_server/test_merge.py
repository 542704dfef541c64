"""Merging shard answers."""

import itertools

import numpy as np

from index_server.domain import Hit, word_range_of
from index_server.merge import best_of_groups, merge_top_k, shard_of, sum_partials, top_with_ties


def test_sum_partials_adds_each_keys_shares():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2**63, 5000, dtype=np.uint64)
    parts = [rng.choice(keys, 3000, replace=False) for _ in range(3)]
    sums = [rng.random(3000).astype(np.float32) for _ in range(3)]
    merged_keys, merged = sum_partials(parts, sums)
    expected: dict[int, float] = {}
    for part, s in zip(parts, sums):
        for k, v in zip(part.tolist(), s.tolist()):
            expected[k] = expected.get(k, 0.0) + v
    assert len(merged_keys) == len(expected) == len(set(merged_keys.tolist()))
    np.testing.assert_allclose(merged, [expected[k] for k in merged_keys.tolist()], rtol=1e-6)
    assert [len(a) for a in sum_partials([], [])] == [0, 0]


def test_top_with_ties_keeps_every_tie_at_the_boundary():
    scores = np.array([0.1, 0.5, 0.5, 0.9, 0.5, 0.2], np.float32)
    assert sorted(top_with_ties(scores, 2).tolist()) == [1, 2, 3, 4]
    assert sorted(top_with_ties(scores, 10).tolist()) == list(range(6))


def test_merge_top_k_orders_by_score_then_id():
    merged = merge_top_k([[Hit("b", 0.9, {}), Hit("d", 0.1, {})], [Hit("a", 0.9, {}), Hit("c", 0.5, {})]], 3)
    assert [h.item_id for h in merged] == ["a", "b", "c"]


def test_routing_is_stable_and_ranges_tile_the_vocabulary():
    assert shard_of("item-1", 4) == shard_of("item-1", 4)
    counts = np.bincount([shard_of(f"item-{i}", 4) for i in range(4000)], minlength=4)
    assert counts.min() > 850  # spread evenly
    ranges = [word_range_of(i, 3, 5000) for i in range(3)]
    assert ranges[0][0] == 0 and ranges[-1][1] == 5000 and all(a[1] == b[0] for a, b in itertools.pairwise(ranges))


def test_merge_top_k_one_per_group_keeps_each_groups_best_once():
    lists = [
        [Hit("a1", 0.9, {}, "A"), Hit("b1", 0.8, {}, "B"), Hit("x", 0.5, {})],
        [Hit("a0", 0.9, {}, "A"), Hit("c1", 0.85, {}, "C"), Hit("b2", 0.7, {}, "B")],
    ]
    assert [h.item_id for h in merge_top_k(lists, 3, one_per_group=True)] == ["a0", "c1", "b1"]
    assert [h.item_id for h in merge_top_k(lists, 10, one_per_group=True)] == ["a0", "c1", "b1", "x"]
    assert [h.item_id for h in merge_top_k(lists, 3)] == ["a0", "a1", "c1"]


def test_best_of_groups_names_every_candidate_of_the_top_groups_against_brute_force():
    rng = np.random.default_rng(1)
    totals = rng.integers(1, 40, 3000).astype(np.float32)  # many ties, within and across groups
    groups = rng.integers(0, 500, 3000).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    for top_k in (1, 10, 100, 1000):
        got = set(best_of_groups(totals, groups, top_k).tolist())
        best = {}
        for g, t in zip(groups.tolist(), totals.tolist()):
            best[g] = max(best.get(g, 0), t)
        kth = sorted(best.values(), reverse=True)[min(top_k, len(best)) - 1]
        expected = {i for i, (g, t) in enumerate(zip(groups.tolist(), totals.tolist())) if t == best[g] >= kth}
        assert got == expected
    assert len(best_of_groups(np.zeros(0, np.float32), np.zeros(0, np.uint64), 5)) == 0


def test_sum_partials_carries_each_keys_group():
    keys = [np.array([1, 2, 3], np.uint64), np.array([3, 4], np.uint64)]
    sums = [np.array([0.1, 0.2, 0.3], np.float32), np.array([0.5, 0.4], np.float32)]
    groups = [np.array([10, 20, 30], np.uint64), np.array([30, 20], np.uint64)]
    merged_keys, merged, merged_groups = sum_partials(keys, sums, groups)
    order = np.argsort(merged_keys)
    assert merged_keys[order].tolist() == [1, 2, 3, 4] and merged_groups[order].tolist() == [10, 20, 30, 20]
    np.testing.assert_allclose(merged[order], [0.1, 0.2, 0.8, 0.4], rtol=1e-6)


def test_an_items_group_decides_its_shard():
    assert shard_of("img-1", 8, "sku") == shard_of("img-2", 8, "sku") == shard_of("sku", 8)
    assert shard_of("img-1", 8) == shard_of("img-1", 8, "")  # no group: placed by its id, as before
