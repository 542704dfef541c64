"""Two-stage retrieval over the real suite: local features computed by the signature service at
ingest, stored with the item at the index, fetched by the gateway for each item's first candidates
and verified against the item's crop; the response says what was re-ranked and how many inliers."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from common.images import encode_jpeg, encode_png
from common.photos import load_photo
from gateway.client import Product, VisualSearchClient
from mps.common.v1 import common_pb2
from tests.helpers import CUP_BOX, start_suite

DEEP, BOW = common_pb2.SIGNATURE_KIND_DEEP, common_pb2.SIGNATURE_KIND_BOW


@pytest.fixture(scope="module")
def shop():
    """ "cup" (the cup of "coffee") among 8 distractor crops of other photos, in "rerank-shop"."""
    suite = start_suite()
    coffee = load_photo("coffee")
    x0, y0, x1, y1 = CUP_BOX
    products = [Product("cup", "rerank-shop", encode_jpeg(coffee[y0:y1, x0:x1]), {"title": "cup"}, image_id="front")]
    for name in ("chelsea", "astronaut", "rocket", "motorcycle_left", "motorcycle_right", "china.jpg", "flower.jpg"):
        photo = load_photo(name)
        h, w = photo.shape[:2]
        products.append(Product(name, "rerank-shop", encode_jpeg(photo[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]), {}))
    try:
        with VisualSearchClient(suite.addresses["gateway"], timeout_s=120) as client:
            client.index_products(products)
            yield suite, client
    finally:
        suite.stop()


def turned_cup() -> bytes:
    """The cup rotated by 20 degrees and shrunk: a new photo of the same object."""
    coffee = load_photo("coffee")
    x0, y0, x1, y1 = CUP_BOX
    cup = coffee[y0 - 10 : y1 + 10, x0 - 10 : x1 + 10]
    matrix = cv2.getRotationMatrix2D((cup.shape[1] / 2, cup.shape[0] / 2), 20, 0.85)
    return encode_png(cv2.warpAffine(cup, matrix, (cup.shape[1], cup.shape[0]), borderMode=cv2.BORDER_REFLECT_101))


@pytest.mark.parametrize("kind", [DEEP, BOW])
def test_matches_are_verified_by_geometry(shop, kind):
    _, client = shop
    photo = turned_cup()
    h, w = load_photo("coffee")[CUP_BOX[1] - 10 : CUP_BOX[3] + 10, CUP_BOX[0] - 10 : CUP_BOX[2] + 10].shape[:2]
    region = [((0, 0, w, h), "rerank-shop")]
    plain = client.search(photo, regions=region, signature_kind=kind, rerank_k=0, min_score=0.0)
    ranked = client.search(photo, regions=region, signature_kind=kind, rerank_k=8, min_score=0.0)
    (before,), (after,) = plain.items, ranked.items
    assert not before.reranked and all(m.inliers == 0 for m in before.matches)
    assert after.reranked and after.matches[0].product_id == "cup"
    cup = after.matches[0]
    assert cup.inliers >= 12 and cup.score > cup.first_stage_score
    first = {m.product_id: m.score for m in before.matches}
    assert cup.first_stage_score == pytest.approx(first["cup"], abs=1e-6)
    others = after.matches[1:]
    assert all(m.inliers < cup.inliers for m in others)
    assert [m.score for m in after.matches] == sorted((m.score for m in after.matches), reverse=True)
    assert ranked.timings.rerank_ms > 0 and plain.timings.rerank_ms == 0


def test_the_gateway_default_reranks_and_a_request_may_turn_it_off(shop):
    _, client = shop
    default = client.search(turned_cup(), categories=["rerank-shop"], min_score=0.0)
    assert default.items and any(item.reranked for item in default.items)
    off = client.search(turned_cup(), categories=["rerank-shop"], min_score=0.0, rerank_k=0)
    assert not any(item.reranked for item in off.items)


def test_products_ingested_without_features_keep_their_first_score(shop):
    suite, _ = shop
    from tests.helpers import start_gateway

    gateway, port = start_gateway(suite.addresses, ingest_local_features=False)
    try:
        with VisualSearchClient(f"127.0.0.1:{port}", timeout_s=120) as plain_client:
            coffee = load_photo("coffee")
            x0, y0, x1, y1 = CUP_BOX
            cup = encode_jpeg(np.ascontiguousarray(coffee[y0:y1, x0:x1][:, ::-1]))
            plain_client.index_products([Product("cup-mirror", "rerank-bare", cup, {})])
            result = plain_client.search(
                turned_cup(), regions=[((0, 0, 299, 307), "rerank-bare")], rerank_k=5, min_score=0.0
            )
        (item,) = result.items
        assert item.matches[0].product_id == "cup-mirror"
        assert not item.reranked and item.matches[0].inliers == 0
        assert item.matches[0].score == item.matches[0].first_stage_score
    finally:
        gateway.stop(None)
