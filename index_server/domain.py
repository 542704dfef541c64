"""The index's domain values, shared by the shard, its databases and the router (no gRPC, no
storage): what is stored (`Item`) and deleted (`Deletion`), what a search finds (`Hit`), how items
and groups are named across shards (`item_key`), which words a word-range shard holds
(`word_range_of`), and the error for a signature that does not fit (`SignatureError`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from common.bow_codec import BagOfWords
from common.errors import InvalidArgument

# A decoded signature: a deep signature's (D,) float32 vector or a bag-of-words signature's bag.
Value = np.ndarray | BagOfWords
# The largest count of one word in a bag a database holds (a posting keeps it as uint16).
MAX_WORD_COUNT = 65535


def item_key(item_id: str) -> int:
    """The 64-bit key that names an item in partial scores (word-range shards merge by it); a group
    is named by the same key of its name."""
    return int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=8).digest(), "little")


def group_name(item_id: str, group_id: str) -> str:
    """The group an item belongs to: its group_id, else the group of its own named by its id."""
    return group_id or item_id


def word_range_of(shard: int, shards: int, vocabulary: int) -> tuple[int, int]:
    """Words [first, end) held by word-range shard `shard` of `shards` (as each shard computes it)."""
    return vocabulary * shard // shards, vocabulary * (shard + 1) // shards


class SignatureError(InvalidArgument, ValueError):
    """A signature does not fit the database (or is malformed); the message says why."""


@dataclass(frozen=True, eq=False)
class Item:
    """One item to add to (or replace in) a database: its decoded signature, the metadata returned
    with every hit, its group ("" = the group of its own, named by its id) and its box ((4,) float32
    xyxy, or None when it has none)."""

    database: str
    item_id: str
    value: Value
    metadata: dict[str, str] = field(default_factory=dict)
    group_id: str = ""
    box: np.ndarray | None = None


@dataclass(frozen=True)
class Deletion:
    """Items of a database to delete, by id and by group (every item of each group)."""

    database: str
    item_ids: tuple[str, ...] = ()
    group_ids: tuple[str, ...] = ()


# What a shard's write-ahead log records, in order: the write path applies each of them.
Operation = Item | Deletion


@dataclass(eq=False)
class Hit:
    """One found item. group_id is "" when the item is its own group; box is (4,) float32 xyxy or
    None when it was added without one."""

    item_id: str
    score: float
    metadata: dict[str, str]
    group_id: str = ""
    box: np.ndarray | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Hit):
            return NotImplemented
        same_box = (self.box is None and other.box is None) or (
            self.box is not None and other.box is not None and np.array_equal(self.box, other.box)
        )
        return same_box and (self.item_id, self.score, self.metadata, self.group_id) == (
            other.item_id,
            other.score,
            other.metadata,
            other.group_id,
        )

    @property
    def group(self) -> str:
        """The group this item counts in for one_per_group (its own id when it has none)."""
        return group_name(self.item_id, self.group_id)


def first_per_group(ranked: list[Hit], top_k: int) -> list[Hit]:
    """The first (best) hit of each group of a best-first list, in order, at most top_k of them."""
    seen: set[str] = set()
    out = []
    for hit in ranked:
        if hit.group not in seen:
            seen.add(hit.group)
            out.append(hit)
            if len(out) == top_k:
                break
    return out


def check_word_counts(bag: BagOfWords) -> None:
    """Raises SignatureError when a word of the bag is counted more than a posting can hold."""
    if int(bag.counts.max(initial=0)) > MAX_WORD_COUNT:
        raise SignatureError(f"a word count above {MAX_WORD_COUNT} does not fit a posting")


def check_value(value: Value) -> None:
    """Raises SignatureError for a value no database would hold, whatever its shape: a vector
    with NaN or infinite values or all zeros, a bag with a word counted above MAX_WORD_COUNT."""
    if isinstance(value, BagOfWords):
        check_word_counts(value)
    else:
        unit_vector(value)


def unit_vector(vector: np.ndarray) -> np.ndarray:
    """(D,) float32 of unit length, in the direction of a (D,) vector; raises SignatureError when
    the vector has NaN or infinite values or is all zeros. The norm is taken in float64: float32
    squares overflow above ~1.8e19 (and underflow below ~1e-23), which made huge vectors zero."""
    if not np.all(np.isfinite(vector)):
        raise SignatureError("signature has NaN or infinite values")
    wide = np.asarray(vector, np.float64)
    norm = float(np.linalg.norm(wide))
    if norm == 0.0:
        raise SignatureError("signature is all zeros: cosine similarity is undefined for it")
    return (wide / norm).astype(np.float32)
