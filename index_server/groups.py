"""Groups of items (the images of one product) as both database kinds keep them: a dense group number
per row, a table of group names, and live items per group.

An item added without a group is the group named by its own id, so every item has a group and a
grouped search or a delete by group never needs a special case. Boxes are kept beside them as an
(N, 4) float32 array with NaN for "no box", so that neither needs a Python object per item.

Groups carry attributes (a product's path, tags and labels), and a filter over them is answered for
every group at once through inverted postings: per term (a tag, a label key, a key=value pair, a
prefix of a path) the group numbers that have it, so `passing(filter)` costs numpy work over the
postings it names, never a Python step per group. A posting entry is stamped with its group's
attribute version when written; changing a group's attributes bumps its version, so its old entries
go stale at once (checked with one vectorised comparison) and are dropped once they are half of a
posting.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any, cast

import numpy as np

from index_server.domain import EMPTY_ATTRIBUTES, Filter, ProductAttributes, item_key, path_prefixes
from index_server.snapshot_codec import pack_strings, unpack_strings

# A posting's term: ("t", tag), ("k", label key), ("l", key, value) or ("p", path prefix).
Term = tuple[str, ...]


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


def terms_of(packed: _Packed) -> Iterator[Term]:
    """The posting terms a group with these (packed) attributes is listed under."""
    path, tags, labels = _parts(packed)
    for prefix in path_prefixes(path):
        yield ("p", prefix)
    for tag in tags:
        yield ("t", tag)
    for key, value in labels:
        yield ("k", key)
        yield ("l", key, value)


# A group's attributes as the table keeps them: one flat tuple of interned strings, the path, the
# tag count, the sorted tags, then the sorted labels' keys and values alternating. Not a
# ProductAttributes with its frozenset and dict: a shard holds one per group (at a million groups
# this is ~0.3 GB less); attributes_of builds the value for the few hits that need it.
_Packed = tuple[str | int, ...]


def _packed(attributes: ProductAttributes) -> _Packed:
    tags = sorted(attributes.tags)
    labels = [sys.intern(text) for pair in sorted(attributes.labels.items()) for text in pair]
    return (sys.intern(attributes.path), len(tags), *(sys.intern(tag) for tag in tags), *labels)


def _parts(packed: _Packed) -> tuple[str, tuple[str, ...], list[tuple[str, str]]]:
    """(path, tags, (key, value) labels) of packed attributes."""
    path, count = cast(str, packed[0]), cast(int, packed[1])
    tags = cast(tuple[str, ...], packed[2 : 2 + count])
    flat = cast(tuple[str, ...], packed[2 + count :])
    return path, tags, list(zip(flat[::2], flat[1::2], strict=True))


def _unpacked(packed: _Packed) -> ProductAttributes:
    path, tags, labels = _parts(packed)
    return ProductAttributes(path, frozenset(tags), dict(labels))


class _Posting:
    """Group numbers listed under one term, each with the attribute version it was written at
    (an entry whose version is not its group's current one is stale)."""

    __slots__ = ("live", "members", "size", "stamps")

    def __init__(self) -> None:
        self.members = np.zeros(4, np.int32)
        self.stamps = np.zeros(4, np.uint32)
        self.size = 0  # entries written
        self.live = 0  # entries not stale

    def append(self, number: int, stamp: int) -> None:
        self.members = grown(self.members, self.size + 1)
        self.stamps = grown(self.stamps, self.size + 1)
        self.members[self.size] = number
        self.stamps[self.size] = stamp
        self.size += 1
        self.live += 1

    def extend(self, numbers: np.ndarray, stamps: np.ndarray) -> None:
        """Appends many entries at once ((n,) int32 group numbers, (n,) uint32 their versions)."""
        self.members = np.concatenate([self.members[: self.size], numbers.astype(np.int32)])
        self.stamps = np.concatenate([self.stamps[: self.size], stamps.astype(np.uint32)])
        self.size += len(numbers)
        self.live += len(numbers)

    def current(self, versions: np.ndarray) -> np.ndarray:
        """(n,) int32 group numbers whose entry is not stale."""
        members = self.members[: self.size]
        return members[self.stamps[: self.size] == versions[members]]

    def drop_stale(self, versions: np.ndarray) -> None:
        members = self.current(versions)
        self.members = members.copy()
        self.stamps = versions[members].astype(np.uint32)
        self.size = self.live = len(members)


class GroupTable:
    """Group names <-> dense int32 numbers, each with its key, its live item count and its
    attributes; not thread-safe on its own (its database's lock guards it: `passing` and the other
    reads change nothing, so readers may share it)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._number: dict[str, int] = {}
        self.sizes = np.zeros(1024, np.int32)  # live items per group number
        self.keys = np.zeros(1024, np.uint64)  # item_key(name) per group number
        self._attributes: dict[int, _Packed] = {}  # groups with attributes only
        self._versions = np.zeros(1024, np.uint32)  # attribute version per group number
        self._postings: dict[Term, _Posting] = {}

    def __len__(self) -> int:
        return len(self.names)

    def number(self, name: str) -> int:
        """The group's number, given one on first sight."""
        number = self._number.get(name)
        if number is None:
            number = len(self.names)
            self.sizes = grown(self.sizes, number + 1)
            self.keys = grown(self.keys, number + 1)
            self._versions = grown(self._versions, number + 1)
            self.names.append(name)
            self._number[name] = number
            self.keys[number] = item_key(name)
        return number

    def number_of(self, name: str) -> int | None:
        """The group's number, None when it has none (never seen, or forgotten by a renumbering)."""
        return self._number.get(name)

    # -- attributes -------------------------------------------------------------------------------

    def set_attributes(self, name: str, attributes: ProductAttributes) -> int:
        """Replaces the group's attributes (empty ones: it has none); gives the group a number if
        it has none, and returns it."""
        number = self.number(name)
        old = self._attributes.pop(number, None)
        if old is not None:
            self._versions[number] += 1  # every entry of the old attributes is stale now
            for term in terms_of(old):
                posting = self._postings[term]
                posting.live -= 1
                if posting.live == 0:
                    del self._postings[term]
                elif posting.live * 2 < posting.size and posting.size > 16:
                    posting.drop_stale(self._versions)
        if not attributes.is_empty():
            packed = self._attributes[number] = _packed(attributes)
            stamp = int(self._versions[number])
            for term in terms_of(packed):
                self._postings.setdefault(term, _Posting()).append(number, stamp)
        return number

    def attributes_of(self, number: int) -> ProductAttributes:
        """The group's attributes (EMPTY_ATTRIBUTES when it has none)."""
        packed = self._attributes.get(number)
        return EMPTY_ATTRIBUTES if packed is None else _unpacked(packed)

    def forget_if_empty(self, number: int) -> None:
        """Drops the group's attributes when it has no live item left (its last one was deleted)."""
        if number in self._attributes and self.sizes[number] <= 0:
            self.set_attributes(self.names[number], EMPTY_ATTRIBUTES)

    def live_names(self, filter: Filter | None = None) -> list[str]:
        """Names of the groups with a live item that pass the filter (None: every one), in number order."""
        count = len(self.names)
        mask = self.passing(filter)
        chosen = np.flatnonzero(self.sizes[:count] > 0 if mask is None else mask[:count])
        return [self.names[number] for number in chosen.tolist()]

    def live_count(self) -> int:
        """Groups with a live item."""
        return int(np.count_nonzero(self.sizes[: len(self.names)] > 0))

    def attributed(self) -> int:
        """How many groups have attributes."""
        return len(self._attributes)

    def passing(self, filter: Filter | None) -> np.ndarray | None:
        """(len(self) + 1,) bool per group number: whether the group passes the filter and has a
        live item; the extra last entry is False, so that a dead row's group -1 (a group forgotten by
        a renumbering) indexes it. None when there is no filter (or an empty one): all pass."""
        if filter is None or filter.is_empty():
            return None
        count = len(self.names)
        mask = np.zeros(count + 1, np.bool_)
        mask[:count] = self._matching(filter, count) & (self.sizes[:count] > 0)
        return mask

    def _term(self, term: Term, count: int) -> np.ndarray:
        """(count,) bool: the groups listed under the term (now)."""
        mask = np.zeros(count, np.bool_)
        posting = self._postings.get(term)
        if posting is not None:
            mask[posting.current(self._versions)] = True
        return mask

    def _any(self, terms: list[Term], count: int) -> np.ndarray:
        mask = np.zeros(count, np.bool_)
        for term in terms:
            posting = self._postings.get(term)
            if posting is not None:
                mask[posting.current(self._versions)] = True
        return mask

    def _matching(self, filter: Filter, count: int) -> np.ndarray:
        """(count,) bool: the groups whose attributes pass the filter (sizes not considered)."""
        mask = np.ones(count, np.bool_)
        if filter.path_prefix:
            mask &= self._term(("p", filter.path_prefix), count)
        for tag in filter.all_tags:
            mask &= self._term(("t", tag), count)
        if filter.any_tags:
            mask &= self._any([("t", tag) for tag in filter.any_tags], count)
        for clause in filter.labels:
            terms: list[Term] = (
                [("l", clause.key, value) for value in clause.values] if clause.values else [("k", clause.key)]
            )
            has = self._any(terms, count)
            mask &= ~has if clause.negate else has
        if filter.any_of:
            either = np.zeros(count, np.bool_)
            for part in filter.any_of:
                either |= self._matching(part, count)
            mask &= either
        return mask

    def attributes_state(self) -> bytes:
        """The attributes of every group that has some, by group name (see load_attributes)."""
        return json.dumps(
            [
                [self.names[number], path, tags, dict(labels)]
                for number, (path, tags, labels) in ((n, _parts(p)) for n, p in sorted(self._attributes.items()))
            ],
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode()

    def load_attributes(self, blob: bytes) -> None:
        """Sets the attributes of attributes_state() on the groups of this table that have the same
        names (a group the table no longer has is skipped). In bulk: each posting is built once, so
        a million groups load in seconds."""
        entries: list[tuple[int, _Packed]] = []
        for name, path, tags, labels in json.loads(blob):
            number = self._number.get(name)
            if number is not None:
                entries.append((number, _packed(ProductAttributes(path, frozenset(tags), labels))))
        if any(number in self._attributes for number, _ in entries):  # not a fresh table: one by one
            for number, packed in entries:
                self.set_attributes(self.names[number], _unpacked(packed))
            return
        listed: dict[Term, list[int]] = {}
        for number, packed in entries:
            self._attributes[number] = packed
            for term in terms_of(packed):
                listed.setdefault(term, []).append(number)
        for term, numbers in listed.items():
            members = np.array(numbers, np.int32)
            self._postings.setdefault(term, _Posting()).extend(members, self._versions[members])

    def _adopt(self, previous: GroupTable, renumber: np.ndarray) -> None:
        """Takes the attributes of `previous`, whose group n is this table's renumber[n] (-1: gone):
        the postings are renumbered with numpy, not rebuilt group by group (compaction holds the
        write lock meanwhile)."""
        self._attributes = {int(renumber[n]): p for n, p in previous._attributes.items() if renumber[n] >= 0}
        for term, posting in previous._postings.items():
            members = renumber[posting.current(previous._versions)]
            members = members[members >= 0]
            if len(members):
                self._postings[term] = fresh = _Posting()
                fresh.extend(members, self._versions[members])

    def size(self, name: str) -> int:
        """Live items in the group (0 for an unknown group)."""
        number = self._number.get(name)
        return 0 if number is None else int(self.sizes[number])

    def numbers(self, names: list[str]) -> np.ndarray:
        """(n,) int32 numbers of the known groups among `names`."""
        return np.array([n for n in (self._number.get(name, -1) for name in names) if n >= 0], np.int32)

    @classmethod
    def of_rows(
        cls, names: list[str], row_groups: np.ndarray, live: np.ndarray, previous: GroupTable | None = None
    ) -> tuple[GroupTable, np.ndarray]:
        """A table of the groups that live rows use, numbered densely, and every row's group number
        in it ((N,) int32; -1 for dead rows whose group is gone): for snapshots and compaction, so
        groups whose items are all deleted are forgotten. `previous`: the table being renumbered
        (`names` are its names, `row_groups` its numbers), whose groups' attributes the new one
        keeps; from a snapshot, load_attributes."""
        table = cls()
        used, inverse = np.unique(row_groups[live], return_inverse=True)
        for number in used.tolist():
            table.number(names[number])
        table.sizes[: len(used)] = np.bincount(inverse, minlength=len(used))
        renumber = np.full(len(names) + 1, -1, np.int32)  # + 1: row_groups may be empty
        renumber[used] = np.arange(len(used), dtype=np.int32)
        out = renumber[row_groups]
        if previous is not None:
            table._adopt(previous, renumber)
        return table, out

    def state(self) -> bytes:
        return pack_strings(self.names)

    @staticmethod
    def names_from(blob: bytes) -> list[str]:
        return unpack_strings(blob)


class GroupAttributes:
    """The group-attribute calls both kinds of database answer alike, from their GroupTable
    (`self._groups`) under their reader-writer lock (`self._lock`)."""

    _groups: GroupTable
    _lock: Any  # common.rwlock.ReadWriteLock

    def set_attributes(self, group_id: str, attributes: ProductAttributes) -> None:
        """Replaces a group's attributes (the group named as group_name names it); visible to the
        next search."""
        with self._lock.write():
            self._groups.set_attributes(group_id, attributes)

    def attributes_of_group(self, group_id: str) -> ProductAttributes:
        with self._lock.read():
            number = self._groups.number_of(group_id)
            return EMPTY_ATTRIBUTES if number is None else self._groups.attributes_of(number)

    def group_names(self, filter: Filter | None = None) -> list[str]:
        """The groups with a live item that pass the filter (None: all), unordered."""
        with self._lock.read():
            return self._groups.live_names(filter)

    def groups_count(self) -> int:
        """Groups with a live item."""
        with self._lock.read():
            return self._groups.live_count()
