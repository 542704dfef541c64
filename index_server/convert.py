"""Protobuf <-> domain values, for the shard's servicer, its log records (index_server.log_codec) and
the router: the one place where index messages become domain values (index_server.domain) and back."""

from __future__ import annotations

import numpy as np

from common.bow_codec import BagOfWords, BowFormatError, decode, encode
from common.limits import check_id, check_metadata
from common.names import check_name
from common.proto_convert import box_from_proto, box_to_proto, dense_from_proto, dense_to_proto
from index_server.domain import Hit, Item, SignatureError, Value, check_value
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
        item.score if score is None else score,  # a LookedUpItem has no score: `score` is given
        dict(item.metadata),
        item.group_id,
        box_of(item),
    )


def signature_value(signature: common_pb2.Signature) -> Value:
    """A deep signature's dense vector or a bag-of-words signature's decoded bag; raises
    SignatureError (or InvalidArgument, from dense_from_proto) when the signature is empty,
    malformed or of an unknown kind."""
    if signature.kind == common_pb2.SIGNATURE_KIND_DEEP:
        vector = dense_from_proto(signature) if signature.WhichOneof("value") == "dense" else None
        if vector is None or not vector.size:
            raise SignatureError("signature is empty: a deep signature carries dense.values_f32le (D float32)")
        return vector
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


def item_of(request: index_pb2.AddRequest, limits: ItemLimits = ItemLimits(), check_database_name: bool = True) -> Item:
    """An Add as an Item, once it is known to be well formed whatever the databases hold (its
    names, ids, metadata, signature and box, within `limits`); raises InvalidArgument saying what
    to fix otherwise. check_database_name=False lets a database stored before names were checked
    be written to. Whether it fits its database is the catalogue's to say."""
    if check_database_name:
        check_name("database", request.database)
    check_id("item_id", request.item_id, limits.max_id_bytes, required=True)
    check_id("group_id", request.group_id, limits.max_id_bytes, required=False)
    check_metadata(request.metadata, limits)
    value = signature_value(request.signature)
    if isinstance(value, BagOfWords):
        if value.vocabulary > limits.max_bow_vocabulary:
            raise SignatureError(
                f"signature uses a {value.vocabulary}-word vocabulary, above the limit of "
                f"{limits.max_bow_vocabulary} words (max_bow_vocabulary)"
            )
    elif value.size > limits.max_dense_dimension:
        raise SignatureError(
            f"signature has {value.size} values, above the limit of "
            f"{limits.max_dense_dimension} dimensions (max_dense_dimension): "
            "reduce the descriptor's dimension"
        )
    check_value(value)  # finite and not all zeros; word counts a posting holds
    box = box_of(request)
    if box is not None and not np.all(np.isfinite(box)):
        raise SignatureError("box has NaN or infinite coordinates")
    return Item(request.database, request.item_id, value, dict(request.metadata), request.group_id, box)


def item_value(
    request: index_pb2.AddRequest, limits: ItemLimits = ItemLimits(), check_database_name: bool = True
) -> Value:
    """The signature value of an Add checked as item_of checks it (the router checks each item with
    it before forwarding)."""
    return item_of(request, limits, check_database_name).value


def stored_item(request: index_pb2.AddRequest) -> Item:
    """An Add as a shard's log stores it, decoded without item_of's checks (it passed them when it
    was received, and a database stored before names were checked keeps its name); raises
    SignatureError (or InvalidArgument) when its signature does not decode."""
    return Item(
        request.database,
        request.item_id,
        signature_value(request.signature),
        dict(request.metadata),
        request.group_id,
        box_of(request),
    )


def add_request(item: Item) -> index_pb2.AddRequest:
    """An Item as the AddRequest that adds it (the inverse of stored_item)."""
    signature = (
        common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BOW, bow=encode(item.value))
        if isinstance(item.value, BagOfWords)
        else dense_to_proto(item.value)
    )
    request = index_pb2.AddRequest(
        database=item.database,
        item_id=item.item_id,
        signature=signature,
        metadata=item.metadata,
        group_id=item.group_id,
    )
    if item.box is not None:
        request.box.CopyFrom(box_to_proto(item.box))
    return request
