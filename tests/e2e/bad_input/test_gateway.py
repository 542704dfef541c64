"""Bad input to the gateway (mps.gateway.v1.VisualSearchService): every RPC, as cases.

Ingest and purge cases write only to categories named "bad-input-gateway*" (never the reference
catalogue); the catalogue cases read the reference catalogue at most.
"""

from __future__ import annotations

import struct
import zlib

import grpc
import pytest

from mps.common.v1 import common_pb2
from mps.gateway.v1 import gateway_pb2
from tests.e2e.bad_input.harness import Case, Stubs, case_id, expecting, rpc_name

SEARCH = rpc_name(gateway_pb2, "VisualSearchService", "MultiProductSearch")
INDEX = rpc_name(gateway_pb2, "VisualSearchService", "IndexProducts")
DELETE = rpc_name(gateway_pb2, "VisualSearchService", "DeleteProducts")
STREAM = rpc_name(gateway_pb2, "VisualSearchService", "StreamMultiProductSearch")
GET_PRODUCT = rpc_name(gateway_pb2, "VisualSearchService", "GetProduct")
LIST_PRODUCTS = rpc_name(gateway_pb2, "VisualSearchService", "ListProducts")
UPDATE_PRODUCT = rpc_name(gateway_pb2, "VisualSearchService", "UpdateProduct")
PURGE_PRODUCTS = rpc_name(gateway_pb2, "VisualSearchService", "PurgeProducts")
STATS = rpc_name(gateway_pb2, "VisualSearchService", "GetCatalogueStats")
PRODUCT_IMAGE = rpc_name(gateway_pb2, "VisualSearchService", "GetProductImage")

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
NOT_FOUND = grpc.StatusCode.NOT_FOUND
OK = grpc.StatusCode.OK
CATEGORY = "bad-input-gateway"
NAME_RULE = ("category", "letters, digits")


def png_header(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels, with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def box(x0: float, y0: float, x1: float, y1: float) -> common_pb2.Box:
    return common_pb2.Box(x_min=x0, y_min=y0, x_max=x1, y_max=y1)


# --- MultiProductSearch ----------------------------------------------------------------------------


def search_case(case_id_: str, code: grpc.StatusCode, says: tuple[str, ...], **fields) -> Case:
    """MultiProductSearch of the reference photo (image="photo"; None: no image) with `fields` set."""

    def call(s: Stubs):
        request = gateway_pb2.MultiProductSearchRequest(**{k: v for k, v in fields.items() if k != "image"})
        image = fields.get("image", "photo")
        if image == "photo":
            request.image.CopyFrom(s.photo)
        elif image is not None:
            request.image.CopyFrom(image)
        return s.gateway.MultiProductSearch(request, timeout=s.timeout)

    return Case(case_id_, SEARCH, call, code, says)


def region(b: common_pb2.Box, category: str = "") -> gateway_pb2.Region:
    return gateway_pb2.Region(box=b, category=category)


def nested_filter(levels: int) -> common_pb2.Filter:
    """A filter whose any_of nests `levels` deep."""
    spec = common_pb2.Filter(all_tags=["x"])
    for _ in range(levels):
        spec = common_pb2.Filter(any_of=[spec])
    return spec


SEARCH_CASES = [
    search_case("search-no-image", INVALID, ("image", "set image.encoded"), image=None),
    search_case(
        "search-empty-encoded-image",
        INVALID,
        ("image is empty", "send the encoded file bytes"),
        image=common_pb2.Image(encoded=b""),
    ),
    search_case(
        "search-random-bytes",
        INVALID,
        ("image cannot be decoded", "send a complete jpeg"),
        image=common_pb2.Image(encoded=bytes(range(256)) * 16),
    ),
    search_case(
        "search-truncated-png",
        INVALID,
        ("image cannot be decoded",),
        image=common_pb2.Image(encoded=png_header(64, 64)[:40]),
    ),
    search_case(
        "search-decompression-bomb",
        INVALID,
        ("pixels", "above the limit", "downscale"),
        image=common_pb2.Image(encoded=png_header(100_000, 100_000)),
    ),
    search_case("search-zero-width-png", INVALID, ("image",), image=common_pb2.Image(encoded=png_header(0, 10))),
    search_case(
        "search-raw-wrong-byte-count",
        INVALID,
        ("needs 300 rgb bytes", "got 5"),
        image=common_pb2.Image(raw=common_pb2.RawImage(width=10, height=10, rgb=b"\x00" * 5)),
    ),
    search_case(
        "search-raw-zero-size",
        INVALID,
        ("zero size",),
        image=common_pb2.Image(raw=common_pb2.RawImage(width=0, height=0, rgb=b"")),
    ),
    search_case(
        "search-raw-too-many-pixels",
        INVALID,
        ("above the limit", "pixels"),
        image=common_pb2.Image(raw=common_pb2.RawImage(width=100_000, height=100_000, rgb=b"\x00")),
    ),
    expecting(
        search_case(
            "search-top-k-over-limit",
            INVALID,
            ("top_k 1000000 is above the limit of 100", "ask for at most 100"),
            top_k=10**6,
        ),
        fields=("top_k",),
        quota=("top_k",),
    ),
    search_case("gateway-search-top-k-max-uint32", INVALID, ("top_k", "ask for at most 100"), top_k=2**32 - 1),
    expecting(
        search_case(
            "search-rerank-k-over-limit",
            INVALID,
            ("rerank_k 101 is above the limit of 100", "or 0 for none"),
            rerank_k=101,
        ),
        fields=("rerank_k",),
    ),
    search_case("search-rerank-k-max-uint32", INVALID, ("rerank_k", "above the limit"), rerank_k=2**32 - 1),
    # Spatial re-ranking (SIGNATURE_KIND_BLCF): the reference gateway does not index BLCF, so its
    # options are checked before the kind is (they are wrong whatever is indexed).
    expecting(
        search_case(
            "search-spatial-rerank-k-with-deep",
            INVALID,
            ("spatial_rerank_k applies to signature_kind_blcf only", "not to signature_kind_deep", "leave it unset"),
            signature_kind=common_pb2.SIGNATURE_KIND_DEEP,
            spatial_rerank_k=10,
        ),
        fields=("spatial_rerank_k",),
    ),
    expecting(
        search_case(
            "search-query-expansion-with-the-default-kind",
            INVALID,
            ("query_expansion applies to signature_kind_blcf only", "set signature_kind signature_kind_blcf"),
            query_expansion=0,
        ),
        fields=("query_expansion",),
    ),
    expecting(
        search_case(
            "search-spatial-rerank-k-over-limit",
            INVALID,
            ("spatial_rerank_k 201 is above the limit of 200", "or 0 for none"),
            signature_kind=common_pb2.SIGNATURE_KIND_BLCF,
            spatial_rerank_k=201,
        ),
        fields=("spatial_rerank_k",),
    ),
    search_case(
        "search-spatial-rerank-k-max-uint32",
        INVALID,
        ("spatial_rerank_k", "above the limit"),
        signature_kind=common_pb2.SIGNATURE_KIND_BLCF,
        spatial_rerank_k=2**32 - 1,
    ),
    expecting(
        search_case(
            "search-query-expansion-above-spatial-rerank-k",
            INVALID,
            ("query_expansion 6 is above spatial_rerank_k 5", "expand over at most 5"),
            signature_kind=common_pb2.SIGNATURE_KIND_BLCF,
            spatial_rerank_k=5,
            query_expansion=6,
        ),
        fields=("query_expansion",),
    ),
    expecting(
        search_case(
            "search-blcf-not-indexed",
            INVALID,
            ("signature_kind signature_kind_blcf is not indexed here", "signature_kind_deep", "ask for one of those"),
            signature_kind=common_pb2.SIGNATURE_KIND_BLCF,
        ),
        fields=("signature_kind",),
    ),
    search_case("search-min-confidence-above-one", INVALID, ("min_confidence", "(0, 1]"), min_confidence=1.5),
    search_case("search-min-confidence-negative", INVALID, ("min_confidence", "(0, 1]"), min_confidence=-0.2),
    search_case("search-min-confidence-nan", INVALID, ("min_confidence", "(0, 1]"), min_confidence=float("nan")),
    search_case("search-min-score-nan", INVALID, ("min_score", "finite"), min_score=float("nan")),
    search_case("search-min-score-infinite", INVALID, ("min_score", "finite"), min_score=float("inf")),
    search_case(
        "search-unknown-signature-kind", INVALID, ("signature_kind 7", "signature_kind_deep"), signature_kind=7
    ),
    expecting(
        search_case(
            "search-too-many-regions",
            EXHAUSTED,
            ("65 regions", "at most 64"),
            regions=[region(box(0, 0, 10, 10))] * 65,
        ),
        quota=("regions",),
    ),
    search_case(
        "search-too-many-categories",
        EXHAUSTED,
        ("257 categories", "at most 256"),
        categories=[f"c{i}" for i in range(257)],
    ),
    search_case(
        "search-category-with-newline",
        INVALID,
        ("categories[1]",) + NAME_RULE,
        categories=[CATEGORY, "shoes\n<script>"],
    ),
    search_case("search-category-too-long", INVALID, ("above the limit of 128",) + NAME_RULE, categories=["x" * 5000]),
    search_case("search-category-empty", INVALID, ("category is required",), categories=[""]),
    search_case("search-category-nul", INVALID, ("u+0000",) + NAME_RULE, categories=["a\x00b"]),
    search_case(
        "search-region-empty-box",
        INVALID,
        ("regions[0].box", "x_max must exceed x_min"),
        regions=[region(box(100, 100, 50, 200), CATEGORY)],
    ),
    search_case(
        "search-region-nan-box",
        INVALID,
        ("regions[0].box", "finite"),
        regions=[region(box(float("nan"), 0, 50, 50), CATEGORY)],
    ),
    search_case(
        "search-region-infinite-box",
        INVALID,
        ("regions[0].box", "finite"),
        regions=[region(box(0, 0, float("inf"), 50), CATEGORY)],
    ),
    search_case(
        "search-region-outside-the-photo",
        INVALID,
        ("regions[1].box", "outside", "overlaps it"),
        regions=[region(box(0, 0, 50, 50), CATEGORY), region(box(5000, 5000, 6000, 6000), CATEGORY)],
    ),
    search_case(
        "search-region-bad-category",
        INVALID,
        ("regions[0].category",) + NAME_RULE,
        regions=[region(box(0, 0, 50, 50), "tab\there")],
    ),
    search_case(
        "search-whole-image-source-asked-for",
        INVALID,
        ("sources", "cannot be asked for", "item_source_detector"),
        sources=[gateway_pb2.ITEM_SOURCE_WHOLE_IMAGE],
    ),
    search_case("search-unknown-source-value", INVALID, ("sources", "cannot be asked for"), sources=[99]),
    search_case("search-max-items-over-limit", INVALID, ("max_items 1000", "ask for at most 48"), max_items=1000),
    expecting(
        search_case(
            "search-filter-label-key-with-newline",
            INVALID,
            ("filter.labels[0].key", "letters, digits"),
            filter=common_pb2.Filter(labels=[common_pb2.LabelClause(key="brand\n<script>", values=["acme"])]),
        ),
        fields=("filter.labels[0].key",),
    ),
    search_case(
        "search-filter-nested-too-deep",
        INVALID,
        ("any_of", "4 levels"),
        filter=nested_filter(6),
    ),
    search_case(
        "search-filter-too-many-terms",
        INVALID,
        ("more than 256",),
        filter=common_pb2.Filter(any_tags=[f"t{i}" for i in range(300)]),
    ),
    search_case(
        "search-filter-path-with-empty-segment",
        INVALID,
        ("filter.path_prefix", "empty segment"),
        filter=common_pb2.Filter(path_prefix="fashion//tops"),
    ),
    search_case(
        "search-filter-huge-value-is-not-echoed",
        INVALID,
        ("filter.labels[0].values[0]", "above the limit of 128"),
        filter=common_pb2.Filter(labels=[common_pb2.LabelClause(key="k", values=["v" * 1_000_000])]),
    ),
    # A filter nothing passes is no error: no matches.
    search_case(
        "search-filter-nothing-passes-is-no-error",
        OK,
        (),
        filter=common_pb2.Filter(labels=[common_pb2.LabelClause(key="brand", values=["nobody"])]),
        categories=["reference"],
    ),
    # Used to be answered as if fine; now fine for real: a category with no catalogue is no error.
    search_case("search-unknown-category-is-no-error", OK, (), categories=["no-such-category"], top_k=1),
    search_case(
        "search-region-of-unknown-category-is-no-error", OK, (), regions=[region(box(0, 0, 80, 80), "no-such-category")]
    ),
    Case(
        "search-malformed-protobuf",
        SEARCH,
        lambda s: s.channels["gateway"].unary_unary(SEARCH)(b"\xff\xff\xff\xff", timeout=s.timeout),
        INVALID,
        ("not a valid protobuf message",),
    ),
]


# --- IndexProducts ----------------------------------------------------------------------------------


def product(
    s: Stubs, product_id: str = "bad-input-product", category: str = CATEGORY, **fields
) -> gateway_pb2.IndexProductsRequest:
    """One catalogue image of the reference crop, with its box (nothing to localise)."""
    request = gateway_pb2.IndexProductsRequest(
        product_id=product_id, category=category, image=s.crop, box=box(0, 0, 64, 64)
    )
    for name, value in fields.items():
        if name == "metadata":
            request.metadata.update(value)
        elif isinstance(value, (common_pb2.Box, common_pb2.Image, common_pb2.ProductAttributes)):
            getattr(request, name).CopyFrom(value)
        elif value is None:
            request.ClearField(name)
        else:
            setattr(request, name, value)
    return request


def index_case(case_id_: str, code: grpc.StatusCode, says: tuple[str, ...], *products) -> Case:
    """`products`: functions of the stubs, each making one request of the stream."""
    return Case(
        case_id_,
        INDEX,
        lambda s: s.gateway.IndexProducts(iter([make(s) for make in products]), timeout=s.timeout),
        code,
        says,
    )


def with_(**fields):
    return lambda s: product(s, **fields)


INDEX_CASES = [
    index_case("index-missing-product-id", INVALID, ("product #0", "product_id is required"), with_(product_id="")),
    index_case("index-missing-category", INVALID, ("product #0", "category is required"), with_(category="")),
    index_case(
        "index-category-with-slash-and-spaces",
        INVALID,
        ("second space",) + NAME_RULE,
        with_(category="shoes  and/hats"),
    ),
    index_case(
        "index-category-too-long", INVALID, ("above the limit of 128",) + NAME_RULE, with_(category="c" * 100_000)
    ),
    index_case("index-category-control-character", INVALID, ("u+001b",) + NAME_RULE, with_(category="a\x1bb")),
    index_case(
        "index-product-id-too-long",
        INVALID,
        ("product_id", "300 utf-8 bytes", "at most 256"),
        with_(product_id="p" * 300),
    ),
    index_case(
        "index-image-id-too-long", INVALID, ("image_id", "1000 utf-8 bytes", "at most 256"), with_(image_id="i" * 1000)
    ),
    index_case("index-no-image", INVALID, ("image", "set image.encoded"), with_(image=common_pb2.Image())),
    index_case(
        "index-corrupt-image",
        INVALID,
        ("image cannot be decoded",),
        with_(image=common_pb2.Image(encoded=b"\xff\xd8\xff garbage")),
    ),
    index_case(
        "index-decompression-bomb",
        INVALID,
        ("above the limit", "downscale"),
        with_(image=common_pb2.Image(encoded=png_header(100_000, 100_000))),
    ),
    index_case(
        "index-raw-wrong-byte-count",
        INVALID,
        ("rgb bytes",),
        with_(image=common_pb2.Image(raw=common_pb2.RawImage(width=4, height=4, rgb=b"\x00"))),
    ),
    expecting(
        index_case(
            "index-empty-box", INVALID, ("box is empty", "x_max must exceed x_min"), with_(box=box(30, 30, 10, 10))
        ),
        info={"stored_images": "0", "refused_request": "0"},
        fields=("requests[0]", "requests[0].box"),
    ),
    index_case("index-nan-box", INVALID, ("box", "finite"), with_(box=box(0, float("nan"), 10, 10))),
    index_case(
        "index-box-outside-the-image",
        INVALID,
        ("box lies outside", "overlaps it"),
        with_(box=box(10_000, 10_000, 20_000, 20_000)),
    ),
    index_case(
        "index-metadata-too-many-keys",
        INVALID,
        ("'bad-input-product'", "65 keys", "limit of 64"),
        with_(metadata={f"k{i}": "v" for i in range(65)}),
    ),
    index_case(
        "index-metadata-key-too-long",
        INVALID,
        ("metadata key", "limit of 128", "shorter keys"),
        with_(metadata={"k" * 129: "v"}),
    ),
    index_case(
        "index-metadata-value-too-long",
        INVALID,
        ("'notes'", "limit of 4096", "reference"),
        with_(metadata={"notes": "v" * 5000}),
    ),
    index_case(
        "index-metadata-too-large-in-all",
        INVALID,
        ("in all", "limit of 16384"),
        with_(metadata={f"k{i}": "v" * 4000 for i in range(5)}),
    ),
    index_case(
        "index-huge-metadata-is-not-echoed", INVALID, ("limit of 4096",), with_(metadata={"x" * 64: "y" * 1_000_000})
    ),
    expecting(
        index_case(
            "index-second-image-bad-keeps-the-first",
            INVALID,
            ("product #1 ('bad-input-second')", "1 image of 1 product was stored", "re-send"),
            with_(product_id="bad-input-first"),
            with_(product_id="bad-input-second", category=""),
        ),
        info={"stored_images": "1", "stored_products": "1", "refused_request": "1"},
        fields=("requests[1]",),
    ),
    index_case(
        "index-bad-image-after-bad-metadata-names-the-first-problem",
        INVALID,
        ("product #0", "limit of 64"),
        with_(metadata={f"k{i}": "v" for i in range(100)}),
        with_(image=common_pb2.Image(encoded=b"junk")),
    ),
    expecting(
        index_case(
            "index-attributes-bad-tag",
            INVALID,
            ("product #0", "attributes.tags[1]", "letters, digits"),
            with_(attributes=common_pb2.ProductAttributes(tags=["ok", "bad\ttag"])),
        ),
        info={"stored_images": "0", "refused_request": "0"},
        fields=("requests[0]", "requests[0].attributes.tags[1]"),
    ),
    index_case(
        "index-attributes-too-many-labels",
        INVALID,
        ("attributes.labels", "65 labels", "limit of 64"),
        with_(attributes=common_pb2.ProductAttributes(labels={f"k{i}": "v" for i in range(65)})),
    ),
    index_case(
        "index-attributes-path-with-leading-slash",
        INVALID,
        ("attributes.path", "empty segment"),
        with_(attributes=common_pb2.ProductAttributes(path="/fashion/tops")),
    ),
    index_case(
        "index-image-uri-without-scheme",
        INVALID,
        ("image_uri", "not an absolute uri", "https://"),
        with_(image_uri="shop.example/a.jpg"),
    ),
    index_case(
        "index-image-uri-too-long",
        INVALID,
        ("image_uri is 5008 utf-8 bytes", "limit of 2048"),
        with_(image_uri="https://" + "u" * 5000),
    ),
    index_case(
        "index-image-uri-with-newline",
        INVALID,
        ("image_uri", "control characters"),
        with_(image_uri="https://shop.example/a.jpg\nX-Injected: 1"),
    ),
    index_case(
        "index-reserved-metadata-key",
        INVALID,
        ("'mps:image_uri'", "gateway's own", "set image_uri"),
        with_(metadata={"mps:image_uri": "https://shop.example/a.jpg"}),
    ),
    index_case(
        "index-image-uri-over-the-metadata-limit-in-all",
        INVALID,
        ("limit of 16384", "image_uri is stored with the metadata"),
        with_(metadata={f"k{i}": "v" * 4000 for i in range(4)}, image_uri="https://shop.example/" + "a" * 1000),
    ),
    # Attributes and a URI are kept: a second image of the same product keeps them.
    index_case(
        "index-attributes-and-uri-are-fine",
        OK,
        (),
        with_(
            product_id="bad-input-attributes",
            attributes=common_pb2.ProductAttributes(path="a/b", tags=["t"], labels={"k": "v"}),
            image_uri="https://shop.example/a.jpg",
        ),
    ),
    # Used to report indexed: 2 for one stored image; now exact (and fine).
    index_case(
        "index-same-image-twice-is-fine",
        OK,
        (),
        with_(product_id="bad-input-twice"),
        with_(product_id="bad-input-twice"),
    ),
    index_case("index-empty-stream-is-fine", OK, ()),
    Case(
        "index-malformed-protobuf",
        INDEX,
        lambda s: s.channels["gateway"].stream_unary(INDEX)(iter([b"\xff\xff\xff\xff"]), timeout=s.timeout),
        INVALID,
        ("not a valid protobuf message",),
    ),
]


# --- DeleteProducts ---------------------------------------------------------------------------------


def delete_case(case_id_: str, code: grpc.StatusCode, says: tuple[str, ...], product_ids=(), categories=()) -> Case:
    return Case(
        case_id_,
        DELETE,
        lambda s: s.gateway.DeleteProducts(
            gateway_pb2.DeleteProductsRequest(product_ids=list(product_ids), categories=list(categories)),
            timeout=s.timeout,
        ),
        code,
        says,
    )


DELETE_CASES = [
    delete_case("delete-no-ids", INVALID, ("product_ids is empty", "name the products")),
    delete_case("delete-empty-id", INVALID, ("product_ids[1] is empty",), product_ids=["bad-input-x", ""]),
    delete_case(
        "delete-id-too-long",
        INVALID,
        ("product_ids[0] is 100000 utf-8 bytes", "limit of 256"),
        product_ids=["p" * 100_000],
    ),
    expecting(
        delete_case(
            "delete-too-many-ids",
            EXHAUSTED,
            ("10001 product_ids", "at most 10000"),
            product_ids=[f"bad-input-{i}" for i in range(10_001)],
        ),
        quota=("product_ids",),
    ),
    delete_case(
        "delete-category-bad-characters",
        INVALID,
        NAME_RULE,
        product_ids=["bad-input-x"],
        categories=["shoes;drop table"],
    ),
    delete_case(
        "delete-category-too-long",
        INVALID,
        ("above the limit of 128",) + NAME_RULE,
        product_ids=["bad-input-x"],
        categories=["c" * 10_000],
    ),
    delete_case(
        "delete-category-empty", INVALID, ("category is required",), product_ids=["bad-input-x"], categories=[""]
    ),
    delete_case(
        "delete-too-many-categories",
        EXHAUSTED,
        ("257 categories", "at most 256"),
        product_ids=["bad-input-x"],
        categories=[f"c{i}" for i in range(257)],
    ),
    # A product nowhere is not an error: it is reported in not_found.
    delete_case("delete-unknown-product-is-no-error", OK, (), product_ids=["bad-input-nowhere"], categories=[CATEGORY]),
    Case(
        "delete-malformed-protobuf",
        DELETE,
        lambda s: s.channels["gateway"].unary_unary(DELETE)(b"\x0a\xff\xff\xff\xff", timeout=s.timeout),
        INVALID,
        ("not a valid protobuf message",),
    ),
]


# --- StreamMultiProductSearch -----------------------------------------------------------------------


def stream_case(case_id_: str, code: grpc.StatusCode, says: tuple[str, ...], *frames: dict, options=None) -> Case:
    """A video stream whose frames are the reference photo (frame_number 1, 2...) with each
    `frames` dict's fields set instead ("image": an Image, or None for none); `options` on the first."""

    def call(s: Stubs):
        requests = []
        for n, fields in enumerate(frames, 1):
            fields = dict(fields)
            image = fields.pop("image", "photo")
            request = gateway_pb2.StreamMultiProductSearchRequest(frame_number=fields.pop("frame_number", n), **fields)
            if image == "photo":
                request.image.CopyFrom(s.photo)
            elif image is not None:
                request.image.CopyFrom(image)
            requests.append(request)
        if options is not None and requests:
            requests[0].options.CopyFrom(options)
        return list(s.gateway.StreamMultiProductSearch(iter(requests), timeout=s.timeout))

    return Case(case_id_, STREAM, call, code, says)


PHOTO: dict = {}  # a frame of the reference photo, nothing else set

STREAM_CASES = [
    stream_case(
        "stream-first-frame-no-image", INVALID, ("frame #0", "has no image", "set image.encoded"), {"image": None}
    ),
    stream_case("stream-later-frame-no-image", INVALID, ("frame #1", "has no image"), PHOTO, {"image": None}),
    stream_case(
        "stream-empty-encoded-image",
        INVALID,
        ("image.encoded is empty",),
        {"image": common_pb2.Image(encoded=b"")},
    ),
    stream_case(
        "stream-random-bytes",
        INVALID,
        ("frame_number 1", "image cannot be decoded"),
        {"image": common_pb2.Image(encoded=bytes(range(256)) * 16)},
    ),
    stream_case(
        "stream-decompression-bomb",
        INVALID,
        ("pixels", "above the limit", "downscale"),
        {"image": common_pb2.Image(encoded=png_header(100_000, 100_000))},
    ),
    stream_case(
        "stream-raw-wrong-byte-count",
        INVALID,
        ("frame #0", "needs 300 rgb bytes", "got 5"),
        {"image": common_pb2.Image(raw=common_pb2.RawImage(width=10, height=10, rgb=b"\x00" * 5))},
    ),
    stream_case(
        "stream-raw-zero-size",
        INVALID,
        ("zero size",),
        {"image": common_pb2.Image(raw=common_pb2.RawImage(width=0, height=0, rgb=b""))},
    ),
    stream_case(
        "stream-raw-too-many-pixels",
        INVALID,
        ("above the limit", "pixels"),
        {"image": common_pb2.Image(raw=common_pb2.RawImage(width=100_000, height=100_000, rgb=b"\x00"))},
    ),
    stream_case(
        "stream-frame-numbers-not-increasing",
        INVALID,
        ("frame numbers must increase", "follows frame_number 5"),
        {"frame_number": 5},
        {"frame_number": 5},
    ),
    stream_case(
        "stream-options-on-a-later-frame",
        INVALID,
        ("frame #1 carries options", "only the first message"),
        PHOTO,
        {"options": gateway_pb2.VideoOptions(top_k=1)},
    ),
    expecting(
        stream_case(
            "stream-top-k-over-limit",
            INVALID,
            ("options.top_k 1000000 is above the limit of 100",),
            PHOTO,
            options=gateway_pb2.VideoOptions(top_k=10**6),
        ),
        fields=("top_k",),
        quota=("top_k",),
    ),
    stream_case(
        "stream-unknown-signature-kind",
        INVALID,
        ("signature_kind 7", "signature_kind_deep"),
        PHOTO,
        options=gateway_pb2.VideoOptions(signature_kind=7),  # type: ignore[arg-type]
    ),
    stream_case(
        "stream-blcf-not-indexed",
        INVALID,
        ("options.signature_kind signature_kind_blcf is not indexed here",),
        PHOTO,
        options=gateway_pb2.VideoOptions(signature_kind=common_pb2.SIGNATURE_KIND_BLCF),
    ),
    stream_case(
        "stream-min-score-nan",
        INVALID,
        ("min_score", "finite"),
        PHOTO,
        options=gateway_pb2.VideoOptions(min_score=float("nan")),
    ),
    stream_case(
        "stream-category-bad-characters",
        INVALID,
        ("options.categories[0]",) + NAME_RULE,
        PHOTO,
        options=gateway_pb2.VideoOptions(categories=["shoes;drop table"]),
    ),
    expecting(
        stream_case(
            "stream-filter-bad-tag",
            INVALID,
            ("options.filter.all_tags[0]", "letters, digits"),
            PHOTO,
            options=gateway_pb2.VideoOptions(filter=common_pb2.Filter(all_tags=["a\x00b"])),
        ),
        fields=("filter.all_tags[0]",),
    ),
    stream_case(
        "stream-too-many-categories",
        EXHAUSTED,
        ("257 categories", "at most 256"),
        PHOTO,
        options=gateway_pb2.VideoOptions(categories=[f"c{i}" for i in range(257)]),
    ),
    # An empty stream is no error: its only message is an empty summary.
    stream_case("stream-empty-is-fine", OK, ()),
    Case(
        "stream-malformed-protobuf",
        STREAM,
        lambda s: list(s.channels["gateway"].stream_stream(STREAM)(iter([b"\x0a\xff\xff\xff\xff"]), timeout=s.timeout)),
        INVALID,
        ("not a valid protobuf message",),
    ),
]

# --- catalogue management -----------------------------------------------------------------------------

REFERENCE = "reference"  # the reference catalogue's category (read here, never changed)


def unary_case(case_id_: str, rpc: str, code: grpc.StatusCode, says: tuple[str, ...], request) -> Case:
    """One unary call of `rpc` with `request` (a message, or a function of the stubs making one)."""
    method = rpc.rsplit("/", 1)[1]

    def call(s: Stubs):
        message = request(s) if callable(request) else request
        return getattr(s.gateway, method)(message, timeout=s.timeout)

    return Case(case_id_, rpc, call, code, says)


def malformed(case_id_: str, rpc: str) -> Case:
    return Case(
        case_id_,
        rpc,
        lambda s: s.channels["gateway"].unary_unary(rpc)(b"\x0a\xff\xff\xff\xff", timeout=s.timeout),
        INVALID,
        ("not a valid protobuf message",),
    )


def bad_tag_filter() -> common_pb2.Filter:
    return common_pb2.Filter(all_tags=["tab\there"])


CATALOGUE_CASES = [
    unary_case("get-product-no-id", GET_PRODUCT, INVALID, ("product_id is required",), gateway_pb2.GetProductRequest()),
    unary_case(
        "get-product-id-too-long",
        GET_PRODUCT,
        INVALID,
        ("product_id", "100000 utf-8 bytes", "limit of 256"),
        gateway_pb2.GetProductRequest(product_id="p" * 100_000),
    ),
    unary_case(
        "get-product-unknown",
        GET_PRODUCT,
        NOT_FOUND,
        ("'bad-input-nowhere'", "not in the catalogue"),
        gateway_pb2.GetProductRequest(product_id="bad-input-nowhere"),
    ),
    unary_case(
        "get-product-unknown-category",
        GET_PRODUCT,
        NOT_FOUND,
        ("category 'bad-input-gateway-nowhere' is not in the catalogue",),
        gateway_pb2.GetProductRequest(product_id="ref-coffee", category="bad-input-gateway-nowhere"),
    ),
    unary_case(
        "get-product-bad-category",
        GET_PRODUCT,
        INVALID,
        NAME_RULE,
        gateway_pb2.GetProductRequest(product_id="ref-coffee", category="shoes;drop table"),
    ),
    unary_case(
        "get-product-reference-is-fine", GET_PRODUCT, OK, (), gateway_pb2.GetProductRequest(product_id="ref-coffee")
    ),
    malformed("get-product-malformed-protobuf", GET_PRODUCT),
    unary_case(
        "list-products-no-category",
        LIST_PRODUCTS,
        INVALID,
        ("category is required",),
        gateway_pb2.ListProductsRequest(),
    ),
    expecting(
        unary_case(
            "list-products-page-size-over-limit",
            LIST_PRODUCTS,
            INVALID,
            ("page_size 5000 is above the limit of 1000",),
            gateway_pb2.ListProductsRequest(category=REFERENCE, page_size=5000),
        ),
        fields=("page_size",),
        quota=("page_size",),
    ),
    unary_case(
        "list-products-unknown-category",
        LIST_PRODUCTS,
        NOT_FOUND,
        ("'bad-input-gateway-nowhere'", "not in the catalogue"),
        gateway_pb2.ListProductsRequest(category="bad-input-gateway-nowhere"),
    ),
    unary_case(
        "list-products-bad-filter",
        LIST_PRODUCTS,
        INVALID,
        ("filter.all_tags[0]",),
        gateway_pb2.ListProductsRequest(category=REFERENCE, filter=bad_tag_filter()),
    ),
    unary_case(
        "list-products-forged-page-token",
        LIST_PRODUCTS,
        INVALID,
        ("page_token",),
        gateway_pb2.ListProductsRequest(category=REFERENCE, page_token="not a token \x00"),
    ),
    unary_case(
        "list-products-reference-is-fine", LIST_PRODUCTS, OK, (), gateway_pb2.ListProductsRequest(category=REFERENCE)
    ),
    malformed("list-products-malformed-protobuf", LIST_PRODUCTS),
    expecting(
        unary_case(
            "update-product-unknown-mask",
            UPDATE_PRODUCT,
            INVALID,
            ("update_mask[1] 'colour'", '"labels.key"'),
            gateway_pb2.UpdateProductRequest(product_id="bad-input-nowhere", update_mask=["tags", "colour"]),
        ),
        fields=("update_mask[1]",),
    ),
    unary_case(
        "update-product-bad-label-key-in-mask",
        UPDATE_PRODUCT,
        INVALID,
        ("update_mask[0]", "label key"),
        gateway_pb2.UpdateProductRequest(product_id="bad-input-nowhere", update_mask=["labels.a\nb"]),
    ),
    unary_case(
        "update-product-bad-attributes",
        UPDATE_PRODUCT,
        INVALID,
        ("attributes.path", "empty segment"),
        gateway_pb2.UpdateProductRequest(
            product_id="bad-input-nowhere", attributes=common_pb2.ProductAttributes(path="a/")
        ),
    ),
    unary_case(
        "update-product-unknown",
        UPDATE_PRODUCT,
        NOT_FOUND,
        ("'bad-input-nowhere'",),
        gateway_pb2.UpdateProductRequest(
            product_id="bad-input-nowhere", attributes=common_pb2.ProductAttributes(tags=["x"]), update_mask=["tags"]
        ),
    ),
    unary_case(
        "update-product-no-id",
        UPDATE_PRODUCT,
        INVALID,
        ("product_id is required",),
        gateway_pb2.UpdateProductRequest(update_mask=["tags"]),
    ),
    malformed("update-product-malformed-protobuf", UPDATE_PRODUCT),
    expecting(
        unary_case(
            "purge-empty-filter-without-force",
            PURGE_PRODUCTS,
            INVALID,
            ("empty filter deletes every product", "set force"),
            gateway_pb2.PurgeProductsRequest(category=REFERENCE),
        ),
        fields=("filter",),
    ),
    unary_case(
        "purge-no-category", PURGE_PRODUCTS, INVALID, ("category is required",), gateway_pb2.PurgeProductsRequest()
    ),
    unary_case(
        "purge-bad-filter",
        PURGE_PRODUCTS,
        INVALID,
        ("filter.all_tags[0]",),
        gateway_pb2.PurgeProductsRequest(category=REFERENCE, filter=bad_tag_filter()),
    ),
    unary_case(
        "purge-unknown-category",
        PURGE_PRODUCTS,
        NOT_FOUND,
        ("'bad-input-gateway-nowhere'", "not in the catalogue"),
        gateway_pb2.PurgeProductsRequest(category="bad-input-gateway-nowhere", force=True),
    ),
    unary_case(
        "purge-nothing-passes-is-no-error",
        PURGE_PRODUCTS,
        OK,
        (),
        gateway_pb2.PurgeProductsRequest(
            category=CATEGORY, filter=common_pb2.Filter(labels=[common_pb2.LabelClause(key="k", values=["nobody"])])
        ),
    ),
    malformed("purge-malformed-protobuf", PURGE_PRODUCTS),
    unary_case(
        "stats-unknown-category",
        STATS,
        NOT_FOUND,
        ("'bad-input-gateway-nowhere'", "not in the catalogue"),
        gateway_pb2.GetCatalogueStatsRequest(categories=[REFERENCE, "bad-input-gateway-nowhere"]),
    ),
    unary_case(
        "stats-bad-category",
        STATS,
        INVALID,
        ("categories[0]",) + NAME_RULE,
        gateway_pb2.GetCatalogueStatsRequest(categories=["a\x1bb"]),
    ),
    expecting(
        unary_case(
            "stats-too-many-categories",
            STATS,
            EXHAUSTED,
            ("257 categories", "at most 256"),
            gateway_pb2.GetCatalogueStatsRequest(categories=[f"c{i}" for i in range(257)]),
        ),
        quota=("categories",),
    ),
    unary_case("stats-of-everything-is-fine", STATS, OK, (), gateway_pb2.GetCatalogueStatsRequest()),
    malformed("stats-malformed-protobuf", STATS),
    unary_case(
        "image-no-image-id",
        PRODUCT_IMAGE,
        INVALID,
        ("image_id is required",),
        gateway_pb2.GetProductImageRequest(product_id="ref-coffee"),
    ),
    unary_case(
        "image-unknown-product",
        PRODUCT_IMAGE,
        NOT_FOUND,
        ("'bad-input-nowhere'",),
        gateway_pb2.GetProductImageRequest(product_id="bad-input-nowhere", image_id="front"),
    ),
    unary_case(
        "image-unknown-image",
        PRODUCT_IMAGE,
        NOT_FOUND,
        ("has no image 'back'", "its images"),
        gateway_pb2.GetProductImageRequest(product_id="ref-coffee", image_id="back", category=REFERENCE),
    ),
    malformed("image-malformed-protobuf", PRODUCT_IMAGE),
]

CASES = SEARCH_CASES + INDEX_CASES + DELETE_CASES + STREAM_CASES + CATALOGUE_CASES


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_case(hostile, case):
    hostile.check(case)


def test_every_service_unchanged_afterwards(hostile):
    hostile.assert_unchanged()
