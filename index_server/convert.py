"""Protobuf <-> domain values, for the shard's servicer, its log records (index_server.log_codec) and
the router: the one place where index messages become domain values (index_server.domain) and back."""

from __future__ import annotations

import base64

import numpy as np

from common import blcf_codec
from common.blcf_codec import AssignmentMap, BlcfFormatError
from common.bow_codec import BagOfWords, BowFormatError, decode, encode
from common.errors import InvalidArgument, ResourceExhausted, quote
from common.limits import check_id, check_metadata
from common.local_features import LocalFeaturesError, from_proto
from common.names import check_name
from common.proto_convert import box_from_proto, box_to_proto, dense_from_proto, dense_to_proto
from index_server.domain import (
    EMPTY_ATTRIBUTES,
    Filter,
    Hit,
    Item,
    LabelClause,
    ProductAttributes,
    Rerank,
    SignatureError,
    Value,
    check_value,
)
from index_server.limits import ItemLimits
from mps.common.v1 import common_pb2
from mps.index.v1 import index_pb2


def box_of(message: index_pb2.AddRequest | index_pb2.ScoredItem | index_pb2.LookedUpItem) -> np.ndarray | None:
    """The message's box as (4,) float32 xyxy, or None when the field is unset."""
    return box_from_proto(message.box) if message.HasField("box") else None


# -- attributes and filters (mps.common.v1.ProductAttributes, Filter: limits in their comments) ------

MAX_PATH_BYTES = 256
MAX_TAGS = 64
MAX_LABELS = 64
# Levels of any_of under the top filter, and tags + values + clauses in a whole filter.
MAX_FILTER_DEPTH = 4
MAX_FILTER_TERMS = 256


def _bad(field: str, problem: str) -> InvalidArgument:
    return InvalidArgument(f"{field} {problem}", violations=[(field, problem)])


def _check_term(field: str, kind: str, value: str) -> None:
    """A tag, label key or label value: the rules of names (common.names), the field named."""
    try:
        check_name(kind, value)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{field}: {exc.message}", violations=[(field, exc.message)]) from None


def _check_path(field: str, path: str) -> None:
    """A taxonomy path: at most MAX_PATH_BYTES, "/"-separated non-empty segments, each a name."""
    size = len(path.encode("utf-8", "surrogatepass"))
    if size > MAX_PATH_BYTES:
        raise _bad(field, f"{quote(path)} is {size} UTF-8 bytes, above the limit of {MAX_PATH_BYTES}")
    for position, segment in enumerate(path.split("/")):
        if not segment:
            raise _bad(
                field,
                f"{quote(path)} has an empty segment (#{position}): segments are separated by single "
                '"/", with no "/" at either end, e.g. "fashion/tops/shirt"',
            )
        _check_term(field, "path segment", segment)


def attributes_of(message: common_pb2.ProductAttributes, field: str = "attributes") -> ProductAttributes:
    """A message's attributes, checked (InvalidArgument naming the field otherwise)."""
    if message.path:
        _check_path(f"{field}.path", message.path)
    if len(message.tags) > MAX_TAGS:
        raise _bad(f"{field}.tags", f"has {len(message.tags)} tags, above the limit of {MAX_TAGS}")
    for i, tag in enumerate(message.tags):
        _check_term(f"{field}.tags[{i}]", "tag", tag)
    if len(message.labels) > MAX_LABELS:
        raise _bad(f"{field}.labels", f"has {len(message.labels)} labels, above the limit of {MAX_LABELS}")
    for key, value in message.labels.items():
        _check_term(f"{field}.labels[{quote(key)}] key", "label key", key)
        _check_term(f"{field}.labels[{quote(key)}]", "label value", value)
    return stored_attributes(message)


def stored_attributes(message: common_pb2.ProductAttributes) -> ProductAttributes:
    """A message's attributes without checks (as logged: they passed attributes_of when received)."""
    if not (message.path or message.tags or message.labels):
        return EMPTY_ATTRIBUTES
    return ProductAttributes(message.path, frozenset(message.tags), dict(message.labels))


def attributes_to_proto(attributes: ProductAttributes) -> common_pb2.ProductAttributes:
    return common_pb2.ProductAttributes(
        path=attributes.path, tags=sorted(attributes.tags), labels=dict(attributes.labels)
    )


def filter_of(message: common_pb2.Filter, field: str = "filter") -> Filter | None:
    """A message's filter, checked (InvalidArgument naming the field otherwise); None when it is
    empty (it keeps everything)."""
    counted = [0]
    compiled = _filter(message, field, 0, counted)
    return None if compiled.is_empty() else compiled


def _filter(message: common_pb2.Filter, field: str, depth: int, counted: list[int]) -> Filter:
    counted[0] += len(message.all_tags) + len(message.any_tags) + len(message.labels)
    counted[0] += sum(len(clause.values) for clause in message.labels)
    if counted[0] > MAX_FILTER_TERMS:
        raise _bad(
            field,
            f"holds more than {MAX_FILTER_TERMS} tags, label values and label clauses in all (the "
            "limit): narrow it with a path_prefix or split the request",
        )
    if message.path_prefix:
        _check_path(f"{field}.path_prefix", message.path_prefix)
    for name in ("all_tags", "any_tags"):
        for i, tag in enumerate(getattr(message, name)):
            _check_term(f"{field}.{name}[{i}]", "tag", tag)
    clauses = []
    for i, clause in enumerate(message.labels):
        _check_term(f"{field}.labels[{i}].key", "label key", clause.key)
        for j, value in enumerate(clause.values):
            _check_term(f"{field}.labels[{i}].values[{j}]", "label value", value)
        clauses.append(LabelClause(clause.key, frozenset(clause.values), clause.negate))
    if message.any_of and depth >= MAX_FILTER_DEPTH:
        raise _bad(f"{field}.any_of", f"nests any_of deeper than {MAX_FILTER_DEPTH} levels (the limit)")
    return Filter(
        message.path_prefix,
        frozenset(message.all_tags),
        frozenset(message.any_tags),
        tuple(clauses),
        tuple(_filter(part, f"{field}.any_of[{i}]", depth + 1, counted) for i, part in enumerate(message.any_of)),
    )


def stored_filter(message: common_pb2.Filter) -> Filter:
    """A message's filter without checks (as logged: it passed filter_of when received); an empty
    one keeps everything."""
    return Filter(
        message.path_prefix,
        frozenset(message.all_tags),
        frozenset(message.any_tags),
        tuple(LabelClause(c.key, frozenset(c.values), c.negate) for c in message.labels),
        tuple(stored_filter(part) for part in message.any_of),
    )


def filter_to_proto(filter: Filter | None) -> common_pb2.Filter:
    if filter is None:
        return common_pb2.Filter()
    return common_pb2.Filter(
        path_prefix=filter.path_prefix,
        all_tags=sorted(filter.all_tags),
        any_tags=sorted(filter.any_tags),
        labels=[common_pb2.LabelClause(key=c.key, values=sorted(c.values), negate=c.negate) for c in filter.labels],
        any_of=[filter_to_proto(part) for part in filter.any_of],
    )


def request_filter(
    request: index_pb2.SearchRequest | index_pb2.SearchBatchRequest | index_pb2.PartialScoresRequest,
) -> Filter | None:
    """A read request's filter, checked; None when it has none (or an empty one)."""
    return filter_of(request.filter) if request.HasField("filter") else None


# -- ListGroups paging -----------------------------------------------------------------------------

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


def page_size_of(requested: int) -> int:
    """ListGroups' page size (0 means DEFAULT_PAGE_SIZE); InvalidArgument above MAX_PAGE_SIZE."""
    page_size = requested or DEFAULT_PAGE_SIZE
    if page_size > MAX_PAGE_SIZE:
        raise _bad("page_size", f"{page_size} is above the limit of {MAX_PAGE_SIZE} groups per page")
    return page_size


def page_token(last_group_id: str) -> str:
    """The next_page_token of a page that ends with this group ("" for none: the last page). Opaque
    to clients; it names the last group id returned (base64url), so a router can merge shards."""
    if not last_group_id:
        return ""
    return base64.urlsafe_b64encode(last_group_id.encode("utf-8", "surrogatepass")).decode().rstrip("=")


def after_token(token: str) -> str:
    """The last group id of the previous page named by a page_token ("" for the first page);
    InvalidArgument for a token no page gave."""
    if not token:
        return ""
    try:
        after = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        if not after:
            raise ValueError("empty")
        return after.decode("utf-8", "surrogatepass")
    except (ValueError, UnicodeDecodeError):
        raise _bad("page_token", "is not a token a ListGroups page gave: send next_page_token as received") from None


# -- items ------------------------------------------------------------------------------------------


def scored_item(hit: Hit) -> index_pb2.ScoredItem:
    item = index_pb2.ScoredItem(item_id=hit.item_id, score=hit.score, metadata=hit.metadata, group_id=hit.group_id)
    if hit.box is not None:  # unset, not a zero box, when the item has none
        item.box.CopyFrom(box_to_proto(hit.box))
    if hit.attributes is not None and not hit.attributes.is_empty():
        item.attributes.CopyFrom(attributes_to_proto(hit.attributes))
    if hit.reranked:
        item.reranked = True
        if hit.window is not None:
            item.window.CopyFrom(box_to_proto(np.asarray(hit.window)))
        if hit.first_stage_score is not None:
            item.first_stage_score = hit.first_stage_score
    return item


def looked_up_item(key: int, hit: Hit) -> index_pb2.LookedUpItem:
    item = index_pb2.LookedUpItem(key=key, item_id=hit.item_id, metadata=hit.metadata, group_id=hit.group_id)
    if hit.box is not None:
        item.box.CopyFrom(box_to_proto(hit.box))
    if hit.attributes is not None and not hit.attributes.is_empty():
        item.attributes.CopyFrom(attributes_to_proto(hit.attributes))
    return item


def hit_of(item: index_pb2.ScoredItem | index_pb2.LookedUpItem, score: float | None = None) -> Hit:
    """A shard's item as a Hit; `score` for a looked-up item, which carries none."""
    hit = Hit(
        item.item_id,
        item.score if score is None else score,  # a LookedUpItem has no score: `score` is given
        dict(item.metadata),
        item.group_id,
        box_of(item),
        stored_attributes(item.attributes),
    )
    if isinstance(item, index_pb2.ScoredItem) and item.reranked:
        hit.reranked = True
        hit.first_stage_score = item.first_stage_score
        if item.HasField("window"):
            window = item.window
            hit.window = (window.x_min, window.y_min, window.x_max, window.y_max)
    return hit


def spatial_rerank_of(
    message: index_pb2.SpatialRerank, max_rerank_k: int, in_batch: bool = False, field: str = "spatial_rerank"
) -> Rerank | None:
    """A request's spatial re-ranking, checked (InvalidArgument naming the field otherwise); None
    when it asks for none (unset, or all zero)."""
    if message.top_k == 0 and not (message.query_expansion or message.candidate_keys or message.candidate_scores):
        return None
    if message.top_k > max_rerank_k:
        problem = f"{message.top_k} is above the limit of {max_rerank_k}: re-rank at most {max_rerank_k} items"
        raise InvalidArgument(
            f"{field}.top_k {problem}",
            violations=[(f"{field}.top_k", problem)],
            quota=[("max_rerank_k", f"at most {max_rerank_k} items re-ranked per query")],
        )
    if message.query_expansion > message.top_k:
        raise _bad(
            f"{field}.query_expansion",
            f"{message.query_expansion} is above {field}.top_k {message.top_k}: the query is expanded "
            "with the best windows of re-ranked items, so at most top_k of them",
        )
    if in_batch and (message.candidate_keys or message.candidate_scores):
        raise _bad(
            f"{field}.candidate_keys",
            "are not allowed in a SearchBatch (they name one query's candidates): send a Search per query",
        )
    if len(message.candidate_keys) != len(message.candidate_scores):
        raise _bad(
            f"{field}.candidate_scores",
            f"holds {len(message.candidate_scores)} scores for {len(message.candidate_keys)} candidate_keys: "
            "give one first-stage score per key",
        )
    candidates = None
    if message.candidate_keys:
        if len(message.candidate_keys) > message.top_k:
            raise _bad(
                f"{field}.candidate_keys",
                f"holds {len(message.candidate_keys)} keys, more than {field}.top_k {message.top_k}: "
                "every candidate is re-ranked, so top_k must count them all",
            )
        scores = np.fromiter(message.candidate_scores, np.float32, len(message.candidate_scores))
        if not np.all(np.isfinite(scores)):
            raise _bad(f"{field}.candidate_scores", "holds NaN or infinite scores: send the first-stage scores")
        candidates = (np.fromiter(message.candidate_keys, np.uint64, len(message.candidate_keys)), scores)
    return Rerank(message.top_k, message.query_expansion, candidates)


def signature_value(signature: common_pb2.Signature) -> Value:
    """A deep signature's dense vector, a bag-of-words signature's decoded bag or a BLCF
    signature's assignment map; raises SignatureError (or InvalidArgument, from dense_from_proto)
    when the signature is empty, malformed or of an unknown kind."""
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
    if signature.kind == common_pb2.SIGNATURE_KIND_BLCF:
        if signature.WhichOneof("value") != "blcf" or not signature.blcf:
            raise SignatureError("signature is empty: a BLCF signature carries blcf bytes (an assignment map)")
        try:
            return blcf_codec.decode(signature.blcf)
        except BlcfFormatError as exc:
            raise SignatureError(f"BLCF signature: {exc}") from None
    if signature.kind == common_pb2.SIGNATURE_KIND_UNSPECIFIED:
        raise SignatureError(
            "signature kind is unspecified: set SIGNATURE_KIND_DEEP, SIGNATURE_KIND_BOW or SIGNATURE_KIND_BLCF"
        )
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
    if isinstance(value, BagOfWords | AssignmentMap):
        if value.vocabulary > limits.max_bow_vocabulary:
            raise SignatureError(
                f"signature uses a {value.vocabulary}-word vocabulary, above the limit of "
                f"{limits.max_bow_vocabulary} words (max_bow_vocabulary)"
            )
    elif isinstance(value, np.ndarray) and value.size > limits.max_dense_dimension:
        raise SignatureError(
            f"signature has {value.size} values, above the limit of "
            f"{limits.max_dense_dimension} dimensions (max_dense_dimension): "
            "reduce the descriptor's dimension"
        )
    if isinstance(value, AssignmentMap) and value.rows * value.columns > limits.max_blcf_cells:
        raise SignatureError(
            f"signature's map has {value.rows}x{value.columns} = {value.rows * value.columns} cells, above the "
            f"limit of {limits.max_blcf_cells} (max_blcf_cells): describe the catalogue photo at a smaller size"
        )
    if isinstance(value, AssignmentMap) and value.levels > 1:
        raise InvalidArgument(
            f"signature holds a pyramid of {value.levels} maps (a query by region); an item is the one map "
            "of its whole image: sign it without regions"
        )
    check_value(value)  # finite and not all zeros; word counts a posting holds
    box = box_of(request)
    if box is not None and not np.all(np.isfinite(box)):
        raise SignatureError("box has NaN or infinite coordinates")
    attributes = attributes_of(request.attributes) if request.HasField("attributes") else None
    check_thumbnail(len(request.thumbnail), limits)
    return Item(
        request.database,
        request.item_id,
        value,
        dict(request.metadata),
        request.group_id,
        box,
        attributes,
        request.thumbnail,
        checked_local_features(request, limits),
    )


def checked_local_features(request: index_pb2.AddRequest, limits: ItemLimits) -> bytes:
    """An Add's local features as the shard stores them (serialized; b"" when unset), once they are
    well formed (common.local_features.from_proto: InvalidArgument naming the field at fault) and
    within max_local_features_bytes (ResourceExhausted)."""
    if not request.HasField("local_features"):
        return b""
    message = request.local_features
    size = len(message.points_u16le) + len(message.descriptors)
    if size > limits.max_local_features_bytes:
        raise ResourceExhausted(
            f"local_features hold {size} bytes of keypoints and descriptors, above the limit of "
            f"{limits.max_local_features_bytes}: keep fewer keypoints (e.g. 256 ORB keypoints take 9216 bytes)",
            quota=[
                (
                    "max_local_features_bytes",
                    f"local features of at most {limits.max_local_features_bytes} bytes",
                )
            ],
        )
    try:
        from_proto(message)
    except LocalFeaturesError as exc:
        problem = str(exc)
        field = problem.split()[0] if problem.startswith("local_features") else "local_features"
        raise InvalidArgument(problem, violations=[(field, problem)]) from None
    return message.SerializeToString()


def check_thumbnail(size: int, limits: ItemLimits) -> None:
    """ResourceExhausted for a thumbnail above max_thumbnail_bytes."""
    if size > limits.max_thumbnail_bytes:
        raise ResourceExhausted(
            f"thumbnail is {size} bytes, above the limit of {limits.max_thumbnail_bytes}: store a "
            "smaller image (a thumbnail, e.g. 256 pixels on its long side, JPEG)",
            quota=[("max_thumbnail_bytes", f"thumbnails of at most {limits.max_thumbnail_bytes} bytes")],
        )


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
        stored_attributes(request.attributes) if request.HasField("attributes") else None,
        request.thumbnail,
        request.local_features.SerializeToString() if request.HasField("local_features") else b"",
    )


def signature_of(value: Value) -> common_pb2.Signature:
    """A decoded signature as the message that carries it (the inverse of signature_value)."""
    if isinstance(value, BagOfWords):
        return common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BOW, bow=encode(value))
    if isinstance(value, AssignmentMap):
        return common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BLCF, blcf=blcf_codec.encode(value))
    return dense_to_proto(value)


def add_request(item: Item) -> index_pb2.AddRequest:
    """An Item as the AddRequest that adds it (the inverse of stored_item)."""
    signature = signature_of(item.value)
    request = index_pb2.AddRequest(
        database=item.database,
        item_id=item.item_id,
        signature=signature,
        metadata=item.metadata,
        group_id=item.group_id,
    )
    if item.box is not None:
        request.box.CopyFrom(box_to_proto(item.box))
    if item.attributes is not None:
        request.attributes.CopyFrom(attributes_to_proto(item.attributes))
    request.thumbnail = item.thumbnail
    if item.local_features:
        request.local_features.ParseFromString(item.local_features)
    return request
