"""Typed Python client for the gateway: a thin, hinted wrapper over the generated stubs.

with VisualSearchClient("127.0.0.1:50050") as client:
    result = client.search(Path("photo.jpg").read_bytes(), top_k=5)
    for item in result.items:
        print(item.category, item.confidence, [m.product_id for m in item.matches])

Filters (search, stream, list_products, purge_products) are an mps.common.v1.Filter or text in the
command line's syntax (gateway/filter_text.py): client.search(photo, filter="brand=acme,in_stock=true").

A refused call raises grpc.RpcError (its code and a message that says what to fix);
common.status.details_of(error) reads its google.rpc details: the fields at fault, the limits
exceeded, and, for an IndexProducts stream refused part-way, how many images were stored
(info["stored_images"]) and which request was refused (info["refused_request"]).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

import grpc
import numpy as np

from common.channels import OutgoingMetadata
from common.serving import channel_options
from gateway.filter_text import parse_filter
from mps.common.v1 import common_pb2
from mps.gateway.v1 import gateway_pb2, gateway_pb2_grpc

Box = tuple[float, float, float, float]  # x_min, y_min, x_max, y_max in pixels


@dataclass(frozen=True)
class Attributes:
    """A product's attributes (mps.common.v1.ProductAttributes): taxonomy path, tags, labels."""

    path: str = ""
    tags: Sequence[str] = ()
    labels: Mapping[str, str] = field(default_factory=dict)

    def to_proto(self) -> common_pb2.ProductAttributes:
        return common_pb2.ProductAttributes(path=self.path, tags=list(self.tags), labels=dict(self.labels))


FilterLike = common_pb2.Filter | str | None


def to_filter(spec: FilterLike) -> common_pb2.Filter | None:
    """A Filter, or filter text (gateway/filter_text.py's syntax), as a message; None for none."""
    if spec is None or isinstance(spec, common_pb2.Filter):
        return spec
    return parse_filter(spec) if spec.strip() else None


@dataclass(frozen=True)
class Product:
    """One catalogue image to index (a product may have several: give each its image_id)."""

    product_id: str
    category: str
    image: bytes | np.ndarray  # encoded file bytes, or (H, W, 3) uint8 RGB pixels
    metadata: Mapping[str, str] = field(default_factory=dict)
    # Empty: derived from the image's content (re-sending the same image replaces it).
    image_id: str = ""
    # Where the product is in the image; None lets the gateway localise it.
    box: Box | None = None
    # The product's attributes (the latest set wins for the whole product); None keeps its own.
    attributes: Attributes | None = None
    # Where the caller keeps the image (https://, gs://...), returned with its matches.
    image_uri: str = ""


def to_image(image: bytes | np.ndarray) -> common_pb2.Image:
    """Encoded bytes as they are, or an (H, W, 3) uint8 RGB array as raw pixels."""
    if isinstance(image, (bytes, bytearray)):
        return common_pb2.Image(encoded=bytes(image))
    rgb = np.ascontiguousarray(image, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"pixels must be (H, W, 3) RGB, got {rgb.shape}")
    return common_pb2.Image(raw=common_pb2.RawImage(width=rgb.shape[1], height=rgb.shape[0], rgb=rgb.tobytes()))


def to_box(box: Box) -> common_pb2.Box:
    return common_pb2.Box(x_min=box[0], y_min=box[1], x_max=box[2], y_max=box[3])


class VisualSearchClient:
    def __init__(
        self,
        address: str,
        timeout_s: float = 30.0,
        max_message_bytes: int = 32 * 1024 * 1024,
        token: str = "",
        tls_ca: bytes | None = None,
        request_id: str = "",
    ):
        """`token`: the gateway's client token (sent as `authorization: Bearer`); `tls_ca`: the PEM
        of the CA that signed the gateway's certificate (None = plaintext); `request_id`: sent as
        `x-request-id` on every call (the gateway makes one otherwise and logs it everywhere)."""
        options = channel_options(max_message_bytes)
        channel = (
            grpc.secure_channel(address, grpc.ssl_channel_credentials(tls_ca), options=options)
            if tls_ca is not None
            else grpc.insecure_channel(address, options=options)
        )
        self._channel = grpc.intercept_channel(channel, OutgoingMetadata(token, lambda: request_id))
        self._stub = gateway_pb2_grpc.VisualSearchServiceStub(self._channel)
        self.timeout_s = timeout_s

    def __enter__(self) -> VisualSearchClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        grpc.channel_ready_future(self._channel).result(timeout=timeout_s)

    def search(
        self,
        image: bytes | np.ndarray,
        top_k: int = 10,
        min_confidence: float = 0.0,
        regions: Sequence[tuple[Box, str]] = (),
        signature_kind: int = common_pb2.SIGNATURE_KIND_UNSPECIFIED,
        categories: Sequence[str] = (),
        min_score: float | None = None,
        sources: Sequence[int] = (),
        max_items: int = 0,
        timeout_s: float | None = None,
        filter: FilterLike = None,
        rerank_k: int | None = None,
        spatial_rerank_k: int | None = None,
        query_expansion: int | None = None,
    ) -> gateway_pb2.MultiProductSearchResponse:
        """Every product in `image` (encoded bytes or RGB pixels) with its top_k catalogue products.

        `regions`: optional (box, category) pairs searched instead of localising (category "" =
        the catalogue decides); `categories` restricts the search; `min_score` drops weaker
        matches; `sources` (mps.gateway.v1.ItemSource values) picks the localisation sources;
        `filter` keeps only the products that pass it (applied inside the index); `rerank_k`
        re-ranks each item's first k matches by local features (None = the gateway's default, 0 = off);
        with signature_kind SIGNATURE_KIND_BLCF, `spatial_rerank_k` re-ranks each item's first k
        matches by their best window in the catalogue photo (Match.window) and `query_expansion`
        expands the query over the first n of them (None = the gateway's defaults, 0 = off).
        """
        # The generated enums are plain ints at runtime: any int is sent, the gateway refuses one it
        # does not know (INVALID_ARGUMENT naming the field).
        request = gateway_pb2.MultiProductSearchRequest(
            image=to_image(image),
            top_k=top_k,
            min_confidence=min_confidence,
            signature_kind=cast(common_pb2.SignatureKind, signature_kind),
            regions=[gateway_pb2.Region(box=to_box(b), category=category) for b, category in regions],
            categories=list(categories),
            sources=[cast(gateway_pb2.ItemSource, source) for source in sources],
            max_items=max_items,
        )
        if min_score is not None:
            request.min_score = min_score
        if rerank_k is not None:
            request.rerank_k = rerank_k
        if spatial_rerank_k is not None:
            request.spatial_rerank_k = spatial_rerank_k
        if query_expansion is not None:
            request.query_expansion = query_expansion
        spec = to_filter(filter)
        if spec is not None:
            request.filter.CopyFrom(spec)
        return self._stub.MultiProductSearch(request, timeout=timeout_s or self.timeout_s)

    def index_products(
        self, products: Iterable[Product], timeout_s: float | None = None
    ) -> gateway_pb2.IndexProductsResponse:
        """Streams catalogue images in; returns how many were indexed per category and, per image,
        the region that was signed."""

        def requests():
            for p in products:
                request = gateway_pb2.IndexProductsRequest(
                    product_id=p.product_id,
                    category=p.category,
                    image=to_image(p.image),
                    metadata=dict(p.metadata),
                    image_id=p.image_id,
                    image_uri=p.image_uri,
                )
                if p.box is not None:
                    request.box.CopyFrom(to_box(p.box))
                if p.attributes is not None:
                    request.attributes.CopyFrom(p.attributes.to_proto())
                yield request

        return self._stub.IndexProducts(requests(), timeout=timeout_s or self.timeout_s)

    def stream(
        self,
        frames: Iterable[tuple[int, bytes | np.ndarray] | tuple[int, bytes | np.ndarray, int]],
        top_k: int = 10,
        signature_kind: int = common_pb2.SIGNATURE_KIND_UNSPECIFIED,
        categories: Sequence[str] = (),
        min_score: float | None = None,
        detection_interval: int = 0,
        search_every_frame: bool = False,
        lockstep: bool = False,
        timeout_s: float | None = 3600.0,
        filter: FilterLike = None,
    ) -> Iterator[gateway_pb2.StreamMultiProductSearchResponse]:
        """Streams video frames ((frame_number, image) or (frame_number, image, timestamp_ms); image:
        encoded bytes or (H, W, 3) uint8 RGB pixels; numbers increasing) to StreamMultiProductSearch
        -> one result per processed frame, then the summary (the last result, its `summary` set).

        By default frames are sent as fast as `frames` yields them and the gateway drops those it has
        no time for (the newest wins; each result's skipped_frames lists them): live video.
        `lockstep` sends a frame only once the previous one's result is back, so every frame is
        processed (a file, when every frame matters). Leaving the iterator early cancels the call."""
        turn = threading.Semaphore(0)
        done = threading.Event()
        spec = to_filter(filter)

        def requests() -> Iterator[gateway_pb2.StreamMultiProductSearchRequest]:
            for position, frame in enumerate(frames):
                if lockstep and position > 0:
                    while not turn.acquire(timeout=0.1):
                        if done.is_set():
                            return
                if done.is_set():
                    return
                request = gateway_pb2.StreamMultiProductSearchRequest(
                    frame_number=frame[0], image=to_image(frame[1]), timestamp_ms=frame[2] if len(frame) > 2 else 0
                )
                if position == 0:
                    options = gateway_pb2.VideoOptions(
                        top_k=top_k,
                        signature_kind=cast(common_pb2.SignatureKind, signature_kind),
                        categories=list(categories),
                        detection_interval=detection_interval,
                        search_every_frame=search_every_frame,
                    )
                    if min_score is not None:
                        options.min_score = min_score
                    if spec is not None:
                        options.filter.CopyFrom(spec)
                    request.options.CopyFrom(options)
                yield request

        call = self._stub.StreamMultiProductSearch(requests(), timeout=timeout_s)
        try:
            for response in call:
                turn.release()
                yield response
        finally:
            done.set()
            call.cancel()  # a no-op once the call is over; stops the gateway when the caller left early

    def delete_products(
        self, product_ids: Sequence[str], categories: Sequence[str] = (), timeout_s: float | None = None
    ) -> gateway_pb2.DeleteProductsResponse:
        """Deletes every image of the products (in these categories; all when empty)."""
        return self._stub.DeleteProducts(
            gateway_pb2.DeleteProductsRequest(product_ids=list(product_ids), categories=list(categories)),
            timeout=timeout_s or self.timeout_s,
        )

    # --- catalogue management -------------------------------------------------------------------

    def get_product(self, product_id: str, category: str = "", timeout_s: float | None = None) -> gateway_pb2.Product:
        """A product with its attributes and images (category "": the one category holding it)."""
        request = gateway_pb2.GetProductRequest(product_id=product_id, category=category)
        return self._stub.GetProduct(request, timeout=timeout_s or self.timeout_s).product

    def list_products(
        self,
        category: str,
        filter: FilterLike = None,
        page_size: int = 0,
        page_token: str = "",
        timeout_s: float | None = None,
    ) -> gateway_pb2.ListProductsResponse:
        """One page of a category's products passing `filter`, in product id order (its
        next_page_token asks for the next; total counts every product passing)."""
        request = gateway_pb2.ListProductsRequest(category=category, page_size=page_size, page_token=page_token)
        spec = to_filter(filter)
        if spec is not None:
            request.filter.CopyFrom(spec)
        return self._stub.ListProducts(request, timeout=timeout_s or self.timeout_s)

    def all_products(
        self, category: str, filter: FilterLike = None, page_size: int = 0, timeout_s: float | None = None
    ) -> Iterator[gateway_pb2.Product]:
        """Every product of a category passing `filter`, page after page."""
        token = ""
        while True:
            page = self.list_products(category, filter, page_size, token, timeout_s)
            yield from page.products
            token = page.next_page_token
            if not token:
                return

    def update_product(
        self,
        product_id: str,
        attributes: Attributes,
        update_mask: Sequence[str] = (),
        category: str = "",
        timeout_s: float | None = None,
    ) -> gateway_pb2.Product:
        """Sets the parts of the product's attributes named by `update_mask` ("path", "tags",
        "labels", "labels.KEY"; empty: all three) -> the product as stored after the change."""
        request = gateway_pb2.UpdateProductRequest(
            product_id=product_id,
            category=category,
            attributes=attributes.to_proto(),
            update_mask=list(update_mask),
        )
        return self._stub.UpdateProduct(request, timeout=timeout_s or self.timeout_s).product

    def purge_products(
        self, category: str, filter: FilterLike = None, force: bool = False, timeout_s: float | None = None
    ) -> gateway_pb2.PurgeProductsResponse:
        """Deletes every product of `category` passing `filter`; every product of it (an empty
        filter) only with `force`."""
        request = gateway_pb2.PurgeProductsRequest(category=category, force=force)
        spec = to_filter(filter)
        if spec is not None:
            request.filter.CopyFrom(spec)
        return self._stub.PurgeProducts(request, timeout=timeout_s or self.timeout_s)

    def catalogue_stats(
        self, categories: Sequence[str] = (), timeout_s: float | None = None
    ) -> gateway_pb2.GetCatalogueStatsResponse:
        """Per category (all when empty): products, and per kind images, index type and memory."""
        request = gateway_pb2.GetCatalogueStatsRequest(categories=list(categories))
        return self._stub.GetCatalogueStats(request, timeout=timeout_s or self.timeout_s)

    def product_image(
        self, product_id: str, image_id: str, category: str = "", timeout_s: float | None = None
    ) -> gateway_pb2.GetProductImageResponse:
        """The stored JPEG thumbnail of one catalogue image (e.g. a Match's product_id and
        image_id), and its image_uri when it was given one."""
        request = gateway_pb2.GetProductImageRequest(product_id=product_id, image_id=image_id, category=category)
        return self._stub.GetProductImage(request, timeout=timeout_s or self.timeout_s)
