"""Exact chi-squared search over bag-of-words items through per-word posting lists (the paper, section 3.2).

For L1-normalised histograms chi2(x, y) = 2 - sum over words in both of 4 x_w y_w / (x_w + y_w), so
a query touches only the posting lists of its own words. A posting is (row int32, count uint16):
6 bytes, no Python object. Histogram weights are never quantised beyond the count itself:
x_w = count_w * inv_total[row], inv_total = 1 / (the item's total count), so scores equal brute
force to float32 rounding.

Postings live in two parts, like a log-structured merge with one level:
- the base: one contiguous CSR array per word (offsets, rows, counts); scanning it is a sequential
  stream, ~10x faster than chasing blocks;
- the tail: a pool of fixed-size blocks chained per word, where adds append in place.
When the tail grows past a fraction of the base, merge() folds it into a new base without holding
the lock (the old base and the frozen tail stay searchable meanwhile), dropping deleted rows'
postings. A delete clears the row's live flag; compact() also renumbers rows densely.
Groups carry attributes (groups.GroupTable); a filter becomes a mask over rows (the group mask taken
at each row's group), ANDed with the live flags the kernels already skip on, so the top k is
collected among the passing items only.
An index may hold only a range of words (word-range sharding): its scores are then partial sums
over that range, named by a 64-bit item key so that shards can be merged.
All of this is PostingsIndex, whatever an item is and however its postings score: BowIndex scores
them by chi-squared, index_server.blcf.BlcfIndex (assignment maps) by tf-idf cosine.

Concurrency: one writer-preferring reader-writer lock per index (common/rwlock.py). Searches,
partial scores, lookups, group sizes and snapshots hold its read side across all of their work
(accumulation, top-k, building hits), so searches of one index run at once, and the compiled
kernels, all `nogil`, run in parallel. Every change holds the write side: add, delete, the two
swaps of merge(), compact(). The invariant: no array, list or dict a reader can reach is written
while any reader holds the lock. The one piece of work done outside the lock, merge() building the
new base, reads only the base (immutable) and the frozen tail (nothing writes a tail once frozen:
adds go to the fresh one) and writes only arrays no one else sees before the write-locked swap. So
every read sees the state between two writes and answers what a lone search of that state answers.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Self, TypeVar

import numba
import numpy as np

from common.bow_codec import BagOfWords
from common.rwlock import ReadWriteLock
from index_server.domain import Filter, Hit, SignatureError, group_name, item_key
from index_server.groups import GroupAttributes, GroupTable, box_or_none, box_row, grown, reported_group
from index_server.snapshot_codec import array_from, pack_strings, unpack_strings

BLOCK = 64
# The tail is merged into the base once it holds this share of the base's postings (plus a floor
# so small indexes are not merged on every add): bounds the slow block-chasing part of a search.
MERGE_FRACTION = 0.05
MERGE_FLOOR = 1 << 20


@dataclass(frozen=True)
class Segment:
    """Immutable CSR postings: word w's rows are rows[offsets[w]:offsets[w+1]], increasing."""

    offsets: np.ndarray  # (V+1,) int64
    rows: np.ndarray  # (P,) int32
    counts: np.ndarray  # (P,) uint16

    @staticmethod
    def empty(vocabulary: int) -> Segment:
        return Segment(np.zeros(vocabulary + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.uint16))

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class Postings:
    """The append pool: block b holds rows[b*BLOCK:(b+1)*BLOCK], counts likewise; next[b] chains."""

    rows: np.ndarray  # (blocks * BLOCK,) int32
    counts: np.ndarray  # (blocks * BLOCK,) uint16
    next: np.ndarray  # (blocks,) int32, -1 ends a chain
    head: np.ndarray  # (V,) int32 first block of each word, -1 if none
    tail: np.ndarray  # (V,) int32 last block of each word
    fill: np.ndarray  # (V,) int32 postings in the tail block
    df: np.ndarray  # (V,) int32 postings per word
    used: int = 0  # blocks in use
    postings: int = 0

    @staticmethod
    def empty(vocabulary: int, blocks: int = 64) -> Postings:
        return Postings(
            np.zeros(blocks * BLOCK, np.int32),
            np.zeros(blocks * BLOCK, np.uint16),
            np.full(blocks, -1, np.int32),
            np.full(vocabulary, -1, np.int32),
            np.full(vocabulary, -1, np.int32),
            np.zeros(vocabulary, np.int32),
            np.zeros(vocabulary, np.int32),
        )

    def reserve(self, new_blocks: int) -> None:
        needed = self.used + new_blocks
        if needed <= len(self.next):
            return
        blocks = max(needed, 2 * len(self.next))
        self.rows = np.concatenate([self.rows, np.zeros((blocks - len(self.next)) * BLOCK, np.int32)])
        self.counts = np.concatenate([self.counts, np.zeros((blocks - len(self.next)) * BLOCK, np.uint16)])
        self.next = np.concatenate([self.next, np.full(blocks - len(self.next), -1, np.int32)])

    def nbytes(self) -> int:
        return self.used * BLOCK * 6 + self.used * 4 + self.head.nbytes * 4  # head, tail, fill, df


V = TypeVar("V")


class PostingsIndex(GroupAttributes, Generic[V]):
    """One database of items of type V, each with a bag of words in the postings; thread-safe.
    What the postings are scored by (and so search) is a subclass's: BowIndex (chi-squared) and
    index_server.blcf.BlcfIndex (tf-idf cosine). Rows, groups, adds, deletes, merges, compaction,
    filters, partial scores by key, lookups and snapshots are here."""

    def __init__(
        self,
        vocabulary: int,
        codebook: int,
        word_range: tuple[int, int] | None = None,
        background_merge: bool = True,
    ):
        self.vocabulary = vocabulary
        self.codebook = codebook
        self.word_range = word_range or (0, vocabulary)
        self.background_merge = background_merge
        self._base = Segment.empty(vocabulary)
        self._frozen: Postings | None = None  # a tail being merged, still searched
        self._tail = Postings.empty(vocabulary)
        self._live = np.zeros(1024, np.bool_)
        self._keys = np.zeros(1024, np.uint64)
        self._group = np.zeros(1024, np.int32)  # group number per row
        self._boxes = np.full((1024, 4), np.nan, np.float32)  # xyxy per row, NaN = no box
        self._groups = GroupTable()
        self._ids: list[str] = []
        self._metadata: list[dict[str, str] | None] = []
        self._row_of: dict[str, int] = {}
        self._lock = ReadWriteLock()  # searches read, changes write (see the module docstring)
        self._merge_lock = threading.Lock()  # one merge or compaction at a time; taken before _lock

    # -- what a subclass says: its values, and how the postings score --------------------------------

    def check(self, value: V) -> None:
        """Raises SignatureError when the value does not fit this database."""
        raise NotImplementedError

    def _bag_of(self, value: V) -> BagOfWords:
        """The bag of words of a (checked) value: what its postings hold."""
        raise NotImplementedError

    def _overlap_locked(self, value: V) -> tuple[np.ndarray, int]:
        """(count,) float32 per row: the sum over the query's words in this index's range of what
        each shared word adds to the row's score, and the row count. The caller holds the lock
        (either side) and checked the value: rows are numbers that compact() changes, so a caller
        reading rows from the scores holds it across both."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self._row_of)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._row_of

    @property
    def dimension(self) -> int:
        return self.vocabulary

    @property
    def index_type(self) -> str:
        return "inverted"

    @property
    def memory_bytes(self) -> int:
        return self.nbytes()

    def group_size(self, group_id: str) -> int:
        """Live items of a group (an item without a group_id is the group named by its id)."""
        with self._lock.read():
            return self._groups.size(group_id)

    # -- groups' attributes ------------------------------------------------------------------------

    def group_items(self, group_ids: list[str]) -> dict[str, list[Hit]]:
        """The live items of these groups (score 0), each group's in item id order; a group with
        none is left out."""
        with self._lock.read():
            numbers = self._groups.numbers(group_ids)
            count = len(self._ids)
            rows = np.flatnonzero(np.isin(self._group[:count], numbers) & self._live[:count])
            out: dict[str, list[Hit]] = {}
            for row in sorted(rows.tolist(), key=lambda r: self._ids[r]):
                out.setdefault(self._groups.names[self._group[row]], []).append(self._hit(row, 0.0))
            return out

    # -- updates ----------------------------------------------------------------------------------

    def add(
        self, item_id: str, value: V, metadata: dict[str, str], group_id: str = "", box: np.ndarray | None = None
    ) -> bool:
        """Adds or replaces an item of a group ("" = its own), with an optional (4,) float32 xyxy box;
        returns True when it replaced one. Visible to the next search."""
        self.check(value)
        bag = self._bag_of(value)
        lo, hi = self.word_range
        keep = (bag.words >= lo) & (bag.words < hi)
        words, counts = bag.words[keep].astype(np.int32), bag.counts[keep].astype(np.uint16)
        box_values = box_row(box)
        with self._lock.write():
            old_group = self._delete_locked(item_id)
            row = len(self._ids)
            if row == len(self._live):
                self._grow_locked(row + 1)
            tail = self._tail
            tail.reserve(len(words))
            tail.used = _append(
                words,
                counts,
                row,
                tail.rows,
                tail.counts,
                tail.next,
                tail.head,
                tail.tail,
                tail.fill,
                tail.df,
                tail.used,
            )
            tail.postings += len(words)
            self._keys[row] = item_key(item_id)
            number = self._groups.number(group_name(item_id, group_id))
            self._group[row] = number
            self._groups.sizes[number] += 1
            self._boxes[row] = box_values
            self._ids.append(item_id)
            self._metadata.append(dict(metadata))
            self._row_of[item_id] = row
            self._live[row] = True
            self._row_added_locked(row, value, bag)
            if old_group is not None and old_group != number:  # the item moved: its old group may be empty
                self._groups.forget_if_empty(old_group)
            due = tail.postings > MERGE_FLOOR + MERGE_FRACTION * len(self._base)
        if due and self.background_merge and not self._merge_lock.locked():
            threading.Thread(target=self.merge, name="bow-merge", daemon=True).start()
        return old_group is not None

    def _grow_locked(self, size: int) -> None:
        """Room for at least `size` rows in every per-row array (the caller holds the write side)."""
        self._live = grown(self._live, size)
        self._keys = grown(self._keys, size)
        self._group = grown(self._group, size)
        self._boxes = grown(self._boxes, size, np.nan)

    def _row_added_locked(self, row: int, value: V, bag: BagOfWords) -> None:
        """A subclass keeps what it holds per row beyond the postings (the write side is held)."""

    def _rows_compacted_locked(self, live_rows: np.ndarray) -> None:
        """A subclass renumbers what it holds per row: row live_rows[i] becomes row i (the write
        side is held)."""

    def delete(self, item_id: str) -> bool:
        with self._lock.write():
            old_group = self._delete_locked(item_id)
            if old_group is not None:
                self._groups.forget_if_empty(old_group)
            return old_group is not None

    def delete_groups(self, group_ids: list[str]) -> int:
        """Deletes every item of these groups; returns how many items that was."""
        with self._lock.write():
            numbers = self._groups.numbers(group_ids)
            numbers = numbers[self._groups.sizes[numbers] > 0]
            if len(numbers) == 0:
                return 0
            count = len(self._ids)
            rows = np.flatnonzero(np.isin(self._group[:count], numbers) & self._live[:count])
            for row in rows.tolist():
                self._delete_locked(self._ids[row])
            for number in numbers.tolist():
                self._groups.forget_if_empty(number)
            return len(rows)

    def _delete_locked(self, item_id: str) -> int | None:
        """Deletes the item; returns its group number, None when it was not there. The caller
        forgets the group's attributes if that emptied it (unless the item is re-added to it)."""
        row = self._row_of.pop(item_id, None)
        if row is None:
            return None
        self._live[row] = False
        self._metadata[row] = None
        number = int(self._group[row])
        self._groups.sizes[number] -= 1
        return number

    def dead_rows(self) -> int:
        return len(self._ids) - len(self._row_of)

    def merge(self) -> None:
        """Folds the tail into a new base, dropping deleted rows' postings; searches and adds go on
        meanwhile (the frozen tail stays searched until the new base replaces it)."""
        with self._merge_lock:
            with self._lock.write():
                if self._tail.postings == 0:
                    return
                self._frozen, self._tail = self._tail, Postings.empty(self.vocabulary)
                base, frozen = self._base, self._frozen
                keep = np.where(self._live[: len(self._ids)], np.arange(len(self._ids), dtype=np.int32), -1)
            merged = _merged(base, frozen, keep)  # off the lock: reads immutable parts, writes fresh arrays
            with self._lock.write():
                self._base, self._frozen = merged, None

    def compact(self) -> None:
        """Merges everything and renumbers rows densely without deleted rows, and groups without
        emptied groups (holds the write side throughout)."""
        with self._merge_lock, self._lock.write():
            count = len(self._ids)
            live_rows = np.flatnonzero(self._live[:count])
            renumber = np.full(count, -1, np.int32)
            renumber[live_rows] = np.arange(len(live_rows), dtype=np.int32)
            self._base = _merged(self._base, self._tail, renumber)
            self._tail = Postings.empty(self.vocabulary)
            spare = max(1024, len(live_rows))
            self._groups, groups = GroupTable.of_rows(
                self._groups.names, self._group[:count], self._live[:count], previous=self._groups
            )
            self._live = np.concatenate([np.ones(len(live_rows), np.bool_), np.zeros(spare, np.bool_)])
            self._keys = np.concatenate([self._keys[live_rows], np.zeros(spare, np.uint64)])
            self._group = np.concatenate([groups[live_rows], np.zeros(spare, np.int32)])
            self._boxes = np.concatenate([self._boxes[live_rows], np.full((spare, 4), np.nan, np.float32)])
            self._ids = [self._ids[r] for r in live_rows]
            self._metadata = [self._metadata[r] for r in live_rows]
            self._row_of = {item_id: row for row, item_id in enumerate(self._ids)}
            self._rows_compacted_locked(live_rows)

    # -- search -----------------------------------------------------------------------------------

    def _walk_locked(
        self,
        segment_kernel: Callable[..., None],
        pool_kernel: Callable[..., None],
        words: np.ndarray,
        weights: np.ndarray,
        per_row: np.ndarray,
        acc: np.ndarray,
    ) -> None:
        """Runs a pair of compiled kernels over every posting of `words` in this index's range: the
        base's (segment_kernel), then the frozen tail's during a merge and the tail's (pool_kernel),
        each adding a term of (weight of the word, the posting's count, per_row[row]) to acc[row].
        The caller holds the lock (either side)."""
        lo, hi = self.word_range
        base = self._base
        segment_kernel(words, weights, lo, hi, base.offsets, base.rows, base.counts, per_row, acc)
        for pool in (self._frozen, self._tail) if self._frozen is not None else (self._tail,):
            pool_kernel(
                words, weights, lo, hi, pool.rows, pool.counts, pool.next, pool.head, pool.tail, pool.fill, per_row, acc
            )

    def _live_locked(self, count: int, filter: Filter | None) -> np.ndarray:
        """(count,) bool: the rows a search may return, live and (with a filter) of a passing
        group. The caller holds the lock."""
        live = self._live[:count]
        passing = self._groups.passing(filter)
        return live if passing is None else live & passing[self._group[:count]]

    def partial_scores(self, value: V, filter: Filter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Live rows (of groups passing the filter) sharing at least one query word in this index's
        range, and their sums over those words (_overlap_locked): ((n,) int32, (n,) float32)."""
        self.check(value)
        with self._lock.read():
            acc, count = self._overlap_locked(value)
            rows = np.flatnonzero((acc > 0) & self._live_locked(count, filter)).astype(np.int32)
        return rows, acc[rows]

    def partial_scores_by_key(self, value: V, filter: Filter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """partial_scores named by item key instead of row: ((n,) uint64, (n,) float32)."""
        keys, sums, _ = self._partial_by_key(value, False, filter)
        return keys, sums

    def partial_scores_with_groups(
        self, value: V, filter: Filter | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """partial_scores_by_key plus each item's group key ((n,) uint64, item_key of its group)."""
        keys, sums, groups = self._partial_by_key(value, True, filter)
        assert groups is not None
        return keys, sums, groups

    def _partial_by_key(
        self, value: V, with_groups: bool, filter: Filter | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        self.check(value)
        with self._lock.read():
            acc, count = self._overlap_locked(value)
            rows = np.flatnonzero((acc > 0) & self._live_locked(count, filter))
            groups = self._groups.keys[self._group[rows]] if with_groups else None
            return self._keys[rows], acc[rows], groups

    def _best_of_groups(self, acc: np.ndarray, live: np.ndarray, top_k: int) -> np.ndarray:
        """(n,) int64 rows: the best row of each group scoring at least the top_k-th best group's
        best (ties kept, so ids can break them). One compiled pass over the rows, one over the
        groups: O(rows + groups). The caller holds the lock."""
        group = self._group[: len(acc)]
        best, row, tied = _group_best(acc, live, group, len(self._groups))
        chosen = _top_candidates(best, row >= 0, top_k)
        ties = chosen[tied[chosen]]
        if len(ties):
            # Several items share their group's best score: the smallest id wins, as between groups.
            # Rare (duplicate images), so Python is fine; one vectorised pass finds them.
            resolve = np.zeros(len(best), np.bool_)
            resolve[ties] = True
            for r in np.flatnonzero(resolve[group] & live & (acc == best[group])).tolist():
                g = group[r]
                if self._ids[r] < self._ids[row[g]]:
                    row[g] = r
        return row[chosen]

    def _hit(self, row: int, score: float) -> Hit:
        item_id = self._ids[row]
        number = self._group[row]
        return Hit(
            item_id,
            score,
            dict(self._metadata[row] or {}),
            reported_group(item_id, self._groups.names[number]),
            box_or_none(self._boxes[row]),
            self._groups.attributes_of(number),
        )

    def lookup(self, keys: np.ndarray) -> dict[int, Hit]:
        """Live items by key, for the keys this index holds: key -> Hit (score 0: nothing is scored)."""
        with self._lock.read():
            count = len(self._ids)
            rows = np.flatnonzero(np.isin(self._keys[:count], keys) & self._live[:count])
            return {int(self._keys[r]): self._hit(r, 0.0) for r in rows.tolist()}

    def nbytes(self) -> int:
        """Bytes of the postings and per-row arrays (ids, metadata and group names not counted)."""
        with self._lock.read():
            pools = self._tail.nbytes() + (self._frozen.nbytes() if self._frozen is not None else 0)
            base = self._base
            return base.rows.nbytes + base.counts.nbytes + base.offsets.nbytes + pools + len(self._ids) * 33

    # -- snapshot ---------------------------------------------------------------------------------

    def state(self) -> dict[str, bytes]:
        """Everything needed to rebuild this index, as named byte strings (see from_state)."""
        self.merge()
        with self._merge_lock, self._lock.read():  # no merge under way: nothing frozen, all in base and tail
            base, count = self._base, len(self._ids)
            tail = Postings(
                self._tail.rows[: self._tail.used * BLOCK].copy(),
                self._tail.counts[: self._tail.used * BLOCK].copy(),
                self._tail.next[: self._tail.used].copy(),
                self._tail.head.copy(),
                self._tail.tail.copy(),
                self._tail.fill.copy(),
                self._tail.df.copy(),
                self._tail.used,
                self._tail.postings,
            )
            ids, metadata = list(self._ids), list(self._metadata)
            live, keys = self._live[:count].copy(), self._keys[:count].copy()
            groups, boxes, group_names = self._group[:count].copy(), self._boxes[:count].copy(), self._groups.state()
            attributes = self._groups.attributes_state()
            extra = self._state_locked(count)
        if tail.postings:  # adds raced the merge: fold them in here, off the lock
            base = _merged(base, tail, np.arange(count, dtype=np.int32))
        return {
            "config": json.dumps(
                {"vocabulary": self.vocabulary, "codebook": self.codebook, "word_range": list(self.word_range)}
            ).encode(),
            "offsets": base.offsets.tobytes(),
            "rows": base.rows.tobytes(),
            "counts": base.counts.tobytes(),
            "live": live.tobytes(),
            "keys": keys.tobytes(),
            "ids": pack_strings(ids),
            "metadata": json.dumps(metadata).encode(),
            "groups": groups.tobytes(),
            "group_names": group_names,
            "boxes": boxes.tobytes(),
            "attributes": attributes,
            **extra,
        }

    def _state_locked(self, count: int) -> dict[str, bytes]:
        """A subclass's own blobs for state(), copied in the same hold of the lock (rows < count)."""
        return {}

    def _load_state(self, state: dict[str, bytes], count: int) -> None:
        """A subclass reads its own blobs back (from_state, once the rows are loaded)."""

    @classmethod
    def from_state(cls, state: dict[str, bytes]) -> Self:
        config = json.loads(state["config"])
        index = cls(config["vocabulary"], config["codebook"], tuple(config["word_range"]))
        index._base = Segment(
            np.frombuffer(state["offsets"], np.int64),
            np.frombuffer(state["rows"], np.int32),
            np.frombuffer(state["counts"], np.uint16),
        )
        index._ids = unpack_strings(state["ids"])
        count = len(index._ids)
        spare = max(1024, count)
        index._live = array_from(state["live"], np.bool_, spare)
        index._keys = array_from(state["keys"], np.uint64, spare)
        index._metadata = json.loads(state["metadata"])
        index._row_of = {index._ids[r]: r for r in np.flatnonzero(index._live[:count]).tolist()}
        if "groups" in state:
            names = GroupTable.names_from(state["group_names"])
            row_groups = np.frombuffer(state["groups"], np.int32)
            boxes = np.frombuffer(state["boxes"], np.float32).reshape(count, 4)
        else:  # a snapshot from before groups: every item is its own group, none has a box
            names, row_groups = index._ids, np.arange(count, dtype=np.int32)
            boxes = np.full((count, 4), np.nan, np.float32)
        index._groups, groups = GroupTable.of_rows(names, row_groups, index._live[:count])
        if "attributes" in state:  # absent in snapshots from before attributes: none
            index._groups.load_attributes(state["attributes"])
        index._group = np.concatenate([groups, np.zeros(spare, np.int32)])
        index._boxes = np.concatenate([boxes, np.full((spare, 4), np.nan, np.float32)])
        index._load_state(state, count)
        return index


class BowIndex(PostingsIndex[BagOfWords]):
    """One database of bag-of-words items, searched exactly by chi-squared; thread-safe."""

    def __init__(
        self,
        vocabulary: int,
        codebook: int,
        word_range: tuple[int, int] | None = None,
        background_merge: bool = True,
        max_word_share: float = 1.0,
    ):
        super().__init__(vocabulary, codebook, word_range, background_merge)
        # The stop-word variant: query words found in more than this share of the items are
        # skipped (faster, no longer exact); 1.0 = exact chi-squared.
        self.max_word_share = max_word_share
        self._inv_total = np.zeros(1024, np.float32)  # 1 / the item's total count, per row

    def check(self, bag: BagOfWords) -> None:
        if bag.vocabulary != self.vocabulary:
            raise SignatureError(
                f"signature uses a {bag.vocabulary}-word vocabulary; this database holds {self.vocabulary}-word bags"
            )
        if bag.codebook != self.codebook:
            raise SignatureError(
                f"signature was made with codebook {bag.codebook:08x}; this database holds "
                f"codebook {self.codebook:08x} signatures (re-sign with the same codebook)"
            )
        if int(bag.counts.max(initial=0)) > np.iinfo(np.uint16).max:
            raise SignatureError("a word count above 65535 does not fit a posting")

    def _bag_of(self, bag: BagOfWords) -> BagOfWords:
        return bag

    def _grow_locked(self, size: int) -> None:
        super()._grow_locked(size)
        self._inv_total = grown(self._inv_total, size)

    def _row_added_locked(self, row: int, value: BagOfWords, bag: BagOfWords) -> None:
        self._inv_total[row] = np.float32(1.0) / np.float32(bag.counts.sum())

    def _rows_compacted_locked(self, live_rows: np.ndarray) -> None:
        spare = max(1024, len(live_rows))
        self._inv_total = np.concatenate([self._inv_total[live_rows], np.zeros(spare, np.float32)])

    def _state_locked(self, count: int) -> dict[str, bytes]:
        return {"inv_total": self._inv_total[:count].tobytes()}

    def _load_state(self, state: dict[str, bytes], count: int) -> None:
        self._inv_total = array_from(state["inv_total"], np.float32, max(1024, count))

    def _overlap_locked(self, bag: BagOfWords) -> tuple[np.ndarray, int]:
        """(count,) float32: per row, the sum of 4 x y / (x + y) over the query's words in range,
        and the row count (see PostingsIndex._overlap_locked)."""
        words = bag.words.astype(np.int32)
        query = bag.histogram().astype(np.float32)
        count = len(self._ids)
        if self.max_word_share < 1.0:
            common = self._document_frequency_locked()[words] > self.max_word_share * len(self._row_of)
            words, query = words[~common], query[~common]
        acc = np.zeros(count, np.float32)
        self._walk_locked(_accumulate_segment, _accumulate_pool, words, query, self._inv_total, acc)
        return acc, count

    def document_frequency(self) -> np.ndarray:
        """(V,) int64 postings per word (deleted items count until the next merge)."""
        with self._lock.read():
            return self._document_frequency_locked()

    def _document_frequency_locked(self) -> np.ndarray:
        df = np.diff(self._base.offsets) + self._tail.df
        return df + self._frozen.df if self._frozen is not None else df

    def search(
        self, bag: BagOfWords, top_k: int, one_per_group: bool = False, filter: Filter | None = None
    ) -> list[Hit]:
        """Up to top_k items sharing a word with the query, smallest chi2 first, ties by id; score
        1 - chi2 / 2. one_per_group: top_k counts groups, each by its best item (exact). filter:
        only items of groups passing it, the top k collected among them."""
        return self.search_batch([bag], top_k, one_per_group, filter)[0]

    def search_batch(
        self, bags: list[BagOfWords], top_k: int, one_per_group: bool = False, filter: Filter | None = None
    ) -> list[list[Hit]]:
        """search() of each bag (each query walks its own posting lists), under one hold of the
        lock, the filter's row mask built once."""
        for bag in bags:
            self.check(bag)
        with self._lock.read():
            if top_k <= 0:
                return [[] for _ in bags]
            count = len(self._ids)
            live = self._live_locked(count, filter)
            results = []
            for bag in bags:
                acc, _ = self._overlap_locked(bag)  # rows only change under the write lock: count holds
                rows = self._best_of_groups(acc, live, top_k) if one_per_group else _top_candidates(acc, live, top_k)
                best = sorted(rows.tolist(), key=lambda r: (-acc[r], self._ids[r]))[:top_k]
                results.append([self._hit(r, float(acc[r]) / 2.0) for r in best])
            return results


def _merged(base: Segment, pool: Postings, renumber: np.ndarray) -> Segment:
    """A new base: base then pool postings per word, rows mapped by renumber (-1 drops a row)."""
    vocabulary = len(base.offsets) - 1
    sizes = np.zeros(vocabulary, np.int64)
    offsets = np.zeros(vocabulary + 1, np.int64)
    pool_arrays = (pool.rows, pool.counts, pool.next, pool.head, pool.tail, pool.fill)
    _merge_walk(
        base.offsets,
        base.rows,
        base.counts,
        *pool_arrays,
        renumber,
        offsets,
        np.empty(0, np.int32),
        np.empty(0, np.uint16),
        sizes,
        False,
    )
    np.cumsum(sizes, out=offsets[1:])
    rows = np.empty(offsets[-1], np.int32)
    counts = np.empty(offsets[-1], np.uint16)
    _merge_walk(base.offsets, base.rows, base.counts, *pool_arrays, renumber, offsets, rows, counts, sizes, True)
    return Segment(offsets, rows, counts)


@numba.njit(cache=True, nogil=True)
def _append(words, counts, row, rows, pcounts, nxt, head, tail, fill, df, used):  # pragma: no cover
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
        df[w] += 1
    return used


@numba.njit(cache=True, nogil=True, fastmath=True)
def _accumulate_segment(words, weights, lo, hi, offsets, rows, counts, inv_total, acc):  # pragma: no cover
    for i in range(words.shape[0]):
        w = words[i]
        if w < lo or w >= hi:
            continue
        q = weights[i]
        for j in range(offsets[w], offsets[w + 1]):
            r = rows[j]
            x = counts[j] * inv_total[r]
            acc[r] += 4.0 * q * x / (q + x)


@numba.njit(cache=True, nogil=True, fastmath=True)
def _accumulate_pool(words, weights, lo, hi, rows, counts, nxt, head, tail, fill, inv_total, acc):  # pragma: no cover
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
                x = counts[j] * inv_total[r]
                acc[r] += 4.0 * q * x / (q + x)
            block = nxt[block]


@numba.njit(cache=True, nogil=True)
def _top_candidates(acc, live, k):  # pragma: no cover
    """Live rows with acc > 0 whose acc is at least the k-th largest (ties kept): the caller sorts."""
    heap = np.empty(k, np.float32)  # min-heap of the k largest so far
    size = 0
    for r in range(acc.shape[0]):
        a = acc[r]
        if a <= 0 or not live[r]:
            continue
        if size < k:
            i = size
            size += 1
            heap[i] = a
            while i > 0 and heap[(i - 1) // 2] > heap[i]:
                parent = (i - 1) // 2
                heap[i], heap[parent] = heap[parent], heap[i]
                i = parent
        elif a > heap[0]:
            heap[0] = a
            i = 0
            while True:
                left, smallest = 2 * i + 1, i
                if left < k and heap[left] < heap[smallest]:
                    smallest = left
                if left + 1 < k and heap[left + 1] < heap[smallest]:
                    smallest = left + 1
                if smallest == i:
                    break
                heap[i], heap[smallest] = heap[smallest], heap[i]
                i = smallest
    if size == 0:
        return np.empty(0, np.int64)
    threshold = heap[0] if size == k else np.float32(0)
    out = []
    for r in range(acc.shape[0]):
        if acc[r] > 0 and acc[r] >= threshold and live[r]:
            out.append(r)
    return np.array(out, np.int64)


@numba.njit(cache=True, nogil=True)
def _group_best(acc, live, group, groups):  # pragma: no cover
    """Per group number: its best acc over live rows with acc > 0, the first row reaching it (-1 for
    a group with none), and whether another row ties it (the caller breaks ties by id)."""
    best = np.zeros(groups, np.float32)
    row = np.full(groups, -1, np.int64)
    tied = np.zeros(groups, np.bool_)
    for r in range(acc.shape[0]):
        a = acc[r]
        if a <= 0 or not live[r]:
            continue
        g = group[r]
        if row[g] < 0 or a > best[g]:
            best[g] = a
            row[g] = r
            tied[g] = False
        elif a == best[g]:
            tied[g] = True
    return best, row, tied


@numba.njit(cache=True, nogil=True)
def _merge_walk(
    offsets,
    rows,
    counts,
    prows,
    pcounts,
    nxt,
    head,
    tail,
    fill,
    renumber,
    out_offsets,
    out_rows,
    out_counts,
    sizes,
    write,
):  # pragma: no cover
    """Per word, base then pool postings of kept rows: counted into sizes, or (write) copied out."""
    for w in range(sizes.shape[0]):
        o = out_offsets[w] if write else 0
        for j in range(offsets[w], offsets[w + 1]):
            r = renumber[rows[j]]
            if r >= 0:
                if write:
                    out_rows[o] = r
                    out_counts[o] = counts[j]
                o += 1
        block = head[w]
        while block >= 0:
            end = fill[w] if block == tail[w] else BLOCK
            for j in range(block * BLOCK, block * BLOCK + end):
                r = renumber[prows[j]]
                if r >= 0:
                    if write:
                        out_rows[o] = r
                        out_counts[o] = pcounts[j]
                    o += 1
            block = nxt[block]
        if not write:
            sizes[w] = o
