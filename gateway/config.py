"""Gateway configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.config import ServerConfig


def _default_exclusive_groups() -> list[list[str]]:
    # Classes that cannot be the same object: the seed's dress/top/skirt, in COCO terms.
    return [["cup", "bowl", "vase", "wine glass", "bottle"],
            ["chair", "sofa", "bed", "bench", "diningtable"],
            ["tvmonitor", "laptop", "microwave", "oven"],
            ["backpack", "handbag", "suitcase"],
            ["bicycle", "motorbike"],
            ["car", "truck", "bus"]]


@dataclass
class GatewayConfig(ServerConfig):
    """The public VisualSearchService over gRPC (mps.gateway.v1)."""

    port: int = 50050
    detector_address: str = "127.0.0.1:50051"
    signature_address: str = "127.0.0.1:50052"
    # Shard holding every category not routed elsewhere.
    index_address: str = "127.0.0.1:50053"
    # Category -> shard address, for categories kept on their own servers.
    index_routes: dict[str, str] = field(default_factory=dict)
    # Kind searched when a request leaves signature_kind unset: "deep" or "bow".
    default_signature_kind: str = "deep"
    # Every product is indexed with each of these kinds, one database per category and kind
    # ("<category>.<kind>"), so a query may choose either.
    index_kinds: list[str] = field(default_factory=lambda: ["deep", "bow"])
    exclusive_groups: list[list[str]] = field(default_factory=_default_exclusive_groups)
    exclusive_iou: float = 0.5
    # Crops are shrunk to this many pixels on their longest side before signing.
    crop_max_side: int = 512
    max_pixels: int = 50_000_000
    max_top_k: int = 100
    max_regions: int = 64
    # Used when the caller sets no deadline.
    default_timeout_s: float = 30.0
    # Kept back from the caller's deadline when searching, so a late shard yields a flagged
    # partial answer instead of failing the whole query.
    reply_reserve_s: float = 0.1
    # Catalogue images signed per ComputeSignatures call during IndexProducts.
    ingest_batch: int = 16
