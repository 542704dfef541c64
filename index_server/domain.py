"""The index's domain values, shared by the shard, its databases and the router (no gRPC, no
storage): what a search finds (`Hit`), how items and groups are named across shards (`item_key`),
which words a word-range shard holds (`word_range_of`), and the error for a signature that does not
fit (`SignatureError`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from common.bow_codec import BagOfWords
from common.errors import InvalidArgument

# A decoded signature: a deep signature's (D,) float32 vector or a bag-of-words signature's bag.
Value = np.ndarray | BagOfWords


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
