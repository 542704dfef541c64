"""The gateway's servicer itself (gateway/service.py), in-process through grpcio-testing, over fake
back ends that implement gateway/ports.py: option and region validation (the domain error it raises,
its message and details), a search's items, timings and failed categories, IndexProducts streaming,
DeleteProducts. grpcio-testing runs no interceptor, so these read the error the servicer raised;
the last tests run the same servicer on a real server on loopback, through the interceptor every
service runs, and read the status a client gets (the mapping itself: tests/common/test_status.py)."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import grpc_testing
import numpy as np
import pytest
from PIL import Image

from common.config import load_config
from common.errors import InvalidArgument, NotFound, ResourceExhausted, ServiceError, Unavailable
from common.local_features import Features
from common.serving import start_bundle
from common.status import details_of
from gateway.config import GatewayConfig
from gateway.pipeline import IngestError
from gateway.ports import (
    BatchAnswer,
    CatalogueEntry,
    CatalogueMatch,
    CategoryFailure,
    DatabaseInfo,
    DetectorOutput,
    LocatorOutput,
    ProductPage,
    Signature,
    SpatialRerank,
)
from gateway.service import VisualSearchService
from index_server.convert import filter_of
from index_server.domain import Filter, ProductAttributes
from mps.common.v1 import common_pb2
from mps.gateway.v1 import gateway_pb2, gateway_pb2_grpc

SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["VisualSearchService"]
BACKEND = "fake-index:1"
# Where the fake detector finds its cup, as fractions of the image it is sent: x0, y0, x1, y1.
CUP = (0.25, 0.1, 0.7, 0.8)


class FakeDetector:
    """Finds one cup (category "tableware") at CUP, whatever the image."""

    def __init__(self) -> None:
        self.calls = 0

    def detect(
        self,
        rgb: np.ndarray,
        min_confidence: float,
        objectness_threshold: float,
        max_objects: int,
        timeout_s: float,
        model: str = "",
    ) -> DetectorOutput:
        self.calls += 1
        height, width = rgb.shape[:2]
        box = np.array([CUP[0] * width, CUP[1] * height, CUP[2] * width, CUP[3] * height], np.float32)
        return DetectorOutput([(box, "cup", "tableware", 0.9)], [], inference_ms=1.0)


class FakeLocator:
    def locate(self, rgb: np.ndarray, max_salient: int, max_segments: int, timeout_s: float) -> LocatorOutput:
        return LocatorOutput([], [])


class FakeSigner:
    """A crop's signature is (kind, its shape), a region's ("blcf", its box), a whole map's covering
    (signature, width, height): what the fake index is sent is checkable."""

    def __init__(self) -> None:
        self.region_calls: list[tuple[tuple[int, ...], list[tuple[float, ...]]]] = []  # (image shape, boxes)

    def images_per_call(self, timeout_s: float) -> int:
        return 0

    def sign(self, crops: Sequence[np.ndarray], kinds: Sequence[str], timeout_s: float) -> list[list[Signature]]:
        return [[(kind, crop.shape) for kind in kinds] for crop in crops]

    def sign_regions(self, rgb: np.ndarray, regions: Sequence[np.ndarray], timeout_s: float) -> list[Signature]:
        boxes = [tuple(round(float(v), 1) for v in box) for box in regions]
        self.region_calls.append((rgb.shape, boxes))
        return [("blcf", box) for box in boxes]

    def covering(self, signature: Signature, width: int, height: int) -> Signature:
        return (signature, width, height)


class FakeWriter:
    def __init__(self, index: FakeIndex):
        self.index = index
        self.pending: list[CatalogueEntry] = []
        self.cancelled = False

    def add(self, entries: Sequence[CatalogueEntry]) -> None:
        self.pending += entries

    def commit(self) -> dict[str, Exception]:
        down = {e.category for e in self.pending if e.category in self.index.down}
        self.index.stored += [e for e in self.pending if e.category not in down]
        return {category: Unavailable(f"index at {BACKEND} failed (UNAVAILABLE): gone") for category in down}

    def cancel(self) -> None:
        self.cancelled = True


class FakeIndex:
    """Catalogue categories "tableware" (one mug) and "lamps", whose index is down."""

    def __init__(self) -> None:
        self.stored: list[CatalogueEntry] = []
        self.writers: list[FakeWriter] = []
        self.searched: list[tuple[str, str, int]] = []
        self.signatures: list[list[Signature]] = []  # each search_batch's
        self.spatial: list[tuple[str, int, SpatialRerank | None]] = []  # each search_batch's (kind, top_k, spatial)
        self.filters: list[Any] = []  # each search_batch's filter
        self.match_extra: dict[str, Any] = {}  # more fields of the mug's CatalogueMatch
        self.down: set[str] = set()  # categories whose writes fail at commit

    def categories(self, kind: str) -> set[str]:
        return {"tableware", "lamps"}

    def unreachable(self) -> list[CategoryFailure]:
        return []

    def backend_of(self, category: str) -> str:
        return BACKEND

    def search_batch(
        self,
        category: str,
        kind: str,
        signatures: Sequence[Signature],
        top_k: int,
        timeout_s: float,
        filter=None,
        spatial: SpatialRerank | None = None,
    ) -> BatchAnswer:
        self.searched.append((category, kind, len(signatures)))
        self.signatures.append(list(signatures))
        self.spatial.append((kind, top_k, spatial))
        self.filters.append(filter)
        if category == "lamps":
            raise Unavailable("index at fake-index:1 ('lamps') service failed (UNAVAILABLE): connection refused")
        if category != "tableware":
            raise NotFound(f"no database {category}.{kind}")
        mug = CatalogueMatch(
            "mug-1", "front", 0.9, {"title": "white mug"}, np.array([1, 2, 30, 40], np.float32), **self.match_extra
        )
        return BatchAnswer([[mug] for _ in signatures])

    def writer(self, timeout_s: float) -> FakeWriter:
        self.writers.append(FakeWriter(self))
        return self.writers[-1]

    def delete_products(
        self, product_ids: Sequence[str], categories: Sequence[str] | None, timeout_s: float
    ) -> tuple[int, list[str]]:
        return 2 * len([p for p in product_ids if p.startswith("mug")]), [p for p in product_ids if p[:3] != "mug"]

    # Catalogue management: tests/gateway/test_catalogue.py has its own fake; none here.

    def list_products(
        self,
        category: str,
        kind: str,
        product_ids: Sequence[str],
        filter: Filter | None,
        page_size: int,
        page_token: str,
        timeout_s: float,
    ) -> ProductPage:
        return ProductPage([], "", 0)

    def update_products(
        self, category: str, kind: str, attributes: dict[str, ProductAttributes], timeout_s: float
    ) -> list[str]:
        return list(attributes)

    def purge_products(
        self, category: str, kind: str, filter: Filter | None, timeout_s: float
    ) -> tuple[list[str], int]:
        return [], 0

    def thumbnails(self, category: str, kind: str, item_ids: Sequence[str], timeout_s: float) -> dict[str, bytes]:
        return {}

    def local_features(
        self, category: str, kind: str, item_ids: Sequence[str], timeout_s: float
    ) -> dict[str, Features]:
        return {}

    def databases(self, timeout_s: float) -> list[DatabaseInfo]:
        return []


class FakePorts:
    def __init__(self) -> None:
        self.detector = FakeDetector()
        self.locator = FakeLocator()
        self.signer = FakeSigner()
        self.index = FakeIndex()
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Recording:
    """The servicer as grpcio-testing calls it, keeping the domain error a method raised (without
    the interceptor, grpcio-testing answers any exception with UNKNOWN)."""

    def __init__(self, servicer: VisualSearchService):
        self.servicer = servicer
        self.raised: list[ServiceError] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.servicer, name)

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return method(request, context)
            except ServiceError as error:
                self.raised.append(error)
                raise

        return call


@pytest.fixture
def ports() -> FakePorts:
    return FakePorts()


@pytest.fixture
def gateway(ports: FakePorts) -> Iterator[Recording]:
    servicer = VisualSearchService(GatewayConfig(), ports)
    yield Recording(servicer)
    servicer.close()
    assert ports.closed


def unary(gateway: Recording, method: str, request: Any) -> tuple[Any, grpc.StatusCode]:
    server = grpc_testing.server_from_dictionary({SERVICE: gateway}, grpc_testing.strict_real_time())
    rpc = server.invoke_unary_unary(SERVICE.methods_by_name[method], (), request, 30)
    response, _, code, _ = rpc.termination()
    return response, code


def refused(gateway: Recording, method: str, request: Any) -> ServiceError:
    """The domain error the servicer raised for `request`."""
    _, code = unary(gateway, method, request)
    assert code == grpc.StatusCode.UNKNOWN and len(gateway.raised) == 1  # no interceptor here
    return gateway.raised[0]


def index_products(gateway: Recording, requests: list[gateway_pb2.IndexProductsRequest]) -> tuple[Any, grpc.StatusCode]:
    server = grpc_testing.server_from_dictionary({SERVICE: gateway}, grpc_testing.strict_real_time())
    rpc = server.invoke_stream_unary(SERVICE.methods_by_name["IndexProducts"], (), 30)
    for request in requests:
        rpc.send_request(request)
    rpc.requests_closed()
    response, _, code, _ = rpc.termination()
    return response, code


@pytest.fixture
def photo(coffee_png: bytes) -> common_pb2.Image:
    return common_pb2.Image(encoded=coffee_png)  # 600 x 400


def search(photo: common_pb2.Image, **fields: Any) -> gateway_pb2.MultiProductSearchRequest:
    return gateway_pb2.MultiProductSearchRequest(image=photo, **fields)


def box(x0: float, y0: float, x1: float, y1: float) -> common_pb2.Box:
    return common_pb2.Box(x_min=x0, y_min=y0, x_max=x1, y_max=y1)


# -- MultiProductSearch --------------------------------------------------------------------------


def test_a_search_maps_items_matches_timings_and_failed_categories(gateway, ports, photo):
    response, code = unary(gateway, "MultiProductSearch", search(photo, top_k=3))
    assert code == grpc.StatusCode.OK and not gateway.raised
    assert (response.image_width, response.image_height, response.proposals) == (600, 400, 1)
    [item] = response.items
    assert (item.category, item.class_name, item.source) == ("tableware", "cup", gateway_pb2.ITEM_SOURCE_DETECTOR)
    assert item.confidence == pytest.approx(0.9)
    # The detector's box, found on the 416-px copy, in pixels of the photo as sent.
    np.testing.assert_allclose(
        [item.box.x_min, item.box.y_min, item.box.x_max, item.box.y_max], [150, 40, 420, 320], atol=1
    )
    [match] = item.matches
    assert (match.product_id, match.image_id, dict(match.metadata)) == ("mug-1", "front", {"title": "white mug"})
    assert match.score == pytest.approx(0.9) and (match.box.x_max, match.box.y_max) == (30, 40)
    assert not item.degraded and not item.warning
    # The whole image was compared over every category, and "lamps" did not answer: said once.
    [failure] = response.failed_categories
    assert (failure.category, failure.code, failure.backend) == ("lamps", "UNAVAILABLE", BACKEND)
    assert "connection refused" in failure.reason
    timings = response.timings
    assert timings.detect_ms > 0 and timings.sign_ms > 0 and timings.search_ms > 0 and timings.locate_ms > 0
    stages = timings.decode_ms + timings.sign_ms + timings.search_ms + max(timings.detect_ms, timings.locate_ms)
    assert timings.total_ms >= stages * 0.99
    assert ("tableware", "deep", 2) in ports.index.searched  # the cup and the whole image, in one call


def test_regions_are_searched_as_drawn_without_localising(gateway, ports, photo):
    request = search(photo, regions=[gateway_pb2.Region(box=box(10, 20, 300, 380), category="tableware")])
    response, code = unary(gateway, "MultiProductSearch", request)
    assert code == grpc.StatusCode.OK and ports.detector.calls == 0
    [item] = response.items
    assert (item.source, item.category) == (gateway_pb2.ITEM_SOURCE_USER_REGION, "tableware")
    assert (item.box.x_min, item.box.y_min, item.box.x_max, item.box.y_max) == (10, 20, 300, 380)
    assert [m.product_id for m in item.matches] == ["mug-1"]
    assert ports.index.searched == [("tableware", "deep", 1)]  # named: signed once, in its category
    assert not response.failed_categories


@pytest.mark.parametrize(
    "region, says, field",
    [
        (box(700, 10, 800, 50), "regions[0].box lies outside the 600x400 image", "regions[0].box"),
        (box(50, 50, 50, 90), "regions[0].box is empty: x_max must exceed x_min", "regions[0].box"),
        (box(float("nan"), 0, 10, 10), "regions[0].box has NaN or infinite coordinates", "regions[0].box"),
    ],
)
def test_a_bad_region_box_is_invalid_argument_naming_it(gateway, ports, photo, region, says, field):
    error = refused(gateway, "MultiProductSearch", search(photo, regions=[gateway_pb2.Region(box=region)]))
    assert type(error) is InvalidArgument and error.message.startswith(says), error.message
    assert [f for f, _ in error.violations] == [field]
    assert ports.detector.calls == 0 and not ports.index.searched


def test_a_bad_region_category_is_invalid_argument_naming_it(gateway, photo):
    request = search(photo, regions=[gateway_pb2.Region(box=box(0, 0, 10, 10), category=" cups")])
    error = refused(gateway, "MultiProductSearch", request)
    assert type(error) is InvalidArgument and error.message.startswith("regions[0].category: category name ' cups'")
    assert [f for f, _ in error.violations] == ["regions[0].category"] and "whitespace" in error.violations[0][1]


@pytest.mark.parametrize(
    "fields, kind, says, violations, quota",
    [
        (
            {"top_k": 101},
            InvalidArgument,
            "top_k 101 is above the limit of 100: ask for at most 100",
            [("top_k", "101 is above the limit of 100")],
            [("top_k", "at most 100 matches per item")],
        ),
        (
            {"min_confidence": 1.5},
            InvalidArgument,
            "min_confidence 1.5 is outside (0, 1]",
            [("min_confidence", "1.5 is outside (0, 1]")],
            [],
        ),
        (
            {"regions": [gateway_pb2.Region(box=box(0, 0, 1, 1))] * 65},
            ResourceExhausted,
            "65 regions; at most 64 per query",
            [],
            [("regions", "at most 64 regions per query")],
        ),
        (
            {"categories": ["c"] * 257},
            ResourceExhausted,
            "257 categories; at most 256 per query",
            [],
            [("categories", "at most 256 categories per query")],
        ),
        ({"categories": ["shoes", "a\0"]}, InvalidArgument, "categories[1]: category name 'a\\x00'", None, []),
        (
            {"signature_kind": 7},
            InvalidArgument,
            "signature_kind 7 is not indexed here; the catalogue is indexed with ['SIGNATURE_KIND_DEEP', "
            "'SIGNATURE_KIND_BOW']",
            [("signature_kind", "7 is not indexed here")],
            [],
        ),
        (
            {"min_score": float("nan")},
            InvalidArgument,
            "min_score must be a finite number",
            [("min_score", "nan is not finite")],
            [],
        ),
        (
            {"sources": [gateway_pb2.ITEM_SOURCE_DETECTOR, gateway_pb2.ITEM_SOURCE_WHOLE_IMAGE]},
            InvalidArgument,
            "sources: ITEM_SOURCE_WHOLE_IMAGE cannot be asked for; choose among ['ITEM_SOURCE_DETECTOR'",
            [("sources[1]", "ITEM_SOURCE_WHOLE_IMAGE cannot be asked for")],
            [],
        ),
        (
            {"max_items": 49},
            InvalidArgument,
            "max_items 49 is above the limit of 48",
            [("max_items", "49 is above the limit of 48")],
            [("max_items", "at most 48 items per photo")],
        ),
    ],
)
def test_options_are_checked_before_any_back_end_is_called(
    gateway, ports, photo, fields, kind, says, violations, quota
):
    error = refused(gateway, "MultiProductSearch", search(photo, **fields))
    assert type(error) is kind and error.message.startswith(says), error.message
    if violations is not None:
        assert error.violations == violations
    else:
        assert [f for f, _ in error.violations] == ["categories[1]"]
    assert error.quota == quota
    assert ports.detector.calls == 0 and not ports.index.searched


def test_a_search_without_an_image_says_how_to_send_one(gateway):
    error = refused(gateway, "MultiProductSearch", gateway_pb2.MultiProductSearchRequest(top_k=3))
    assert type(error) is InvalidArgument
    assert error.message == "image: no image given: set image.encoded (file bytes) or image.raw (RGB pixels)"


def test_a_search_no_category_answers_is_unavailable(gateway, ports, photo):
    request = search(photo, regions=[gateway_pb2.Region(box=box(10, 20, 300, 380), category="lamps")])
    error = refused(gateway, "MultiProductSearch", request)
    assert type(error) is Unavailable and error.message.startswith(
        "no catalogue category could be searched: the index at fake-index:1 (UNAVAILABLE; categories 'lamps')"
    )


# -- IndexProducts -------------------------------------------------------------------------------


def product(
    product_id: str, photo: common_pb2.Image, category: str = "tableware", **fields: Any
) -> gateway_pb2.IndexProductsRequest:
    return gateway_pb2.IndexProductsRequest(product_id=product_id, category=category, image=photo, **fields)


def test_index_products_streams_every_image_in_and_reports_each(gateway, ports, photo):
    requests = [
        product("mug-1", photo, image_id="front", metadata={"title": "white mug"}),
        product("mug-1", photo, image_id="side", box=box(100, 50, 400, 350)),
        product("mug-2", photo, image_id="front", category="cups"),
    ]
    response, code = index_products(gateway, requests)
    assert code == grpc.StatusCode.OK and not gateway.raised
    assert (response.indexed, response.products, dict(response.per_category)) == (3, 2, {"tableware": 2, "cups": 1})
    assert not response.images_truncated
    reported = [(i.product_id, i.image_id, i.category, i.source) for i in response.images]
    assert reported == [
        ("mug-1", "front", "tableware", gateway_pb2.ITEM_SOURCE_DETECTOR),
        ("mug-1", "side", "tableware", gateway_pb2.ITEM_SOURCE_USER_REGION),
        # The detector's cup is a "tableware" box: for a "cups" product it is not the product's own.
        ("mug-2", "front", "cups", gateway_pb2.ITEM_SOURCE_WHOLE_IMAGE),
    ]
    side = response.images[1].box
    assert (side.x_min, side.y_min, side.x_max, side.y_max) == (100, 50, 400, 350)
    # Every image once per index kind, committed once, with its metadata.
    stored = [(e.product_id, e.image_id, e.category, e.kind) for e in ports.index.stored]
    assert stored == [
        (p, i, c, kind)
        for p, i, c in (("mug-1", "front", "tableware"), ("mug-1", "side", "tableware"), ("mug-2", "front", "cups"))
        for kind in ("deep", "bow")
    ]
    assert ports.index.stored[0].metadata == {"title": "white mug"} and not ports.index.writers[0].cancelled


def test_a_refused_image_stores_those_before_it_and_names_itself(gateway, ports, photo):
    requests = [product("mug-1", photo, image_id="a"), product("mug-2", photo, image_id="b"), product("", photo)]
    _, code = index_products(gateway, requests)
    assert code == grpc.StatusCode.UNKNOWN  # no interceptor here: the raised error is read below
    [error] = gateway.raised
    assert type(error) is IngestError and error.status == "INVALID_ARGUMENT" and error.reason == "INVALID_ARGUMENT"
    assert error.message == (
        "product #2 (''): product_id is required; 2 images of 2 products were stored (those before it in "
        "the stream): fix it and re-send from there (a re-sent image replaces itself)"
    )
    assert error.info == {"stored_images": "2", "stored_products": "2", "refused_request": "2"}
    assert error.violations == [("requests[2]", "product_id is required")]
    assert [(i.product_id, i.image_id) for i in error.indexed] == [("mug-1", "a"), ("mug-2", "b")]
    assert [(e.product_id, e.kind) for e in ports.index.stored] == [
        ("mug-1", "deep"),
        ("mug-1", "bow"),
        ("mug-2", "deep"),
        ("mug-2", "bow"),
    ]


def test_a_bad_box_is_refused_with_its_field_under_the_request(gateway, ports, photo):
    index_products(gateway, [product("mug-1", photo, box=box(700, 0, 800, 10))])
    [error] = gateway.raised
    assert type(error) is IngestError and error.status == "INVALID_ARGUMENT"
    assert error.message.startswith("product #0 ('mug-1'): box lies outside the 600x400 image")
    assert "0 images of 0 products were stored" in error.message
    assert error.info == {"stored_images": "0", "stored_products": "0", "refused_request": "0"}
    assert [f for f, _ in error.violations] == ["requests[0]", "requests[0].box"]
    assert not ports.index.stored


def test_too_many_images_in_a_stream_is_a_quota_failure(ports, photo):
    servicer = VisualSearchService(GatewayConfig(max_images_per_stream=2), ports)
    gateway = Recording(servicer)
    try:
        index_products(gateway, [product(f"mug-{i}", photo, image_id="a") for i in range(3)])
    finally:
        servicer.close()
    [error] = gateway.raised
    assert type(error) is IngestError and error.status == "RESOURCE_EXHAUSTED"
    assert error.message.startswith("product #2 ('mug-2'): send at most 2 images per IndexProducts stream")
    assert error.quota == [("images", "at most 2 per IndexProducts stream")]
    assert error.info["stored_images"] == "2" and len(ports.index.stored) == 4


def test_an_index_failing_at_commit_is_said_with_what_was_stored(gateway, ports, photo):
    ports.index.down = {"tableware"}
    index_products(gateway, [product("mug-1", photo), product("cup-1", photo, category="cups")])
    [error] = gateway.raised
    assert type(error) is IngestError and error.status == "UNAVAILABLE" and error.reason == "UNAVAILABLE"
    assert error.message == (
        "index at fake-index:1 failed (UNAVAILABLE): gone; 1 image of 1 product was stored: none of "
        "categories ['tableware'], whose index failed: re-send those"
    )
    assert error.info == {"stored_images": "1", "stored_products": "1"} and not error.violations
    assert [(e.product_id, e.kind) for e in ports.index.stored] == [("cup-1", "deep"), ("cup-1", "bow")]


def test_a_cancelled_stream_stores_nothing(gateway, ports, photo):
    server = grpc_testing.server_from_dictionary({SERVICE: gateway}, grpc_testing.strict_real_time())
    rpc = server.invoke_stream_unary(SERVICE.methods_by_name["IndexProducts"], (), 30)
    rpc.send_request(product("mug-1", photo))
    rpc.cancel()  # (grpcio-testing gives a cancelled call no termination to read)
    for _ in range(100):  # the servicer's thread sees the cancel after the call is over
        if gateway.raised:
            break
        threading.Event().wait(0.05)
    [error] = gateway.raised
    assert type(error) is IngestError and error.status == "CANCELLED"
    assert error.message == "the client cancelled the stream or its deadline passed: nothing of it was stored"
    assert not ports.index.stored and ports.index.writers[0].cancelled


# -- DeleteProducts ------------------------------------------------------------------------------


def test_delete_products_reports_what_was_deleted_and_not_found(gateway):
    request = gateway_pb2.DeleteProductsRequest(product_ids=["mug-1", "lamp-9", "mug-1"])
    response, code = unary(gateway, "DeleteProducts", request)
    assert code == grpc.StatusCode.OK
    assert (response.images_deleted, list(response.not_found)) == (2, ["lamp-9"])  # each id once


def test_delete_products_refusals_name_the_field(gateway):
    error = refused(gateway, "DeleteProducts", gateway_pb2.DeleteProductsRequest())
    assert type(error) is InvalidArgument and error.message == "product_ids is empty: name the products to delete"
    assert error.violations == [("product_ids", "empty")]
    gateway.raised.clear()
    error = refused(gateway, "DeleteProducts", gateway_pb2.DeleteProductsRequest(product_ids=["mug-1", ""]))
    assert error.violations == [("product_ids[1]", "empty")]


# -- attributes, image URIs, thumbnails and filters ------------------------------------------------


def test_a_search_filter_reaches_every_index_search_compiled(gateway, ports, photo):
    spec = common_pb2.Filter(path_prefix="kitchen", labels=[common_pb2.LabelClause(key="brand", values=["acme"])])
    response, code = unary(gateway, "MultiProductSearch", search(photo, filter=spec))
    assert code == grpc.StatusCode.OK and response.items
    assert ports.index.filters and all(f == filter_of(spec) for f in ports.index.filters)
    ports.index.filters.clear()
    unary(gateway, "MultiProductSearch", search(photo, filter=common_pb2.Filter()))
    assert ports.index.filters and all(f is None for f in ports.index.filters)  # empty: no filter at all


def test_a_bad_filter_is_refused_naming_its_field(gateway, ports, photo):
    spec = common_pb2.Filter(any_of=[common_pb2.Filter(), common_pb2.Filter(any_tags=["a  b"])])
    error = refused(gateway, "MultiProductSearch", search(photo, filter=spec))
    assert type(error) is InvalidArgument and error.violations[0][0] == "filter.any_of[1].any_tags[0]"
    assert not ports.index.searched and ports.detector.calls == 0


def test_matches_carry_the_products_attributes_and_image_uri(gateway, ports, photo):
    acme = ProductAttributes("kitchen/mugs", frozenset({"white"}), {"brand": "acme"})
    ports.index.match_extra = {"attributes": acme, "image_uri": "https://shop.example/mug.jpg"}
    response, _ = unary(gateway, "MultiProductSearch", search(photo))
    match = response.items[0].matches[0]
    assert match.attributes.path == "kitchen/mugs" and list(match.attributes.tags) == ["white"]
    assert dict(match.attributes.labels) == {"brand": "acme"} and match.image_uri == "https://shop.example/mug.jpg"


def test_ingest_sends_attributes_to_every_kind_and_one_thumbnail(gateway, ports, photo):
    attributes = common_pb2.ProductAttributes(path="kitchen/mugs", tags=["white"], labels={"brand": "acme"})
    requests = [
        product("mug-1", photo, image_id="a", attributes=attributes, image_uri="https://shop.example/a.jpg"),
        product("mug-1", photo, image_id="b"),
    ]
    _, code = index_products(gateway, requests)
    assert code == grpc.StatusCode.OK and not gateway.raised
    first, second = ports.index.stored[:2], ports.index.stored[2:]
    assert [e.kind for e in first] == ["deep", "bow"]
    assert all(
        e.attributes == ProductAttributes("kitchen/mugs", frozenset({"white"}), {"brand": "acme"}) for e in first
    )
    assert all(e.attributes is None for e in second)  # unset: the product keeps its own
    assert first[0].metadata == {"mps:image_uri": "https://shop.example/a.jpg"} == first[1].metadata
    # The thumbnail: a JPEG of the whole image, 160 px on its longer side, with the first kind only.
    assert [bool(e.thumbnail) for e in ports.index.stored] == [True, False, True, False]
    with Image.open(io.BytesIO(first[0].thumbnail)) as thumbnail:
        assert (thumbnail.format, thumbnail.size) == ("JPEG", (160, 107))


def test_bad_attributes_are_refused_in_their_turn(gateway, ports, photo):
    requests = [
        product("mug-1", photo, image_id="a"),
        product("mug-2", photo, attributes=common_pb2.ProductAttributes(labels={"brand": "a\nb"})),
    ]
    index_products(gateway, requests)
    [error] = gateway.raised
    assert error.info["refused_request"] == "1" and error.info["stored_images"] == "1"
    assert [f for f, _ in error.violations] == ["requests[1]", "requests[1].attributes.labels['brand']"]


# -- bags of local convolutional features (SIGNATURE_KIND_BLCF) ---------------------------------------

BLCF = common_pb2.SIGNATURE_KIND_BLCF


@pytest.fixture
def blcf_gateway(ports: FakePorts) -> Iterator[Recording]:
    """A gateway indexing BLCF too, whose BLCF images are sent at most 300 px a side."""
    servicer = VisualSearchService(GatewayConfig(index_kinds=["deep", "bow", "blcf"], blcf_side=300), ports)
    yield Recording(servicer)
    servicer.close()


def test_a_blcf_search_signs_the_photo_once_with_every_item_as_a_region(blcf_gateway, ports, photo):
    response, code = unary(blcf_gateway, "MultiProductSearch", search(photo, signature_kind=BLCF))
    assert code == grpc.StatusCode.OK and not blcf_gateway.raised
    [item] = response.items
    assert item.class_name == "cup" and [m.product_id for m in item.matches] == ["mug-1"]
    # Selected with deep crops (the cup and the whole image), then one call for BLCF: the 600x400
    # photo shrunk to 300x200 with the cup's box, in those pixels, as its one region.
    [(shape, [region])] = ports.signer.region_calls
    assert shape == (200, 300, 3)
    np.testing.assert_allclose(region, [75, 20, 210, 160], atol=1)
    assert ports.index.signatures[-1] == [("blcf", region)]
    # The selection's deep search is not re-ranked; the BLCF one is, by the gateway's defaults, and
    # every re-ranked candidate comes back.
    assert [(kind, top_k, spatial) for kind, top_k, spatial in ports.index.spatial if kind == "blcf"] == [
        ("blcf", 50, SpatialRerank(50, 0))
    ]
    assert all(spatial is None for kind, _, spatial in ports.index.spatial if kind == "deep")


def test_blcf_regions_that_name_their_category_are_signed_once_by_region(blcf_gateway, ports, photo):
    regions = [
        gateway_pb2.Region(box=box(10, 20, 300, 380), category="tableware"),
        gateway_pb2.Region(box=box(400, 0, 600, 200), category="tableware"),
    ]
    request = search(photo, signature_kind=BLCF, regions=regions, spatial_rerank_k=7, query_expansion=3)
    response, code = unary(blcf_gateway, "MultiProductSearch", request)
    assert code == grpc.StatusCode.OK and ports.detector.calls == 0
    assert [i.source for i in response.items] == [gateway_pb2.ITEM_SOURCE_USER_REGION] * 2
    assert ports.signer.region_calls == [((200, 300, 3), [(5, 10, 150, 190), (200, 0, 300, 100)])]
    assert ports.index.searched == [("tableware", "blcf", 2)]  # no deep selection: the regions are named
    assert ports.index.spatial == [("blcf", 20, SpatialRerank(7, 3))]


def test_spatial_rerank_k_zero_asks_the_index_for_no_re_ranking(blcf_gateway, ports, photo):
    regions = [gateway_pb2.Region(box=box(10, 20, 300, 380), category="tableware")]
    unary(blcf_gateway, "MultiProductSearch", search(photo, signature_kind=BLCF, regions=regions, spatial_rerank_k=0))
    assert ports.index.spatial == [("blcf", 20, None)]


def test_a_blcf_match_says_where_in_the_catalogue_image_it_was_found(blcf_gateway, ports, photo):
    ports.index.match_extra = {"window": np.array([5, 6, 70, 80], np.float32), "first_stage_score": 0.4}
    regions = [gateway_pb2.Region(box=box(10, 20, 300, 380), category="tableware")]
    response, _ = unary(blcf_gateway, "MultiProductSearch", search(photo, signature_kind=BLCF, regions=regions))
    [match] = response.items[0].matches
    assert (match.window.x_min, match.window.y_min, match.window.x_max, match.window.y_max) == (5, 6, 70, 80)
    assert match.score == pytest.approx(0.9) and match.first_stage_score == pytest.approx(0.4)
    assert match.inliers == 0 and not response.items[0].reranked  # a window is not a geometric verification
    # Another kind's match has no window.
    ports.index.match_extra = {}
    response, _ = unary(blcf_gateway, "MultiProductSearch", search(photo, regions=regions))
    assert not response.items[0].matches[0].HasField("window")


@pytest.mark.parametrize(
    "blcf, fields, says, violations",
    [
        (
            False,
            {"spatial_rerank_k": 10},
            "spatial_rerank_k applies to SIGNATURE_KIND_BLCF only (spatial re-ranking of bags of local "
            "convolutional features), not to SIGNATURE_KIND_DEEP: leave it unset, or set signature_kind "
            "SIGNATURE_KIND_BLCF",
            [("spatial_rerank_k", "set with signature_kind SIGNATURE_KIND_DEEP")],
        ),
        (
            True,
            {"signature_kind": common_pb2.SIGNATURE_KIND_BOW, "query_expansion": 0},
            "query_expansion applies to SIGNATURE_KIND_BLCF only",
            [("query_expansion", "set with signature_kind SIGNATURE_KIND_BOW")],
        ),
        (
            False,
            {"signature_kind": BLCF},
            "signature_kind SIGNATURE_KIND_BLCF is not indexed here; the catalogue is indexed with "
            "['SIGNATURE_KIND_DEEP', 'SIGNATURE_KIND_BOW']: ask for one of those",
            [("signature_kind", "SIGNATURE_KIND_BLCF is not indexed here")],
        ),
        (
            True,
            {"signature_kind": BLCF, "spatial_rerank_k": 201},
            "spatial_rerank_k 201 is above the limit of 200: re-rank at most 200 candidates per item, or 0 for none",
            [("spatial_rerank_k", "201 is above the limit of 200")],
        ),
        (
            True,
            {"signature_kind": BLCF, "spatial_rerank_k": 5, "query_expansion": 6},
            "query_expansion 6 is above spatial_rerank_k 5: the query is expanded with the best windows of "
            "the re-ranked candidates, so expand over at most 5 (or 0 for none)",
            [("query_expansion", "6 is above spatial_rerank_k 5")],
        ),
        (
            True,
            {"signature_kind": BLCF, "spatial_rerank_k": 0, "query_expansion": 1},
            "query_expansion 1 is above spatial_rerank_k 0",
            [("query_expansion", "1 is above spatial_rerank_k 0")],
        ),
    ],
)
def test_spatial_options_are_checked_before_any_back_end_is_called(
    gateway, blcf_gateway, ports, photo, blcf, fields, says, violations
):
    chosen = blcf_gateway if blcf else gateway
    error = refused(chosen, "MultiProductSearch", search(photo, **fields))
    assert type(error) is InvalidArgument and error.message.startswith(says), error.message
    assert error.violations == violations
    assert ports.detector.calls == 0 and not ports.index.searched and not ports.signer.region_calls


def test_a_blcf_video_stream_is_refused_like_a_search_when_blcf_is_not_indexed(gateway, photo):
    options = gateway_pb2.VideoOptions(signature_kind=BLCF)
    with pytest.raises(InvalidArgument) as caught:
        gateway.servicer._video_settings(options)
    assert caught.value.message.startswith("options.signature_kind SIGNATURE_KIND_BLCF is not indexed here")


def test_a_blcf_video_stream_takes_the_gateways_spatial_defaults(blcf_gateway):
    settings = blcf_gateway.servicer._video_settings(gateway_pb2.VideoOptions(signature_kind=BLCF))
    assert (settings.search.kind, settings.search.spatial_rerank_k, settings.search.query_expansion) == ("blcf", 50, 0)
    deep = blcf_gateway.servicer._video_settings(gateway_pb2.VideoOptions())
    assert (deep.search.kind, deep.search.spatial_rerank_k) == ("deep", 0)


def test_ingest_with_blcf_signs_each_whole_image_covering_its_own_pixels(blcf_gateway, ports, photo):
    requests = [
        product("mug-1", photo, image_id="a"),
        product("mug-1", photo, image_id="b", box=box(100, 50, 400, 350)),
    ]
    response, code = index_products(blcf_gateway, requests)
    assert code == grpc.StatusCode.OK and not blcf_gateway.raised and response.indexed == 2
    stored = ports.index.stored
    assert [(e.image_id, e.kind) for e in stored] == [(i, k) for i in ("a", "b") for k in ("deep", "bow", "blcf")]
    # deep and bow sign the product's crop; blcf the whole photo (sent at 300x200), its map then
    # covering the 600x400 original, so that the index's windows are in its pixels.
    # (the detector's 270x280 cup and the 300x300 box, at most 256 px a side)
    assert stored[0].signature == ("deep", (256, 247, 3)) and stored[4].signature == ("bow", (256, 256, 3))
    assert stored[2].signature == stored[5].signature == (("blcf", (200, 300, 3)), 600, 400)
    # The same box, metadata and product for every kind; the thumbnail with the first kind only.
    assert all(e.box.tolist() == stored[3].box.tolist() for e in stored[3:])
    assert [bool(e.thumbnail) for e in stored] == [True, False, False, True, False, False]


def test_ingest_with_blcf_refuses_an_image_its_map_cannot_describe(blcf_gateway, ports):
    long_strip = common_pb2.Image(raw=common_pb2.RawImage(width=70_000, height=2, rgb=bytes(70_000 * 2 * 3)))
    index_products(blcf_gateway, [product("strip", long_strip)])
    [error] = blcf_gateway.raised
    assert type(error) is IngestError and error.status == "INVALID_ARGUMENT"
    assert error.message.startswith(
        "product #0 ('strip'): image is 70000x2 pixels; a catalogue indexed with SIGNATURE_KIND_BLCF takes at "
        "most 65535 a side"
    )
    assert [f for f, _ in error.violations] == ["requests[0]", "requests[0].image"] and not ports.index.stored


# -- over a real server on loopback, through the interceptor ------------------------------------------


@pytest.fixture
def stub(ports: FakePorts) -> Iterator[gateway_pb2_grpc.VisualSearchServiceStub]:
    config = load_config(GatewayConfig, "gateway", environ={}, port=0, max_regions=2)
    servicer = VisualSearchService(config, ports)
    bundle = start_bundle(
        config,
        lambda server: gateway_pb2_grpc.add_VisualSearchServiceServicer_to_server(servicer, server),
        [SERVICE.full_name],
        on_stop=servicer.close,
    )
    with grpc.insecure_channel(f"127.0.0.1:{bundle.port}") as channel:
        yield gateway_pb2_grpc.VisualSearchServiceStub(channel)
    bundle.server.stop(None)
    assert bundle.on_stop is not None
    bundle.on_stop()


def test_a_client_reads_what_was_stored_before_a_refused_image(stub, photo):
    requests = [product("mug-1", photo, image_id="a"), product("mug-1", photo, image_id="b", category=" cups")]
    with pytest.raises(grpc.RpcError) as caught:
        stub.IndexProducts(iter(requests), timeout=30)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("product #1 ('mug-1'): category name ' cups' starts or ends with whitespace")
    assert "; 1 image of 1 product was stored (those before it in the stream)" in error.details()
    details = details_of(error)
    assert details.reason == "INVALID_ARGUMENT"
    assert details.info == {"stored_images": "1", "stored_products": "1", "refused_request": "1"}
    assert [field for field, _ in details.violations] == ["requests[1]"]


def test_a_client_reads_the_quota_a_search_went_over(stub, photo):
    request = search(photo, regions=[gateway_pb2.Region(box=box(0, 0, 5, 5))] * 3)
    with pytest.raises(grpc.RpcError) as caught:
        stub.MultiProductSearch(request, timeout=30)
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == "3 regions; at most 2 per query: split them over several queries"
    assert details_of(error).quota == [("regions", "at most 2 regions per query")]
