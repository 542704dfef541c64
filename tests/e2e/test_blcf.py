"""Bags of local convolutional features (SIGNATURE_KIND_BLCF) through the whole suite over loopback:
a gateway configured to index BLCF too signs each catalogue image whole at ingest; a search signs
the photo once with every item as a region, the index re-ranks the candidates by their best window
and each match says where in its catalogue photo the product was found."""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np
import pytest

from common.images import encode_jpeg
from common.photos import load_photo
from gateway.client import Product, VisualSearchClient
from mps.common.v1 import common_pb2
from tests.helpers import CUP_BOX, MOTO_BOX, shop_catalogue, start_gateway, video_clip

BLCF = common_pb2.SIGNATURE_KIND_BLCF
SCENES = "blcf-scenes"
# The cup of "coffee" pasted small into a 1280x720 shelf photo ("china.jpg"): a product that fills
# a small part of its catalogue photo.
SHELF_SIZE = (1280, 720)
CUP_ON_SHELF = (900, 380, 900 + CUP_BOX[2] - CUP_BOX[0], 380 + CUP_BOX[3] - CUP_BOX[1])


def shelf(with_cup: bool) -> np.ndarray:
    scene = cv2.resize(load_photo("china.jpg"), SHELF_SIZE, interpolation=cv2.INTER_AREA)
    if with_cup:
        x0, y0, x1, y1 = CUP_BOX
        a, b, c, d = CUP_ON_SHELF
        scene[b:d, a:c] = load_photo("coffee")[y0:y1, x0:x1]
    return scene


def scene_catalogue() -> list[Product]:
    """In SCENES: the shelf with the cup, the same shelf without it, and whole photos of others."""
    products = [
        Product("cup-on-shelf", SCENES, encode_jpeg(shelf(True)), {"title": "cup"}, image_id="shelf"),
        Product("bare-shelf", SCENES, encode_jpeg(shelf(False)), {}, image_id="shelf"),
    ]
    for name in ("chelsea", "astronaut", "rocket", "flower.jpg", "motorcycle_right"):
        products.append(Product(f"scene-{name}", SCENES, encode_jpeg(load_photo(name)), {}, image_id="whole"))
    return products


# Each catalogue image's size (width, height), to check that windows lie inside it.
SIZES = {
    "coffee-cup": (CUP_BOX[2] - CUP_BOX[0], CUP_BOX[3] - CUP_BOX[1]),
    "moto-left": (MOTO_BOX[2] - MOTO_BOX[0], MOTO_BOX[3] - MOTO_BOX[1]),
    "cup-on-shelf": SHELF_SIZE,
}


@pytest.fixture(scope="module")
def client(suite) -> Iterator[VisualSearchClient]:
    """A gateway indexing deep, bow and blcf over the session's services, with the shop catalogue
    (re-sent: the same images, now with BLCF too) and the scenes."""
    gateway, port = start_gateway(suite.addresses, index_kinds=["deep", "bow", "blcf"])
    try:
        with VisualSearchClient(f"127.0.0.1:{port}", timeout_s=120) as c:
            shop, scenes = shop_catalogue(), scene_catalogue()
            response = c.index_products(shop + scenes)
            assert response.indexed == len(shop) + len(scenes)
            stats = {s.category: s for s in c.catalogue_stats(["tableware", SCENES]).categories}
            assert {k.kind for k in stats[SCENES].kinds} == {
                common_pb2.SIGNATURE_KIND_DEEP,
                common_pb2.SIGNATURE_KIND_BOW,
                BLCF,
            }
            yield c
    finally:
        gateway.stop(None)


def inside(window, product_id: str) -> bool:
    width, height = SIZES[product_id]
    return 0 <= window.x_min < window.x_max <= width + 0.5 and 0 <= window.y_min < window.y_max <= height + 0.5


def test_a_detected_product_is_found_by_its_local_features(client, coffee_png):
    result = client.search(coffee_png, top_k=3, signature_kind=BLCF, categories=["tableware"], min_score=0.0)
    cups = [i for i in result.items if i.class_name == "cup"]
    assert len(cups) == 1 and cups[0].category == "tableware"
    best = cups[0].matches[0]
    assert best.product_id == "coffee-cup" and best.HasField("window") and inside(best.window, "coffee-cup")
    assert 0 < best.first_stage_score <= best.score <= 1  # the best window scores its whole map or more
    assert result.timings.sign_ms > 0 and result.timings.search_ms > 0


def test_a_region_finds_the_product_in_a_small_part_of_a_catalogue_photo(client, coffee_png):
    result = client.search(coffee_png, top_k=3, signature_kind=BLCF, regions=[(CUP_BOX, SCENES)], min_score=0.0)
    (item,) = result.items
    best = item.matches[0]
    assert best.product_id == "cup-on-shelf" and inside(best.window, "cup-on-shelf")
    # Where it was found: at the pasted cup, within a cell of the catalogue photo's map (the shelf's
    # long side at 448 px, stride 32: 1280 / 14 columns, 720 / 8 rows), since a cell next to the cup
    # sees it too (a stride-32 feature's receptive field spans its neighbours).
    w, (a, b, c, d) = best.window, CUP_ON_SHELF
    cell_w, cell_h = SHELF_SIZE[0] / 14, SHELF_SIZE[1] / 8
    a, b, c, d = a - cell_w, b - cell_h, c + cell_w, d + cell_h
    assert min(w.x_max, c) > max(w.x_min, a) and min(w.y_max, d) > max(w.y_min, b), (w, CUP_ON_SHELF)
    assert best.score > best.first_stage_score


def test_spatial_rerank_k_zero_gives_first_stage_scores_and_no_window(client, coffee_png):
    result = client.search(
        coffee_png, top_k=3, signature_kind=BLCF, regions=[(CUP_BOX, SCENES)], min_score=0.0, spatial_rerank_k=0
    )
    matches = result.items[0].matches
    assert matches and all(not m.HasField("window") and m.score == m.first_stage_score for m in matches)
    expanded = client.search(
        coffee_png,
        signature_kind=BLCF,
        regions=[(CUP_BOX, SCENES)],
        min_score=0.0,
        spatial_rerank_k=10,
        query_expansion=2,
    )
    assert expanded.items[0].matches[0].product_id == "cup-on-shelf"


def test_a_video_stream_searches_with_blcf(client):
    frames, _ = video_clip(pan=4, zoom=0, after_cut=0)
    results = list(
        client.stream(
            list(enumerate(frames, 1)),
            top_k=3,
            signature_kind=BLCF,
            categories=["tableware", "vehicles"],
            lockstep=True,
        )
    )
    summary = results[-1].summary
    assert summary.frames_processed == len(frames) and summary.searches >= 1
    found = {i.matches[0].product_id for r in results[:-1] for i in r.items if i.matches}
    assert found & {"coffee-cup", "moto-left"}, found
