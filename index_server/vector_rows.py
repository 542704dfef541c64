"""Float32 rows on disk by label: the full vectors an approximate dense index re-ranks with, kept
out of the process's memory (the page cache holds what the OS can spare).

One unnamed temporary file per database (the OS deletes it when the process closes it or exits),
mapped with numpy's memmap and grown by doubling. A row, once written, is never rewritten (a
replaced item gets a new label), so a reader holding an older, shorter mapping still reads right:
growing the file never moves what is in it. Not thread-safe on its own: writes happen under the
owning database's write lock, reads of rows written before a read began need no lock.
"""

from __future__ import annotations

import tempfile
from typing import IO, Any

import faiss
import numpy as np

# faiss's stubs do not know its pointer helpers (swig_ptr) and take its functions' arrays as ints.
_faiss: Any = faiss


class VectorRows:
    """(capacity, D) float32 rows in a temporary file under `directory` ("" = the system's)."""

    def __init__(self, dimension: int, directory: str = "", capacity: int = 1024):
        self.dimension = dimension
        # Open as long as this object lives (close() or the process's end deletes it).
        self._file: IO[bytes] = tempfile.TemporaryFile(prefix="dense-rows-", dir=directory or None)  # noqa: SIM115
        self.matrix = self._map(max(1, capacity))

    def _map(self, capacity: int) -> np.ndarray:
        self._file.truncate(capacity * self.dimension * 4)  # sparse: unwritten rows take no disk
        self.capacity = capacity
        return np.memmap(self._file, np.float32, "r+", shape=(capacity, self.dimension)).view(np.ndarray)

    def write(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """(n,) int64 labels, (n, D) float32 rows: row `label` holds its vector from now on."""
        if len(labels) == 0:
            return
        top = int(labels.max()) + 1
        if top > self.capacity:
            self.matrix = self._map(max(top, 2 * self.capacity))
        self.matrix[labels] = vectors

    def read(self, labels: np.ndarray) -> np.ndarray:
        """(n,) int64 labels -> (n, D) float32 copy of their rows (ascending labels read fastest)."""
        return self.matrix[labels]

    def inner_products(self, labels: np.ndarray, unit: np.ndarray) -> np.ndarray:
        """(n,) int64 labels, (D,) float32 query -> (n,) float32 inner products with their rows,
        read in place (no copy of the rows) on this thread."""
        out = np.empty(len(labels), np.float32)
        if len(labels):
            matrix, labels = self.matrix, np.ascontiguousarray(labels, np.int64)
            _faiss.fvec_inner_products_by_idx(
                _faiss.swig_ptr(out),
                _faiss.swig_ptr(np.ascontiguousarray(unit, np.float32)),
                _faiss.swig_ptr(matrix),
                _faiss.swig_ptr(labels),
                self.dimension,
                1,
                len(labels),
            )
        return out

    @property
    def disk_bytes(self) -> int:
        return self.capacity * self.dimension * 4

    def close(self) -> None:
        self._file.close()
