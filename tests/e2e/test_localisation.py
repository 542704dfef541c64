"""Finding products in any photo, not only the detector's classes, over the real suite on loopback:
class-agnostic localisation, the category from the catalogue, localisation at ingest, products with
several images, deletion, the data path and scores."""

import ast
import re
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from common.images import encode_jpeg, encode_png
from common.photos import load_photo
from detector_server.nms import iou_matrix
from gateway.client import Product, VisualSearchClient
from gateway.demo_catalogue import ROCKET_BOX, cut, paste, two_product_scene
from mps.gateway.v1 import gateway_pb2
from mps.index.v1 import index_pb2, index_pb2_grpc
from tests.helpers import CUP_BOX, start_suite, tiles

DISTRACTORS = (
    "astronaut",
    "motorcycle_left",
    "hubble_deep_field",
    "immunohistochemistry",
    "flower.jpg",
    "retina",
    "logo",
)
LOCALISING = [gateway_pb2.ITEM_SOURCE_OBJECTNESS, gateway_pb2.ITEM_SOURCE_SALIENT, gateway_pb2.ITEM_SOURCE_SEGMENT]


def iou(box, target) -> float:
    return float(iou_matrix(np.array([[box.x_min, box.y_min, box.x_max, box.y_max]], np.float32), target[None])[0, 0])


def catalogue() -> list[Product]:
    rocket = cut("rocket", ROCKET_BOX)
    products = [
        # Two images of one product, one with the box given.
        Product("rocket", "toys", encode_jpeg(rocket[:, ::-1]), {"title": "rocket"}, "front"),
        Product("rocket", "toys", encode_jpeg(load_photo("rocket")), {"title": "rocket"}, "on-pad", ROCKET_BOX),
        # Localised at ingest: the detector's cup is this product's category.
        Product("coffee-cup", "tableware", encode_png(load_photo("coffee")), {"title": "cup"}),
        # A framed portrait: the whole photo is the product.
        Product("cat-portrait", "pets", encode_jpeg(load_photo("chelsea")), {"title": "cat"}, box=(0, 0, 451, 300)),
        # A shop may file its cups under a category the detector does not know.
        Product("kitchen-cup", "kitchen", encode_jpeg(cut("coffee", CUP_BOX)[:, ::-1]), {}),
        Product("doomed", "toys", encode_jpeg(tiles("rocket")[0]), {}, "a"),
        Product("doomed", "toys", encode_jpeg(tiles("rocket")[1]), {}, "b"),
    ]
    for name in DISTRACTORS:
        for i, tile in enumerate(tiles(name)):
            for category in ("toys", "pets", "tableware"):
                products.append(Product(f"{category}-{name}-{i}", category, encode_jpeg(tile), {}))
    return products


@pytest.fixture(scope="module")
def shop():
    suite = start_suite()
    with VisualSearchClient(suite.addresses["gateway"], timeout_s=120) as client:
        report = client.index_products(catalogue())
        yield suite, client, report
    suite.stop()


@pytest.fixture(scope="module")
def scene():
    image, boxes = two_product_scene()
    return image, encode_png(image), boxes


def stats(suite) -> dict[str, int]:
    with grpc.insecure_channel(suite.addresses["index"]) as channel:
        response = index_pb2_grpc.IndexServiceStub(channel).Stats(index_pb2.StatsRequest(), timeout=5)
    return {d.name: d.items for d in response.databases}


def test_finds_products_the_detector_has_no_class_for(shop, scene):
    _, client, _ = shop
    _, png, boxes = scene
    result = client.search(png, top_k=3)
    assert result.proposals > 2
    for product, category in (("rocket", "toys"), ("cat-portrait", "pets")):
        found = [i for i in result.items if iou(i.box, boxes[product]) >= 0.5]
        assert found, f"no item on the {product}: {[(i.category, i.box) for i in result.items]}"
        item = found[0]
        assert item.source in LOCALISING and not item.class_name
        assert item.category == category and item.matches[0].product_id == product
        assert item.category_margin > 0


def test_max_items_caps_the_items_best_first(shop, scene):
    _, client, _ = shop
    everything = client.search(scene[1], top_k=1)
    capped = client.search(scene[1], top_k=1, max_items=1)
    assert len(everything.items) >= 2 and len(capped.items) == 1
    assert capped.items[0].matches[0].product_id == everything.items[0].matches[0].product_id


def test_the_detector_only_path_finds_nothing_there(shop, scene):
    """What users hit before: the detector has no class for either product."""
    _, client, _ = shop
    result = client.search(scene[1], sources=[gateway_pb2.ITEM_SOURCE_DETECTOR])
    assert [i.source for i in result.items] == [gateway_pb2.ITEM_SOURCE_WHOLE_IMAGE]


def test_nothing_qualifies_gives_one_whole_image_item(shop):
    _, client, _ = shop
    cat = load_photo("chelsea")  # no product class in it
    result = client.search(encode_png(cat), sources=[gateway_pb2.ITEM_SOURCE_DETECTOR])
    assert len(result.items) == 1
    item = result.items[0]
    assert item.source == gateway_pb2.ITEM_SOURCE_WHOLE_IMAGE
    assert (item.box.x_min, item.box.y_min, item.box.x_max, item.box.y_max) == (0, 0, cat.shape[1], cat.shape[0])
    assert item.category == "pets" and item.matches[0].product_id == "cat-portrait"


def test_every_item_says_where_it_came_from(shop, coffee_png):
    _, client, _ = shop
    cups = [i for i in client.search(coffee_png).items if i.class_name == "cup"]
    assert cups and cups[0].source == gateway_pb2.ITEM_SOURCE_DETECTOR and cups[0].category == "tableware"
    assert cups[0].matches[0].product_id == "coffee-cup"
    region = client.search(coffee_png, regions=[(CUP_BOX, "tableware")]).items
    assert [i.source for i in region] == [gateway_pb2.ITEM_SOURCE_USER_REGION]


def test_a_region_without_a_category_takes_the_clearly_best_one(shop, scene):
    _, client, _ = shop
    _, png, boxes = scene
    item = client.search(png, regions=[(tuple(boxes["rocket"]), "")]).items[0]
    assert item.category == "toys" and item.category_margin > 0 and not item.warning
    assert item.matches[0].product_id == "rocket"


def test_a_category_without_a_catalogue_is_searched_like_no_category(shop, coffee_png):
    """The detector says tableware; searched without it, the cup is found where the shop files it."""
    _, client, _ = shop
    restricted = client.search(coffee_png, categories=["kitchen", "toys"], top_k=3)
    cups = [i for i in restricted.items if i.class_name == "cup"]
    assert cups and cups[0].category == "kitchen" and cups[0].matches[0].product_id == "kitchen-cup"
    assert cups[0].category_margin > 0.02
    assert all(i.category in ("kitchen", "toys", "") for i in restricted.items)


def test_a_category_nobody_can_tell_apart_is_left_open(shop, coffee_png):
    """The same distractor tiles are in 'pets' and 'toys': the catalogue cannot pick one for the cup."""
    _, client, _ = shop
    restricted = client.search(coffee_png, categories=["pets", "toys"], top_k=3, min_score=0.0)
    cup = next(i for i in restricted.items if i.class_name == "cup")
    assert cup.category == "" and "no category is clearly best" in cup.warning
    assert cup.matches and {m.product_id.split("-")[0] for m in cup.matches} <= {"pets", "toys", "doomed", "rocket"}


def test_categories_restrict_the_search(shop, scene):
    _, client, _ = shop
    _, png, boxes = scene
    result = client.search(png, categories=["toys"])
    assert result.items and all(i.category == "toys" for i in result.items)
    assert any(iou(i.box, boxes["rocket"]) >= 0.5 and i.matches[0].product_id == "rocket" for i in result.items)


def test_ingest_localises_each_image_and_returns_the_box(shop):
    _, _, report = shop
    images = {(i.product_id, i.image_id): i for i in report.images}
    assert report.indexed == len(report.images) == len(catalogue()) and not report.images_truncated
    cup = next(i for (p, _), i in images.items() if p == "coffee-cup")
    assert cup.source == gateway_pb2.ITEM_SOURCE_DETECTOR and iou(cup.box, np.array(CUP_BOX, np.float32)) > 0.8
    given = images[("rocket", "on-pad")]
    assert given.source == gateway_pb2.ITEM_SOURCE_USER_REGION
    assert (given.box.x_min, given.box.y_min, given.box.x_max, given.box.y_max) == ROCKET_BOX
    # An image without an id gets one from its content.
    assert len(cup.image_id) == 16


def test_a_product_in_a_room_is_signed_without_the_room(shop):
    """A catalogue photo of a product in a room: what is signed is the product's box, not the room."""
    _, client, _ = shop
    room = cv2.resize(load_photo("china.jpg"), (960, 640))
    room, truth = paste(room, load_photo("chelsea"), 420, 250, 400)
    report = client.index_products([Product("cat-in-room", "scratch-room", encode_jpeg(room), {})])
    placed = report.images[0]
    assert placed.source in LOCALISING and iou(placed.box, truth) >= 0.5


def test_a_match_carries_its_image_and_box(shop, coffee_png):
    _, client, report = shop
    cup = next(i for i in client.search(coffee_png).items if i.class_name == "cup")
    match = cup.matches[0]
    stored = next(i for i in report.images if i.product_id == "coffee-cup")
    assert match.image_id == stored.image_id and match.metadata["title"] == "cup"
    assert match.box == stored.box


def test_a_product_with_several_images_is_one_result(shop, scene):
    suite, client, _ = shop
    _, png, boxes = scene
    assert stats(suite)["toys.deep"] >= 2 + 2 + 4 * len(DISTRACTORS)  # both rocket images are kept
    item = client.search(png, top_k=5, regions=[(tuple(boxes["rocket"]), "toys")], min_score=0.0).items[0]
    ids = [m.product_id for m in item.matches]
    assert ids[0] == "rocket" and len(ids) == len(set(ids)) == 5
    assert item.matches[0].image_id in ("front", "on-pad")


def test_delete_products_removes_every_image_in_every_kind(shop):
    suite, client, _ = shop
    before = stats(suite)
    response = client.delete_products(["doomed", "never-indexed"])
    assert response.images_deleted == 2 and list(response.not_found) == ["never-indexed"]
    after = stats(suite)
    assert after["toys.deep"] == before["toys.deep"] - 2 and after["toys.bow"] == before["toys.bow"] - 2
    result = client.search(encode_jpeg(tiles("rocket")[0]), regions=[((0, 0, 100, 100), "toys")], top_k=50)
    assert "doomed" not in [m.product_id for m in result.items[0].matches]
    with pytest.raises(grpc.RpcError) as error:
        client.delete_products([])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == "product_ids is empty: name the products to delete"


def test_raw_pixels_are_searched_like_the_encoded_photo(shop, scene):
    _, client, _ = shop
    image, png, _ = scene
    encoded, raw = client.search(png, top_k=3), client.search(image, top_k=3)
    assert [(i.category, i.source, [m.product_id for m in i.matches]) for i in encoded.items] == [
        (i.category, i.source, [m.product_id for m in i.matches]) for i in raw.items
    ]


def test_many_regions_of_a_large_photo_are_signed_in_several_calls(shop):
    """64 regions of a 12-megapixel photo: more than one signature call may carry."""
    _, client, _ = shop
    photo = np.ascontiguousarray(np.tile(load_photo("coffee"), (8, 7, 1))[:3000, :4000])
    regions = [((x * 500, y * 375, x * 500 + 500, y * 375 + 375), "tableware") for y in range(8) for x in range(8)]
    result = client.search(encode_jpeg(photo), regions=regions, top_k=1, timeout_s=120)
    assert len(result.items) == 64 and all(i.matches for i in result.items)
    assert (result.image_width, result.image_height) == (4000, 3000)
    assert result.items[-1].box.x_max == 4000


def test_min_score_turns_the_least_bad_item_into_no_match(shop, scene):
    _, client, _ = shop
    _, png, boxes = scene
    region = [(tuple(boxes["cat-portrait"]), "toys")]  # no cat among the toys
    loose = client.search(png, regions=region, min_score=0.0).items[0]
    assert loose.matches  # without a floor, the least bad toy comes back
    floored = client.search(png, regions=region).items[0]  # the gateway's default floor for deep
    assert all(m.score >= 0.55 for m in floored.matches)
    floor = loose.matches[0].score + 0.01
    strict = client.search(png, regions=region, min_score=floor).items[0]
    said = re.fullmatch(
        r"no catalogue product scores (\d\.\d{3}) or more \(min_score\): the best is '(.+)' at (\d\.\d{3})",
        strict.warning,
    )
    assert not strict.matches and said, strict.warning
    assert float(said[1]) == pytest.approx(floor, abs=1e-3) and said[2] == loose.matches[0].product_id
    assert float(said[3]) == pytest.approx(loose.matches[0].score, abs=1e-3)


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"sources": [gateway_pb2.ITEM_SOURCE_WHOLE_IMAGE]}, "sources: ITEM_SOURCE_WHOLE_IMAGE cannot be asked for"),
        ({"sources": [42]}, "sources: 42 cannot be asked for; choose among ['ITEM_SOURCE_DETECTOR', "),
        ({"min_score": float("nan")}, "min_score must be a finite number"),
        ({"max_items": 1000}, "max_items 1000 is above the limit of 48"),
    ],
)
def test_bad_search_options(shop, coffee_png, change, fragment):
    _, client, _ = shop
    with pytest.raises(grpc.RpcError) as error:
        client.search(coffee_png, **change)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(fragment), error.value.details()


def test_a_bad_box_at_ingest_says_what_was_indexed(shop):
    _, client, _ = shop
    coffee = encode_jpeg(load_photo("coffee"))
    with pytest.raises(grpc.RpcError) as error:
        client.index_products(
            [Product("ok", "scratch", coffee, {}), Product("bad-box", "scratch", coffee, {}, box=(500, 10, 400, 50))]
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'bad-box'" in error.value.details() and "1 image of 1 product was stored" in error.value.details()


def test_the_pipeline_is_free_of_grpc():
    """Orchestration is logic: the pipeline and its ports import no gRPC (the servicer does)."""
    root = Path(__file__).resolve().parents[2] / "gateway"
    for name in ("pipeline.py", "ports.py", "proposals.py", "exclusive.py", "crops.py"):
        tree = ast.parse((root / name).read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "grpc" not in imported and "mps" not in imported, name


@pytest.fixture(scope="module")
def flat_shop():
    """A shop with one flat category and a per-category score floor."""
    suite = start_suite(category_min_score={"everything": {"deep": 0.5}})
    products = [
        Product("cup", "everything", encode_png(load_photo("coffee")), {}),
        Product("rocket", "everything", encode_jpeg(cut("rocket", ROCKET_BOX)), {}),
    ]
    products += [
        Product(f"{name}-{i}", "everything", encode_jpeg(tile), {})
        for name in DISTRACTORS
        for i, tile in enumerate(tiles(name))
    ]
    with VisualSearchClient(suite.addresses["gateway"], timeout_s=120) as client:
        client.index_products(products)
        yield client
    suite.stop()


def test_a_shop_with_one_flat_category_is_served(flat_shop, coffee_png, scene):
    cups = [i for i in flat_shop.search(coffee_png).items if i.class_name == "cup"]
    assert cups and cups[0].category == "everything" and cups[0].matches[0].product_id == "cup"
    rocket = [i for i in flat_shop.search(scene[1]).items if iou(i.box, scene[2]["rocket"]) >= 0.5]
    assert rocket and rocket[0].category == "everything" and rocket[0].matches[0].product_id == "rocket"


def test_the_per_category_floor_applies_unless_the_request_sets_one(flat_shop, scene):
    _, png, boxes = scene
    region = [(tuple(boxes["rocket"]), "everything")]
    floored = flat_shop.search(png, regions=region, top_k=50).items[0]
    assert floored.matches and min(m.score for m in floored.matches) >= 0.5
    unfloored = flat_shop.search(png, regions=region, top_k=50, min_score=0.0).items[0]
    assert len(unfloored.matches) > len(floored.matches)
