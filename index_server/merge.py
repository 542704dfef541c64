"""Merging shard answers (no gRPC here): item-range top-k lists, word-range partial scores."""

from __future__ import annotations

import numba
import numpy as np

from index_server.inverted import Hit, item_key


def shard_of(item_id: str, shards: int) -> int:
    """The item-range shard that holds an item: a stable hash of its id."""
    return item_key(item_id) % shards


def word_range_of(shard: int, shards: int, vocabulary: int) -> tuple[int, int]:
    """Words [first, end) held by word-range shard `shard` of `shards` (as each shard computes it)."""
    return vocabulary * shard // shards, vocabulary * (shard + 1) // shards


def merge_top_k(lists: list[list[Hit]], top_k: int) -> list[Hit]:
    """The best top_k of several shards' top-k lists (each shard's top k holds its share of the
    global top k), best first, ties by id as in one shard."""
    return sorted((hit for hits in lists for hit in hits), key=lambda h: (-h.score, h.item_id))[:top_k]


def sum_partials(keys: list[np.ndarray], sums: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct key, the sum of its partial scores over all shards: ((n,) uint64, (n,) float32).
    An open-addressing hash table in one pass: linear time where sorting would be n log n."""
    all_keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
    all_sums = np.concatenate(sums) if sums else np.zeros(0, np.float32)
    if len(all_keys) == 0:
        return all_keys, all_sums
    capacity = 1 << int(2 * len(all_keys) - 1).bit_length()
    table_keys = np.zeros(capacity, np.uint64)
    table_sums = np.zeros(capacity, np.float32)
    used = np.zeros(capacity, np.bool_)
    _hash_sum(all_keys, all_sums, table_keys, table_sums, used)
    slots = np.flatnonzero(used)
    return table_keys[slots], table_sums[slots]


def top_with_ties(scores: np.ndarray, top_k: int) -> np.ndarray:
    """Indices of every score at least the top_k-th largest (ties kept, so ids can break them)."""
    if len(scores) <= top_k:
        return np.arange(len(scores))
    kth = np.partition(scores, len(scores) - top_k)[len(scores) - top_k]
    return np.flatnonzero(scores >= kth)


@numba.njit(cache=True, nogil=True)
def _hash_sum(keys, sums, table_keys, table_sums, used):  # pragma: no cover
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
        table_sums[slot] += sums[i]
