"""Protobuf <-> domain values shared by the shard's servicer, its catalogue and the router."""

from __future__ import annotations

import numpy as np

from common.bow_codec import BagOfWords, BowFormatError, decode
from common.errors import InvalidArgument
from common.limits import check_id, check_metadata
from common.names import check_name
from common.proto_convert import box_from_proto, box_to_proto, dense_from_proto
from index_server.domain import Hit, SignatureError, Value, unit_vector
from index_server.limits import ItemLimits
from mps.common.v1 import common_pb2
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


def signature_value(signature: common_pb2.Signature) -> Value:
    """A deep signature's dense vector or a bag-of-words signature's decoded bag; raises
    SignatureError when the signature is empty, malformed or of an unknown kind."""
    if signature.kind == common_pb2.SIGNATURE_KIND_DEEP:
        if signature.WhichOneof("value") != "dense" or not signature.dense.values:
            raise SignatureError("signature is empty: a deep signature carries dense.values")
        return dense_from_proto(signature)
    if signature.kind == common_pb2.SIGNATURE_KIND_BOW:
        if signature.WhichOneof("value") != "bow" or not signature.bow:
            raise SignatureError("signature is empty: a bag-of-words signature carries bow bytes")
        try:
            return decode(signature.bow)
        except BowFormatError as exc:
            raise SignatureError(f"bag-of-words signature: {exc}") from None
    if signature.kind == common_pb2.SIGNATURE_KIND_UNSPECIFIED:
        raise SignatureError("signature kind is unspecified: set SIGNATURE_KIND_DEEP or SIGNATURE_KIND_BOW")
    raise SignatureError(f"signature kind {signature.kind} is unknown")


def item_value(
    request: index_pb2.AddRequest, limits: ItemLimits = ItemLimits(), check_database_name: bool = True
) -> Value:
    """An Add's signature value, once the item is known to be well formed whatever the databases
    hold (its names, ids, metadata, signature and box, within `limits`); raises InvalidArgument
    saying what to fix otherwise. The router checks with it too, before forwarding.
    check_database_name=False lets a database stored before names were checked be written to."""
    if check_database_name:
        check_name("database", request.database)
    check_id("item_id", request.item_id, limits.max_id_bytes, required=True)
    check_id("group_id", request.group_id, limits.max_id_bytes, required=False)
    check_metadata(request.metadata, limits)
    try:
        value = signature_value(request.signature)
        if isinstance(value, BagOfWords):
            if value.vocabulary > limits.max_bow_vocabulary:
                raise SignatureError(
                    f"signature uses a {value.vocabulary}-word vocabulary, above the limit of "
                    f"{limits.max_bow_vocabulary} words (max_bow_vocabulary)"
                )
        else:
            if value.size > limits.max_dense_dimension:
                raise SignatureError(
                    f"signature has {value.size} values, above the limit of "
                    f"{limits.max_dense_dimension} dimensions (max_dense_dimension): "
                    "reduce the descriptor's dimension"
                )
            unit_vector(value)  # finite and not all zeros
        box = box_of(request)
        if box is not None and not np.all(np.isfinite(box)):
            raise SignatureError("box has NaN or infinite coordinates")
    except SignatureError as exc:
        raise InvalidArgument(str(exc)) from None
    return value
