"""Exact cosine search over the dense vectors of one database, in one contiguous matrix."""

from __future__ import annotations

import threading
import numpy as np


from index_server.inverted import Hit, SignatureError


class DenseDatabase:
    """Unit vectors (N, D) float32 with ids and metadata; adds, deletes and searches are thread-safe.

    Rows are kept dense: a delete moves the last row into the hole, so a search is one matrix-vector
    product over exactly the live items.
    """

    def __init__(self, dimension: int, capacity: int = 1024):
        self.dimension = dimension
        self._vectors = np.empty((capacity, dimension), dtype=np.float32)
        self._ids: list[str] = []
        self._metadata: list[dict[str, str]] = []
        self._row_of: dict[str, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ids)

    def _check(self, vector: np.ndarray) -> np.ndarray:
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
        """Adds or replaces an item; returns True when it replaced one."""
        unit = self._check(vector)
        with self._lock:
            row = self._row_of.get(item_id)
            if row is not None:
                self._vectors[row] = unit
                self._metadata[row] = dict(metadata)
                return True
            row = len(self._ids)
            if row == len(self._vectors):
                grown = np.empty((2 * len(self._vectors), self.dimension), dtype=np.float32)
                grown[:row] = self._vectors[:row]
                self._vectors = grown
            self._vectors[row] = unit
            self._ids.append(item_id)
            self._metadata.append(dict(metadata))
            self._row_of[item_id] = row
            return False

    def delete(self, item_id: str) -> bool:
        with self._lock:
            row = self._row_of.pop(item_id, None)
            if row is None:
                return False
            last = len(self._ids) - 1
            if row != last:
                self._vectors[row] = self._vectors[last]
                self._ids[row] = self._ids[last]
                self._metadata[row] = self._metadata[last]
                self._row_of[self._ids[row]] = row
            self._ids.pop()
            self._metadata.pop()
            return True

    def search(self, query: np.ndarray, top_k: int) -> list[Hit]:
        """(D,) float32 query -> up to top_k hits, highest cosine similarity first."""
        unit = self._check(query)
        with self._lock:
            count = len(self._ids)
            scores = self._vectors[:count] @ unit
            k = min(top_k, count)
            if k == 0:
                return []
            best = np.argpartition(-scores, k - 1)[:k] if k < count else np.arange(count)
            # Ties broken by id so results are deterministic.
            best = sorted(best.tolist(), key=lambda r: (-scores[r], self._ids[r]))
            return [Hit(self._ids[r], float(scores[r]), dict(self._metadata[r])) for r in best]
