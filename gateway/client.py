"""Typed Python client for the gateway: a thin, hinted wrapper over the generated stubs.

    with VisualSearchClient("127.0.0.1:50050") as client:
        result = client.search(Path("photo.jpg").read_bytes(), top_k=5)
        for item in result.items:
            print(item.category, item.confidence, [m.product_id for m in item.matches])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import grpc

from common.serving import channel_options
from mps.common.v1 import common_pb2
from mps.gateway.v1 import gateway_pb2, gateway_pb2_grpc


@dataclass(frozen=True)
class Product:
    """One catalogue image to index."""

    product_id: str
    category: str
    image: bytes  # encoded file bytes
    metadata: Mapping[str, str]


class VisualSearchClient:
    def __init__(self, address: str, timeout_s: float = 30.0,
                 max_message_bytes: int = 32 * 1024 * 1024):
        self._channel = grpc.insecure_channel(address, options=channel_options(max_message_bytes))
        self._stub = gateway_pb2_grpc.VisualSearchServiceStub(self._channel)
        self.timeout_s = timeout_s

    def __enter__(self) -> "VisualSearchClient":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        grpc.channel_ready_future(self._channel).result(timeout=timeout_s)

    def search(self, image: bytes, top_k: int = 10, min_confidence: float = 0.0,
               regions: Sequence[tuple[tuple[float, float, float, float], str]] = (),
               signature_kind: int = common_pb2.SIGNATURE_KIND_UNSPECIFIED,
               timeout_s: float | None = None) -> gateway_pb2.MultiProductSearchResponse:
        """Every product in `image` (encoded bytes) with its top_k catalogue matches.

        `regions`: optional ((x_min, y_min, x_max, y_max), category) pairs that replace detection.
        """
        request = gateway_pb2.MultiProductSearchRequest(
            image=common_pb2.Image(encoded=image), top_k=top_k, min_confidence=min_confidence,
            signature_kind=signature_kind,
            regions=[gateway_pb2.Region(box=common_pb2.Box(x_min=b[0], y_min=b[1], x_max=b[2], y_max=b[3]),
                                        category=category) for b, category in regions])
        return self._stub.MultiProductSearch(request, timeout=timeout_s or self.timeout_s)

    def index_products(self, products: Iterable[Product], timeout_s: float | None = None
                       ) -> gateway_pb2.IndexProductsResponse:
        """Streams catalogue images in; returns how many were indexed per category."""
        requests = (gateway_pb2.IndexProductsRequest(
            product_id=p.product_id, category=p.category, image=common_pb2.Image(encoded=p.image),
            metadata=dict(p.metadata)) for p in products)
        return self._stub.IndexProducts(requests, timeout=timeout_s or self.timeout_s)
