"""Dense (deep descriptor) databases: exact FAISS Flat while small; once large, an approximate index
learned from the database's own vectors whose candidates are re-ranked exactly; filters applied
while the top k is collected, never after.

Modes (DenseTuning says when):

- exact, below `exact_below` items (100,000 by default): IndexIDMap2(IndexFlatIP) over the unit
  vectors, in memory (4 D bytes per item); every search is exact.
- approximate, from `exact_below` items on: PCA to `pca_dimension` dimensions (when the vectors
  have more), then IVF with nlist = 4 sqrt(N) lists and PQ codes of one byte per 4 dimensions (96
  bytes at 384), the items' labels as the IVF's ids. A search takes the index's best
  max(rerank_min, rerank_per_k k) candidates and re-ranks them with their float32 vectors, read from
  a file of rows by label (vector_rows.VectorRows: 4 D bytes per item on disk, none in memory; the
  page cache keeps what the OS can spare, as Qdrant keeps originals on disk for rescoring). Scores
  and order are exact among the candidates: the approximation only decides which items are
  candidates. bench/dense.py measures recall@10 against Flat.
- override: any other FAISS factory string (`factory`), e.g. "IVF1024,Flat": that index alone,
  searched from a flat buffer until `train_size` vectors have arrived, then trained on them; no
  re-rank. "Flat" keeps a database exact whatever its size.

Memory per item in approximate mode (memory_bytes; bytes per item in bench/dense.py): the IVF lists
(code and 8-byte id), the coarse centroids, the PCA matrix and the PQ tables (small), the per-label
arrays (group int32, box 4 float32), the id -> label dict, the label -> id and label -> metadata
lists with the strings and packed metadata they hold, and the group table. Not counted: the float32
rows on disk.

Builds: a database that crosses `exact_below`, or has grown `rebuild_growth` times since its index
was trained, builds a new index beside the one it serves (in a background thread by default): under
the read lock it notes the live labels (and, from the exact index, copies their vectors), then off
the lock it trains on a sample (PCA, coarse k-means, PQ) and adds every vector; then it adds the
items added meanwhile, in rounds off the lock while there are many, and under the write lock only
the last few and the removals noted meanwhile, and swaps. Searches go on against the old index all
along; the write lock is held for milliseconds.

Filters: a filter becomes a label mask (the GroupTable's passing groups, by each label's group) used
inside the search. Exact mode searches the flat index through an IDSelectorBitmap (exact). In
approximate mode, when at most `filter_exact_rows` items pass, their rows are scored exactly
(a 1% filter is exact); otherwise the IVF is searched through the selector, probing more lists
the fewer items pass, and re-ranked. A search that collects fewer than min(k, passing items)
asks again, twice as deep (probing more), so the top k is full whenever k items pass.

Concurrency: one writer-preferring reader-writer lock per database (common/rwlock.py). Searches,
group reads and snapshots hold its read side across all of their work, FAISS search included, so
searches of one database run at once (FAISS releases the GIL in search, and its CPU indexes are
safe for concurrent searches). Every change holds the write side: adds, deletes, attributes, the
swap at the end of a build. The invariant: nothing a reader can reach (the FAISS index, the rows
written before it began, the dicts and lists, the group and box arrays, the group table) changes
while any reader holds the lock, so a search answers what a lone search of the state between two
writes does. A single query runs FAISS on one thread (its OpenMP setting is per thread): two cores
serve two queries at once rather than one query with a thread waiting at a barrier.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from common.rwlock import ReadWriteLock
from index_server.domain import (
    Filter,
    Hit,
    SignatureError,
    group_name,
    unit_vector,
)
from index_server.groups import GroupAttributes, GroupTable, box_or_none, box_row, grown, reported_group
from index_server.snapshot_codec import pack_strings, unpack_strings
from index_server.vector_rows import VectorRows

log = logging.getLogger(__name__)
# faiss as Python sees it: its stubs know neither the numpy wrappers nor the keyword constructors
# (SearchParametersIVF(nprobe=...)) that faiss's Python layer adds.
_faiss: Any = faiss

AUTO = "auto"  # the factory of the size-chosen index (exact, then approximate + re-rank)
EXACT, APPROXIMATE, OVERRIDE = "exact", "approximate", "override"
_CHUNK = 16_384  # vectors per FAISS add while a build fills its index (its transient buffers)
_LAST_ROUND = 4_096  # items added during a build that the swap adds under the write lock


@dataclass(frozen=True)
class DenseTuning:
    """When a database turns approximate, and how it searches then (see the module docstring)."""

    # Exact Flat below this many items; the approximate index from then on.
    exact_below: int = 100_000
    # PCA output dimensions of the approximate index (vectors with at most this many are kept).
    pca_dimension: int = 384
    # Candidates re-ranked exactly: max(rerank_min, rerank_per_k * top_k).
    rerank_min: int = 1000
    rerank_per_k: int = 4
    # IVF lists probed per query; 0 = nlist / 32, at least 16 (at 1M items recall@10 is the same
    # from nlist / 32 to nlist / 8: the re-rank depth decides it; bench/dense.py).
    nprobe: int = 0
    # Retrain once the database has grown this many times since its index was trained.
    rebuild_growth: float = 4.0
    # A filtered search of an approximate database where at most this many items pass scores them
    # all exactly (their rows read from disk): ~5 kB per item read.
    filter_exact_rows: int = 20_000
    # Vectors a build trains on (a uniform sample of the live ones).
    train_sample: int = 131_072
    # Where the float32 rows file lives ("" = the system's temporary directory).
    rows_dir: str = ""
    # Builds in a background thread (False: in the add that makes one due; tests).
    background: bool = True
    # FAISS threads of a build; 0 = one less than the machine's cores (at least 1), so that the
    # searches a build must not stall keep a core, and no OpenMP team waits on a busy one.
    build_threads: int = 0


@dataclass(frozen=True)
class _Ranker:
    """How one search (with its filter) produces candidates: rank(queries, depth) -> per query
    (scores, labels), best first, scores exact."""

    rank: Callable[[np.ndarray, int], list[tuple[np.ndarray, np.ndarray]]]
    # Every item not returned scores at most the last one returned, and fewer than `depth` returned
    # means every passing item was.
    exact: bool
    start: int  # the first depth of a search that is not grouped
    ceiling: int  # a depth that returns every passing item


def _make(dimension: int, factory: str) -> faiss.IndexIDMap2:
    try:
        return faiss.IndexIDMap2(faiss.index_factory(dimension, factory, faiss.METRIC_INNER_PRODUCT))
    except RuntimeError as exc:
        raise ValueError(f"FAISS factory string {factory!r} is not valid: {exc}") from None


@contextmanager
def _faiss_threads(threads: int) -> Iterator[None]:
    """FAISS (and its OpenBLAS) on `threads` OpenMP threads in this thread only (0: as it is)."""
    if threads <= 0:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _packed(metadata: Mapping[str, str]) -> bytes | None:
    """Metadata as the database keeps it: compact JSON bytes (a dict per item costs ~4x more)."""
    return json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode() if metadata else None


def _unpacked(packed: bytes | None) -> dict[str, str]:
    return json.loads(packed) if packed else {}


def _ivf_of(index: Any) -> Any:
    """The IVF inside an approximate index, as its own class (IndexIVFPQ, ...), not IndexIVF."""
    return faiss.downcast_index(faiss.extract_index_ivf(index))


def _compacted(ivf: Any) -> None:
    """Re-allocates the IVF's lists at their exact sizes (adds grow them by doubling)."""
    old = ivf.invlists
    fresh = _faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    for number in range(ivf.nlist):
        size = old.list_size(number)
        if size:
            fresh.add_entries(number, size, old.get_ids(number), old.get_codes(number))
    ivf.replace_invlists(fresh, True)
    fresh.this.disown()  # the IVF owns it now


class DenseDatabase(GroupAttributes):
    """Unit vectors (N, D) float32 with ids, metadata, groups and boxes; adds, deletes and searches
    are thread-safe."""

    def __init__(
        self, dimension: int, factory: str = AUTO, train_size: int = 50_000, tuning: DenseTuning | None = None
    ):
        self.dimension = dimension
        self.factory = factory
        self.train_size = train_size
        self.tuning = tuning or DenseTuning()
        # Any: faiss's SWIG stubs do not know the numpy wrappers (remove_ids(array), search(array, k)).
        self._index: Any
        if factory in (AUTO, "Flat"):
            self._mode, self._index, self._trained = EXACT, _make(dimension, "Flat"), True
        else:
            target = _make(dimension, factory)
            # Until the target is trained, vectors live in (and are searched exactly from) a flat buffer.
            self._mode, self._trained = OVERRIDE, target.is_trained
            self._index = target if target.is_trained else _make(dimension, "Flat")
        self._rows: VectorRows | None = None  # approximate mode: the float32 rows by label, on disk
        self._shape = ""  # approximate mode: the index's factory-like description
        self._trained_on = 0  # approximate mode: live items when its index was built
        self._label_of: dict[str, int] = {}
        self._ids: list[str | None] = []  # by label; None once deleted
        self._metadata: list[bytes | None] = []  # by label, packed (None: empty or deleted)
        self._group = np.full(1024, -1, np.int32)  # group number per label, -1 once deleted
        self._boxes = np.full((1024, 4), np.nan, np.float32)  # xyxy per label, NaN = no box
        self._groups = GroupTable()
        self._object_bytes = 0  # the id strings, label ints and packed metadata of live items
        self._lock = ReadWriteLock()  # searches read, changes write (see the module docstring)
        self._building = False
        self._removed_meanwhile: list[int] | None = None  # labels removed while a build runs
        self._build_thread: threading.Thread | None = None
        self._build_error: BaseException | None = None

    @property
    def _next_label(self) -> int:
        return len(self._ids)

    def __len__(self) -> int:
        return len(self._label_of)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._label_of

    @property
    def approximate(self) -> bool:
        return self._mode == APPROXIMATE

    @property
    def index_type(self) -> str:
        """What searches this database now, e.g. "flat" or "PCA384,IVF4096,PQ96 + exact re-rank"."""
        if self._mode == EXACT:
            return "flat"
        if self._mode == APPROXIMATE:
            return f"{self._shape} + exact re-rank"
        return self.factory if self._trained else f"{self.factory} (flat until {self.train_size} items)"

    @property
    def memory_bytes(self) -> int:
        """Bytes this database holds in memory (the module docstring says what counts; the Python
        containers by sys.getsizeof, the group table estimated at ~100 bytes per group)."""
        with self._lock.read():
            if self._mode == APPROXIMATE:
                ivf = _ivf_of(self._index)
                held = ivf.invlists.compute_ntotal() * (ivf.code_size + 8) + ivf.nlist * ivf.d * 4
                if isinstance(self._index, faiss.IndexPreTransform):
                    held += self.dimension * (ivf.d + 1) * 4
                if isinstance(ivf, faiss.IndexIVFPQ):
                    held += ivf.pq.M * ivf.pq.ksub * ivf.pq.dsub * 4
            else:  # a flat buffer, or the override's codes, and IndexIDMap2's two maps (~48 B)
                inner = self._index.index
                code = inner.sa_code_size() if self._mode == OVERRIDE else 4 * self.dimension
                held = self._index.ntotal * (code + 8 + 48)
            held += self._group.nbytes + self._boxes.nbytes + self._object_bytes
            held += sys.getsizeof(self._label_of) + sys.getsizeof(self._ids) + sys.getsizeof(self._metadata)
            groups = len(self._groups)
            held += groups * 100 + self._groups.sizes.nbytes + self._groups.keys.nbytes
            return int(held)

    def check(self, vector: np.ndarray) -> np.ndarray:
        """The unit vector of a valid (D,) signature; raises SignatureError otherwise."""
        if vector.shape != (self.dimension,):
            raise SignatureError(f"signature has {vector.size} values; this database holds {self.dimension}-d vectors")
        return unit_vector(vector)

    # -- groups ------------------------------------------------------------------------------------

    def group_size(self, group_id: str) -> int:
        """Live items of a group (an item without a group_id is the group named by its id)."""
        with self._lock.read():
            return self._groups.size(group_id)

    def group_items(self, group_ids: list[str]) -> dict[str, list[Hit]]:
        """The live items of these groups (score 0), each group's in item id order; a group with
        none is left out."""
        with self._lock.read():
            numbers = self._groups.numbers(group_ids)
            labels = np.flatnonzero(np.isin(self._group[: self._next_label], numbers))
            out: dict[str, list[Hit]] = {}
            for label in sorted(labels.tolist(), key=lambda label: self._ids[label] or ""):
                out.setdefault(self._groups.names[self._group[label]], []).append(self._hit(label, 0.0))
            return out

    # -- updates -----------------------------------------------------------------------------------

    def add(
        self,
        item_id: str,
        vector: np.ndarray,
        metadata: dict[str, str],
        group_id: str = "",
        box: np.ndarray | None = None,
    ) -> bool:
        """Adds or replaces an item of a group ("" = its own), with an optional (4,) float32 xyxy box;
        returns True when it replaced one. Visible to the next search."""
        unit = self.check(vector)
        return self._insert([item_id], unit[None, :], [metadata], [group_id], box_row(box)[None, :]) > 0

    def add_batch(
        self,
        item_ids: Sequence[str],
        vectors: np.ndarray,
        metadata: Sequence[Mapping[str, str]] | None = None,
        group_ids: Sequence[str] | None = None,
        boxes: np.ndarray | None = None,
    ) -> int:
        """add() of many items at once: (n, D) vectors, optional per-item metadata, group ids and
        (n, 4) float32 xyxy boxes (NaN rows: none). One FAISS add for all; returns how many replaced
        an item (an id given twice: the last one counts)."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape != (len(item_ids), self.dimension):
            raise SignatureError(
                f"{len(item_ids)} items need ({len(item_ids)}, {self.dimension}) vectors, not {vectors.shape}"
            )
        wide = vectors.astype(np.float64)
        norms = np.linalg.norm(wide, axis=1)
        bad = ~(np.isfinite(wide).all(axis=1) & (norms > 0))
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            try:
                unit_vector(vectors[first])
            except SignatureError as exc:
                raise SignatureError(f"item #{first}: {exc}") from None
        units = (wide / norms[:, None]).astype(np.float32)
        count = len(item_ids)
        rows = np.full((count, 4), np.nan, np.float32) if boxes is None else np.asarray(boxes, np.float32)
        return self._insert(
            list(item_ids),
            units,
            list(metadata) if metadata is not None else [{}] * count,
            list(group_ids) if group_ids is not None else [""] * count,
            rows.reshape(count, 4),
        )

    def _insert(
        self,
        item_ids: list[str],
        units: np.ndarray,
        metadata: list[Mapping[str, str]],
        group_ids: list[str],
        boxes: np.ndarray,
    ) -> int:
        last = {item_id: i for i, item_id in enumerate(item_ids)}
        keep = sorted(last.values()) if len(last) < len(item_ids) else list(range(len(item_ids)))
        packed = [_packed(metadata[i]) for i in keep]
        with self._lock.write():
            replaced, old_groups, old_labels = len(item_ids) - len(keep), [], []
            for i in keep:
                forgotten = self._forget_locked(item_ids[i])
                if forgotten is not None:
                    replaced += 1
                    old_labels.append(forgotten[0])
                    old_groups.append(forgotten[1])
            if old_labels:  # one remove_ids for all: each call scans the index
                self._index.remove_ids(np.array(old_labels, np.int64))
            first = self._next_label
            labels = np.arange(first, first + len(keep), dtype=np.int64)
            chosen = units[keep] if len(keep) < len(units) else units
            if self._mode == APPROXIMATE:
                assert self._rows is not None
                self._rows.write(labels, chosen)
            with _faiss_threads(1 if len(keep) < 64 else 0):  # a few vectors: no thread team to wake
                self._index.add_with_ids(chosen, labels)
            self._group = grown(self._group, first + len(keep), -1)
            self._boxes = grown(self._boxes, first + len(keep), np.nan)
            self._boxes[first : first + len(keep)] = boxes[keep]
            for label, i, blob in zip(labels.tolist(), keep, packed):
                item_id = item_ids[i]
                number = self._groups.number(group_name(item_id, group_ids[i]))
                self._group[label] = number
                self._groups.sizes[number] += 1
                self._label_of[item_id] = label
                self._ids.append(item_id)
                self._metadata.append(blob)
                self._object_bytes += _object_bytes(item_id, blob)
            for number in old_groups:  # an item that moved may have emptied its old group
                self._groups.forget_if_empty(number)
            if self._mode == OVERRIDE and not self._trained and len(self._label_of) >= self.train_size:
                self._train_override_locked()
            due = self._build_due_locked()
        if due:
            self._start_build()
        return replaced

    def delete(self, item_id: str) -> bool:
        with self._lock.write():
            forgotten = self._forget_locked(item_id)
            if forgotten is None:
                return False
            self._index.remove_ids(np.array([forgotten[0]], np.int64))
            self._groups.forget_if_empty(forgotten[1])
            return True

    def delete_groups(self, group_ids: list[str]) -> int:
        """Deletes every item of these groups; returns how many items that was."""
        with self._lock.write():
            numbers = self._groups.numbers(group_ids)
            numbers = numbers[self._groups.sizes[numbers] > 0]
            if len(numbers) == 0:
                return 0
            labels = np.flatnonzero(np.isin(self._group[: self._next_label], numbers)).astype(np.int64)
            for label in labels.tolist():
                item_id = self._ids[label]
                assert item_id is not None
                self._forget_locked(item_id)
            # One remove_ids for the whole group: each call scans the index.
            self._index.remove_ids(labels)
            for number in numbers.tolist():
                self._groups.forget_if_empty(number)
            return len(labels)

    def _forget_locked(self, item_id: str) -> tuple[int, int] | None:
        """Forgets a live item everywhere but in the FAISS index (the caller removes its label
        there) -> (its label, its group number), None when it was not there. The caller forgets the
        group's attributes if that emptied it (unless the item is re-added to it)."""
        label = self._label_of.pop(item_id, None)
        if label is None:
            return None
        number = int(self._group[label])
        self._groups.sizes[number] -= 1
        self._group[label] = -1
        self._object_bytes -= _object_bytes(item_id, self._metadata[label])
        self._ids[label] = None
        self._metadata[label] = None
        if self._removed_meanwhile is not None:
            self._removed_meanwhile.append(label)
        return label, number

    def _train_override_locked(self) -> None:
        labels = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        vectors = self._index.index.reconstruct_n(0, self._index.ntotal)
        target = _make(self.dimension, self.factory)
        target.train(vectors)
        target.add_with_ids(vectors, labels)
        self._index, self._trained = target, True

    # -- builds of the approximate index -----------------------------------------------------------

    def _build_due_locked(self) -> bool:
        """Whether a build starts now (then marks it started); the caller holds the write lock."""
        if self.factory != AUTO or self._building or self._build_error is not None:
            return False
        live = len(self._label_of)
        due = live >= self.tuning.exact_below
        if self._mode == APPROXIMATE:
            due = live >= self.tuning.rebuild_growth * max(1, self._trained_on)
        if due:
            self._building, self._removed_meanwhile = True, []
        return due

    def _start_build(self) -> None:
        if not self.tuning.background:
            self._build()
            return
        self._build_thread = threading.Thread(target=self._build, name="dense-build", daemon=True)
        self._build_thread.start()

    @property
    def building(self) -> bool:
        return self._building

    def wait_for_build(self, timeout: float | None = None) -> bool:
        """Waits for a background build to be swapped in; False when it is still running."""
        thread = self._build_thread
        if thread is not None:
            thread.join(timeout)
        return not self._building

    def build_now(self) -> None:
        """Builds the approximate index now, in this thread, whatever the size (an auto database
        with at least 2 items; a build already running is waited for instead)."""
        with self._lock.write():
            start = self.factory == AUTO and not self._building and len(self._label_of) >= 2
            if start:
                self._building, self._removed_meanwhile = True, []
        if start:
            self._build()
        else:
            self.wait_for_build()

    def _build(self) -> None:
        threads = self.tuning.build_threads or max(1, (os.cpu_count() or 2) - 1)
        try:
            with _faiss_threads(threads):
                self._build_and_swap()
        except BaseException as exc:  # the old index keeps serving; no new build is tried
            log.exception("building the approximate index of a %d-item database failed", len(self))
            with self._lock.write():
                self._build_error = exc
                self._building, self._removed_meanwhile = False, None

    def _live_labels_locked(self, start: int, end: int) -> np.ndarray:
        return (np.flatnonzero(self._group[start:end] >= 0) + start).astype(np.int64)

    def _vectors_locked(self, labels: np.ndarray) -> np.ndarray:
        """(n, D) float32 vectors of live labels, from wherever this database keeps them."""
        if self._mode == APPROXIMATE:
            assert self._rows is not None
            return self._rows.read(labels)
        return self._index.reconstruct_batch(labels) if len(labels) else np.empty((0, self.dimension), np.float32)

    def _build_and_swap(self) -> None:
        started = time.perf_counter()
        with self._lock.read():
            watermark = self._next_label
            labels = self._live_labels_locked(0, watermark)
            rows = self._rows if self._mode == APPROXIMATE else None
            # From the exact index: a copy now (its rows move on deletes); rows on disk never move.
            copied = self._vectors_locked(labels) if rows is None else None
        rng = np.random.default_rng(len(labels))
        sample = np.sort(rng.choice(len(labels), min(len(labels), self.tuning.train_sample), replace=False))
        fresh = rows is None
        if rows is None:
            assert copied is not None
            rows = VectorRows(self.dimension, self.tuning.rows_dir, max(1024, watermark))
            index, shape = self._trained_index(copied[sample], len(labels))
        else:
            index, shape = self._trained_index(rows.read(labels[sample]), len(labels))
        trained = time.perf_counter()
        for start in range(0, len(labels), _CHUNK):
            chunk = labels[start : start + _CHUNK]
            vectors = copied[start : start + _CHUNK] if copied is not None else rows.read(chunk)
            if fresh:
                rows.write(chunk, vectors)
            index.add_with_ids(vectors, chunk)
        del copied
        filled = time.perf_counter()
        _compacted(_ivf_of(index))
        while True:  # the items added meanwhile, off the lock while there are many
            with self._lock.read():
                top = self._next_label
                labels = self._live_labels_locked(watermark, top)
                if len(labels) <= _LAST_ROUND:
                    break
                vectors = self._vectors_locked(labels)
            if fresh:
                rows.write(labels, vectors)
            index.add_with_ids(vectors, labels)
            watermark = top
        caught_up = time.perf_counter()
        with self._lock.write():
            labels = self._live_labels_locked(watermark, self._next_label)
            vectors = self._vectors_locked(labels)
            if fresh:
                rows.write(labels, vectors)
            index.add_with_ids(vectors, labels)
            assert self._removed_meanwhile is not None
            if self._removed_meanwhile:
                index.remove_ids(np.array(self._removed_meanwhile, np.int64))
            old_rows = self._rows
            self._index, self._rows, self._shape, self._mode = index, rows, shape, APPROXIMATE
            self._trained_on = len(self._label_of)
            self._building, self._removed_meanwhile = False, None
        if old_rows is not None and old_rows is not rows:
            old_rows.close()
        _release_free_memory()
        log.info(
            "dense database of %d items: %s built in %.1f s (train %.1f, add %.1f, catch up %.1f, swap %.3f)",
            self._trained_on,
            self.index_type,
            time.perf_counter() - started,
            trained - started,
            filled - trained,
            caught_up - filled,
            time.perf_counter() - caught_up,
        )

    def _trained_index(self, sample: np.ndarray, count: int) -> tuple[Any, str]:
        """An empty approximate index for `count` items, trained on (n, D) float32 sample vectors
        -> (the index, its description)."""
        reduced_dimension = min(self.dimension, self.tuning.pca_dimension)
        nlist = max(1, min(int(4 * math.sqrt(count)), len(sample) // 4))
        if reduced_dimension % 4 == 0 and len(sample) >= 4096:
            codes = f"PQ{reduced_dimension // 4}"
        else:  # too few vectors to train PQ's 256-centroid codebooks: 8-bit scalars
            codes = "SQ8"
        shape = f"IVF{nlist},{codes}"
        if reduced_dimension < self.dimension:
            shape = f"PCA{reduced_dimension},{shape}"
        index: Any = faiss.index_factory(self.dimension, shape, faiss.METRIC_INNER_PRODUCT)
        ivf: Any = _ivf_of(index)
        # Far fewer training points and iterations than FAISS's defaults (PCA: 25 per dimension,
        # k-means: 16 per centroid, 8 rounds): the re-rank makes up for slightly worse cells and
        # codes, and a 400k build trains in ~30 s on one core rather than minutes.
        if reduced_dimension < self.dimension:
            _faiss.downcast_VectorTransform(index.chain.at(0)).max_points_per_d = 25
        ivf.cp.niter, ivf.cp.max_points_per_centroid, ivf.cp.min_points_per_centroid = 8, 16, 4
        if codes != "SQ8":
            ivf.do_polysemous_training = False
            ivf.pq.cp.niter, ivf.pq.cp.max_points_per_centroid, ivf.pq.cp.min_points_per_centroid = 8, 16, 4
        index.train(np.ascontiguousarray(sample, np.float32))
        return index, shape

    # -- search ------------------------------------------------------------------------------------

    def search(
        self, query: np.ndarray, top_k: int, one_per_group: bool = False, filter: Filter | None = None
    ) -> list[Hit]:
        """(D,) float32 query -> up to top_k hits, highest cosine similarity first (ties by id).
        one_per_group: top_k counts groups, each by its best item. filter: only items of groups
        passing it, the top k collected among them."""
        return self.search_batch(query[None, :], top_k, one_per_group, filter)[0]

    def search_batch(
        self,
        queries: Sequence[np.ndarray] | np.ndarray,
        top_k: int,
        one_per_group: bool = False,
        filter: Filter | None = None,
    ) -> list[list[Hit]]:
        """B (D,) float32 queries (or a (B, D) array) -> per query what search() returns, from one
        FAISS search of the whole batch (one matrix product) rather than B."""
        if len(queries) == 0:
            return []
        units = np.empty((len(queries), self.dimension), np.float32)
        for i, query in enumerate(queries):
            try:
                units[i] = self.check(np.asarray(query))
            except SignatureError as exc:
                raise SignatureError(f"query #{i}: {exc}" if len(queries) > 1 else str(exc)) from None
        with self._lock.read():
            count = len(self._label_of)
            if top_k <= 0 or count == 0:
                return [[] for _ in queries]
            allowed = self._allowed_locked(filter)
            passing = count if allowed is None else int(np.count_nonzero(allowed))
            if passing == 0:
                return [[] for _ in queries]
            with _faiss_threads(1 if len(units) == 1 else 0):
                ranker = self._ranker_locked(units, top_k, allowed, passing, count)
                return self._collect_locked(ranker, len(units), top_k, one_per_group, passing)

    def _allowed_locked(self, filter: Filter | None) -> np.ndarray | None:
        """(next_label,) bool: the labels of live items of passing groups; None without a filter."""
        passing = self._groups.passing(filter)
        return None if passing is None else passing[self._group[: self._next_label]]

    def _ranker_locked(
        self, units: np.ndarray, top_k: int, allowed: np.ndarray | None, passing: int, count: int
    ) -> _Ranker:
        if self._mode == APPROXIMATE:
            if allowed is not None and passing <= self.tuning.filter_exact_rows:
                return self._scan_ranker(units, np.flatnonzero(allowed).astype(np.int64))
            return self._approximate_ranker(units, top_k, allowed, passing, count)
        if allowed is not None and self._mode == OVERRIDE:  # its index may not take a selector
            return self._post_filter_ranker(units, top_k, allowed, passing, count)
        bitmap = None if allowed is None else np.packbits(allowed, bitorder="little")
        params = None if bitmap is None else _faiss.SearchParameters(sel=_faiss.IDSelectorBitmap(bitmap))

        def rank(which: np.ndarray, depth: int) -> list[tuple[np.ndarray, np.ndarray]]:
            if params is None:
                scores, labels = self._index.search(units[which], depth)
            else:
                scores, labels = self._index.search(units[which], depth, params=params)
            return [(s[row >= 0], row[row >= 0]) for s, row in zip(scores, labels)]

        return _Ranker(rank, exact=True, start=top_k, ceiling=passing)

    def _post_filter_ranker(
        self, units: np.ndarray, top_k: int, allowed: np.ndarray, passing: int, count: int
    ) -> _Ranker:
        """The override's own search, deep enough for top_k passing items on average; deeper when
        short."""

        def rank(which: np.ndarray, depth: int) -> list[tuple[np.ndarray, np.ndarray]]:
            scores, labels = self._index.search(units[which], depth)
            keep = [(row >= 0) & allowed[np.maximum(row, 0)] for row in labels]
            return [(s[k], row[k]) for s, row, k in zip(scores, labels, keep)]

        return _Ranker(rank, exact=False, start=min(count, 2 * math.ceil(top_k * count / passing)), ceiling=count)

    def _scan_ranker(self, units: np.ndarray, labels: np.ndarray) -> _Ranker:
        """Exact over a few rows: every passing item's row read and scored."""
        assert self._rows is not None
        if len(units) == 1:
            scores = self._rows.inner_products(labels, units[0])[None, :]
        else:  # one read of the rows for the whole batch, one matrix product
            scores = units @ self._rows.read(labels).T

        def rank(which: np.ndarray, depth: int) -> list[tuple[np.ndarray, np.ndarray]]:
            out = []
            for query in which.tolist():
                row = scores[query]
                best = np.argpartition(-row, depth - 1)[:depth] if depth < len(row) else np.arange(len(row))
                best = best[np.argsort(-row[best], kind="stable")]
                out.append((row[best], labels[best]))
            return out

        return _Ranker(rank, exact=True, start=1, ceiling=len(labels))

    def _approximate_ranker(
        self, units: np.ndarray, top_k: int, allowed: np.ndarray | None, passing: int, count: int
    ) -> _Ranker:
        """The IVF's candidates (through the filter's selector), re-ranked with their rows."""
        rows = self._rows
        assert rows is not None
        ivf = _ivf_of(self._index)
        nlist = ivf.nlist
        base = self.tuning.nprobe or max(16, nlist // 32)
        share = passing / count
        rerank = max(self.tuning.rerank_min, self.tuning.rerank_per_k * top_k)
        bitmap = None if allowed is None else np.packbits(allowed, bitorder="little")
        selector = None if bitmap is None else _faiss.IDSelectorBitmap(bitmap)
        pretransform = isinstance(self._index, faiss.IndexPreTransform)

        def rank(which: np.ndarray, depth: int) -> list[tuple[np.ndarray, np.ndarray]]:
            # Deeper asks probe more lists: as many more as the depth grew, and as many more as
            # the filter keeps fewer items; every list once the depth reaches every passing item.
            wanted = base * max(1.0, depth / rerank) / share
            nprobe = nlist if depth >= passing else min(nlist, math.ceil(wanted))
            params = _faiss.SearchParametersIVF(nprobe=nprobe)
            if selector is not None:
                params.sel = selector
            if pretransform:
                params = _faiss.SearchParametersPreTransform(index_params=params)
            _, labels = self._index.search(units[which], depth, params=params)
            out = []
            for query, row in zip(which.tolist(), labels):
                candidates = np.sort(row[row >= 0])  # ascending: the file read in order
                scores = rows.inner_products(candidates, units[query])
                order = np.argsort(-scores, kind="stable")
                out.append((scores[order], candidates[order]))
            return out

        return _Ranker(rank, exact=False, start=rerank, ceiling=passing)

    def _collect_locked(
        self, ranker: _Ranker, queries: int, top_k: int, one_per_group: bool, passing: int
    ) -> list[list[Hit]]:
        """The top k (or, one_per_group, the best item of each of the top k groups) of each query
        from the ranker's candidates; a query still short asks again, twice as deep. Grouped:
        the top 4k items hold k groups unless a few groups own most of the near items."""
        results: list[list[Hit]] = [[] for _ in range(queries)]
        pending = np.arange(queries)
        depth = min(ranker.ceiling, max(ranker.start, 4 * top_k) if one_per_group else max(ranker.start, top_k))
        wanted = min(top_k, passing)
        while len(pending):
            short = []
            for query, (scores, labels) in zip(pending.tolist(), ranker.rank(pending, depth)):
                # (-score, id, label) sorts best first with ties by id; Hits only for the winners.
                ranked = sorted(
                    (-float(s), self._ids[label] or "", label) for s, label in zip(scores.tolist(), labels.tolist())
                )
                if one_per_group:
                    winners: dict[int, tuple[float, str, int]] = {}
                    for entry in ranked:
                        winners.setdefault(int(self._group[entry[2]]), entry)
                        if len(winners) == top_k:
                            break
                    chosen = list(winners.values())
                    # Exact: complete when every item not returned scores below the k-th group's
                    # best (an equal one might win on id), or when nothing more can come back.
                    complete = (
                        len(ranked) < depth or (len(chosen) == top_k and chosen[-1][0] < ranked[-1][0])
                        if ranker.exact
                        else len(chosen) == top_k
                    )
                else:
                    chosen = ranked[:top_k]
                    complete = len(chosen) == wanted
                if complete or depth >= ranker.ceiling:
                    results[query] = [self._hit(label, -negative) for negative, _, label in chosen]
                else:
                    short.append(query)
            pending = np.array(short, np.int64)
            depth = min(ranker.ceiling, 2 * depth)
        return results

    def _hit(self, label: int, score: float) -> Hit:
        item_id = self._ids[label]
        assert item_id is not None
        number = int(self._group[label])
        return Hit(
            item_id,
            score,
            _unpacked(self._metadata[label]),
            reported_group(item_id, self._groups.names[number]),
            box_or_none(self._boxes[label]),
            self._groups.attributes_of(number),
        )

    # -- snapshot ---------------------------------------------------------------------------------

    def state(self) -> dict[str, bytes]:
        """Everything needed to rebuild this database, as named byte strings (see from_state); an
        approximate database's float32 rows are one of them ("rows", in label order)."""
        with self._lock.read():
            labels = self._live_labels_locked(0, self._next_label)
            ids = [self._ids[label] or "" for label in labels.tolist()]
            state = {
                "index": faiss.serialize_index(self._index).tobytes(),
                "config": json.dumps(
                    {
                        "dimension": self.dimension,
                        "factory": self.factory,
                        "train_size": self.train_size,
                        "trained": self._trained,
                        "next_label": self._next_label,
                        "mode": self._mode,
                        "shape": self._shape,
                        "trained_on": self._trained_on,
                        "tuning": dataclasses.asdict(self.tuning),
                    }
                ).encode(),
                "labels": labels.tobytes(),
                "ids": pack_strings(ids),
                "metadata": json.dumps([_unpacked(self._metadata[label]) for label in labels.tolist()]).encode(),
                "groups": self._group[labels].tobytes(),
                "group_names": self._groups.state(),
                "boxes": self._boxes[labels].tobytes(),
                "attributes": self._groups.attributes_state(),
            }
            if self._mode == APPROXIMATE:
                assert self._rows is not None
                rows = self._rows
                state["rows"] = b"".join(
                    rows.read(labels[start : start + _CHUNK]).tobytes() for start in range(0, len(labels), _CHUNK)
                )
            return state

    @classmethod
    def from_state(cls, state: Mapping[str, bytes], tuning: DenseTuning | None = None) -> DenseDatabase:
        """The database state() described; `tuning` None: the one it was saved with."""
        config = json.loads(state["config"])
        factory = config["factory"]
        if "mode" not in config and factory == "Flat":
            factory = AUTO  # saved before the approximate index, when "Flat" was the default
        if tuning is None:
            known = {field.name for field in dataclasses.fields(DenseTuning)}
            tuning = DenseTuning(**{k: v for k, v in config.get("tuning", {}).items() if k in known})
        database = cls(config["dimension"], factory, config["train_size"], tuning)
        database._index = faiss.deserialize_index(np.frombuffer(state["index"], np.uint8).copy())
        database._trained = config["trained"]
        database._mode = config.get("mode", EXACT if factory == AUTO else OVERRIDE)
        database._shape = config.get("shape", "")
        database._trained_on = config.get("trained_on", 0)
        next_label = config["next_label"]
        labels = np.frombuffer(state["labels"], np.int64)
        ids = unpack_strings(state["ids"])
        metadata = [_packed(m) for m in json.loads(state["metadata"])]
        database._ids = [None] * next_label
        database._metadata = [None] * next_label
        for label, item_id, blob in zip(labels.tolist(), ids, metadata):
            database._ids[label] = item_id
            database._metadata[label] = blob
            database._label_of[item_id] = label
            database._object_bytes += _object_bytes(item_id, blob)
        if "groups" in state:
            names = GroupTable.names_from(state["group_names"])
            saved_groups = np.frombuffer(state["groups"], np.int32)
            boxes = np.frombuffer(state["boxes"], np.float32).reshape(len(labels), 4)
        else:  # a snapshot from before groups: every item is its own group, none has a box
            names, saved_groups = ids, np.arange(len(ids), dtype=np.int32)
            boxes = np.full((len(labels), 4), np.nan, np.float32)
        database._groups, groups = GroupTable.of_rows(names, saved_groups, np.ones(len(labels), np.bool_))
        if "attributes" in state:  # absent in snapshots from before attributes: none
            database._groups.load_attributes(state["attributes"])
        size = max(1024, next_label)
        database._group = np.full(size, -1, np.int32)
        database._group[labels] = groups
        database._boxes = np.full((size, 4), np.nan, np.float32)
        database._boxes[labels] = boxes
        if database._mode == APPROXIMATE:
            rows = VectorRows(database.dimension, tuning.rows_dir, size)
            vectors = np.frombuffer(state["rows"], np.float32).reshape(len(labels), database.dimension)
            for start in range(0, len(labels), _CHUNK):
                rows.write(labels[start : start + _CHUNK], vectors[start : start + _CHUNK])
            database._rows = rows
        return database


def _release_free_memory() -> None:
    """Gives the heap pages a build freed (the exact index, its copies, FAISS's buffers) back to
    the OS where the C library can (glibc's malloc_trim); elsewhere, nothing."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _object_bytes(item_id: str, packed: bytes | None) -> int:
    """Bytes of an item's Python objects: its id, its label in the id -> label dict, its metadata."""
    return sys.getsizeof(item_id) + 32 + (sys.getsizeof(packed) if packed is not None else 0)
