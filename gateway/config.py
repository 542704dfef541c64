"""Gateway configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.channels import channel_target, split_addresses
from common.config import ConfigError, ServerConfig

# Signature kinds by name (mps.common.v1.SignatureKind: SIGNATURE_KIND_DEEP, SIGNATURE_KIND_BOW,
# SIGNATURE_KIND_BLCF).
SignatureKind = Literal["deep", "bow", "blcf"]
# The sources that find candidate regions in a photo (gateway.proposals.LOCALISING).
LocalisingSource = Literal["detector", "objectness", "salient", "segment"]


def _default_exclusive_groups() -> list[list[str]]:
    # Classes (or catalogue categories) that cannot be the same object: the seed's dress/top/skirt,
    # in COCO terms.
    return [
        ["cup", "bowl", "vase", "wine glass", "bottle"],
        ["chair", "sofa", "bed", "bench", "diningtable"],
        ["tvmonitor", "laptop", "microwave", "oven"],
        ["backpack", "handbag", "suitcase"],
        ["bicycle", "motorbike"],
        ["car", "truck", "bus"],
    ]


@dataclass
class GatewayConfig(ServerConfig):
    """The public VisualSearchService over gRPC (mps.gateway.v1)."""

    port: int = 50050
    # Every address below may name several replicas of a stateless service: one dns:///name:port
    # resolving to all of them, or IP:port,IP:port. Calls are spread by round_robin over those
    # whose health is SERVING, and reads refused UNAVAILABLE (a replica gone) are retried on
    # another (common.channels.balanced_channel).
    detector_address: str = "127.0.0.1:50051"
    # Detector models asked about every photo, in parallel ("" = the detector service's default
    # model; its ListModels names the others); their detections are merged (one box per object
    # and category, the most confident: item_iou), their class-agnostic boxes too (proposal_iou).
    detector_models: list[str] = field(default_factory=lambda: [""])
    signature_address: str = "127.0.0.1:50052"
    # Shard (or router) holding every category not routed elsewhere. One address: an index
    # shard's replicas take writes through a router (index_server.router), never round_robin.
    index_address: str = "127.0.0.1:50053"
    # Category -> shard address, for categories kept on their own servers.
    index_routes: dict[str, str] = field(default_factory=dict)
    # Kind searched when a request leaves signature_kind unset: "deep", "bow" or "blcf".
    default_signature_kind: SignatureKind = "deep"
    # Every product is indexed with each of these kinds, one database per category and kind
    # ("<category>.<kind>"), so a query may choose any of them. "blcf" (bags of local convolutional
    # features) is indexed only when listed here: each catalogue image is then also signed whole
    # (its assignment map covers the whole photo, so a query's window may find the product
    # anywhere in it).
    index_kinds: list[SignatureKind] = field(default_factory=lambda: ["deep", "bow"])
    # The kind that picks, among a photo's candidate regions, those that are catalogue products
    # and their categories (cheap to compute for every candidate); the requested kind then signs
    # only the chosen items.
    selection_kind: SignatureKind = "deep"

    # -- localisation ------------------------------------------------------------------------------
    # Sources used when a request names none: "detector" (product classes), "objectness"
    # (class-agnostic boxes), "salient" (SCDA), "segment" (selective search ranked by activation).
    default_sources: list[LocalisingSource] = field(
        default_factory=lambda: ["detector", "objectness", "salient", "segment"]
    )
    # Class-agnostic boxes: the detector's objectness threshold and count.
    objectness_threshold: float = 0.005
    max_objects: int = 30
    max_salient: int = 3
    max_segments: int = 30
    # Candidates from different sources overlapping this much are one (the better source's box
    # stays: detector class > objectness > salient > segment).
    proposal_iou: float = 0.7
    # Candidates signed and searched per photo (best of each source first), and items returned.
    max_proposals: int = 48
    max_items: int = 10
    # The decoded photo's longest side (a larger JPEG is decoded at a reduced DCT scale); the
    # detector and the salient-object locator get copies of these sizes.
    decode_max_side: int = 2000
    detector_side: int = 416
    locate_side: int = 640
    # Crops are shrunk to this many pixels on their longest side before signing (the signatures
    # look at 224 px or less).
    crop_max_side: int = 256

    # -- categories and scores ----------------------------------------------------------------------
    # A class-agnostic item takes the category whose best match beats every other category's best
    # by at least this much (selection kind's score); otherwise it is ambiguous.
    category_margin: float = 0.05
    # A class-agnostic candidate is an item only when its best match (selection kind) scores this.
    proposal_min_score: float = 0.6
    # Matches scoring below these are dropped, per kind (see mps.common.v1.SignatureKind), unless a
    # request sets min_score; per-category overrides as {"category": {"deep": 0.7}}. Calibrated on
    # bench/scenes.py (true boxes, 477 objects): deep 0.55 keeps ~96% of right first matches and
    # drops ~30% of wrong ones (0.62: 86% / 86%); bow scores separate less (0.12: 96% / 5%). blcf
    # (tf-idf cosine, or the best window's once spatially re-ranked) starts at 0.05, a floor that
    # only drops items sharing next to no word with the query: not calibrated yet.
    min_score: dict[SignatureKind, float] = field(default_factory=lambda: {"deep": 0.55, "bow": 0.12, "blcf": 0.05})
    category_min_score: dict[str, dict[SignatureKind, float]] = field(default_factory=dict)
    exclusive_groups: list[list[str]] = field(default_factory=_default_exclusive_groups)
    exclusive_iou: float = 0.5
    # Items of one category overlapping this much (IoU) are one product (the better match stays);
    # so are items whose best match is the same product when the smaller box lies this much
    # (intersection over its own area) in the other.
    item_iou: float = 0.5
    same_product_overlap: float = 0.3
    # A class-agnostic item's box is the score-weighted mean of the candidates that found the same
    # product around it, weights exp(sharpness x (score - best)); 0 keeps the best box as it is.
    box_vote_sharpness: float = 20.0
    # Seconds the list of catalogue categories (from the index's Stats) is cached. An index backend
    # that did not answer is listed again as soon as its channel reconnects.
    catalogue_refresh_s: float = 5.0
    # A search waits up to this long for an index backend whose channel is between reconnection
    # attempts (at most 1 s apart), so one that is back answers at once; 0 = fail at once.
    index_ready_wait_s: float = 0.3

    # -- limits -------------------------------------------------------------------------------------
    max_pixels: int = 50_000_000
    max_top_k: int = 100
    max_regions: int = 64
    max_categories: int = 256
    # ComputeSignatures calls are split to stay under these: images per call when the signature
    # service does not advertise its limit (ListKinds' max_images_per_call, used when it does),
    # and bytes per call (its message limit is 32 MiB). The chunks are signed in parallel.
    signature_call_images: int = 32
    signature_call_bytes: int = 8 * 1024 * 1024
    # Products' metadata, as the index shard limits it (checked here so a refused product is refused
    # before anything of it is written): keys per product, UTF-8 bytes per key and per value, and
    # in all (keys and values).
    max_metadata_keys: int = 64
    max_metadata_key_bytes: int = 128
    max_metadata_value_bytes: int = 4096
    max_metadata_bytes: int = 16384
    # product_id and image_id, in UTF-8 bytes (the index item is "<product_id>/<image_id>").
    max_id_bytes: int = 256
    # Product ids per DeleteProducts call.
    max_delete_ids: int = 10_000
    # ListProducts: products per page when the request says 0, and at most (mps.gateway.v1: 100, 1000).
    default_page_size: int = 100
    max_page_size: int = 1000
    # Used when the caller sets no deadline.
    default_timeout_s: float = 30.0
    # Kept back from the caller's deadline when searching, so a late shard yields a flagged
    # partial answer instead of failing the whole query.
    reply_reserve_s: float = 0.25

    # -- ingestion ------------------------------------------------------------------------------------
    # Catalogue images localised and signed per batch during IndexProducts.
    ingest_batch: int = 16
    # Without a box, a catalogue image's product is the detector's most confident box of the
    # product's category; else its salient object on a plain backdrop; else the most object-like
    # box (objectness at least ingest_min_objectness); else the salient object; else the whole
    # image. Salient and object boxes smaller than ingest_min_area of the image are details.
    ingest_min_objectness: float = 0.02
    ingest_min_area: float = 0.05
    # Each catalogue image is kept as a JPEG thumbnail (the whole image, at most thumbnail_side
    # pixels on its longer side, at this JPEG quality) for GetProductImage: clients show matches
    # without reaching the server's files. The index refuses one over its max_thumbnail_bytes
    # (64 KiB by default); 160 px at quality 80 is about 5-10 KB.
    thumbnail_side: int = 160
    thumbnail_quality: int = 80
    # IndexProductsRequest.image_uri, in UTF-8 bytes (mps.gateway.v1: at most 2048).
    max_image_uri_bytes: int = 2048
    # IndexProductsResponse lists at most this many images.
    ingest_report_limit: int = 100_000
    # Images per IndexProducts stream; more is RESOURCE_EXHAUSTED (the images before are stored).
    # An index shard holds a whole Add stream until it ends (at most 20 000 items, one per image
    # and kind), since nothing of a stream is stored unless it ends normally.
    max_images_per_stream: int = 10_000
    # How long the end of an IndexProducts stream waits for a cancel that grpc reports just after
    # it (see gateway/service.py): a cancelled stream must store nothing.
    cancel_settle_s: float = 0.02

    # -- two-stage retrieval (gateway/rerank.py) ---------------------------------------------------
    # The first rerank_k matches of each item are re-scored by local features and geometric
    # verification when a request leaves rerank_k unset (0 = off); a request may ask for up to
    # max_rerank_k. Catalogue images get their local features at ingest (ingest_local_features:
    # described whole here, stored by the index with the thumbnail); images ingested without them
    # are never verified (they keep their first score).
    rerank_k: int = 20
    max_rerank_k: int = 100
    ingest_local_features: bool = True
    # How catalogue images and query crops are described (common.local_features.ExtractorSettings).
    rerank_side: int = 320
    rerank_points: int = 256
    # Fusion (common.local_features.fuse): a candidate with at least rerank_min_inliers RANSAC
    # inliers scores its first score + rerank_weight x n / (n + rerank_half).
    rerank_min_inliers: int = 12
    rerank_weight: float = 0.5
    rerank_half: int = 25

    # -- bags of local convolutional features (SIGNATURE_KIND_BLCF) ----------------------------------
    # A BLCF query is signed by region: the photo goes to the signature service once, shrunk to at
    # most blcf_side pixels on its longer side, with every item's box (the service describes it at
    # a scale where the largest region spans several cells, up to its model's region_max_side:
    # sending more pixels than that adds nothing); a catalogue image is signed whole, at this side
    # too (the service resizes it to its model's long_side).
    blcf_side: int = 896
    # The index re-scores each BLCF item's first spatial_rerank_k candidates by their best window
    # over the catalogue photo's assignment map (mps.index.v1.SpatialRerank) when a request leaves
    # spatial_rerank_k unset (0 = off); a request may ask for up to max_spatial_rerank_k (the index
    # refuses more than its own max_rerank_k, 200 by default). query_expansion: the average query
    # expansion over the first N re-ranked candidates when a request leaves it unset (0 = off).
    spatial_rerank_k: int = 50
    max_spatial_rerank_k: int = 200
    query_expansion: int = 0

    # -- video (StreamMultiProductSearch, gateway/stream.py) ------------------------------------------
    # Run the detector on every Nth processed frame and only track in between (a stream's options
    # may override it); a scene cut is always detected at once.
    video_detection_interval: int = 1
    # Class-agnostic boxes tracked per frame: fewer and surer than a photo's candidates, since each
    # new track costs a search. Detector classes use the model's threshold (video_min_confidence 0).
    video_objectness_threshold: float = 0.3
    video_max_objects: int = 8
    video_min_confidence: float = 0.0
    # SORT tracker: IoU to match a box to a track, frames a lost track is kept, detections before a
    # track gets an id (a track born right after the start or a cut gets one at once).
    video_iou_threshold: float = 0.3
    video_max_age: int = 30
    video_min_hits: int = 2
    # A track already searched is searched again when its box grew by this factor, its crop got this
    # much sharper, or its appearance drifted this far (gateway.video.ReSearch), never twice within
    # video_min_frames_between frames.
    video_growth: float = 1.6
    video_sharper: float = 1.5
    video_drift: float = 0.35
    video_min_frames_between: int = 5
    # Scene cuts (colour histogram distance between consecutive frames) end every track.
    video_cut_detection: bool = True
    # Tracks searched on one frame at most (new tracks first); the others wait for a later frame.
    video_max_searches_per_frame: int = 16
    # A stream's deadline when the caller sets none, and the most one frame's work may take.
    video_stream_timeout_s: float = 3600.0
    video_frame_timeout_s: float = 10.0

    def _check(self) -> None:
        super()._check()
        if not self.detector_models:
            raise ConfigError('detector_models [] is empty: name at least one detector model ("" = its default)')
        repeated = sorted({m for m in self.detector_models if self.detector_models.count(m) > 1})
        if repeated:
            raise ConfigError(f"detector_models names {repeated} more than once: each model is asked once")
        for name in ("detector_address", "signature_address"):
            try:
                channel_target(getattr(self, name))
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None
        for name, address in [("index_address", self.index_address)] + [
            (f"index_routes[{category!r}]", a) for category, a in self.index_routes.items()
        ]:
            if len(split_addresses(address)) != 1:
                raise ConfigError(
                    f"{name} {address!r} is not one address: an index shard's replicas all take every "
                    "write, so put a router (python -m index_server router) in front of them and name it"
                )
        for name in ("default_signature_kind", "selection_kind"):
            if getattr(self, name) not in self.index_kinds:
                raise ConfigError(
                    f"{name} {getattr(self, name)!r} is not one of index_kinds {self.index_kinds}: "
                    "every product is indexed only with those kinds"
                )
        for name in ("objectness_threshold", "ingest_min_objectness", "ingest_min_area"):
            self._within(name, 0, 1)
        for name in ("proposal_iou", "exclusive_iou", "item_iou", "same_product_overlap"):
            self._within(name, 0, 1)
        self._at_least(0, "max_objects", "max_salient", "max_segments", "category_margin", "box_vote_sharpness")
        self._at_least(1, "max_proposals", "max_items", "decode_max_side", "detector_side", "locate_side")
        self._at_least(1, "crop_max_side", "max_pixels", "max_top_k", "max_regions", "max_categories")
        self._at_least(1, "signature_call_images", "signature_call_bytes", "max_id_bytes", "max_delete_ids")
        self._at_least(
            0, "max_metadata_keys", "max_metadata_key_bytes", "max_metadata_value_bytes", "max_metadata_bytes"
        )
        self._at_least(1, "ingest_batch", "max_images_per_stream", "thumbnail_side", "max_image_uri_bytes")
        self._within("thumbnail_quality", 1, 95)
        self._at_least(0, "rerank_k", note="0 = off")
        self._at_least(1, "max_rerank_k", "rerank_min_inliers", "rerank_half")
        if self.rerank_k > self.max_rerank_k:
            raise ConfigError(f"rerank_k {self.rerank_k} is above max_rerank_k {self.max_rerank_k}")
        self._within("rerank_side", 32, 2048)
        self._within("blcf_side", 32, 8192)
        self._at_least(0, "spatial_rerank_k", "query_expansion", note="0 = off")
        self._at_least(1, "max_spatial_rerank_k")
        if self.spatial_rerank_k > self.max_spatial_rerank_k:
            raise ConfigError(
                f"spatial_rerank_k {self.spatial_rerank_k} is above max_spatial_rerank_k "
                f"{self.max_spatial_rerank_k}: lower it, or raise the limit"
            )
        if self.query_expansion > self.spatial_rerank_k:
            raise ConfigError(
                f"query_expansion {self.query_expansion} is above spatial_rerank_k {self.spatial_rerank_k}: "
                "the query is expanded with the best windows of the re-ranked candidates, so expand over "
                "at most spatial_rerank_k of them (or 0 for none)"
            )
        self._within("rerank_points", 1, 512)
        self._at_least(0, "rerank_weight")
        self._at_least(1, "default_page_size", "max_page_size")
        if self.default_page_size > self.max_page_size:
            raise ConfigError(f"default_page_size {self.default_page_size} is above max_page_size {self.max_page_size}")
        self._at_least(0, "ingest_report_limit", "catalogue_refresh_s", "reply_reserve_s", "cancel_settle_s")
        self._at_least(0, "index_ready_wait_s", note="0 = fail at once")
        self._above(0, "default_timeout_s", "video_stream_timeout_s", "video_frame_timeout_s")
        self._within("video_objectness_threshold", 0, 1)
        self._within("video_min_confidence", 0, 1)
        self._within("video_iou_threshold", 0, 1, low_open=True)
        self._at_least(1, "video_detection_interval", "video_min_hits", "video_max_searches_per_frame")
        self._at_least(0, "video_max_objects", "video_max_age", "video_min_frames_between")
        for name in ("video_growth", "video_sharper"):
            if getattr(self, name) <= 1:
                raise ConfigError(f"{name} {getattr(self, name)} must be above 1 (a factor over the last search)")
        if not 0 < self.video_drift <= 2:
            raise ConfigError(f"video_drift {self.video_drift} must be in (0, 2] (1 - correlation of histograms)")
