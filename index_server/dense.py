"""Dense (deep descriptor) databases in FAISS: exact inner product on unit vectors by default.

The FAISS index is built from a factory string ("Flat" by default; e.g. "IVF1024,Flat" or
"IVF4096,PQ32" by configuration) with METRIC_INNER_PRODUCT behind an IndexIDMap2, so items carry
stable int64 labels and can be removed. A factory that needs training serves exactly from a flat
buffer until `train_size` vectors have arrived, then is trained on them and takes over.
Per label, the item's group number and box live in numpy arrays (see groups.py).

Concurrency: one writer-preferring reader-writer lock per database (common/rwlock.py). Searches,
group sizes and snapshots hold its read side across all of their work, FAISS search included, so
searches of one database run at once (FAISS releases the GIL in search, and its CPU indexes are
safe for concurrent searches: search does not change an index). Every change holds the write side:
add (and the training it may start), delete, delete_groups. The invariant: nothing a reader can
reach (the FAISS index, the dicts, the group and box arrays, the group table) is changed while any
reader holds the lock, so a search answers what a lone search of the state between two writes does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from common.rwlock import ReadWriteLock
from index_server.domain import Hit, SignatureError, group_name, unit_vector
from index_server.groups import GroupTable, box_or_none, box_row, grown, reported_group
from index_server.snapshot_codec import pack_strings, unpack_strings


def _make(dimension: int, factory: str) -> faiss.IndexIDMap2:
    try:
        return faiss.IndexIDMap2(faiss.index_factory(dimension, factory, faiss.METRIC_INNER_PRODUCT))
    except RuntimeError as exc:
        raise ValueError(f"FAISS factory string {factory!r} is not valid: {exc}") from None


class DenseDatabase:
    """Unit vectors (N, D) float32 with ids and metadata; adds, deletes and searches are thread-safe."""

    def __init__(self, dimension: int, factory: str = "Flat", train_size: int = 50_000):
        self.dimension = dimension
        self.factory = factory
        self.train_size = train_size
        target = _make(dimension, factory)
        # Until the target is trained, vectors live in (and are searched exactly from) a flat buffer.
        # Any: faiss's SWIG stubs do not know the numpy wrappers (remove_ids(array), search(array, k)).
        self._index: Any = target if target.is_trained else _make(dimension, "Flat")
        self._trained = target.is_trained
        self._label_of: dict[str, int] = {}
        self._id_of: dict[int, str] = {}
        self._metadata: dict[int, dict[str, str]] = {}
        self._group = np.zeros(1024, np.int32)  # group number per label
        self._boxes = np.full((1024, 4), np.nan, np.float32)  # xyxy per label, NaN = no box
        self._groups = GroupTable()
        self._next_label = 0
        self._lock = ReadWriteLock()  # searches read, changes write (see the module docstring)

    def __len__(self) -> int:
        return len(self._label_of)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._label_of

    def group_size(self, group_id: str) -> int:
        """Live items of a group (an item without a group_id is the group named by its id)."""
        with self._lock.read():
            return self._groups.size(group_id)

    def check(self, vector: np.ndarray) -> np.ndarray:
        """The unit vector of a valid (D,) signature; raises SignatureError otherwise."""
        if vector.shape != (self.dimension,):
            raise SignatureError(f"signature has {vector.size} values; this database holds {self.dimension}-d vectors")
        return unit_vector(vector)

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
        box_values = box_row(box)
        with self._lock.write():
            replaced = self._remove_locked(item_id)
            label = self._next_label
            self._next_label += 1
            self._index.add_with_ids(unit[None, :], np.array([label], np.int64))
            self._label_of[item_id] = label
            self._id_of[label] = item_id
            self._metadata[label] = dict(metadata)
            self._group = grown(self._group, label + 1)
            self._boxes = grown(self._boxes, label + 1, np.nan)
            number = self._groups.number(group_name(item_id, group_id))
            self._group[label] = number
            self._groups.sizes[number] += 1
            self._boxes[label] = box_values
            if not self._trained and len(self._label_of) >= self.train_size:
                self._train_locked()
            return replaced

    def delete(self, item_id: str) -> bool:
        with self._lock.write():
            return self._remove_locked(item_id)

    def delete_groups(self, group_ids: list[str]) -> int:
        """Deletes every item of these groups; returns how many items that was."""
        with self._lock.write():
            numbers = self._groups.numbers(group_ids)
            numbers = numbers[self._groups.sizes[numbers] > 0]
            if len(numbers) == 0:
                return 0
            labels = [
                label
                for label in np.flatnonzero(np.isin(self._group[: self._next_label], numbers)).tolist()
                if label in self._id_of
            ]
            # One remove_ids for the whole group: each call scans the index.
            self._index.remove_ids(np.array(labels, np.int64))
            for label in labels:
                del self._label_of[self._id_of.pop(label)], self._metadata[label]
                self._groups.sizes[self._group[label]] -= 1
            return len(labels)

    def _remove_locked(self, item_id: str) -> bool:
        label = self._label_of.pop(item_id, None)
        if label is None:
            return False
        self._index.remove_ids(np.array([label], np.int64))
        del self._id_of[label], self._metadata[label]
        self._groups.sizes[self._group[label]] -= 1
        return True

    def _train_locked(self) -> None:
        labels = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        vectors = self._index.index.reconstruct_n(0, self._index.ntotal)
        target = _make(self.dimension, self.factory)
        target.train(vectors)
        target.add_with_ids(vectors, labels)
        self._index, self._trained = target, True

    def search(self, query: np.ndarray, top_k: int, one_per_group: bool = False) -> list[Hit]:
        """(D,) float32 query -> up to top_k hits, highest cosine similarity first (ties by id).
        one_per_group: top_k counts groups, each by its best item."""
        return self.search_batch(query[None, :], top_k, one_per_group)[0]

    def search_batch(
        self, queries: Sequence[np.ndarray] | np.ndarray, top_k: int, one_per_group: bool = False
    ) -> list[list[Hit]]:
        """B (D,) float32 queries (or a (B, D) array) -> per query what search() returns, from one FAISS search of the
        whole batch (one matrix product) rather than B."""
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
            k = min(top_k, count)
            if k <= 0:
                return [[] for _ in queries]
            if not one_per_group:
                scores, labels = self._index.search(units, k)
                return [self._ranked(s, row) for s, row in zip(scores, labels)]
            return self._search_groups_locked(units, top_k, count)

    def _search_groups_locked(self, units: np.ndarray, top_k: int, count: int) -> list[list[Hit]]:
        """one_per_group: the top 4k items hold k groups unless a few groups own most of the near
        items; then the queries still short ask again for twice as many, until the whole database."""
        results: list[list[Hit]] = [[] for _ in range(len(units))]
        pending = np.arange(len(units))
        depth = min(count, 4 * top_k)
        while len(pending):
            scores, labels = self._index.search(units[pending], depth)
            short = []
            for query, query_scores, query_labels in zip(pending.tolist(), scores, labels):
                # (-score, id, label) sorts best first with ties by id; Hits only for the winners.
                ranked = sorted(
                    (-float(s), self._id_of[int(label)], int(label))
                    for s, label in zip(query_scores, query_labels)
                    if label >= 0
                )
                winners: dict[int, tuple[float, str, int]] = {}
                for entry in ranked:
                    winners.setdefault(int(self._group[entry[2]]), entry)
                    if len(winners) == top_k:
                        break
                grouped = [self._hit(label, -negative) for negative, _, label in winners.values()]
                # Complete when every item not returned scores below the k-th group's best (an
                # equal one might win on id), or when nothing more can come back.
                complete = (
                    depth >= count
                    or len(ranked) < depth
                    or (len(grouped) == top_k and grouped[-1].score > -ranked[-1][0])
                )
                if complete:
                    results[query] = grouped
                else:
                    short.append(query)
            pending = np.array(short, np.int64)
            depth = min(count, 2 * depth)
        return results

    def _ranked(self, scores: np.ndarray, labels: np.ndarray) -> list[Hit]:
        hits = [self._hit(int(label), float(score)) for score, label in zip(scores, labels) if label >= 0]
        return sorted(hits, key=lambda h: (-h.score, h.item_id))

    def _hit(self, label: int, score: float) -> Hit:
        item_id = self._id_of[label]
        return Hit(
            item_id,
            score,
            dict(self._metadata[label]),
            reported_group(item_id, self._groups.names[self._group[label]]),
            box_or_none(self._boxes[label]),
        )

    # -- snapshot ---------------------------------------------------------------------------------

    def state(self) -> dict[str, bytes]:
        """Everything needed to rebuild this database, as named byte strings (see from_state)."""
        with self._lock.read():
            labels = np.array(sorted(self._id_of), np.int64)
            return {
                "index": faiss.serialize_index(self._index).tobytes(),
                "config": json.dumps(
                    {
                        "dimension": self.dimension,
                        "factory": self.factory,
                        "train_size": self.train_size,
                        "trained": self._trained,
                        "next_label": self._next_label,
                    }
                ).encode(),
                "labels": labels.tobytes(),
                "ids": pack_strings([self._id_of[label] for label in labels.tolist()]),
                "metadata": json.dumps([self._metadata[label] for label in labels.tolist()]).encode(),
                "groups": self._group[labels].tobytes(),
                "group_names": self._groups.state(),
                "boxes": self._boxes[labels].tobytes(),
            }

    @classmethod
    def from_state(cls, state: dict[str, bytes]) -> DenseDatabase:
        config = json.loads(state["config"])
        database = cls(config["dimension"], config["factory"], config["train_size"])
        database._index = faiss.deserialize_index(np.frombuffer(state["index"], np.uint8).copy())
        database._trained = config["trained"]
        database._next_label = config["next_label"]
        labels = np.frombuffer(state["labels"], np.int64)
        ids = unpack_strings(state["ids"])
        database._id_of = dict(zip(labels.tolist(), ids))
        database._label_of = dict(zip(ids, labels.tolist()))
        database._metadata = dict(zip(labels.tolist(), json.loads(state["metadata"])))
        if "groups" in state:
            names = GroupTable.names_from(state["group_names"])
            saved_groups = np.frombuffer(state["groups"], np.int32)
            boxes = np.frombuffer(state["boxes"], np.float32).reshape(len(labels), 4)
        else:  # a snapshot from before groups: every item is its own group, none has a box
            names, saved_groups = ids, np.arange(len(ids), dtype=np.int32)
            boxes = np.full((len(labels), 4), np.nan, np.float32)
        database._groups, groups = GroupTable.of_rows(names, saved_groups, np.ones(len(labels), np.bool_))
        size = max(1024, database._next_label)
        database._group = np.zeros(size, np.int32)
        database._group[labels] = groups
        database._boxes = np.full((size, 4), np.nan, np.float32)
        database._boxes[labels] = boxes
        return database
