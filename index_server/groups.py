"""Groups of items (the images of one product) as both database kinds keep them: a dense group number
per row, a table of group names, and live items per group.

An item added without a group is the group named by its own id, so every item has a group and a
grouped search or a delete by group never needs a special case. Boxes are kept beside them as an
(N, 4) float32 array with NaN for "no box", so that neither needs a Python object per item.
"""

from __future__ import annotations

import numpy as np

from index_server.domain import item_key
from index_server.snapshot_codec import pack_strings, unpack_strings


def reported_group(item_id: str, name: str) -> str:
    """The group_id to report for an item ("" when the item is its own group, as when added)."""
    return "" if name == item_id else name


def box_row(box: np.ndarray | None) -> np.ndarray:
    """(4,) float32 xyxy, NaN when there is no box."""
    return np.full(4, np.nan, np.float32) if box is None else np.asarray(box, np.float32).reshape(4)


def box_or_none(row: np.ndarray) -> np.ndarray | None:
    """A stored (4,) float32 row as a box of its own, or None for the NaN "no box" row."""
    return None if np.isnan(row[0]) else row.copy()


def grown(array: np.ndarray, size: int, fill: float = 0) -> np.ndarray:
    """`array` with room for at least `size` rows (doubling, so appends stay amortised O(1))."""
    if size <= len(array):
        return array
    extra = np.full((max(size, 2 * len(array)) - len(array),) + array.shape[1:], fill, array.dtype)
    return np.concatenate([array, extra])


class GroupTable:
    """Group names <-> dense int32 numbers, each with its key and its live item count; not
    thread-safe on its own (its database's lock guards it)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._number: dict[str, int] = {}
        self.sizes = np.zeros(1024, np.int32)  # live items per group number
        self.keys = np.zeros(1024, np.uint64)  # item_key(name) per group number

    def __len__(self) -> int:
        return len(self.names)

    def number(self, name: str) -> int:
        """The group's number, given one on first sight."""
        number = self._number.get(name)
        if number is None:
            number = len(self.names)
            self.sizes = grown(self.sizes, number + 1)
            self.keys = grown(self.keys, number + 1)
            self.names.append(name)
            self._number[name] = number
            self.keys[number] = item_key(name)
        return number

    def size(self, name: str) -> int:
        """Live items in the group (0 for an unknown group)."""
        number = self._number.get(name)
        return 0 if number is None else int(self.sizes[number])

    def numbers(self, names: list[str]) -> np.ndarray:
        """(n,) int32 numbers of the known groups among `names`."""
        return np.array([n for n in (self._number.get(name, -1) for name in names) if n >= 0], np.int32)

    @classmethod
    def of_rows(cls, names: list[str], row_groups: np.ndarray, live: np.ndarray) -> tuple[GroupTable, np.ndarray]:
        """A table of the groups that live rows use, numbered densely, and every row's group number
        in it ((N,) int32; -1 for dead rows whose group is gone): for snapshots and compaction, so
        groups whose items are all deleted are forgotten."""
        table = cls()
        used, inverse = np.unique(row_groups[live], return_inverse=True)
        for number in used.tolist():
            table.number(names[number])
        table.sizes[: len(used)] = np.bincount(inverse, minlength=len(used))
        renumber = np.full(len(names) + 1, -1, np.int32)  # + 1: row_groups may be empty
        renumber[used] = np.arange(len(used), dtype=np.int32)
        out = renumber[row_groups]
        return table, out

    def state(self) -> bytes:
        return pack_strings(self.names)

    @staticmethod
    def names_from(blob: bytes) -> list[str]:
        return unpack_strings(blob)
