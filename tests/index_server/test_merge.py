"""Merging shard answers."""

import numpy as np

from index_server.inverted import Hit
from index_server.merge import merge_top_k, shard_of, sum_partials, top_with_ties, word_range_of


def test_sum_partials_adds_each_keys_shares():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 2 ** 63, 5000, dtype=np.uint64)
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
    assert ranges[0][0] == 0 and ranges[-1][1] == 5000 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
