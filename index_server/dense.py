"""Dense (deep descriptor) databases in FAISS: exact inner product on unit vectors by default.

The FAISS index is built from a factory string ("Flat" by default; e.g. "IVF1024,Flat" or
"IVF4096,PQ32" by configuration) with METRIC_INNER_PRODUCT behind an IndexIDMap2, so items carry
stable int64 labels and can be removed. A factory that needs training serves exactly from a flat
buffer until `train_size` vectors have arrived, then is trained on them and takes over.
"""

from __future__ import annotations

import json
import threading

import faiss
import numpy as np

from index_server.inverted import Hit, SignatureError
from index_server.state import pack_strings, unpack_strings


def _make(dimension: int, factory: str) -> faiss.Index:
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
        self._index = target if target.is_trained else _make(dimension, "Flat")
        self._trained = target.is_trained
        self._label_of: dict[str, int] = {}
        self._id_of: dict[int, str] = {}
        self._metadata: dict[int, dict[str, str]] = {}
        self._next_label = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._label_of)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._label_of

    def check(self, vector: np.ndarray) -> np.ndarray:
        """The unit vector of a valid (D,) signature; raises SignatureError otherwise."""
        if vector.shape != (self.dimension,):
            raise SignatureError(f"signature has {vector.size} values; this database holds "
                                 f"{self.dimension}-d vectors")
        if not np.all(np.isfinite(vector)):
            raise SignatureError("signature has NaN or infinite values")
        norm = float(np.linalg.norm(vector))
        if norm == 0.0:
            raise SignatureError("signature is all zeros: cosine similarity is undefined for it")
        return (vector / norm).astype(np.float32)

    def add(self, item_id: str, vector: np.ndarray, metadata: dict[str, str]) -> bool:
        """Adds or replaces an item; returns True when it replaced one. Visible to the next search."""
        unit = self.check(vector)
        with self._lock:
            replaced = self._remove_locked(item_id)
            label = self._next_label
            self._next_label += 1
            self._index.add_with_ids(unit[None, :], np.array([label], np.int64))
            self._label_of[item_id] = label
            self._id_of[label] = item_id
            self._metadata[label] = dict(metadata)
            if not self._trained and len(self._label_of) >= self.train_size:
                self._train_locked()
            return replaced

    def delete(self, item_id: str) -> bool:
        with self._lock:
            return self._remove_locked(item_id)

    def _remove_locked(self, item_id: str) -> bool:
        label = self._label_of.pop(item_id, None)
        if label is None:
            return False
        self._index.remove_ids(np.array([label], np.int64))
        del self._id_of[label], self._metadata[label]
        return True

    def _train_locked(self) -> None:
        labels = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        vectors = self._index.index.reconstruct_n(0, self._index.ntotal)
        target = _make(self.dimension, self.factory)
        target.train(vectors)
        target.add_with_ids(vectors, labels)
        self._index, self._trained = target, True

    def search(self, query: np.ndarray, top_k: int) -> list[Hit]:
        """(D,) float32 query -> up to top_k hits, highest cosine similarity first (ties by id)."""
        unit = self.check(query)
        with self._lock:
            k = min(top_k, len(self._label_of))
            if k == 0:
                return []
            scores, labels = self._index.search(unit[None, :], k)
            hits = [Hit(self._id_of[int(label)], float(score), dict(self._metadata[int(label)]))
                    for score, label in zip(scores[0], labels[0]) if label >= 0]
        return sorted(hits, key=lambda h: (-h.score, h.item_id))

    # -- snapshot ---------------------------------------------------------------------------------

    def state(self) -> dict[str, bytes]:
        """Everything needed to rebuild this database, as named byte strings (see from_state)."""
        with self._lock:
            labels = sorted(self._id_of)
            return {"index": faiss.serialize_index(self._index).tobytes(),
                    "config": json.dumps({"dimension": self.dimension, "factory": self.factory,
                                          "train_size": self.train_size, "trained": self._trained,
                                          "next_label": self._next_label}).encode(),
                    "labels": np.array(labels, np.int64).tobytes(),
                    "ids": pack_strings([self._id_of[label] for label in labels]),
                    "metadata": json.dumps([self._metadata[label] for label in labels]).encode()}

    @classmethod
    def from_state(cls, state: dict[str, bytes]) -> "DenseDatabase":
        config = json.loads(state["config"])
        database = cls(config["dimension"], config["factory"], config["train_size"])
        database._index = faiss.deserialize_index(np.frombuffer(state["index"], np.uint8).copy())
        database._trained = config["trained"]
        database._next_label = config["next_label"]
        labels = np.frombuffer(state["labels"], np.int64).tolist()
        ids = unpack_strings(state["ids"])
        database._id_of = dict(zip(labels, ids))
        database._label_of = dict(zip(ids, labels))
        database._metadata = dict(zip(labels, json.loads(state["metadata"])))
        return database
