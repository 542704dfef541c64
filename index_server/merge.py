"""Merging shard answers (no gRPC here): item-range top-k lists, word-range partial scores."""

from __future__ import annotations

import dataclasses

import numba
import numpy as np

from index_server.domain import Hit, first_per_group, item_key


def shard_of(item_id: str, shards: int, group_id: str = "") -> int:
    """The item-range shard that holds an item: a stable hash of its group (all images of a product
    on one shard), or of its id when it has none (where items without groups always were)."""
    return item_key(group_id or item_id) % shards


def merge_top_k(lists: list[list[Hit]], top_k: int, one_per_group: bool = False) -> list[Hit]:
    """The best top_k of several shards' top-k lists (each shard's top k holds its share of the
    global top k), best first, ties by id as in one shard. one_per_group: only each group's best
    hit counts; a group found on several shards (it should live on one) is still kept once, and
    each shard's top k groups hold its share of the global top k groups, so this stays exact."""
    ranked = sorted((hit for hits in lists for hit in hits), key=lambda h: (-h.score, h.item_id))
    return first_per_group(ranked, top_k) if one_per_group else ranked[:top_k]


def merge_reranked(lists: list[list[Hit]], top_k: int, rerank_k: int, one_per_group: bool = False) -> list[Hit]:
    """The best top_k of several item-range shards' spatially re-ranked lists (BLCF), as one shard
    holding every item answers: the global first stage's top rerank_k (by first-stage score, ties
    by id) re-ordered by their re-ranked scores (ties by id), then the rest in first-stage order.
    Each shard re-ranked its own first-stage top rerank_k (it was asked for max(top_k, rerank_k)
    items), which holds its share of the global top rerank_k; an item a shard re-ranked that is
    not among the global top rerank_k goes back to its first-stage score. one_per_group: as in
    merge_top_k, by first-stage score."""

    def first_stage(hit: Hit) -> float:
        return hit.first_stage_score if hit.reranked and hit.first_stage_score is not None else hit.score

    ranked = sorted((hit for hits in lists for hit in hits), key=lambda h: (-first_stage(h), h.item_id))
    if one_per_group:
        ranked = first_per_group(ranked, len(ranked))
    head = sorted(ranked[:rerank_k], key=lambda h: (-h.score, h.item_id))
    rest = [
        dataclasses.replace(hit, score=first_stage(hit), window=None, first_stage_score=None, reranked=False)
        for hit in ranked[rerank_k:]
    ]
    return (head + rest)[:top_k]


def sum_partials(
    keys: list[np.ndarray], sums: list[np.ndarray], groups: list[np.ndarray] | None = None
) -> tuple[np.ndarray, ...]:
    """Per distinct key, the sum of its partial scores over all shards: ((n,) uint64, (n,) float32),
    and with `groups` (each key's group key, aligned with `keys`) the (n,) uint64 group of each.
    An open-addressing hash table in one pass: linear time where sorting would be n log n."""
    all_keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    all_sums = np.concatenate(sums) if sums else np.zeros(0, np.float32)
    all_groups = (np.concatenate(groups) if groups else np.zeros(0, np.uint64)) if groups is not None else None
    if len(all_keys) == 0:
        return (all_keys, all_sums) if all_groups is None else (all_keys, all_sums, all_groups)
    capacity = 1 << int(2 * len(all_keys) - 1).bit_length()
    table_keys = np.zeros(capacity, np.uint64)
    table_sums = np.zeros(capacity, np.float32)
    used = np.zeros(capacity, np.bool_)
    slot_of = np.empty(len(all_keys), np.int64)
    _hash_reduce(all_keys, all_sums, table_keys, table_sums, used, slot_of, False)
    slots = np.flatnonzero(used)
    if all_groups is None:
        return table_keys[slots], table_sums[slots]
    table_groups = np.zeros(capacity, np.uint64)
    table_groups[slot_of] = all_groups  # an item has one group, whichever shard names it
    return table_keys[slots], table_sums[slots], table_groups[slots]


def best_of_groups(totals: np.ndarray, groups: np.ndarray, top_k: int) -> np.ndarray:
    """(n,) float32 totals, (n,) uint64 group keys -> indices of the items that may be the best of
    one of the top_k best groups: every item at its group's best total, in the groups whose best is
    at least the top_k-th best group's (ties kept, so ids can break them). Linear, by hash table."""
    if len(totals) == 0:
        return np.zeros(0, np.int64)
    capacity = 1 << int(2 * len(groups) - 1).bit_length()
    table_groups = np.zeros(capacity, np.uint64)
    table_best = np.full(capacity, -np.inf, np.float32)
    used = np.zeros(capacity, np.bool_)
    slot_of = np.empty(len(groups), np.int64)
    _hash_reduce(groups, totals, table_groups, table_best, used, slot_of, True)
    group_best = table_best[slot_of]
    bests = table_best[used]
    threshold = bests[top_with_ties(bests, top_k)].min()  # totals is not empty: neither is bests
    return np.flatnonzero((totals == group_best) & (group_best >= threshold))


def top_with_ties(scores: np.ndarray, top_k: int) -> np.ndarray:
    """Indices of every score at least the top_k-th largest (ties kept, so ids can break them)."""
    if len(scores) <= top_k:
        return np.arange(len(scores))
    kth = np.partition(scores, len(scores) - top_k)[len(scores) - top_k]
    return np.flatnonzero(scores >= kth)


@numba.njit(cache=True, nogil=True)
def _hash_reduce(keys, values, table_keys, table_values, used, slot_of, take_max):  # pragma: no cover
    """Per distinct key, the sum (or, with take_max, the maximum) of its values, in an
    open-addressing table; slot_of[i] is the slot of keys[i]."""
    mask = table_keys.shape[0] - 1
    for i in range(keys.shape[0]):
        key = keys[i]
        # Keys are already uniform hashes: their low bits pick the slot.
        slot = np.int64(key & np.uint64(mask))
        while used[slot] and table_keys[slot] != key:
            slot = (slot + 1) & mask
        if not used[slot]:
            used[slot] = True
            table_keys[slot] = key
        if take_max:
            if values[i] > table_values[slot]:
                table_values[slot] = values[i]
        else:
            table_values[slot] += values[i]
        slot_of[i] = slot
