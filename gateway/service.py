"""VisualSearchService servicer: protobuf <-> the pipeline's domain objects (gateway/pipeline.py).
Refusals are domain errors (common.errors), raised here or by the pipeline; the server's
interceptor turns them into status codes with their details."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import grpc
import numpy as np

from common.errors import InvalidArgument, ResourceExhausted
from common.names import check_name
from common.proto_convert import box_from_proto, box_to_proto, kind_name
from common.serving import Deadline
from common.streams import client_stream
from common.telemetry import BATCH_SIZE, ContextThreadPoolExecutor
from gateway.backends import KIND_NAMES, KIND_VALUES
from gateway.catalogue import Catalogue, Product
from gateway.config import GatewayConfig
from gateway.crops import valid_box
from gateway.pipeline import CatalogueImage, FoundItem, IndexedImage, Pipeline, SearchOptions, Timings
from gateway.ports import CatalogueMatch, Ports
from gateway.proposals import Source
from gateway.stream import FrameResult, StreamSettings, StreamSummary, TrackedItem, VideoStream
from index_server.convert import after_token, attributes_of, attributes_to_proto, filter_of
from index_server.domain import Filter, ProductAttributes
from mps.common.v1 import common_pb2
from mps.gateway.v1 import gateway_pb2, gateway_pb2_grpc

SOURCES = {
    Source.DETECTOR: gateway_pb2.ITEM_SOURCE_DETECTOR,
    Source.OBJECTNESS: gateway_pb2.ITEM_SOURCE_OBJECTNESS,
    Source.SALIENT: gateway_pb2.ITEM_SOURCE_SALIENT,
    Source.SEGMENT: gateway_pb2.ITEM_SOURCE_SEGMENT,
    Source.WHOLE_IMAGE: gateway_pb2.ITEM_SOURCE_WHOLE_IMAGE,
    Source.USER_REGION: gateway_pb2.ITEM_SOURCE_USER_REGION,
}
SOURCE_OF = {value: source for source, value in SOURCES.items()}
REQUESTABLE = (Source.DETECTOR, Source.OBJECTNESS, Source.SALIENT, Source.SEGMENT)


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


class VisualSearchService(gateway_pb2_grpc.VisualSearchServiceServicer):
    def __init__(self, config: GatewayConfig, backends: Ports):
        self.config = config
        self.backends = backends
        # Downstream calls of all concurrent requests (detector, locator, signature chunks, one
        # search per category) run here.
        self.pool = ContextThreadPoolExecutor(max_workers=8 * config.max_workers, thread_name_prefix="gateway")
        self.pipeline = Pipeline(
            config, backends.detector, backends.locator, backends.signer, backends.index, self.pool
        )
        self.default_kind = KIND_VALUES[config.default_signature_kind]
        self.index_kinds = [KIND_VALUES[name] for name in config.index_kinds]
        self.catalogue = Catalogue(config, backends.index, self.pool, _check_attributes)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.backends.close()

    # --- MultiProductSearch -------------------------------------------------------------------

    def MultiProductSearch(
        self, request: gateway_pb2.MultiProductSearchRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.MultiProductSearchResponse:
        start = time.perf_counter()
        deadline = Deadline.of(context, self.config.default_timeout_s)
        options = self._options(request)
        raw = request.image.raw
        photo = self.pipeline.decode(
            request.image.encoded if request.image.WhichOneof("source") == "encoded" else None,
            (raw.width, raw.height, raw.rgb) if request.image.HasField("raw") else None,
        )
        timings = Timings(decode_ms=_ms(start))
        options.regions = self._regions(request.regions, photo.width, photo.height)
        outcome = self.pipeline.search(photo, options, deadline, timings)
        BATCH_SIZE.labels("gateway", "proposals_per_photo").observe(outcome.proposals)
        BATCH_SIZE.labels("gateway", "items_per_photo").observe(len(outcome.items))
        t = outcome.timings
        return gateway_pb2.MultiProductSearchResponse(
            items=[_item(i) for i in outcome.items],
            image_width=outcome.width,
            image_height=outcome.height,
            proposals=outcome.proposals,
            timings=gateway_pb2.StageTimings(
                decode_ms=t.decode_ms,
                detect_ms=t.detect_ms,
                locate_ms=t.locate_ms,
                sign_ms=t.sign_ms,
                search_ms=t.search_ms,
                rerank_ms=t.rerank_ms,
                total_ms=_ms(start),
            ),
            failed_categories=[
                gateway_pb2.CategoryFailure(category=f.category, code=f.code, reason=f.reason, backend=f.backend)
                for f in outcome.failed
            ],
        )

    def _options(self, request: gateway_pb2.MultiProductSearchRequest) -> SearchOptions:
        config = self.config
        top_k = request.top_k or 10
        if top_k > config.max_top_k:
            raise InvalidArgument(
                f"top_k {top_k} is above the limit of {config.max_top_k}: ask for at most {config.max_top_k}",
                violations=[("top_k", f"{top_k} is above the limit of {config.max_top_k}")],
                quota=[("top_k", f"at most {config.max_top_k} matches per item")],
            )
        if not 0.0 <= request.min_confidence <= 1.0:
            raise InvalidArgument(
                f"min_confidence {request.min_confidence} is outside (0, 1]: set a threshold in "
                "(0, 1], or 0 to keep the model's",
                violations=[("min_confidence", f"{request.min_confidence} is outside (0, 1]")],
            )
        if len(request.regions) > config.max_regions:
            raise ResourceExhausted(
                f"{len(request.regions)} regions; at most {config.max_regions} per query: "
                "split them over several queries",
                quota=[("regions", f"at most {config.max_regions} regions per query")],
            )
        if len(request.categories) > config.max_categories:
            raise ResourceExhausted(
                f"{len(request.categories)} categories; at most {config.max_categories} per "
                "query: name fewer, or none to search every category",
                quota=[("categories", f"at most {config.max_categories} categories per query")],
            )
        for i, category in enumerate(request.categories):
            try:
                check_name("category", category)
            except InvalidArgument as exc:
                raise InvalidArgument(f"categories[{i}]: {exc}", violations=[(f"categories[{i}]", str(exc))]) from None
        kind = request.signature_kind or self.default_kind
        spatial_rerank_k, query_expansion = self._spatial_options(request, kind)
        if kind not in self.index_kinds:
            name = kind_name(kind)
            raise InvalidArgument(
                f"signature_kind {name} is not indexed here; the catalogue is indexed with "
                f"{[common_pb2.SignatureKind.Name(k) for k in self.index_kinds]}: ask for one of those "
                "(a kind is searchable once the gateway's index_kinds lists it and the catalogue is "
                "ingested with it)",
                violations=[("signature_kind", f"{name} is not indexed here")],
            )
        if request.HasField("min_score") and not np.isfinite(request.min_score):
            raise InvalidArgument(
                "min_score must be a finite number (leave it unset for the gateway's default)",
                violations=[("min_score", f"{request.min_score} is not finite")],
            )
        sources = set()
        for i, value in enumerate(request.sources):
            source = SOURCE_OF.get(value)
            if source not in REQUESTABLE:
                name = gateway_pb2.ItemSource.Name(value) if value in gateway_pb2.ItemSource.values() else value
                raise InvalidArgument(
                    f"sources: {name} cannot be asked for; choose among "
                    f"{[gateway_pb2.ItemSource.Name(SOURCES[s]) for s in REQUESTABLE]}",
                    violations=[(f"sources[{i}]", f"{name} cannot be asked for")],
                )
            sources.add(source)
        if request.max_items > config.max_proposals:
            raise InvalidArgument(
                f"max_items {request.max_items} is above the limit of {config.max_proposals} "
                f"(the candidate regions a photo is searched with): ask for at most "
                f"{config.max_proposals}, or 0 for the gateway's default",
                violations=[("max_items", f"{request.max_items} is above the limit of {config.max_proposals}")],
                quota=[("max_items", f"at most {config.max_proposals} items per photo")],
            )
        rerank_k = request.rerank_k if request.HasField("rerank_k") else config.rerank_k
        if rerank_k > config.max_rerank_k:
            raise InvalidArgument(
                f"rerank_k {rerank_k} is above the limit of {config.max_rerank_k}: re-rank at most "
                f"{config.max_rerank_k} candidates per item, or 0 for none",
                violations=[("rerank_k", f"{rerank_k} is above the limit of {config.max_rerank_k}")],
            )
        return SearchOptions(
            KIND_NAMES[kind],
            top_k,
            request.min_confidence,
            (),
            list(request.categories),
            request.min_score if request.HasField("min_score") else None,
            frozenset(sources) or None,
            request.max_items,
            _filter(request),
            rerank_k,
            spatial_rerank_k,
            query_expansion,
        )

    def _spatial_options(self, request: gateway_pb2.MultiProductSearchRequest, kind: int) -> tuple[int, int]:
        """(spatial_rerank_k, query_expansion) of a search of `kind`: the request's, else the
        gateway's defaults, for SIGNATURE_KIND_BLCF; (0, 0) for another kind, which may not set them."""
        config = self.config
        if kind != common_pb2.SIGNATURE_KIND_BLCF:
            for name in ("spatial_rerank_k", "query_expansion"):
                if request.HasField(name):
                    named = kind_name(kind)
                    raise InvalidArgument(
                        f"{name} applies to SIGNATURE_KIND_BLCF only (spatial re-ranking of bags of local "
                        f"convolutional features), not to {named}: leave it unset, or set "
                        "signature_kind SIGNATURE_KIND_BLCF",
                        violations=[(name, f"set with signature_kind {named}")],
                    )
            return 0, 0
        k = request.spatial_rerank_k if request.HasField("spatial_rerank_k") else config.spatial_rerank_k
        if k > config.max_spatial_rerank_k:
            raise InvalidArgument(
                f"spatial_rerank_k {k} is above the limit of {config.max_spatial_rerank_k}: re-rank at most "
                f"{config.max_spatial_rerank_k} candidates per item, or 0 for none",
                violations=[("spatial_rerank_k", f"{k} is above the limit of {config.max_spatial_rerank_k}")],
            )
        # The default expansion never exceeds a smaller spatial_rerank_k the request asked for.
        expansion = request.query_expansion if request.HasField("query_expansion") else min(config.query_expansion, k)
        if expansion > k:
            raise InvalidArgument(
                f"query_expansion {expansion} is above spatial_rerank_k {k}: the query is expanded with "
                f"the best windows of the re-ranked candidates, so expand over at most {k} (or 0 for none)",
                violations=[("query_expansion", f"{expansion} is above spatial_rerank_k {k}")],
            )
        return k, expansion

    @staticmethod
    def _regions(regions, width: int, height: int) -> list[tuple[np.ndarray, str]]:
        out = []
        for i, region in enumerate(regions):
            box = box_from_proto(region.box)
            problem = valid_box(box, width, height)
            if problem:
                raise InvalidArgument(f"regions[{i}].box {problem}", violations=[(f"regions[{i}].box", problem)])
            if region.category:  # empty: every category
                try:
                    check_name("category", region.category)
                except InvalidArgument as exc:
                    raise InvalidArgument(
                        f"regions[{i}].category: {exc}", violations=[(f"regions[{i}].category", str(exc))]
                    ) from None
            out.append((box, region.category))
        return out

    # --- StreamMultiProductSearch ---------------------------------------------------------------

    def StreamMultiProductSearch(
        self,
        request_iterator: Iterator[gateway_pb2.StreamMultiProductSearchRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[gateway_pb2.StreamMultiProductSearchResponse]:
        """The per-stream engine is gateway/stream.py; this only converts."""
        remaining = context.time_remaining()
        seconds = self.config.video_stream_timeout_s if remaining is None or remaining > 1e8 else remaining
        stream = VideoStream(self.config, self.pipeline, self._video_settings, seconds)
        if not context.add_callback(stream.cancel):
            return
        for result in stream.run(request_iterator):
            if isinstance(result, StreamSummary):
                yield gateway_pb2.StreamMultiProductSearchResponse(summary=_video_summary(result))
            else:
                yield _video_result(result)

    def _video_settings(self, options: gateway_pb2.VideoOptions | None) -> StreamSettings:
        """A stream's options, checked as a MultiProductSearch's are."""
        options = options or gateway_pb2.VideoOptions()
        request = gateway_pb2.MultiProductSearchRequest(
            top_k=options.top_k, signature_kind=options.signature_kind, categories=list(options.categories)
        )
        if options.HasField("min_score"):
            request.min_score = options.min_score
        if options.HasField("filter"):
            request.filter.CopyFrom(options.filter)
        try:
            search = self._options(request)
        except InvalidArgument as exc:
            raise exc.reworded(f"options.{exc.message}") from None
        return StreamSettings(
            search, options.detection_interval or self.config.video_detection_interval, options.search_every_frame
        )

    # --- IndexProducts ------------------------------------------------------------------------

    def IndexProducts(
        self, request_iterator: Iterator[gateway_pb2.IndexProductsRequest], context: grpc.ServicerContext
    ) -> gateway_pb2.IndexProductsResponse:
        deadline = Deadline.of(context, self.config.default_timeout_s)
        # The client's cancel (or deadline) is Cancelled, never a normal end (common/streams.py);
        # an IngestError says exactly what was stored before it.
        images = (_catalogue_image(r) for r in client_stream(request_iterator, context, self.config.cancel_settle_s))
        return self._ingest_report(self.pipeline.ingest(images, deadline))

    def _ingest_report(self, indexed: list[IndexedImage]) -> gateway_pb2.IndexProductsResponse:
        per_category = Counter(image.category for image in indexed)
        limit = self.config.ingest_report_limit
        return gateway_pb2.IndexProductsResponse(
            indexed=len(indexed),
            per_category=dict(per_category),
            images_truncated=len(indexed) > limit,
            products=len({image.product_id for image in indexed}),
            images=[
                gateway_pb2.IndexedImage(
                    product_id=i.product_id,
                    image_id=i.image_id,
                    category=i.category,
                    box=box_to_proto(i.box),
                    source=SOURCES[i.source],
                )
                for i in indexed[:limit]
            ],
        )

    # --- DeleteProducts -----------------------------------------------------------------------

    def DeleteProducts(
        self, request: gateway_pb2.DeleteProductsRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.DeleteProductsResponse:
        deadline = Deadline.of(context, self.config.default_timeout_s)
        deleted, not_found = self.pipeline.delete_products(
            list(request.product_ids), list(request.categories), deadline
        )
        return gateway_pb2.DeleteProductsResponse(images_deleted=deleted, not_found=not_found)

    # --- catalogue management (gateway/catalogue.py) --------------------------------------------

    def GetProduct(
        self, request: gateway_pb2.GetProductRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.GetProductResponse:
        deadline = Deadline.of(context, self.config.default_timeout_s)
        product = self.catalogue.get(request.product_id, request.category, deadline)
        return gateway_pb2.GetProductResponse(product=_product(product))

    def ListProducts(
        self, request: gateway_pb2.ListProductsRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.ListProductsResponse:
        deadline = Deadline.of(context, self.config.default_timeout_s)
        after_token(request.page_token)  # the index's own tokens, passed on: refused here, not there
        products, token, total = self.catalogue.products(
            request.category, _filter(request), request.page_size, request.page_token, deadline
        )
        return gateway_pb2.ListProductsResponse(
            products=[_product(p) for p in products], next_page_token=token, total=total
        )

    def UpdateProduct(
        self, request: gateway_pb2.UpdateProductRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.UpdateProductResponse:
        deadline = Deadline.of(context, self.config.default_timeout_s)
        product = self.catalogue.update(
            request.product_id,
            request.category,
            attributes_of(request.attributes, "attributes"),
            list(request.update_mask),
            deadline,
        )
        return gateway_pb2.UpdateProductResponse(product=_product(product))

    def PurgeProducts(
        self, request: gateway_pb2.PurgeProductsRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.PurgeProductsResponse:
        deadline = Deadline.of(context, self.config.default_timeout_s)
        products, images = self.catalogue.purge(request.category, _filter(request), request.force, deadline)
        return gateway_pb2.PurgeProductsResponse(products_deleted=products, images_deleted=images)

    def GetCatalogueStats(
        self, request: gateway_pb2.GetCatalogueStatsRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.GetCatalogueStatsResponse:
        deadline = Deadline.of(context, self.config.default_timeout_s)
        if len(request.categories) > self.config.max_categories:
            raise ResourceExhausted(
                f"{len(request.categories)} categories; at most {self.config.max_categories} per call: "
                "name fewer, or none for every category",
                quota=[("categories", f"at most {self.config.max_categories} categories per call")],
            )
        figures = self.catalogue.stats(list(request.categories), deadline)
        return gateway_pb2.GetCatalogueStatsResponse(
            categories=[
                gateway_pb2.CategoryStats(
                    category=f.category,
                    products=f.products,
                    kinds=[
                        gateway_pb2.KindStats(
                            kind=KIND_VALUES[d.kind],
                            images=d.images,
                            index_type=d.index_type,
                            memory_bytes=d.memory_bytes,
                        )
                        for d in f.databases
                    ],
                )
                for f in figures
            ]
        )

    def GetProductImage(
        self, request: gateway_pb2.GetProductImageRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.GetProductImageResponse:
        deadline = Deadline.of(context, self.config.default_timeout_s)
        thumbnail, uri = self.catalogue.image(request.product_id, request.image_id, request.category, deadline)
        return gateway_pb2.GetProductImageResponse(thumbnail=thumbnail, image_uri=uri)


def _check_attributes(attributes: ProductAttributes, field: str) -> None:
    """InvalidArgument, naming the field, for attributes the index would refuse."""
    attributes_of(attributes_to_proto(attributes), field)


def _filter(
    request: gateway_pb2.MultiProductSearchRequest | gateway_pb2.ListProductsRequest | gateway_pb2.PurgeProductsRequest,
) -> Filter | None:
    """The request's filter, checked (InvalidArgument naming its field); None when unset or empty."""
    return filter_of(request.filter, "filter") if request.HasField("filter") else None


def _catalogue_image(request: gateway_pb2.IndexProductsRequest) -> CatalogueImage:
    image = request.image
    out = CatalogueImage(
        request.product_id,
        request.category,
        request.image_id,
        image.encoded if image.WhichOneof("source") == "encoded" else None,
        (image.raw.width, image.raw.height, image.raw.rgb) if image.HasField("raw") else None,
        box_from_proto(request.box) if request.HasField("box") else None,
        dict(request.metadata),
        image_uri=request.image_uri,
    )
    if request.HasField("attributes"):
        try:
            out.attributes = attributes_of(request.attributes, "attributes")
        except InvalidArgument as exc:
            out.refusal = exc  # refused in its turn (Pipeline.check_image)
    return out


def _product(product: Product) -> gateway_pb2.Product:
    out = gateway_pb2.Product(
        product_id=product.product_id,
        category=product.category,
        attributes=attributes_to_proto(product.attributes),
    )
    for image in product.images:
        message = out.images.add(image_id=image.image_id, metadata=image.metadata, image_uri=image.image_uri)
        if image.box is not None:
            message.box.CopyFrom(box_to_proto(image.box))
    return out


def _match(match: CatalogueMatch) -> gateway_pb2.Match:
    out = gateway_pb2.Match(
        product_id=match.product_id,
        score=match.score,
        metadata=match.metadata,
        image_id=match.image_id,
        attributes=attributes_to_proto(match.attributes),
        image_uri=match.image_uri,
        inliers=match.inliers,
        first_stage_score=match.score if match.first_stage_score is None else match.first_stage_score,
    )
    if match.box is not None:
        out.box.CopyFrom(box_to_proto(match.box))
    if match.window is not None:
        out.window.CopyFrom(box_to_proto(match.window))
    return out


def _item(item: FoundItem) -> gateway_pb2.Item:
    out = gateway_pb2.Item(
        category=item.category,
        class_name=item.class_name,
        confidence=item.confidence,
        box=box_to_proto(item.box),
        matches=[_match(m) for m in item.matches],
        warning=item.warning,
        source=SOURCES[item.source],
        category_margin=item.category_margin,
        reranked=item.reranked,
    )
    if item.degraded is not None:
        out.degraded = True
        out.missing_word_ranges.extend(
            common_pb2.WordRange(first=a, end=b) for a, b in item.degraded.missing_word_ranges
        )
        out.missing_shards.extend(item.degraded.missing_shards)
    return out


def _video_item(item: TrackedItem) -> gateway_pb2.VideoItem:
    return gateway_pb2.VideoItem(
        track_id=item.track_id,
        box=box_to_proto(item.box),
        category=item.category,
        class_name=item.class_name,
        confidence=item.confidence,
        matches=[_match(m) for m in item.matches],
        searched=item.searched,
        last_searched_frame=item.last_searched_frame,
        warning=item.warning,
    )


def _video_result(result: FrameResult) -> gateway_pb2.StreamMultiProductSearchResponse:
    return gateway_pb2.StreamMultiProductSearchResponse(
        frame_number=result.number,
        timestamp_ms=result.timestamp_ms,
        searched=result.searched,
        skipped_frames=result.skipped,
        items=[_video_item(i) for i in result.items],
        detected=result.detected,
        cut=result.cut,
        image_width=result.width,
        image_height=result.height,
        process_ms=result.process_ms,
    )


def _video_summary(summary: StreamSummary) -> gateway_pb2.VideoSummary:
    return gateway_pb2.VideoSummary(
        tracks=[
            gateway_pb2.TrackSummary(
                track_id=t.track_id,
                category=t.category,
                class_name=t.class_name,
                first_frame=t.first_frame,
                last_frame=t.last_frame,
                searches=t.searches,
                best_matches=[_match(m) for m in t.best_matches],
            )
            for t in summary.tracks
        ],
        frames_received=summary.received,
        frames_processed=summary.processed,
        frames_skipped=summary.skipped,
        frames_detected=summary.detected,
        searches=summary.searches,
    )
