"""Exact chi-squared search over bag-of-words items through per-word posting lists (seed 000, 3.2).

For L1-normalised histograms chi2(x, y) = 2 - sum over words in both of 4 x_w y_w / (x_w + y_w), so
a query touches only the posting lists of its own words. A posting is (row int32, count uint16):
6 bytes, no Python object. Histogram weights are never quantised: x_w = count_w * inv_total[row],
with inv_total = 1 / (the item's total count), so scores equal brute force.

Postings live in one pool of fixed-size blocks chained per word (the layout of Lucene's in-memory
postings): an add appends in place, a search walks each query word's chain. A delete clears the
row's live flag (its postings are skipped, then dropped by compact()). An index may hold only a
range of words (word-range sharding): its scores are then partial sums over that range.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numba
import numpy as np

from common.bow_codec import BagOfWords

BLOCK = 64


class SignatureError(ValueError):
    """A signature does not fit the database; the message says why."""


@dataclass
class Hit:
    item_id: str
    score: float
    metadata: dict[str, str]


@dataclass
class Postings:
    """The pool: block b holds rows[b*BLOCK:(b+1)*BLOCK], counts likewise; next[b] chains blocks."""

    rows: np.ndarray      # (blocks * BLOCK,) int32
    counts: np.ndarray    # (blocks * BLOCK,) uint16
    next: np.ndarray      # (blocks,) int32, -1 ends a chain
    head: np.ndarray      # (V,) int32 first block of each word, -1 if none
    tail: np.ndarray      # (V,) int32 last block of each word
    fill: np.ndarray      # (V,) int32 postings in the tail block
    used: int = 0         # blocks in use

    @staticmethod
    def empty(vocabulary: int, blocks: int = 256) -> "Postings":
        return Postings(np.zeros(blocks * BLOCK, np.int32), np.zeros(blocks * BLOCK, np.uint16),
                        np.full(blocks, -1, np.int32), np.full(vocabulary, -1, np.int32),
                        np.full(vocabulary, -1, np.int32), np.zeros(vocabulary, np.int32))

    def reserve(self, new_blocks: int) -> None:
        needed = self.used + new_blocks
        if needed <= len(self.next):
            return
        blocks = max(needed, 2 * len(self.next))
        self.rows = np.concatenate([self.rows, np.zeros((blocks - len(self.next)) * BLOCK, np.int32)])
        self.counts = np.concatenate([self.counts, np.zeros((blocks - len(self.next)) * BLOCK, np.uint16)])
        self.next = np.concatenate([self.next, np.full(blocks - len(self.next), -1, np.int32)])

    def nbytes(self) -> int:
        return self.used * BLOCK * 6 + self.used * 4 + self.head.nbytes * 3


class BowIndex:
    """One database of bag-of-words items, searched exactly by chi-squared; thread-safe."""

    def __init__(self, vocabulary: int, codebook: int, word_range: tuple[int, int] | None = None):
        self.vocabulary = vocabulary
        self.codebook = codebook
        self.word_range = word_range or (0, vocabulary)
        self._postings = Postings.empty(vocabulary)
        self._inv_total = np.zeros(1024, np.float32)
        self._live = np.zeros(1024, np.bool_)
        self._ids: list[str] = []
        self._metadata: list[dict[str, str] | None] = []
        self._row_of: dict[str, int] = {}
        self._lock = threading.RLock()

    # -- checks -----------------------------------------------------------------------------------
    def check(self, bag: BagOfWords) -> None:
        if bag.vocabulary != self.vocabulary:
            raise SignatureError(f"signature uses a {bag.vocabulary}-word vocabulary; this database holds "
                                 f"{self.vocabulary}-word bags")
        if bag.codebook != self.codebook:
            raise SignatureError(f"signature was made with codebook {bag.codebook:08x}; this database holds "
                                 f"codebook {self.codebook:08x} signatures (re-sign with the same codebook)")
        if int(bag.counts.max(initial=0)) > np.iinfo(np.uint16).max:
            raise SignatureError("a word count above 65535 does not fit a posting")

    def __len__(self) -> int:
        return len(self._row_of)

    @property
    def dimension(self) -> int:
        return self.vocabulary

    def contains(self, item_id: str) -> bool:
        return item_id in self._row_of

    # -- updates ----------------------------------------------------------------------------------
    def add(self, item_id: str, bag: BagOfWords, metadata: dict[str, str]) -> bool:
        """Adds or replaces an item; returns True when it replaced one. Visible to the next search."""
        self.check(bag)
        lo, hi = self.word_range
        keep = (bag.words >= lo) & (bag.words < hi)
        words, counts = bag.words[keep].astype(np.int32), bag.counts[keep].astype(np.uint16)
        with self._lock:
            replaced = self._delete_locked(item_id)
            row = len(self._ids)
            if row == len(self._live):
                self._inv_total = np.concatenate([self._inv_total, np.zeros(row, np.float32)])
                self._live = np.concatenate([self._live, np.zeros(row, np.bool_)])
            p = self._postings
            p.reserve(len(words))
            p.used = _append(words, counts, row, p.rows, p.counts, p.next, p.head, p.tail, p.fill, p.used)
            self._inv_total[row] = np.float32(1.0) / np.float32(bag.counts.sum())
            self._ids.append(item_id)
            self._metadata.append(dict(metadata))
            self._row_of[item_id] = row
            self._live[row] = True
            return replaced

    def delete(self, item_id: str) -> bool:
        with self._lock:
            return self._delete_locked(item_id)

    def _delete_locked(self, item_id: str) -> bool:
        row = self._row_of.pop(item_id, None)
        if row is None:
            return False
        self._live[row] = False
        self._metadata[row] = None
        return True

    def dead_rows(self) -> int:
        return len(self._ids) - len(self._row_of)

    def compact(self) -> None:
        """Rewrites the pool without deleted rows, renumbering rows densely, each word contiguous."""
        with self._lock:
            live_rows = np.flatnonzero(self._live[:len(self._ids)])
            renumber = np.full(len(self._ids) + 1, -1, np.int32)
            renumber[live_rows] = np.arange(len(live_rows), dtype=np.int32)
            p = self._postings
            fresh = Postings.empty(self.vocabulary, max(256, p.used))
            fresh.used = _compact(p.rows, p.counts, p.next, p.head, p.fill, p.tail, renumber,
                                  fresh.rows, fresh.counts, fresh.next, fresh.head, fresh.tail, fresh.fill)
            self._postings = fresh
            self._inv_total = np.concatenate([self._inv_total[live_rows],
                                              np.zeros(max(1024, len(live_rows)), np.float32)])
            self._live = np.concatenate([np.ones(len(live_rows), np.bool_),
                                         np.zeros(max(1024, len(live_rows)), np.bool_)])
            self._ids = [self._ids[r] for r in live_rows]
            self._metadata = [self._metadata[r] for r in live_rows]
            self._row_of = {item_id: row for row, item_id in enumerate(self._ids)}

    # -- search -----------------------------------------------------------------------------------
    def partial_scores(self, bag: BagOfWords) -> tuple[np.ndarray, np.ndarray]:
        """Rows and their sums of 4 x y / (x + y) over the query's words in this index's range, for
        live rows sharing at least one such word: ((n,) int32, (n,) float64)."""
        self.check(bag)
        query = bag.histogram().astype(np.float64)
        with self._lock:
            p, count = self._postings, len(self._ids)
            acc = np.zeros(count, np.float64)
            _accumulate(bag.words.astype(np.int32), query, self.word_range[0], self.word_range[1],
                        p.rows, p.counts, p.next, p.head, p.tail, p.fill, self._inv_total, acc)
            rows = np.flatnonzero((acc > 0) & self._live[:count]).astype(np.int32)
            return rows, acc[rows]

    def search(self, bag: BagOfWords, top_k: int) -> list[Hit]:
        """Up to top_k items sharing a word with the query, smallest chi2 first; score 1 - chi2 / 2."""
        rows, overlap = self.partial_scores(bag)
        with self._lock:
            return [Hit(self._ids[r], s / 2.0, dict(self._metadata[r] or {}))
                    for r, s in top_rows(rows, overlap, top_k, self._ids)]

    def items(self, rows: np.ndarray) -> list[tuple[str, dict[str, str]]]:
        with self._lock:
            return [(self._ids[r], dict(self._metadata[r] or {})) for r in rows]

    def nbytes(self) -> int:
        """Bytes of the postings and per-row arrays (ids and metadata not counted)."""
        return self._postings.nbytes() + len(self._ids) * 5


def top_rows(rows: np.ndarray, overlap: np.ndarray, top_k: int, ids: list[str]
             ) -> list[tuple[int, float]]:
    """The top_k (row, overlap) by overlap descending, ties broken by item id."""
    k = min(top_k, len(rows))
    if k == 0:
        return []
    best = np.argpartition(-overlap, k - 1)[:k] if k < len(rows) else np.arange(len(rows))
    return sorted(((int(rows[i]), float(overlap[i])) for i in best), key=lambda t: (-t[1], ids[t[0]]))


@numba.njit(cache=True, nogil=True)
def _append(words, counts, row, rows, pcounts, nxt, head, tail, fill, used):  # pragma: no cover
    for i in range(words.shape[0]):
        w = words[i]
        if head[w] < 0 or fill[w] == BLOCK:
            block = used
            used += 1
            nxt[block] = -1
            if head[w] < 0:
                head[w] = block
            else:
                nxt[tail[w]] = block
            tail[w] = block
            fill[w] = 0
        slot = tail[w] * BLOCK + fill[w]
        rows[slot] = row
        pcounts[slot] = counts[i]
        fill[w] += 1
    return used


@numba.njit(cache=True, nogil=True)
def _accumulate(words, weights, lo, hi, rows, counts, nxt, head, tail, fill, inv_total, acc):  # pragma: no cover
    for i in range(words.shape[0]):
        w = words[i]
        if w < lo or w >= hi:
            continue
        q = weights[i]
        block = head[w]
        while block >= 0:
            end = fill[w] if block == tail[w] else BLOCK
            base = block * BLOCK
            for j in range(base, base + end):
                r = rows[j]
                x = np.float64(counts[j] * inv_total[r])
                acc[r] += 4.0 * q * x / (q + x)
            block = nxt[block]


@numba.njit(cache=True, nogil=True)
def _compact(rows, counts, nxt, head, fill, tail, renumber, out_rows, out_counts, out_next, out_head,
             out_tail, out_fill):  # pragma: no cover
    used = 0
    for w in range(head.shape[0]):
        block = head[w]
        while block >= 0:
            end = fill[w] if block == tail[w] else BLOCK
            for j in range(block * BLOCK, block * BLOCK + end):
                r = renumber[rows[j]]
                if r < 0:
                    continue
                if out_head[w] < 0 or out_fill[w] == BLOCK:
                    b = used
                    used += 1
                    out_next[b] = -1
                    if out_head[w] < 0:
                        out_head[w] = b
                    else:
                        out_next[out_tail[w]] = b
                    out_tail[w] = b
                    out_fill[w] = 0
                slot = out_tail[w] * BLOCK + out_fill[w]
                out_rows[slot] = r
                out_counts[slot] = counts[j]
                out_fill[w] += 1
            block = nxt[block]
    return used
