"""The index's domain values, shared by the shard, its databases and the router (no gRPC, no
storage): what is stored (`Item`), deleted (`Deletion`) and updated (`Update`), what a search finds
(`Hit`), what a product is beyond its images (`ProductAttributes`) and how a search or a delete
selects products by it (`Filter`), how a BLCF search is re-ranked (`Rerank`), how items and groups
are named across shards (`item_key`), which words a word-range shard holds (`word_range_of`), and
the error for a signature that does not fit (`SignatureError`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from common.blcf_codec import AssignmentMap
from common.bow_codec import BagOfWords
from common.errors import InvalidArgument

# A decoded signature: a deep signature's (D,) float32 vector, a bag-of-words signature's bag or a
# BLCF signature's assignment map.
Value = np.ndarray | BagOfWords | AssignmentMap
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


@dataclass(frozen=True, slots=True)  # slots: a shard may hold millions (one per group)
class ProductAttributes:
    """A group's (product's) attributes (mps.common.v1.ProductAttributes): its taxonomy path
    ("" = none; segments joined by "/"), its tags and its key=value labels (a dict: read-only)."""

    path: str = ""
    tags: frozenset[str] = frozenset()
    labels: Mapping[str, str] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash((self.path, self.tags, tuple(sorted(self.labels.items()))))

    def is_empty(self) -> bool:
        return not (self.path or self.tags or self.labels)


EMPTY_ATTRIBUTES = ProductAttributes()


@dataclass(frozen=True)
class LabelClause:
    """The label `key` has one of `values` (none: has the label at all); `negate` inverts it."""

    key: str
    values: frozenset[str] = frozenset()
    negate: bool = False

    def holds(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        found = value is not None and (not self.values or value in self.values)
        return found != self.negate


@dataclass(frozen=True)
class Filter:
    """A compiled mps.common.v1.Filter: every part that is set must hold (AND); `any_of`, when
    set, needs one of its filters to hold (OR). `matches` is the reference semantics (one product
    at a time); GroupTable.passing answers the same for every group at once."""

    path_prefix: str = ""
    all_tags: frozenset[str] = frozenset()
    any_tags: frozenset[str] = frozenset()
    labels: tuple[LabelClause, ...] = ()
    any_of: tuple[Filter, ...] = ()

    def is_empty(self) -> bool:
        """True when no part is set: the filter keeps everything."""
        return not (self.path_prefix or self.all_tags or self.any_tags or self.labels or self.any_of)

    def matches(self, attributes: ProductAttributes) -> bool:
        if self.path_prefix and not path_under(attributes.path, self.path_prefix):
            return False
        if not self.all_tags <= attributes.tags:
            return False
        if self.any_tags and self.any_tags.isdisjoint(attributes.tags):
            return False
        if not all(clause.holds(attributes.labels) for clause in self.labels):
            return False
        return not self.any_of or any(f.matches(attributes) for f in self.any_of)


def path_under(path: str, prefix: str) -> bool:
    """Whether `path` is `prefix` or lies under it, segment by segment."""
    return path == prefix or path.startswith(prefix + "/")


def path_prefixes(path: str) -> list[str]:
    """Every prefix of a path that a path_prefix filter can name: "a/b/c" -> ["a", "a/b", "a/b/c"]."""
    if not path:
        return []
    segments = path.split("/")
    return ["/".join(segments[: i + 1]) for i in range(len(segments))]


class SignatureError(InvalidArgument, ValueError):
    """A signature does not fit the database (or is malformed); the message says why."""


@dataclass(frozen=True, eq=False)
class Item:
    """One item to add to (or replace in) a database: its decoded signature, the metadata returned
    with every hit, its group ("" = the group of its own, named by its id), its box ((4,) float32
    xyxy, or None when it has none), its group's attributes (None: the group keeps those it has;
    set: they replace the group's), its thumbnail (encoded image bytes, stored on disk, not in
    memory; b"" = none) and its local features (a serialized mps.common.v1.LocalFeatures, checked
    when received, stored on disk beside the thumbnail; b"" = none)."""

    database: str
    item_id: str
    value: Value
    metadata: dict[str, str] = field(default_factory=dict)
    group_id: str = ""
    box: np.ndarray | None = None
    attributes: ProductAttributes | None = None
    thumbnail: bytes = b""
    local_features: bytes = b""

    @property
    def group(self) -> str:
        return group_name(self.item_id, self.group_id)


@dataclass(frozen=True)
class Deletion:
    """Items of a database to delete, by id and by group (every item of each group), and every item
    of the groups that pass `where` (None: no such part; an empty Filter: every group). A shard
    resolves `where` to group_ids before it logs the deletion, so a replay deletes exactly what
    was acknowledged; only a replica catching up (its state stale) logs a `where` as received."""

    database: str
    item_ids: tuple[str, ...] = ()
    group_ids: tuple[str, ...] = ()
    where: Filter | None = None


@dataclass(frozen=True)
class Update:
    """New attributes for groups of a database (each replaces the group's attributes whole); only
    groups that are in the database are logged."""

    database: str
    attributes: Mapping[str, ProductAttributes] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash((self.database, tuple(sorted(self.attributes))))


# What a shard's write-ahead log records, in order: the write path applies each of them.
Operation = Item | Deletion | Update


@dataclass(frozen=True)
class Rerank:
    """Spatial re-ranking of a BLCF search (mps.index.v1.SpatialRerank): the first stage's top
    `top_k` items re-scored by their best window, then (query_expansion N > 0) re-scored again with
    the query averaged with the best windows of the first N. `candidates`: re-score exactly these
    items instead of running a first stage ((n,) uint64 item keys, (n,) float32 their first-stage
    scores: a word-layout router's sums)."""

    top_k: int
    query_expansion: int = 0
    candidates: tuple[np.ndarray, np.ndarray] | None = None


@dataclass(eq=False)
class Hit:
    """One found item. group_id is "" when the item is its own group; box is (4,) float32 xyxy or
    None when it was added without one; attributes are its group's (None where not known, e.g.
    from a shard that does not keep them). A spatially re-ranked item (BLCF) says so (`reranked`),
    with its best window (x_min, y_min, x_max, y_max pixels of the item's image; `score` is that
    window's) and its first-stage score."""

    item_id: str
    score: float
    metadata: dict[str, str]
    group_id: str = ""
    box: np.ndarray | None = None
    attributes: ProductAttributes | None = None
    window: tuple[float, float, float, float] | None = None
    first_stage_score: float | None = None
    reranked: bool = False

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Hit):
            return NotImplemented
        same_box = (self.box is None and other.box is None) or (
            self.box is not None and other.box is not None and np.array_equal(self.box, other.box)
        )
        # No attributes and empty ones are the same answer (a group never given any).
        mine = (self.item_id, self.score, self.metadata, self.group_id, self.attributes or EMPTY_ATTRIBUTES)
        theirs = (other.item_id, other.score, other.metadata, other.group_id, other.attributes or EMPTY_ATTRIBUTES)
        spatial = (self.window, self.first_stage_score, self.reranked) == (
            other.window,
            other.first_stage_score,
            other.reranked,
        )
        return same_box and mine == theirs and spatial

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
    with NaN or infinite values or all zeros, a bag with a word counted above MAX_WORD_COUNT (an
    assignment map, decoded and so checked, has at most 255 x 255 cells: it always fits)."""
    if isinstance(value, BagOfWords):
        check_word_counts(value)
    elif isinstance(value, np.ndarray):
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
