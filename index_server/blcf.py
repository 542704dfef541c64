"""BLCF databases (seed 002): assignment maps searched by tf-idf cosine through the inverted index,
the first stage's top K re-ranked by windows slid over each candidate's stored map.

An item is an assignment map (common.blcf_codec.AssignmentMap: the word of every cell of a CNN's
feature map). Its bag (the cells of each word) is what the postings hold (count = cells, uint16),
so rows, groups, adds, deletes, merges, compaction, filters, the top k and partial scores by key
are inverted.PostingsIndex's. What BLCF adds:
- tf-idf: idf_w = log(1 + N / df_w) over the N live items (df_w = live items holding w; a word no
  live item holds has idf 0; smoothed so that a word every item holds, as in a database of one
  item, still weighs log 2), an item's vector d_w = count_w idf_w, the query's q_w = count_w idf_w,
  score = cos(q, d) in [0, 1]. N and df change with every add and delete, and with them every
  item's norm |d|: the norms are cached, tagged with a change counter, and the first search after
  a change recomputes them (one compiled pass over a per-row sparse word/count table).
- whole maps: every item's map (a flat uint16 pool; per row its offset, rows, columns and image
  size), its full bag and a full-vocabulary df are kept even by a word-range shard, which holds
  only some words' postings: idf and norms are the database's on every shard, so the partial
  cosines of word ranges (sum over the range of q_w d_w idf_w^2 / (|q| |d|)) add up to the cosine.
- spatial re-ranking (domain.Rerank): each of the first stage's top K is re-scored by its best
  window, windows of several heights and widths (config.WindowSpec) slid over its map. A window's
  counts come from integral histograms built per candidate over the distinct words of its map
  (4 lookups per word); a word seen once in the map counts 0 or 1 in any window, so all such
  words share one integral image of their contributions (most words of a map, so most of the
  work). Query expansion averages the unit query with the unit best windows of the first N
  re-ranked items and re-scores the K with that.

Concurrency is PostingsIndex's (inverted.py): everything a search reads is written only under the
write side of the lock. The one thing a reader makes is the norm cache: it builds new arrays and
swaps the (counter, idf, inverse norms) tuple in under a small lock of its own, never writing an
array another reader may hold.
"""

from __future__ import annotations

import dataclasses
import threading

import numba
import numpy as np

from common.blcf_codec import EMPTY, AssignmentMap
from common.bow_codec import BagOfWords
from index_server.config import WindowSpec
from index_server.domain import Filter, Hit, Rerank, SignatureError
from index_server.groups import grown
from index_server.inverted import BLOCK, PostingsIndex, _top_candidates
from index_server.snapshot_codec import array_from

__all__ = ["BlcfIndex", "Rerank", "WindowSpec"]

DEFAULT_WINDOWS = WindowSpec()


class BlcfIndex(PostingsIndex[AssignmentMap]):
    """One database of BLCF items (assignment maps), searched exactly by tf-idf cosine and
    optionally re-ranked by windows; thread-safe. `fingerprint` names the vocabulary (the postings'
    codebook), `windows` the windows of spatial re-ranking."""

    def __init__(
        self,
        vocabulary: int,
        fingerprint: int,
        word_range: tuple[int, int] | None = None,
        windows: WindowSpec = DEFAULT_WINDOWS,
        background_merge: bool = True,
    ):
        super().__init__(vocabulary, fingerprint, word_range, background_merge)
        self.windows = windows
        # Row n: the window sides over a map side of n cells (windows.sizes(n)), 0-padded.
        self._sides = _side_table(windows)
        # Live items holding each word, over the whole vocabulary (not only this shard's range).
        self._df = np.zeros(vocabulary, np.int32)
        # Every row's map: cells[map_start[r] : map_start[r] + rows * columns], row-major.
        self._cells = np.zeros(1 << 16, np.uint16)
        self._cells_used = 0
        self._map_start = np.zeros(1024, np.int64)
        self._map_shape = np.zeros((1024, 2), np.int32)  # rows, columns
        self._image_size = np.zeros((1024, 2), np.int32)  # width, height in pixels
        # Every row's whole bag: words and counts [bag_start[r], bag_start[r] + bag_length[r]).
        self._bag_words = np.zeros(1 << 16, np.uint16)
        self._bag_counts = np.zeros(1 << 16, np.uint16)
        self._bag_used = 0
        self._bag_start = np.zeros(1024, np.int64)
        self._bag_length = np.zeros(1024, np.int32)
        # Bumped by every change of N, df or row numbers: the norm cache is valid for one value.
        self._changes = 0
        self._weights: tuple[int, np.ndarray, np.ndarray] | None = None  # (changes, idf, inverse norms)
        self._weights_lock = threading.Lock()

    @property
    def fingerprint(self) -> int:
        return self.codebook

    # -- what PostingsIndex asks of a subclass ---------------------------------------------------------

    def check(self, amap: AssignmentMap) -> None:
        if amap.vocabulary != self.vocabulary or amap.fingerprint != self.codebook:
            raise SignatureError(
                f"signature was made with the {amap.vocabulary}-word BLCF vocabulary {amap.fingerprint:08x}; "
                f"this database holds signatures of the {self.vocabulary}-word vocabulary {self.codebook:08x} "
                "(re-sign with the same vocabulary)"
            )

    def add(
        self,
        item_id: str,
        amap: AssignmentMap,
        metadata: dict[str, str],
        group_id: str = "",
        box: np.ndarray | None = None,
    ) -> bool:
        """PostingsIndex.add of one map: a query's pyramid (several levels) is not an item."""
        if amap.levels > 1:
            raise SignatureError(
                f"signature holds a pyramid of {amap.levels} maps (a query by region); an item is the one "
                "map of its whole image: sign it without regions"
            )
        return super().add(item_id, amap, metadata, group_id, box)

    def _bag_of(self, amap: AssignmentMap) -> BagOfWords:
        return amap.bag()

    def _grow_locked(self, size: int) -> None:
        super()._grow_locked(size)
        self._map_start = grown(self._map_start, size)
        self._map_shape = grown(self._map_shape, size)
        self._image_size = grown(self._image_size, size)
        self._bag_start = grown(self._bag_start, size)
        self._bag_length = grown(self._bag_length, size)

    def _row_added_locked(self, row: int, amap: AssignmentMap, bag: BagOfWords) -> None:
        cells = np.ascontiguousarray(amap.words, np.uint16).reshape(-1)
        self._cells = grown(self._cells, self._cells_used + len(cells))
        self._cells[self._cells_used : self._cells_used + len(cells)] = cells
        self._map_start[row] = self._cells_used
        self._cells_used += len(cells)
        self._map_shape[row] = (amap.rows, amap.columns)
        self._image_size[row] = (amap.width, amap.height)
        length = len(bag.words)
        self._bag_words = grown(self._bag_words, self._bag_used + length)
        self._bag_counts = grown(self._bag_counts, self._bag_used + length)
        self._bag_words[self._bag_used : self._bag_used + length] = bag.words
        self._bag_counts[self._bag_used : self._bag_used + length] = bag.counts
        self._bag_start[row] = self._bag_used
        self._bag_length[row] = length
        self._bag_used += length
        self._df[bag.words] += 1  # distinct words: one each
        self._changes += 1

    def _delete_locked(self, item_id: str) -> int | None:
        row = self._row_of.get(item_id)
        number = super()._delete_locked(item_id)
        if row is not None:
            start = self._bag_start[row]
            self._df[self._bag_words[start : start + self._bag_length[row]]] -= 1
            self._changes += 1
        return number

    def _rows_compacted_locked(self, live_rows: np.ndarray) -> None:
        spare = max(1024, len(live_rows))
        map_lengths = self._map_shape[live_rows, 0].astype(np.int64) * self._map_shape[live_rows, 1]
        self._cells, map_start = _compacted_pool(self._cells, self._map_start[live_rows], map_lengths)
        bag_lengths = self._bag_length[live_rows].astype(np.int64)
        bag_start = self._bag_start[live_rows]
        self._bag_words, new_bag_start = _compacted_pool(self._bag_words, bag_start, bag_lengths)
        self._bag_counts, _ = _compacted_pool(self._bag_counts, bag_start, bag_lengths)
        self._cells_used, self._bag_used = len(self._cells), len(self._bag_words)
        self._map_start = np.concatenate([map_start, np.zeros(spare, np.int64)])
        self._map_shape = np.concatenate([self._map_shape[live_rows], np.zeros((spare, 2), np.int32)])
        self._image_size = np.concatenate([self._image_size[live_rows], np.zeros((spare, 2), np.int32)])
        self._bag_start = np.concatenate([new_bag_start, np.zeros(spare, np.int64)])
        self._bag_length = np.concatenate([self._bag_length[live_rows], np.zeros(spare, np.int32)])
        self._changes += 1  # rows renumbered: cached norms are by row

    def _state_locked(self, count: int) -> dict[str, bytes]:
        return {
            "blcf_cells": self._cells[: self._cells_used].tobytes(),
            "blcf_map_start": self._map_start[:count].tobytes(),
            "blcf_map_shape": self._map_shape[:count].tobytes(),
            "blcf_image_size": self._image_size[:count].tobytes(),
            "blcf_bag_words": self._bag_words[: self._bag_used].tobytes(),
            "blcf_bag_counts": self._bag_counts[: self._bag_used].tobytes(),
            "blcf_bag_start": self._bag_start[:count].tobytes(),
            "blcf_bag_length": self._bag_length[:count].tobytes(),
        }

    def _load_state(self, state: dict[str, bytes], count: int) -> None:
        spare = max(1024, count)
        self._cells = array_from(state["blcf_cells"], np.uint16, 1 << 16)
        self._cells_used = len(self._cells) - (1 << 16)
        self._map_start = array_from(state["blcf_map_start"], np.int64, spare)
        self._map_shape = array_from(state["blcf_map_shape"], np.int32, 2 * spare).reshape(-1, 2)
        self._image_size = array_from(state["blcf_image_size"], np.int32, 2 * spare).reshape(-1, 2)
        self._bag_words = array_from(state["blcf_bag_words"], np.uint16, 1 << 16)
        self._bag_counts = array_from(state["blcf_bag_counts"], np.uint16, 1 << 16)
        self._bag_used = len(self._bag_words) - (1 << 16)
        self._bag_start = array_from(state["blcf_bag_start"], np.int64, spare)
        self._bag_length = array_from(state["blcf_bag_length"], np.int32, spare)
        # df over the live rows, from their bags (the one source of truth, so never out of step).
        live = np.flatnonzero(self._live[:count])
        lengths = self._bag_length[live].astype(np.int64)
        words = self._bag_words[np.repeat(self._bag_start[live] - _starts(lengths), lengths) + np.arange(lengths.sum())]
        self._df = np.bincount(words, minlength=self.vocabulary).astype(np.int32)
        self._changes += 1

    def nbytes(self) -> int:
        """PostingsIndex.nbytes plus the maps, the bags and their per-row arrays."""
        with self._lock.read():
            own = self._cells_used * 2 + self._bag_used * 4 + len(self._ids) * 36 + self._df.nbytes
        return super().nbytes() + own

    # -- tf-idf ------------------------------------------------------------------------------------------

    def document_frequency(self) -> np.ndarray:
        """(V,) int32 live items holding each word (the whole vocabulary, whatever the range)."""
        with self._lock.read():
            return self._df.copy()

    def _weights_locked(self) -> tuple[np.ndarray, np.ndarray]:
        """((V,) float32 idf, (rows,) float32 1 / |d| per row, 0 for a row of norm 0): cached until
        the next change. The caller holds the lock (either side), so no change comes meanwhile; of
        concurrent readers after a change, one computes them and the others wait for its result."""
        cached = self._weights
        if cached is not None and cached[0] == self._changes:
            return cached[1], cached[2]
        with self._weights_lock:
            cached = self._weights
            if cached is not None and cached[0] == self._changes:
                return cached[1], cached[2]
            count, items = len(self._ids), len(self._row_of)
            idf = np.zeros(self.vocabulary, np.float32)
            held = self._df > 0
            idf[held] = np.log1p(items / self._df[held])
            inverse_norms = np.empty(count, np.float32)
            _inverse_norms(self._bag_start, self._bag_length, self._bag_words, self._bag_counts, idf, inverse_norms)
            self._weights = (self._changes, idf, inverse_norms)
            return idf, inverse_norms

    def _overlap_locked(self, amap: AssignmentMap) -> tuple[np.ndarray, int]:
        """(count,) float32 per row: the cosine's share of the query's words in this index's range
        (the cosine itself when the index holds every word), and the row count."""
        idf, inverse_norms = self._weights_locked()
        return self._cosines_locked(amap.bag(), idf, inverse_norms), len(self._ids)

    def _cosines_locked(self, bag: BagOfWords, idf: np.ndarray, inverse_norms: np.ndarray) -> np.ndarray:
        words = bag.words.astype(np.int32)
        query = bag.counts * idf[words].astype(np.float64)
        query_norm = _norm(query)
        acc = np.zeros(len(self._ids), np.float32)
        if query_norm == 0:
            return acc
        # q_w idf_w / |q| per query word; the kernels multiply by each posting's count and 1 / |d|.
        weights = (query * idf[words] / query_norm).astype(np.float32)
        self._walk_locked(_dot_segment, _dot_pool, words, weights, inverse_norms, acc)
        return acc

    # -- search ------------------------------------------------------------------------------------------

    def search(
        self,
        amap: AssignmentMap,
        top_k: int,
        one_per_group: bool = False,
        filter: Filter | None = None,
        rerank: Rerank | None = None,
    ) -> list[Hit]:
        """Up to top_k items sharing a word of positive idf with the query, best tf-idf cosine first,
        ties by id. one_per_group: top_k counts groups, each by its best item (exact). filter: only
        items of groups passing it, the top k collected among them. rerank: the first stage's top
        rerank.top_k (of max(top_k, rerank.top_k) collected) re-scored by their best windows and
        re-ordered by them (ties by id), the rest following in first-stage order; with
        rerank.candidates, exactly those live items are re-scored, with the scores given."""
        return self.search_batch([amap], top_k, one_per_group, filter, rerank)[0]

    def search_batch(
        self,
        maps: list[AssignmentMap],
        top_k: int,
        one_per_group: bool = False,
        filter: Filter | None = None,
        rerank: Rerank | None = None,
    ) -> list[list[Hit]]:
        """search() of each map under one hold of the lock, the filter's row mask and the weights
        made once."""
        for amap in maps:
            self.check(amap)
        with self._lock.read():
            if top_k <= 0:
                return [[] for _ in maps]
            idf, inverse_norms = self._weights_locked()
            live = self._live_locked(len(self._ids), filter)
            return [self._search_locked(amap, top_k, one_per_group, live, idf, inverse_norms, rerank) for amap in maps]

    def _search_locked(
        self,
        amap: AssignmentMap,
        top_k: int,
        one_per_group: bool,
        live: np.ndarray,
        idf: np.ndarray,
        inverse_norms: np.ndarray,
        rerank: Rerank | None,
    ) -> list[Hit]:
        bag = amap.bag()
        if rerank is not None and rerank.candidates is not None:
            rows, first = self._candidates_locked(*rerank.candidates, live)
            depth = len(rows)
        else:
            acc = self._cosines_locked(bag, idf, inverse_norms)
            depth = max(top_k, rerank.top_k if rerank is not None else 0)
            found = self._best_of_groups(acc, live, depth) if one_per_group else _top_candidates(acc, live, depth)
            rows = sorted(found.tolist(), key=lambda r: (-acc[r], self._ids[r]))[:depth]
            first = [float(acc[r]) for r in rows]
        if rerank is None:
            reranked = 0
        elif rerank.candidates is not None:
            reranked = len(rows)  # the caller chose them (no more than its top_k: the service checks)
        else:
            reranked = min(rerank.top_k, len(rows))
        head = self._reranked_locked(bag, rows[:reranked], first[:reranked], idf, rerank) if reranked else []
        rest = [self._hit(row, score) for row, score in zip(rows[reranked:], first[reranked:])]
        return (head + rest)[:top_k]

    def _candidates_locked(
        self, keys: np.ndarray, scores: np.ndarray, live: np.ndarray
    ) -> tuple[list[int], list[float]]:
        """The live rows (passing the filter) of these item keys, with their given scores, best first
        (ties by id); a key not held here is left out."""
        given = dict(zip(np.asarray(keys, np.uint64).tolist(), np.asarray(scores, np.float32).tolist()))
        count = len(self._ids)
        rows = np.flatnonzero(np.isin(self._keys[:count], np.asarray(keys, np.uint64)) & live).tolist()
        ordered = sorted(rows, key=lambda r: (-given[int(self._keys[r])], self._ids[r]))
        return ordered, [given[int(self._keys[r])] for r in ordered]

    def _reranked_locked(
        self, bag: BagOfWords, rows: list[int], first: list[float], idf: np.ndarray, rerank: Rerank | None
    ) -> list[Hit]:
        """The rows' hits re-scored by their best windows (then, with query expansion, by their best
        windows for the expanded query), best first, ties by id."""
        candidates = np.asarray(rows, np.int64)
        query = np.zeros(self.vocabulary, np.float64)
        query[bag.words] = bag.counts * idf[bag.words].astype(np.float64)
        scores, boxes = self._windows_locked(candidates, query, idf)
        # Ranked as reported (float32, as first-stage scores are), so a router merging shards'
        # answers orders them the same way.
        scores = scores.astype(np.float32)
        order = sorted(range(len(rows)), key=lambda i: (-scores[i], self._ids[rows[i]]))
        expansion = rerank.query_expansion if rerank is not None else 0
        if expansion > 0:
            vectors = [query] + [self._window_vector_locked(rows[i], boxes[i], idf) for i in order[:expansion]]
            units = [unit for unit in map(_unit, vectors) if unit is not None]
            scores, boxes = self._windows_locked(candidates, np.mean(units, axis=0) if units else query, idf)
            scores = scores.astype(np.float32)
            order = sorted(range(len(rows)), key=lambda i: (-scores[i], self._ids[rows[i]]))
        return [
            dataclasses.replace(
                self._hit(rows[i], float(scores[i])),
                window=self._map_locked(rows[i]).cell_box(*(int(v) for v in boxes[i])),
                first_stage_score=float(first[i]),
                reranked=True,
            )
            for i in order
        ]

    def _windows_locked(self, rows: np.ndarray, query: np.ndarray, idf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per row, its best window's cosine with the (V,) float64 query vector and that window as
        (row0, column0, row1, column1) cells: ((n,) float64, (n, 4) int64)."""
        scores = np.zeros(len(rows), np.float64)
        boxes = np.zeros((len(rows), 4), np.int64)
        _best_windows(
            rows,
            self._map_start,
            self._map_shape,
            self._cells,
            idf,
            query,
            _norm(query),
            self._sides,
            self.windows.stride,
            scores,
            boxes,
        )
        return scores, boxes

    def _map_locked(self, row: int) -> AssignmentMap:
        """The row's stored map (a view of the pool: read it under the lock)."""
        rows, columns = (int(v) for v in self._map_shape[row])
        start = int(self._map_start[row])
        words = self._cells[start : start + rows * columns].reshape(rows, columns)
        width, height = (int(v) for v in self._image_size[row])
        return AssignmentMap(words, self.vocabulary, self.codebook, width, height)

    def _window_vector_locked(self, row: int, box: np.ndarray, idf: np.ndarray) -> np.ndarray:
        """(V,) float64 tf-idf vector of the cells [row0, row1) x [column0, column1) of a row's map."""
        row0, column0, row1, column1 = (int(v) for v in box)
        cells = self._map_locked(row).words[row0:row1, column0:column1].reshape(-1)
        counts = np.bincount(cells[cells != EMPTY], minlength=self.vocabulary)
        return counts * idf.astype(np.float64)


def _norm(vector: np.ndarray) -> float:
    # Not np.dot / np.linalg.norm: BLAS may spread one (V,) product over threads, which costs
    # milliseconds when the cores are busy with other searches.
    return float(np.sqrt(np.sum(vector * vector)))


def _unit(vector: np.ndarray) -> np.ndarray | None:
    norm = _norm(vector)
    return vector / norm if norm > 0 else None


def _starts(lengths: np.ndarray) -> np.ndarray:
    """(n,) int64 offsets of consecutive runs of these lengths."""
    starts = np.zeros(len(lengths), np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


def _compacted_pool(pool: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The runs pool[starts[i] : starts[i] + lengths[i]] packed one after the other, and their new
    starts."""
    new_starts = _starts(lengths)
    index = np.repeat(starts - new_starts, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)
    return pool[index], new_starts


@numba.njit(cache=True, nogil=True, fastmath=True)
def _dot_segment(words, weights, lo, hi, offsets, rows, counts, inverse_norms, acc):  # pragma: no cover
    for i in range(words.shape[0]):
        w = words[i]
        if w < lo or w >= hi:
            continue
        q = weights[i]
        for j in range(offsets[w], offsets[w + 1]):
            r = rows[j]
            acc[r] += q * counts[j] * inverse_norms[r]


@numba.njit(cache=True, nogil=True, fastmath=True)
def _dot_pool(words, weights, lo, hi, rows, counts, nxt, head, tail, fill, inverse_norms, acc):  # pragma: no cover
    for i in range(words.shape[0]):
        w = words[i]
        if w < lo or w >= hi:
            continue
        q = weights[i]
        block = head[w]
        while block >= 0:
            end = fill[w] if block == tail[w] else BLOCK
            for j in range(block * BLOCK, block * BLOCK + end):
                r = rows[j]
                acc[r] += q * counts[j] * inverse_norms[r]
            block = nxt[block]


@numba.njit(cache=True, nogil=True)
def _inverse_norms(starts, lengths, words, counts, idf, out):  # pragma: no cover
    """out[r] = 1 / sqrt(sum over the row's bag of (count_w idf_w)^2), 0 where that is 0."""
    for r in range(out.shape[0]):
        total = 0.0
        for j in range(starts[r], starts[r] + lengths[r]):
            value = counts[j] * np.float64(idf[words[j]])
            total += value * value
        out[r] = 1.0 / np.sqrt(total) if total > 0 else 0.0


def _side_table(windows: WindowSpec) -> np.ndarray:
    """(256, F + 1) int64: row n holds windows.sizes(n), the window sides over a map side of n
    cells (the codec's maps have at most 255), smallest first, padded with 0."""
    table = np.zeros((256, len(windows.fractions) + 1), np.int64)
    for cells in range(1, 256):
        sides = windows.sizes(cells)
        table[cells, : len(sides)] = sides
    return table


@numba.njit(cache=True, nogil=True)
def _positions(cells, side, stride):  # pragma: no cover
    """Window starts every `stride` cells, the last one flush with the far edge."""
    last = cells - side
    count = last // stride + 1
    extra = 1 if last % stride != 0 else 0
    out = np.empty(count + extra, np.int64)
    for i in range(count):
        out[i] = i * stride
    if extra:
        out[count] = last
    return out


@numba.njit(cache=True, nogil=True, fastmath=True)  # fastmath: the per-word sums vectorise
def _best_windows(
    rows, map_start, map_shape, cells, idf, query, query_norm, sides, stride, scores, boxes
):  # pragma: no cover
    """Per candidate row: the best cosine between the query and a window of its map, and that
    window in cells. Windows are tried smallest first; a later one must score strictly higher."""
    local = np.full(idf.shape[0], -1, np.int64)  # word -> its number among the map's distinct words
    for i in range(rows.shape[0]):
        r = rows[i]
        height, width, start = map_shape[r, 0], map_shape[r, 1], map_start[r]
        n = height * width
        distinct = np.empty(n, np.int64)
        total = np.zeros(n, np.int64)
        found = 0
        for k in range(n):
            w = cells[start + k]
            if w == EMPTY or idf[w] <= 0:
                continue  # adds nothing to a window's vector
            if local[w] < 0:
                local[w] = found
                distinct[found] = w
                found += 1
            total[local[w]] += 1
        # A word seen more than once gets an integral histogram of its own; the others share two
        # integral images (their count in a window is 0 or 1, so their sums are linear).
        multi = np.full(found, -1, np.int64)
        multi_idf = np.empty(found, np.float64)
        multi_query = np.empty(found, np.float64)
        m_count = 0
        for u in range(found):
            if total[u] > 1:
                w = distinct[u]
                multi[u] = m_count
                multi_idf[m_count] = idf[w]
                multi_query[m_count] = query[w] * idf[w]
                m_count += 1
        stride_row = width + 1
        scoring = np.zeros((height + 1) * stride_row, np.int32)  # cells whose word has idf > 0
        single_dot = np.zeros((height + 1) * stride_row, np.float64)
        single_norm = np.zeros((height + 1) * stride_row, np.float64)
        hist = np.zeros((height + 1) * stride_row * m_count, np.int32)
        for y in range(height):
            for x in range(width):
                p = (y + 1) * stride_row + x + 1
                up, left, diagonal = p - stride_row, p - 1, p - stride_row - 1
                dot_value, norm_value, m, scores_here = 0.0, 0.0, -1, 0
                w = cells[start + y * width + x]
                if w != EMPTY and idf[w] > 0:
                    scores_here = 1
                    m = multi[local[w]]
                    if m < 0:
                        dot_value = query[w] * idf[w]
                        norm_value = np.float64(idf[w]) * idf[w]
                scoring[p] = scoring[up] + scoring[left] - scoring[diagonal] + scores_here
                single_dot[p] = single_dot[up] + single_dot[left] - single_dot[diagonal] + dot_value
                single_norm[p] = single_norm[up] + single_norm[left] - single_norm[diagonal] + norm_value
                for j in range(m_count):
                    hist[p * m_count + j] = (
                        hist[up * m_count + j] + hist[left * m_count + j] - hist[diagonal * m_count + j]
                    )
                if m >= 0:
                    hist[p * m_count + m] += 1
        for u in range(found):
            local[distinct[u]] = -1
        best, b0, b1, b2, b3 = -1.0, 0, 0, height, width
        for side_y in sides[height]:
            if side_y == 0:
                break
            ys = _positions(height, side_y, stride)
            for side_x in sides[width]:
                if side_x == 0:
                    break
                xs = _positions(width, side_x, stride)
                for y0 in ys:
                    for x0 in xs:
                        p00 = y0 * stride_row + x0
                        p01 = p00 + side_x
                        p10 = p00 + side_y * stride_row
                        p11 = p10 + side_x
                        if scoring[p11] - scoring[p01] - scoring[p10] + scoring[p00] == 0:
                            score = 0.0  # nothing in it scores (exact: the float sums may leave dust)
                            if score > best:
                                best, b0, b1, b2, b3 = score, y0, x0, y0 + side_y, x0 + side_x
                            continue
                        dot = single_dot[p11] - single_dot[p01] - single_dot[p10] + single_dot[p00]
                        norm = single_norm[p11] - single_norm[p01] - single_norm[p10] + single_norm[p00]
                        for j in range(m_count):
                            c = (
                                hist[p11 * m_count + j]
                                - hist[p01 * m_count + j]
                                - hist[p10 * m_count + j]
                                + hist[p00 * m_count + j]
                            )
                            # No branch on c: whether a word is in a window is unpredictable.
                            value = c * multi_idf[j]
                            norm += value * value
                            dot += c * multi_query[j]
                        score = dot / (query_norm * np.sqrt(norm)) if norm > 0 and query_norm > 0 else 0.0
                        if score > best:
                            best, b0, b1, b2, b3 = score, y0, x0, y0 + side_y, x0 + side_x
        scores[i] = max(best, 0.0)
        boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3] = b0, b1, b2, b3
