"""VisualSearchService servicer: MultiProductSearch and IndexProducts over the backend services."""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, NoReturn

import grpc
import numpy as np

from common.images import ImageError, decode_image
from common.proto_convert import box_from_proto, box_to_proto, image_from_proto, image_to_proto
from common.serving import timeout_from
from gateway.backends import Backends
from gateway.config import GatewayConfig
from gateway.crops import crop, valid_box
from gateway.exclusive import resolve_exclusive
from mps.common.v1 import common_pb2
from mps.detector.v1 import detector_pb2
from mps.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from mps.index.v1 import index_pb2
from mps.signature.v1 import signature_pb2

log = logging.getLogger(__name__)

KINDS = {"deep": common_pb2.SIGNATURE_KIND_DEEP, "bow": common_pb2.SIGNATURE_KIND_BOW}
KIND_NAMES = {value: name for name, value in KINDS.items()}


def database_name(category: str, kind: int) -> str:
    """The index database of one category's products signed with one kind."""
    return f"{category}.{KIND_NAMES[kind]}"


@dataclass
class Candidate:
    """An item to search: a detection or a user-given region."""

    category: str
    class_name: str
    confidence: float
    box: np.ndarray  # (4,) float32 xyxy original pixels
    matches: list[gateway_pb2.Match] = field(default_factory=list)
    warning: str = ""
    # Set from the index's first SearchResponse when part of the category's index did not answer.
    degraded: index_pb2.SearchResponse | None = None


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def _abort_from(context: grpc.ServicerContext, stage: str, error: grpc.RpcError) -> NoReturn:
    """Maps a failed downstream call to the caller's status."""
    code = error.code()
    if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED):
        context.abort(code, f"{stage}: {error.details()}")
    context.abort(grpc.StatusCode.UNAVAILABLE, f"{stage} service failed ({code.name}): {error.details()}")
    raise AssertionError("context.abort returns only by raising")


class VisualSearchService(gateway_pb2_grpc.VisualSearchServiceServicer):
    def __init__(self, config: GatewayConfig, backends: Backends):
        self.config = config
        self.backends = backends
        for name in [config.default_signature_kind, *config.index_kinds]:
            if name not in KINDS:
                raise ValueError(f"signature kind {name!r} in the gateway config is not one of {sorted(KINDS)}")
        if config.default_signature_kind not in config.index_kinds:
            raise ValueError("default_signature_kind must be one of index_kinds")
        self.default_kind = KINDS[config.default_signature_kind]
        self.index_kinds = [KINDS[name] for name in config.index_kinds]
        # Per-category searches of all concurrent queries run here.
        self.pool = ThreadPoolExecutor(max_workers=4 * config.max_workers, thread_name_prefix="search")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.backends.close()

    # --- MultiProductSearch -------------------------------------------------------------------

    def MultiProductSearch(self, request: gateway_pb2.MultiProductSearchRequest,
                           context: grpc.ServicerContext) -> gateway_pb2.MultiProductSearchResponse:
        start = time.perf_counter()
        top_k = request.top_k or 10
        self._validate_search(request, top_k, context)
        kind = request.signature_kind or self.default_kind
        if kind not in self.index_kinds:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"signature_kind {kind} is not indexed here; the catalogue is indexed with "
                          f"{[common_pb2.SignatureKind.Name(k) for k in self.index_kinds]}")
        if request.image.WhichOneof("source") != "encoded":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "image.encoded is required: send the photo's file bytes")
        try:
            image = decode_image(request.image.encoded, self.config.max_pixels)
        except ImageError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        timings = gateway_pb2.StageTimings(decode_ms=_ms(start))

        stage = time.perf_counter()
        if request.regions:
            candidates = self._regions(request.regions, image, context)
        else:
            candidates = self._detect(request, context)
        timings.detect_ms = _ms(stage)

        stage = time.perf_counter()
        signatures = self._sign([crop(image, c.box, self.config.crop_max_side) for c in candidates],
                                kind, context) if candidates else []
        timings.sign_ms = _ms(stage)

        stage = time.perf_counter()
        self._search_all(candidates, signatures, top_k, context)
        timings.search_ms = _ms(stage)
        timings.total_ms = _ms(start)
        return gateway_pb2.MultiProductSearchResponse(
            items=[self._item(c) for c in candidates],
            image_width=image.shape[1], image_height=image.shape[0], timings=timings)

    @staticmethod
    def _item(candidate: Candidate) -> gateway_pb2.Item:
        item = gateway_pb2.Item(category=candidate.category, class_name=candidate.class_name,
                                confidence=candidate.confidence, box=box_to_proto(candidate.box),
                                matches=candidate.matches, warning=candidate.warning)
        if candidate.degraded is not None:
            item.degraded = True
            item.missing_word_ranges.extend(candidate.degraded.missing_word_ranges)
            item.missing_shards.extend(candidate.degraded.missing_shards)
        return item

    def _validate_search(self, request: gateway_pb2.MultiProductSearchRequest, top_k: int,
                         context: grpc.ServicerContext) -> None:
        if top_k > self.config.max_top_k:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"top_k {top_k} is above the limit of {self.config.max_top_k}")
        if not 0.0 <= request.min_confidence <= 1.0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"min_confidence {request.min_confidence} is outside (0, 1]; 0 keeps the model's")
        if len(request.regions) > self.config.max_regions:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{len(request.regions)} regions; at most {self.config.max_regions} per query")

    def _regions(self, regions: list[gateway_pb2.Region], image: np.ndarray,
                 context: grpc.ServicerContext) -> list[Candidate]:
        height, width = image.shape[:2]
        out = []
        for i, region in enumerate(regions):
            box = box_from_proto(region.box)
            problem = valid_box(box, width, height)
            if problem:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"regions[{i}].box {problem}")
            if not region.category:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"regions[{i}].category is required: the catalogue category to search")
            box = np.array([max(box[0], 0), max(box[1], 0), min(box[2], width), min(box[3], height)],
                           dtype=np.float32)
            out.append(Candidate(region.category, "", 1.0, box))
        return out

    def _detect(self, request: gateway_pb2.MultiProductSearchRequest,
                context: grpc.ServicerContext) -> list[Candidate]:
        try:
            response = self.backends.detector.Detect(
                detector_pb2.DetectRequest(image=request.image, min_confidence=request.min_confidence,
                                           products_only=True),
                timeout=timeout_from(context, self.config.default_timeout_s))
        except grpc.RpcError as exc:
            _abort_from(context, "detector", exc)
        found = [Candidate(d.category, d.class_name, d.confidence, box_from_proto(d.box))
                 for d in response.detections]
        if not found:
            return []
        keep = resolve_exclusive(np.stack([c.box for c in found]), np.array([c.confidence for c in found]),
                                 [c.class_name for c in found], self.config.exclusive_groups,
                                 self.config.exclusive_iou)
        return [found[i] for i in keep]

    def _sign(self, crops: list[np.ndarray], kind: int, context: grpc.ServicerContext
              ) -> list[common_pb2.Signature]:
        try:
            response = self.backends.signature.ComputeSignatures(
                signature_pb2.ComputeSignaturesRequest(images=[image_to_proto(c) for c in crops], kind=kind),
                timeout=timeout_from(context, self.config.default_timeout_s))
        except grpc.RpcError as exc:
            _abort_from(context, "signature", exc)
        if len(response.signatures) != len(crops):
            context.abort(grpc.StatusCode.INTERNAL,
                          f"signature service returned {len(response.signatures)} signatures for "
                          f"{len(crops)} images: check that its version matches the gateway's")
        return list(response.signatures)

    def _search_all(self, candidates: list[Candidate], signatures: list[common_pb2.Signature],
                    top_k: int, context: grpc.ServicerContext) -> None:
        """One Search per item, all in parallel; only the detected categories' shards are asked."""
        timeout = timeout_from(context, self.config.default_timeout_s, self.config.reply_reserve_s)
        futures = [self.pool.submit(self._search_one, c, s, top_k, timeout)
                   for c, s in zip(candidates, signatures)]
        for future in futures:
            future.result()

    def _search_one(self, candidate: Candidate, signature: common_pb2.Signature, top_k: int,
                    timeout: float) -> None:
        stub = self.backends.index_for(candidate.category)
        try:
            database = database_name(candidate.category, signature.kind)
            for chunk in stub.Search(index_pb2.SearchRequest(database=database,
                                                             signature=signature, top_k=top_k),
                                     timeout=timeout):
                if chunk.degraded:
                    candidate.degraded = chunk
                    candidate.warning = (f"part of the {candidate.category!r} index did not answer "
                                         f"({chunk.degraded_reason}); matches are exact over the rest")
                candidate.matches.extend(gateway_pb2.Match(product_id=i.item_id, score=i.score,
                                                           metadata=i.metadata) for i in chunk.items)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                candidate.warning = f"no catalogue for category {candidate.category!r} yet"
            else:
                candidate.warning = (f"search in {candidate.category!r} failed ({exc.code().name}): "
                                     f"{exc.details()}; matches may be partial")
                log.warning("search %s: %s", candidate.category, candidate.warning)

    # --- IndexProducts ------------------------------------------------------------------------

    def IndexProducts(self, request_iterator: Iterator[gateway_pb2.IndexProductsRequest],
                      context: grpc.ServicerContext) -> gateway_pb2.IndexProductsResponse:
        per_category: Counter[str] = Counter()
        pending: list[tuple[gateway_pb2.IndexProductsRequest, np.ndarray]] = []

        def flush() -> None:
            if not pending:
                return
            by_shard: dict[int, list[index_pb2.AddRequest]] = defaultdict(list)
            stubs = {}
            for kind in self.index_kinds:
                signatures = self._sign([im for _, im in pending], kind, context)
                for (request, _), signature in zip(pending, signatures):
                    stub = self.backends.index_for(request.category)
                    stubs[id(stub)] = stub
                    by_shard[id(stub)].append(index_pb2.AddRequest(
                        item_id=request.product_id, database=database_name(request.category, kind),
                        signature=signature, metadata=request.metadata))
            for key, adds in by_shard.items():
                try:
                    stubs[key].Add(iter(adds), timeout=timeout_from(context, self.config.default_timeout_s))
                except grpc.RpcError as exc:
                    _abort_from(context, f"index (after {sum(per_category.values())} products indexed)", exc)
            per_category.update(request.category for request, _ in pending)
            pending.clear()

        for position, request in enumerate(request_iterator):
            problem = ""
            if not request.product_id or not request.category:
                problem = "product_id and category are required"
            else:
                try:
                    image = image_from_proto(request.image, self.config.max_pixels)
                except ImageError as exc:
                    problem = str(exc)
            if problem:
                flush()  # everything before the bad product is indexed, and the reply says so
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"product #{position} ({request.product_id!r}): {problem}; the "
                              f"{sum(per_category.values())} products before it were indexed")
            pending.append((request, crop(image, np.array([0, 0, image.shape[1], image.shape[0]]),
                                          self.config.crop_max_side)))
            if len(pending) >= self.config.ingest_batch:
                flush()
        flush()
        return gateway_pb2.IndexProductsResponse(indexed=sum(per_category.values()),
                                                 per_category=dict(per_category))
