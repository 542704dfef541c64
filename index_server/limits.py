"""What one item, one Add stream and one query may hold: the checks a shard and the router share.

No gRPC here: the checks raise common.errors (InvalidArgument for a value outside its documented
range, ResourceExhausted for volume), each naming the limit in a QuotaFailure detail, and the
server's interceptor (common.interceptors) turns them into statuses.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from common.errors import InvalidArgument, ResourceExhausted


@dataclass
class ItemLimits:
    """Bounds on what an Add may store (fields of both IndexConfig and RouterConfig, so flags)."""

    # FAISS reads back no index of 2**20 dimensions or more (the shard would never start again).
    max_dense_dimension: int = 4096
    # The bag-of-words format holds at most 65535 words.
    max_bow_vocabulary: int = 65535
    # Cells of a BLCF item's assignment map: spatial re-ranking slides windows over each candidate's
    # map through integral histograms whose size grows with its cells (the model's 448-pixel
    # photos make at most 28 x 28 = 784), so this bounds a search's memory and time.
    max_blcf_cells: int = 2500
    # item_id and group_id, in UTF-8 bytes.
    max_id_bytes: int = 1024
    # Metadata per item: it is returned with every hit, so it bounds the size of answers.
    max_metadata_keys: int = 64
    max_metadata_key_bytes: int = 128
    max_metadata_value_bytes: int = 4096
    max_metadata_bytes: int = 16384
    # A shard holds a whole Add stream until it ends (it commits all or nothing): this bounds that.
    max_items_per_stream: int = 20_000
    # An item's thumbnail (AddRequest.thumbnail), stored on disk with it: bytes.
    max_thumbnail_bytes: int = 64 << 10
    # An item's local features (AddRequest.local_features), stored on disk with it like the
    # thumbnail: bytes of keypoints and descriptors. The default fits the protocol's most, 512
    # keypoints of 4 + 128 bytes (ORB's 256 keypoints of 4 + 32 bytes take 9 KiB).
    max_local_features_bytes: int = 512 * (4 + 128)


def limits_of(config: ItemLimits) -> ItemLimits:
    """The limits of a configuration that includes them (IndexConfig, RouterConfig), on their own."""
    return ItemLimits(**{f.name: getattr(config, f.name) for f in fields(ItemLimits)})


def check_stream_length(count: int, limits: ItemLimits) -> None:
    """Raises ResourceExhausted once a stream sends more than max_items_per_stream items."""
    if count > limits.max_items_per_stream:
        raise ResourceExhausted(
            f"send at most {limits.max_items_per_stream} items per Add stream; split the "
            "ingest into several streams (nothing of this one was added)",
            quota=[("max_items_per_stream", f"at most {limits.max_items_per_stream} items per Add stream")],
        )


def check_top_k(requested: int, limit: int) -> int:
    """The number of results to return (0 means 10); InvalidArgument above the limit, naming the
    field (BadRequest) and the limit (QuotaFailure)."""
    top_k = requested or 10
    if top_k > limit:
        raise InvalidArgument(
            f"top_k {top_k} is above the limit of {limit}: ask for at most {limit}",
            violations=[("top_k", f"{top_k} is above the limit of {limit}")],
            quota=[("max_top_k", f"at most {limit} results per query")],
        )
    return top_k
