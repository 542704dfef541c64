"""Bad input to the index shard (mps.index.v1.IndexService), every RPC: names, ids, metadata,
signatures, limits, streams, and the inputs that used to break a shard or keep it from starting
(a NUL or 600-byte database name, a 2**20+1-d vector, 6.5 MB of metadata, top_k out of range)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import grpc
import numpy as np
import pytest

from common import blcf_codec
from common.blcf_codec import AssignmentMap
from common.bow_codec import BagOfWords, decode, encode
from common.proto_convert import dense_from_proto, dense_to_proto
from mps.common.v1 import common_pb2
from mps.index.v1 import index_pb2
from tests.e2e.bad_input.harness import Case, Stubs, case_id, expecting, rpc_name

ADD, DELETE, SEARCH, BATCH, PARTIAL, LOOKUP, STATS, REPLICATE = (
    rpc_name(index_pb2, "IndexService", method)
    for method in ("Add", "Delete", "Search", "SearchBatch", "PartialScores", "Lookup", "Stats", "Replicate")
)
UPDATE, LIST, IMAGES = (
    rpc_name(index_pb2, "IndexService", method) for method in ("UpdateGroups", "ListGroups", "GetItemImages")
)
INVALID, NOT_FOUND, EXHAUSTED, PRECONDITION, OK = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OK,
)
DEEP = common_pb2.SIGNATURE_KIND_DEEP
# The corpus's own databases: names without a ".<kind>" suffix, so the gateway sees no category.
OWN = "corpus_index"


def dense(values: Any) -> common_pb2.Signature:
    return dense_to_proto(np.asarray(values, np.float32))


def bag(words: list[int], vocabulary: int = 100, codebook: int = 1) -> common_pb2.Signature:
    return common_pb2.Signature(
        kind=common_pb2.SIGNATURE_KIND_BOW, bow=encode(BagOfWords.from_words(np.asarray(words), vocabulary, codebook))
    )


def item(
    database: str = OWN, item_id: str = "x", signature: common_pb2.Signature | None = None, **fields: Any
) -> index_pb2.AddRequest:
    return index_pb2.AddRequest(
        item_id=item_id,
        database=database,
        signature=signature if signature is not None else dense([1, 0, 0, 0]),
        **fields,
    )


def add(*requests: index_pb2.AddRequest) -> Callable[[Stubs], Any]:
    return lambda s: s.index.Add(iter(requests), timeout=s.timeout)


def add_expecting(added: int, replaced: int, *requests: index_pb2.AddRequest) -> Callable[[Stubs], Any]:
    def call(s: Stubs) -> None:
        response = s.index.Add(iter(requests), timeout=s.timeout)
        assert (response.added, response.replaced) == (added, replaced), response

    return call


def search(
    database: str | None = None, signature: common_pb2.Signature | str = "deep", **fields: Any
) -> Callable[[Stubs], Any]:
    """A drained Search; database None = the reference database of the signature's kind."""

    def call(s: Stubs) -> Any:
        query = getattr(s, signature) if isinstance(signature, str) else signature
        name = (
            database
            if database is not None
            else s.databases["bow" if query.kind == common_pb2.SIGNATURE_KIND_BOW else "deep"]
        )
        return list(
            s.index.Search(index_pb2.SearchRequest(database=name, signature=query, **fields), timeout=s.timeout)
        )

    return call


def batch(
    kind: str = "deep",
    signatures: Callable[[Stubs], list[common_pb2.Signature]] | None = None,
    database: str | None = None,
    **fields: Any,
) -> Callable[[Stubs], Any]:
    def call(s: Stubs) -> Any:
        queries = signatures(s) if signatures is not None else [getattr(s, kind)]
        return s.index.SearchBatch(
            index_pb2.SearchBatchRequest(
                database=s.databases[kind] if database is None else database, signatures=queries, **fields
            ),
            timeout=s.timeout,
        )

    return call


def partial(
    kind: str = "bow", signature: Callable[[Stubs], common_pb2.Signature] | None = None, database: str | None = None
) -> Callable[[Stubs], Any]:
    def call(s: Stubs) -> Any:
        return list(
            s.index.PartialScores(
                index_pb2.PartialScoresRequest(
                    database=s.databases[kind] if database is None else database,
                    signature=signature(s) if signature is not None else s.bow,
                ),
                timeout=s.timeout,
            )
        )

    return call


def lookup(
    kind: str = "bow", keys: list[int] | None = None, database: str | None = None, expect_items: int | None = None
) -> Callable[[Stubs], Any]:
    def call(s: Stubs) -> Any:
        response = s.index.Lookup(
            index_pb2.LookupRequest(database=s.databases[kind] if database is None else database, keys=keys or [1]),
            timeout=s.timeout,
        )
        assert expect_items is None or len(response.items) == expect_items
        return response

    return call


def no_database_listed(call: Callable[[Stubs], Any]) -> Callable[[Stubs], Any]:
    """The call, checking that its refusal names no database the shard holds."""

    def checked(s: Stubs) -> Any:
        try:
            return call(s)
        except grpc.RpcError as error:
            assert "reference" not in (error.details() or ""), error.details()
            raise

    return checked


def other_codebook(s: Stubs) -> common_pb2.Signature:
    held = decode(s.bow.bow)
    return common_pb2.Signature(
        kind=common_pb2.SIGNATURE_KIND_BOW,
        bow=encode(BagOfWords(held.words, held.counts, held.vocabulary, held.codebook ^ 1)),
    )


# A BLCF database of the corpus's own: 64-word vocabulary 0x00000b1c, 4 x 5 maps.
BLCF = f"{OWN}_blcf"
BLCF_VOCABULARY, BLCF_FINGERPRINT = 64, 0xB1C


def assignment(seed: int, vocabulary: int = BLCF_VOCABULARY, fingerprint: int = BLCF_FINGERPRINT) -> AssignmentMap:
    words = np.random.default_rng(seed).integers(0, BLCF_VOCABULARY, (4, 5)).astype(np.uint16)
    return AssignmentMap(words, vocabulary, fingerprint, 160, 128)


def pyramid_of(amap: AssignmentMap) -> AssignmentMap:
    """A query's two-level map of the same image (what a query by region is; never an item)."""
    return AssignmentMap(amap.words, amap.vocabulary, amap.fingerprint, amap.width, amap.height, (amap.words[:2],))


def blcf(data: AssignmentMap | bytes) -> common_pb2.Signature:
    encoded = data if isinstance(data, bytes) else blcf_codec.encode(data)
    return common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BLCF, blcf=encoded)


def rerank(**fields: Any) -> index_pb2.SpatialRerank:
    return index_pb2.SpatialRerank(**fields)


def reranked_search(s: Stubs) -> None:
    """A BLCF search re-ranked: every item says it was, with its window inside its image."""
    request = index_pb2.SearchRequest(
        database=BLCF, signature=blcf(assignment(1)), top_k=3, spatial_rerank=rerank(top_k=3, query_expansion=1)
    )
    items = [item for chunk in s.index.Search(request, timeout=s.timeout) for item in chunk.items]
    assert items and items[0].item_id == "blcf-1", items
    assert all(i.reranked and 0 <= i.window.x_min < i.window.x_max <= 160 for i in items), items


def stats_are_clean(s: Stubs) -> None:
    held = s.index.Stats(index_pb2.StatsRequest(), timeout=s.timeout).databases
    assert all(not d.broken_reason for d in held), [(d.name, d.broken_reason) for d in held]
    assert all("\0" not in d.name and len(d.name.encode()) <= 128 for d in held)


TOO_LONG = "n" * 129
EMPTY = common_pb2.Signature()


def local(count: int = 4, **fields: Any) -> common_pb2.LocalFeatures:
    """ORB-like local features of `count` keypoints in a 64 x 48 region, fields overridden."""
    xy = np.stack([np.arange(count) % 64, np.arange(count) % 48], axis=1).astype("<u2")
    values: dict[str, Any] = {
        "extractor": "orb-v1",
        "width": 64,
        "height": 48,
        "points_u16le": xy.tobytes(),
        "descriptors": bytes(range(32)) * count,
        "descriptor_bytes": 32,
    }
    return common_pb2.LocalFeatures(**{**values, **fields})


def features_read_back(s: Stubs) -> None:
    """The features added by the case before, alone (no_thumbnails), and none where not asked for."""
    request = index_pb2.GetItemImagesRequest(
        database=f"{OWN}_features", item_ids=["f", "f", "no-such-item"], local_features=True, no_thumbnails=True
    )
    (image,) = s.index.GetItemImages(request, timeout=s.timeout).images
    assert (image.item_id, image.thumbnail, image.local_features) == ("f", b"", local(256)), image.item_id
    request.local_features, request.no_thumbnails = False, False
    (image,) = s.index.GetItemImages(request, timeout=s.timeout).images
    assert image.thumbnail == b"jpeg" and not image.HasField("local_features")


CASES = [
    # -- Add: database names (a NUL split the snapshot key; over ~500 bytes no snapshot was written)
    Case("add-database-empty", ADD, add(item(database="")), INVALID, ("database is required",)),
    Case("add-database-nul", ADD, add(item(database="a\0b")), INVALID, ("database name", "u+0000")),
    Case("add-database-129-bytes", ADD, add(item(database=TOO_LONG)), INVALID, ("129 utf-8 bytes", "limit of 128")),
    Case("add-database-600-bytes", ADD, add(item(database="n" * 600)), INVALID, ("limit of 128",)),
    Case("add-database-multibyte-over-limit", ADD, add(item(database="é" * 65)), INVALID, ("130 utf-8 bytes",)),
    Case("add-database-leading-space", ADD, add(item(database=" shoes")), INVALID, ("whitespace",)),
    Case("add-database-newline", ADD, add(item(database="sho\nes")), INVALID, ("u+000a", "letters, digits")),
    Case("add-database-bell", ADD, add(item(database="a\x07")), INVALID, ("u+0007",)),
    Case("add-database-bidi-override", ADD, add(item(database="a\u202eb")), INVALID, ("u+202e",)),
    # -- Add: ids
    Case("add-item-id-missing", ADD, add(item(item_id="")), INVALID, ("item #0", "item_id is required")),
    Case("add-item-id-2000-bytes", ADD, add(item(item_id="i" * 2000)), INVALID, ("item_id", "limit of 1024")),
    Case("add-group-id-2000-bytes", ADD, add(item(group_id="g" * 2000)), INVALID, ("group_id", "limit of 1024")),
    # -- Add: signatures
    Case("add-signature-unset", ADD, add(item(signature=EMPTY)), INVALID, ("unspecified", "signature_kind_deep")),
    Case(
        "add-signature-kind-99",
        ADD,
        add(item(signature=common_pb2.Signature(kind=cast(common_pb2.SignatureKind, 99)))),  # no such kind
        INVALID,
        ("signature kind 99 is unknown",),
    ),
    Case(
        "add-deep-without-values",
        ADD,
        add(item(signature=common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_DEEP))),
        INVALID,
        ("empty", "dense.values"),
    ),
    Case(
        "add-deep-bytes-not-whole-float32",
        ADD,
        add(item(signature=common_pb2.Signature(kind=DEEP, dense=common_pb2.DenseVector(values_f32le=b"\0" * 15)))),
        INVALID,
        ("dense.values_f32le is 15 bytes, not a multiple of 4", "little-endian float32"),
    ),
    Case(
        # The deprecated repeated float field is still read (an index's log written before holds it).
        "add-deep-in-the-deprecated-repeated-float-field",
        ADD,
        add_expecting(
            1,
            0,
            item(
                f"{OWN}_legacy",
                signature=common_pb2.Signature(kind=DEEP, dense=common_pb2.DenseVector(values=[0, 0, 1, 0])),
            ),
        ),
        OK,
    ),
    Case(
        "add-bow-without-bytes",
        ADD,
        add(item(signature=common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BOW))),
        INVALID,
        ("empty", "bow bytes"),
    ),
    Case(
        "add-bow-garbage",
        ADD,
        add(item(signature=common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BOW, bow=b"\x01garbage bytes"))),
        INVALID,
        ("bag-of-words signature",),
    ),
    Case(
        "add-bow-truncated",
        ADD,
        lambda s: s.index.Add(
            iter([item(signature=common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BOW, bow=s.bow.bow[:12]))]),
            timeout=s.timeout,
        ),
        INVALID,
        ("truncated",),
    ),
    Case("add-dense-nan", ADD, add(item(signature=dense([np.nan, 1, 0, 0]))), INVALID, ("nan",)),
    Case("add-dense-inf", ADD, add(item(signature=dense([np.inf, 1, 0, 0]))), INVALID, ("infinite",)),
    Case("add-dense-zeros", ADD, add(item(signature=dense([0, 0, 0, 0]))), INVALID, ("all zeros",)),
    Case(
        "add-dense-4097-dims",
        ADD,
        add(item(signature=dense(np.ones(4097)))),
        INVALID,
        ("4097 values", "limit of 4096 dimensions"),
    ),
    Case(
        "add-dense-2-to-the-20-plus-1-dims",
        ADD,
        add(item(signature=dense(np.ones((1 << 20) + 1)))),
        INVALID,
        ("limit of 4096 dimensions",),
    ),
    Case("add-box-nan", ADD, add(item(box=common_pb2.Box(x_min=float("nan"), x_max=1, y_max=1))), INVALID, ("box",)),
    Case("add-box-inf", ADD, add(item(box=common_pb2.Box(x_max=float("inf"), y_max=1))), INVALID, ("box", "infinite")),
    # -- Add: metadata (6.5 MB per product made a category's searches fail)
    Case(
        "add-metadata-65-keys",
        ADD,
        add(item(metadata={f"k{i}": "v" for i in range(65)})),
        INVALID,
        ("65 keys", "limit of 64"),
    ),
    Case(
        "add-metadata-key-129-bytes",
        ADD,
        add(item(metadata={"k" * 129: "v"})),
        INVALID,
        ("metadata key", "limit of 128"),
    ),
    Case(
        "add-metadata-value-4097-bytes",
        ADD,
        add(item(metadata={"title": "v" * 4097})),
        INVALID,
        ("'title'", "limit of 4096"),
    ),
    Case(
        "add-metadata-value-6-5-mb",
        ADD,
        add(item(metadata={"blob": "v" * 6_500_000})),
        INVALID,
        ("'blob'", "limit of 4096", "reference"),
    ),
    Case(
        "add-metadata-20-kib-in-all",
        ADD,
        add(item(metadata={f"k{i}": "v" * 4000 for i in range(5)})),
        INVALID,
        ("limit of 16384 per item",),
    ),
    # -- Add: against what a database holds
    Case(
        "add-bow-into-a-deep-database",
        ADD,
        lambda s: s.index.Add(
            iter([item(database=s.databases["deep"], item_id="corpus-x", signature=s.bow)]), timeout=s.timeout
        ),
        INVALID,
        ("holds signature_kind_deep", "not signature_kind_bow"),
    ),
    Case(
        "add-8-values-into-the-deep-database",
        ADD,
        lambda s: s.index.Add(
            iter([item(database=s.databases["deep"], item_id="corpus-x", signature=dense(np.ones(8)))]),
            timeout=s.timeout,
        ),
        INVALID,
        ("8 values", "-d vectors"),
    ),
    Case(
        "add-other-codebook-into-the-bow-database",
        ADD,
        lambda s: s.index.Add(
            iter([item(database=s.databases["bow"], item_id="corpus-x", signature=other_codebook(s))]),
            timeout=s.timeout,
        ),
        INVALID,
        ("codebook", "re-sign"),
    ),
    # -- Add: a stream is all or nothing, bounded, and counted exactly
    Case(
        "add-refused-second-item-stores-nothing",
        ADD,
        add(item(f"{OWN}_atomic", "a"), item(f"{OWN}_atomic", "b", dense([0, 0, 0, 0]))),
        INVALID,
        ("item #1 ('b')", "nothing of this stream was added"),
    ),
    Case(
        "search-the-refused-stream-created-nothing",
        SEARCH,
        search(f"{OWN}_atomic", dense([1, 0, 0, 0])),
        NOT_FOUND,
        ("does not exist", "first add"),
    ),
    Case(
        "add-new-database-two-shapes-in-one-stream",
        ADD,
        add(item(f"{OWN}_shapes", "a"), item(f"{OWN}_shapes", "b", dense([1, 0]))),
        INVALID,
        ("item #1", "first item for it has a deep signature of 4"),
    ),
    Case(
        "add-20001-items-in-one-stream",
        ADD,
        add(*[item(f"{OWN}_many", f"i{n}") for n in range(20_001)]),
        EXHAUSTED,
        ("send at most 20000 items per add stream", "split"),
    ),
    Case(
        "add-first-refused-with-3-dims",
        ADD,
        add(item(f"{OWN}_fresh", signature=dense([0, 0, 0]))),
        INVALID,
        ("all zeros",),
    ),
    Case("add-then-4-dims-is-accepted", ADD, add_expecting(1, 0, item(f"{OWN}_fresh")), OK),
    Case(
        "add-same-id-twice-counts-once",
        ADD,
        add_expecting(1, 1, item(f"{OWN}_counts", "a"), item(f"{OWN}_counts", "a", dense([0, 1, 0, 0]))),
        OK,
    ),
    Case(
        "add-huge-values-are-normalised",
        ADD,
        add_expecting(1, 0, item(f"{OWN}_huge", "h", dense([3e38, 3e38, 0, 0]))),
        OK,
    ),
    # -- Add: local features (re-ranking), checked and bounded like the thumbnail
    expecting(
        Case(
            "add-local-features-without-extractor",
            ADD,
            add(item(f"{OWN}_features", "f", local_features=local(extractor=""))),
            INVALID,
            ("item #0 ('f')", "local_features.extractor must name the extractor"),
        ),
        fields=("local_features.extractor",),
    ),
    Case(
        "add-local-features-unset-message-fields",
        ADD,
        add(item(f"{OWN}_features", "f"), item(f"{OWN}_features", "g", local_features=common_pb2.LocalFeatures())),
        INVALID,
        ("item #1 ('g')", "local_features.extractor", "nothing of this stream was added"),
    ),
    Case(
        "add-local-features-odd-points",
        ADD,
        add(item(f"{OWN}_features", "f", local_features=local(points_u16le=b"\0" * 7))),
        INVALID,
        ("local_features.points_u16le", "4 bytes a keypoint"),
    ),
    expecting(
        Case(
            "add-local-features-descriptors-short",
            ADD,
            add(item(f"{OWN}_features", "f", local_features=local(descriptors=b"\0" * 100))),
            INVALID,
            ("local_features.descriptors holds 100 bytes", "4 keypoints of 32 bytes need 128"),
        ),
        fields=("local_features.descriptors",),
    ),
    Case(
        "add-local-features-descriptor-bytes-0",
        ADD,
        add(item(f"{OWN}_features", "f", local_features=local(descriptor_bytes=0))),
        INVALID,
        ("local_features.descriptor_bytes 0 is not in 1..128",),
    ),
    Case(
        "add-local-features-no-size",
        ADD,
        add(item(f"{OWN}_features", "f", local_features=local(width=0, height=0))),
        INVALID,
        ("local_features.width and height", "1..65535"),
    ),
    Case(
        "add-local-features-keypoint-outside",
        ADD,
        add(item(f"{OWN}_features", "f", local_features=local(20, width=8, height=8))),
        INVALID,
        ("keypoint outside its width x height",),
    ),
    Case(
        "add-local-features-600-keypoints",
        ADD,
        add(item(f"{OWN}_features", "f", local_features=local(600, width=64, height=48))),
        INVALID,
        ("600 keypoints", "at most 512"),
    ),
    expecting(
        Case(
            "add-local-features-1-mb",
            ADD,
            add(item(f"{OWN}_features", "f", local_features=local(descriptors=b"\0" * (1 << 20)))),
            EXHAUSTED,
            ("item #0 ('f')", "above the limit of 67584", "fewer keypoints"),
        ),
        quota=("max_local_features_bytes",),
    ),
    Case(
        "search-the-refused-features-created-nothing",
        SEARCH,
        search(f"{OWN}_features", dense([1, 0, 0, 0])),
        NOT_FOUND,
        ("does not exist",),
    ),
    Case(
        "add-local-features-256-keypoints-is-accepted",
        ADD,
        add_expecting(1, 0, item(f"{OWN}_features", "f", local_features=local(256), thumbnail=b"jpeg")),
        OK,
    ),
    # -- Delete
    Case(
        "delete-database-empty",
        DELETE,
        lambda s: s.index.Delete(index_pb2.DeleteRequest(item_ids=["a"]), timeout=s.timeout),
        INVALID,
        ("database is required",),
    ),
    Case(
        "delete-database-nul",
        DELETE,
        lambda s: s.index.Delete(index_pb2.DeleteRequest(database="a\0b", item_ids=["a"]), timeout=s.timeout),
        INVALID,
        ("u+0000",),
    ),
    Case(
        "delete-database-600-bytes",
        DELETE,
        lambda s: s.index.Delete(index_pb2.DeleteRequest(database="n" * 600, item_ids=["a"]), timeout=s.timeout),
        INVALID,
        ("limit of 128",),
    ),
    Case(
        "delete-unknown-database",
        DELETE,
        no_database_listed(
            lambda s: s.index.Delete(
                index_pb2.DeleteRequest(database="no_such_database", item_ids=["a"]), timeout=s.timeout
            )
        ),
        NOT_FOUND,
        ("'no_such_database' does not exist", "first add"),
    ),
    Case(
        "delete-an-id-twice-counts-once",
        DELETE,
        lambda s: _deleted(
            s, index_pb2.DeleteRequest(database=f"{OWN}_counts", item_ids=["a", "a", "zz", "zz"]), 1, ["zz"]
        ),
        OK,
    ),
    Case(
        "delete-groups-not-there",
        DELETE,
        lambda s: _deleted(s, index_pb2.DeleteRequest(database=f"{OWN}_fresh", group_ids=["nope", "nope"]), 0, []),
        OK,
    ),
    # -- Search
    Case("search-database-empty", SEARCH, search(""), INVALID, ("database is required",)),
    Case("search-database-nul", SEARCH, search("a\0b"), INVALID, ("u+0000",)),
    Case("search-database-600-bytes", SEARCH, search("n" * 600), INVALID, ("limit of 128",)),
    Case(
        "search-unknown-database",
        SEARCH,
        no_database_listed(search("no_such_database")),
        NOT_FOUND,
        ("'no_such_database' does not exist", "first add"),
    ),
    Case(
        "search-top-k-1001",
        SEARCH,
        search(top_k=1001),
        INVALID,
        ("top_k 1001 is above the limit of 1000", "ask for at most 1000"),
    ),
    Case("search-top-k-max-uint32", SEARCH, search(top_k=2**32 - 1), INVALID, ("ask for at most 1000",)),
    Case(
        "search-bow-query-on-deep-database",
        SEARCH,
        lambda s: search(s.databases["deep"], "bow")(s),
        INVALID,
        ("holds signature_kind_deep", "not signature_kind_bow"),
    ),
    Case(
        "search-7-values-on-deep-database",
        SEARCH,
        search(signature=dense(np.ones(7))),
        INVALID,
        ("7 values", "-d vectors"),
    ),
    Case(
        "search-nan-query",
        SEARCH,
        lambda s: search(signature=dense([np.nan] * len(dense_from_proto(s.deep))))(s),
        INVALID,
        ("nan",),
    ),
    Case(
        "search-deep-bytes-not-whole-float32",
        SEARCH,
        search(signature=common_pb2.Signature(kind=DEEP, dense=common_pb2.DenseVector(values_f32le=b"\0" * 4098))),
        INVALID,
        ("dense.values_f32le is 4098 bytes, not a multiple of 4",),
    ),
    Case(
        "search-zero-query",
        SEARCH,
        lambda s: search(signature=dense(np.zeros(len(dense_from_proto(s.deep)))))(s),
        INVALID,
        ("all zeros",),
    ),
    Case(
        "search-huge-valued-query",
        SEARCH,
        lambda s: search(signature=dense(np.full(len(dense_from_proto(s.deep)), 3e38)))(s),
        OK,
    ),
    Case("search-signature-unset", SEARCH, lambda s: search(s.databases["deep"], EMPTY)(s), INVALID, ("unspecified",)),
    Case(
        "search-bow-garbage",
        SEARCH,
        search(signature=common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BOW, bow=b"\x01\xff\xff")),
        INVALID,
        ("bag-of-words signature",),
    ),
    Case(
        "search-bow-other-vocabulary",
        SEARCH,
        search(signature=bag([1, 2, 3], vocabulary=100)),
        INVALID,
        ("vocabulary",),
    ),
    Case("search-bow-other-codebook", SEARCH, lambda s: search(signature=other_codebook(s))(s), INVALID, ("codebook",)),
    # -- SearchBatch
    Case("batch-no-signatures", BATCH, batch(signatures=lambda s: []), INVALID, ("signatures is empty",)),
    Case(
        "batch-257-queries",
        BATCH,
        batch(signatures=lambda s: [s.deep] * 257),
        EXHAUSTED,
        ("batch limit of 256", "split"),
    ),
    Case("batch-top-k-1001", BATCH, batch(top_k=1001), INVALID, ("top_k 1001 is above the limit of 1000",)),
    Case(
        "batch-second-query-bad",
        BATCH,
        batch(signatures=lambda s: [s.deep, dense(np.ones(3))]),
        INVALID,
        ("signature #1", "3 values"),
    ),
    Case(
        "batch-mixed-kinds",
        BATCH,
        batch(signatures=lambda s: [s.deep, s.bow]),
        INVALID,
        ("signature #1", "not signature_kind_bow"),
    ),
    Case(
        "batch-unknown-database",
        BATCH,
        no_database_listed(batch(database="no_such_database")),
        NOT_FOUND,
        ("does not exist",),
    ),
    Case("batch-database-nul", BATCH, batch(database="x\0"), INVALID, ("u+0000",)),
    # -- PartialScores
    Case(
        "partial-on-a-dense-database",
        PARTIAL,
        partial("deep", signature=lambda s: s.deep),
        INVALID,
        ("dense", "use search"),
    ),
    Case(
        "partial-unknown-database",
        PARTIAL,
        no_database_listed(partial(database="no_such_database")),
        NOT_FOUND,
        ("does not exist",),
    ),
    Case("partial-database-empty", PARTIAL, partial(database=""), INVALID, ("database is required",)),
    Case(
        "partial-garbage-bow",
        PARTIAL,
        partial(signature=lambda s: common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BOW, bow=b"\x01\x00")),
        INVALID,
        ("bag-of-words signature",),
    ),
    Case("partial-deep-query", PARTIAL, partial(signature=lambda s: s.deep), INVALID, ("not signature_kind_deep",)),
    # -- Lookup
    Case("lookup-on-a-dense-database", LOOKUP, lookup("deep"), INVALID, ("dense", "bag-of-words")),
    Case(
        "lookup-unknown-database",
        LOOKUP,
        no_database_listed(lookup(database="no_such_database")),
        NOT_FOUND,
        ("does not exist",),
    ),
    Case("lookup-database-600-bytes", LOOKUP, lookup(database="n" * 600), INVALID, ("limit of 128",)),
    Case("lookup-unknown-keys", LOOKUP, lookup(keys=[1, 2, 3], expect_items=0), OK),
    Case("lookup-a-million-keys", LOOKUP, lookup(keys=list(range(1, 1_000_001)), expect_items=0), OK),
    # -- UpdateGroups, ListGroups, GetItemImages
    Case(
        "update-unknown-database",
        UPDATE,
        lambda s: s.index.UpdateGroups(
            index_pb2.UpdateGroupsRequest(
                database="no_such_database", groups=[index_pb2.GroupAttributes(group_id="g")]
            ),
            timeout=s.timeout,
        ),
        NOT_FOUND,
        ("does not exist",),
    ),
    Case(
        "update-bad-label-key",
        UPDATE,
        lambda s: s.index.UpdateGroups(
            index_pb2.UpdateGroupsRequest(
                database=s.databases["deep"],
                groups=[
                    index_pb2.GroupAttributes(
                        group_id="g", attributes=common_pb2.ProductAttributes(labels={"bad\nkey": "v"})
                    )
                ],
            ),
            timeout=s.timeout,
        ),
        INVALID,
        ("labels",),
    ),
    Case(
        "update-bad-path",
        UPDATE,
        lambda s: s.index.UpdateGroups(
            index_pb2.UpdateGroupsRequest(
                database=s.databases["deep"],
                groups=[index_pb2.GroupAttributes(group_id="g", attributes=common_pb2.ProductAttributes(path="a//b"))],
            ),
            timeout=s.timeout,
        ),
        INVALID,
        ("path",),
    ),
    Case(
        "list-page-size-over-limit",
        LIST,
        lambda s: s.index.ListGroups(
            index_pb2.ListGroupsRequest(database=s.databases["deep"], page_size=10**6), timeout=s.timeout
        ),
        INVALID,
        ("page_size",),
    ),
    Case(
        "list-forged-page-token",
        LIST,
        lambda s: s.index.ListGroups(
            index_pb2.ListGroupsRequest(database=s.databases["deep"], page_token="%%%not a token"),
            timeout=s.timeout,
        ),
        INVALID,
        ("page_token",),
    ),
    Case(
        "list-filter-too-deep",
        LIST,
        lambda s: s.index.ListGroups(
            index_pb2.ListGroupsRequest(
                database=s.databases["deep"],
                filter=common_pb2.Filter(
                    any_of=[
                        common_pb2.Filter(
                            any_of=[
                                common_pb2.Filter(
                                    any_of=[
                                        common_pb2.Filter(
                                            any_of=[common_pb2.Filter(any_of=[common_pb2.Filter(path_prefix="a")])]
                                        )
                                    ]
                                )
                            ]
                        )
                    ]
                ),
            ),
            timeout=s.timeout,
        ),
        INVALID,
        ("filter",),
    ),
    Case(
        "list-unknown-database",
        LIST,
        lambda s: s.index.ListGroups(index_pb2.ListGroupsRequest(database="no_such_database"), timeout=s.timeout),
        NOT_FOUND,
        ("does not exist",),
    ),
    Case(
        "images-unknown-database",
        IMAGES,
        lambda s: s.index.GetItemImages(
            index_pb2.GetItemImagesRequest(database="no_such_database", item_ids=["x"]), timeout=s.timeout
        ),
        NOT_FOUND,
        ("does not exist",),
    ),
    Case(
        "images-unknown-items-are-left-out",
        IMAGES,
        lambda s: s.index.GetItemImages(
            index_pb2.GetItemImagesRequest(database=s.databases["deep"], item_ids=["no-such-item"]),
            timeout=s.timeout,
        ),
        OK,
    ),
    Case("images-local-features-without-thumbnails", IMAGES, features_read_back, OK),
    Case(
        "images-local-features-unknown-database",
        IMAGES,
        lambda s: s.index.GetItemImages(
            index_pb2.GetItemImagesRequest(database="no_such_database", item_ids=["x"], local_features=True),
            timeout=s.timeout,
        ),
        NOT_FOUND,
        ("does not exist",),
    ),
    # -- BLCF signatures (assignment maps) and spatial re-ranking
    Case(
        "add-blcf-creates-its-database",
        ADD,
        add_expecting(3, 0, *(item(BLCF, f"blcf-{n}", blcf(assignment(n))) for n in range(3))),
        OK,
    ),
    Case(
        "add-blcf-without-bytes",
        ADD,
        add(item(BLCF, signature=common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_BLCF))),
        INVALID,
        ("empty", "blcf bytes"),
    ),
    Case(
        "add-blcf-garbage",
        ADD,
        add(item(BLCF, signature=blcf(b"\x01garbage"))),
        INVALID,
        ("blcf signature", "8 bytes", "at least 16"),
    ),
    Case(
        "add-blcf-truncated",
        ADD,
        add(item(BLCF, signature=blcf(blcf_codec.encode(assignment(0))[:-3]))),
        INVALID,
        ("blcf signature", "inside map 0 (4x5 cells)", "truncated"),
    ),
    Case(
        "add-blcf-pyramid",
        ADD,
        add(item(BLCF, signature=blcf(blcf_codec.encode(pyramid_of(assignment(0)))))),
        INVALID,
        ("pyramid of 2 maps", "sign it without regions"),
    ),
    Case(
        "add-blcf-map-too-large",
        ADD,
        add(
            item(
                BLCF,
                signature=blcf(AssignmentMap(np.ones((51, 50), np.uint16), BLCF_VOCABULARY, BLCF_FINGERPRINT, 8, 8)),
            )
        ),
        INVALID,
        ("51x50 = 2550 cells", "max_blcf_cells"),
    ),
    Case(
        "add-blcf-version-2",
        ADD,
        add(item(BLCF, signature=blcf(b"\x02" + blcf_codec.encode(assignment(0))[1:]))),
        INVALID,
        ("format version 2",),
    ),
    Case(
        "add-blcf-word-beyond-its-vocabulary",
        ADD,
        add(item(BLCF, signature=blcf(blcf_codec.encode(assignment(0))[:14] + b"\x40\x00" * 20))),
        INVALID,
        ("word 64", "beyond its 64-word vocabulary"),
    ),
    Case(
        "add-blcf-of-another-vocabulary",
        ADD,
        add(item(BLCF, "blcf-x", blcf(assignment(0, fingerprint=0xB1D)))),
        INVALID,
        ("vocabulary 00000b1d", "re-sign with the same vocabulary"),
    ),
    Case(
        "add-blcf-into-the-deep-database",
        ADD,
        lambda s: s.index.Add(iter([item(s.databases["deep"], "corpus-x", blcf(assignment(0)))]), timeout=s.timeout),
        INVALID,
        ("holds signature_kind_deep", "not signature_kind_blcf"),
    ),
    Case(
        "search-blcf-query-on-the-bow-database",
        SEARCH,
        lambda s: search(s.databases["bow"], blcf(assignment(0)))(s),
        INVALID,
        ("holds signature_kind_bow", "not signature_kind_blcf"),
    ),
    Case(
        "search-spatial-rerank-on-the-deep-database",
        SEARCH,
        search(spatial_rerank=rerank(top_k=5)),
        INVALID,
        ("spatial_rerank applies to signature_kind_blcf", "is dense"),
    ),
    Case(
        "search-spatial-rerank-on-the-bow-database",
        SEARCH,
        search(signature="bow", spatial_rerank=rerank(top_k=5)),
        INVALID,
        ("spatial_rerank applies to signature_kind_blcf", "is bag-of-words"),
    ),
    expecting(
        Case(
            "search-spatial-rerank-top-k-201",
            SEARCH,
            search(BLCF, blcf(assignment(0)), spatial_rerank=rerank(top_k=201)),
            INVALID,
            ("spatial_rerank.top_k 201 is above the limit of 200",),
        ),
        fields=("spatial_rerank.top_k",),
        quota=("max_rerank_k",),
    ),
    Case(
        "search-query-expansion-above-the-rerank-top-k",
        SEARCH,
        search(BLCF, blcf(assignment(0)), spatial_rerank=rerank(top_k=2, query_expansion=3)),
        INVALID,
        ("query_expansion 3 is above spatial_rerank.top_k 2",),
    ),
    Case(
        "search-query-expansion-without-rerank",
        SEARCH,
        search(BLCF, blcf(assignment(0)), spatial_rerank=rerank(query_expansion=1)),
        INVALID,
        ("query_expansion 1 is above spatial_rerank.top_k 0",),
    ),
    Case(
        "search-candidate-scores-of-another-length",
        SEARCH,
        search(
            BLCF, blcf(assignment(0)), spatial_rerank=rerank(top_k=5, candidate_keys=[1, 2], candidate_scores=[0.1])
        ),
        INVALID,
        ("1 scores for 2 candidate_keys", "one first-stage score per key"),
    ),
    Case(
        "search-candidate-keys-above-the-rerank-top-k",
        SEARCH,
        search(
            BLCF,
            blcf(assignment(0)),
            spatial_rerank=rerank(top_k=1, candidate_keys=[1, 2], candidate_scores=[0.1, 0.2]),
        ),
        INVALID,
        ("holds 2 keys, more than spatial_rerank.top_k 1",),
    ),
    Case(
        "batch-candidate-keys",
        BATCH,
        batch(
            signatures=lambda s: [blcf(assignment(0))],
            database=BLCF,
            spatial_rerank=rerank(top_k=2, candidate_keys=[1], candidate_scores=[0.5]),
        ),
        INVALID,
        ("candidate_keys", "not allowed in a searchbatch"),
    ),
    Case("search-blcf-reranked-is-accepted", SEARCH, reranked_search, OK),
    Case(
        "search-blcf-candidates-not-held-are-left-out",
        SEARCH,
        search(
            BLCF, blcf(assignment(0)), spatial_rerank=rerank(top_k=2, candidate_keys=[7, 8], candidate_scores=[1, 1])
        ),
        OK,
    ),
    Case(
        "partial-blcf-scores-are-accepted",
        PARTIAL,
        partial(signature=lambda s: blcf(assignment(2)), database=BLCF),
        OK,
    ),
    # -- Stats: after all of the above, nothing broken, no name that breaks a snapshot
    Case("stats-after-the-corpus", STATS, stats_are_clean, OK),
    # -- Replicate (replica to replica)
    Case(
        "replicate-another-word-range",
        REPLICATE,
        lambda s: list(
            s.index.Replicate(
                index_pb2.ReplicateRequest(word_shard_index=5, word_shard_count=7, replica="corpus:1"),
                timeout=s.timeout,
            )
        ),
        PRECONDITION,
        ("word range", "not a replica of this shard"),
    ),
]


def _deleted(s: Stubs, request: index_pb2.DeleteRequest, deleted: int, not_found: list[str]) -> None:
    response = s.index.Delete(request, timeout=s.timeout)
    assert (response.deleted, list(response.not_found)) == (deleted, not_found), response


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_case(hostile, case):
    hostile.check(case)


def test_every_service_unchanged_afterwards(hostile):
    hostile.assert_unchanged()
