"""Protobuf <-> domain values shared by the shard's servicer, its catalogue and the router."""

from __future__ import annotations

import numpy as np

from common.proto_convert import box_from_proto, box_to_proto
from index_server.domain import Hit
from mps.index.v1 import index_pb2


def box_of(message: index_pb2.AddRequest | index_pb2.ScoredItem | index_pb2.LookedUpItem) -> np.ndarray | None:
    """The message's box as (4,) float32 xyxy, or None when the field is unset."""
    return box_from_proto(message.box) if message.HasField("box") else None


def scored_item(hit: Hit) -> index_pb2.ScoredItem:
    item = index_pb2.ScoredItem(item_id=hit.item_id, score=hit.score, metadata=hit.metadata, group_id=hit.group_id)
    if hit.box is not None:  # unset, not a zero box, when the item has none
        item.box.CopyFrom(box_to_proto(hit.box))
    return item


def looked_up_item(key: int, hit: Hit) -> index_pb2.LookedUpItem:
    item = index_pb2.LookedUpItem(key=key, item_id=hit.item_id, metadata=hit.metadata, group_id=hit.group_id)
    if hit.box is not None:
        item.box.CopyFrom(box_to_proto(hit.box))
    return item


def hit_of(item: index_pb2.ScoredItem | index_pb2.LookedUpItem, score: float | None = None) -> Hit:
    """A shard's item as a Hit; `score` for a looked-up item, which carries none."""
    return Hit(
        item.item_id,
        item.score if score is None else score,  # type: ignore[union-attr]
        dict(item.metadata),
        item.group_id,
        box_of(item),
    )
