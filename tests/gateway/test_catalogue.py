"""Catalogue management logic (gateway/catalogue.py) over an in-process index port: category
resolution, update masks (read-modify-write on every kind), the purge force rule, stats, images."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from common.errors import InvalidArgument, NotFound, Unavailable
from common.serving import Deadline
from gateway.catalogue import Catalogue, apply_mask, check_image_uri, parse_mask
from gateway.config import GatewayConfig
from gateway.ports import CatalogueImageInfo, CatalogueProduct, CategoryFailure, DatabaseInfo, ProductPage
from index_server.convert import attributes_of, attributes_to_proto
from index_server.domain import ProductAttributes

SHIRT = ProductAttributes("fashion/tops", frozenset({"striped"}), {"brand": "acme", "size": "m"})


class FakeIndex:
    """Categories "tops" (products s-1, s-2, twin) and "shoes" (twin), each in both kinds."""

    def __init__(self) -> None:
        self.held = {
            ("tops", kind): {"s-1": SHIRT, "s-2": ProductAttributes(), "twin": ProductAttributes()}
            for kind in ("deep", "bow")
        } | {("shoes", kind): {"twin": ProductAttributes()} for kind in ("deep", "bow")}
        self.updates: list[tuple[str, str, dict]] = []
        self.down: list[CategoryFailure] = []

    def categories(self, kind):
        return {c for c, k in self.held if k == kind}

    def unreachable(self):
        return self.down

    def list_products(self, category, kind, product_ids, filter, page_size, page_token, timeout_s):
        if (category, kind) not in self.held:
            raise NotFound(f"no database {category}.{kind}")
        held = self.held[category, kind]
        ids = [p for p in sorted(held) if not product_ids or p in product_ids]
        image = CatalogueImageInfo("front", {}, np.array([0, 0, 5, 5], np.float32), "")
        return ProductPage([CatalogueProduct(p, held[p], [image]) for p in ids[:page_size]], "", len(ids))

    def update_products(self, category, kind, attributes, timeout_s):
        self.updates.append((category, kind, attributes))
        held = self.held[category, kind]
        held.update({p: a for p, a in attributes.items() if p in held})
        return [p for p in attributes if p not in held]

    def purge_products(self, category, kind, filter, timeout_s):
        held = self.held[category, kind]
        gone = [p for p, a in held.items() if filter is None or filter.matches(a)]
        for p in gone:
            del held[p]
        return gone, 2 * len(gone)

    def thumbnails(self, category, kind, item_ids, timeout_s):
        return {i: b"jpeg" for i in item_ids} if kind == "deep" else {}

    def databases(self, timeout_s):
        return [
            DatabaseInfo(c, k, 2 * len(held), len(held), "flat" if k == "deep" else "inverted", 1000, "x")
            for (c, k), held in self.held.items()
        ]


@pytest.fixture
def catalogue():
    index = FakeIndex()
    pool = ThreadPoolExecutor(4)

    def check(attributes, field):
        attributes_of(attributes_to_proto(attributes), field)

    yield Catalogue(GatewayConfig(), index, pool, check), index
    pool.shutdown()


def deadline():
    return Deadline(10)


def test_a_product_is_found_in_the_one_category_holding_it(catalogue):
    cat, _ = catalogue
    product = cat.get("s-1", "", deadline())
    assert (product.category, product.attributes) == ("tops", SHIRT)
    with pytest.raises(InvalidArgument, match=r"2 categories \('shoes', 'tops'\): name the one"):
        cat.get("twin", "", deadline())
    assert cat.get("twin", "shoes", deadline()).category == "shoes"
    with pytest.raises(NotFound, match="not in the catalogue"):
        cat.get("nobody", "", deadline())
    with pytest.raises(NotFound, match="category 'hats' is not in the catalogue"):
        cat.get("s-1", "hats", deadline())
    with pytest.raises(NotFound, match="product 's-9' is not in category 'tops'"):
        cat.get("s-9", "tops", deadline())


def test_an_unreachable_category_makes_an_absent_product_unavailable(catalogue):
    cat, index = catalogue
    index.down = [CategoryFailure("lamps", "UNAVAILABLE", "gone", "x")]
    with pytest.raises(Unavailable, match="lamps"):
        cat.get("nobody", "", deadline())
    assert cat.get("s-1", "", deadline()).category == "tops"  # found where it could be looked for


@pytest.mark.parametrize(
    "mask, expected",
    [
        ([], ProductAttributes("new/path", frozenset({"t"}), {"colour": "red"})),
        (["path"], ProductAttributes("new/path", SHIRT.tags, SHIRT.labels)),
        (["tags", "labels"], ProductAttributes(SHIRT.path, frozenset({"t"}), {"colour": "red"})),
        (["labels.colour"], ProductAttributes(SHIRT.path, SHIRT.tags, {**SHIRT.labels, "colour": "red"})),
        (["labels.size"], ProductAttributes(SHIRT.path, SHIRT.tags, {"brand": "acme"})),
    ],
)
def test_update_masks(mask, expected):
    given = ProductAttributes("new/path", frozenset({"t"}), {"colour": "red"})
    assert apply_mask(SHIRT, given, parse_mask(mask)) == expected


@pytest.mark.parametrize("mask, says", [(["colour"], "update_mask[0]"), (["path", "labels.a b  c"], "update_mask[1]")])
def test_a_bad_mask_names_its_entry(mask, says):
    with pytest.raises(InvalidArgument, match=says.replace("[", r"\[")):
        parse_mask(mask)


def test_an_update_writes_every_kind_and_keeps_concurrent_label_updates(catalogue):
    cat, index = catalogue
    threads = [
        threading.Thread(
            target=cat.update,
            args=("s-1", "tops", ProductAttributes(labels={f"k{i}": "v"}), [f"labels.k{i}"], deadline()),
        )
        for i in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for kind in ("deep", "bow"):
        labels = index.held["tops", kind]["s-1"].labels
        assert labels == {"brand": "acme", "size": "m", **{f"k{i}": "v" for i in range(8)}}
    with pytest.raises(InvalidArgument, match=r"attributes\.labels"):
        cat.update("s-1", "tops", ProductAttributes(labels={"bad\tkey": "v"}), ["labels"], deadline())


def test_purge_needs_force_for_an_empty_filter_and_counts_images_once(catalogue):
    cat, index = catalogue
    with pytest.raises(InvalidArgument, match="set force"):
        cat.purge("tops", None, False, deadline())
    assert cat.purge("tops", None, True, deadline()) == (3, 6)
    assert not index.held["tops", "bow"]
    with pytest.raises(NotFound, match="'hats'"):
        cat.purge("hats", None, True, deadline())


def test_stats_and_images(catalogue):
    cat, _ = catalogue
    [tops] = cat.stats(["tops"], deadline())
    assert tops.products == 3 and [d.kind for d in tops.databases] == ["deep", "bow"]
    assert [f.category for f in cat.stats([], deadline())] == ["shoes", "tops"]
    with pytest.raises(NotFound, match="'hats'"):
        cat.stats(["tops", "hats"], deadline())
    assert cat.image("s-1", "front", "", deadline()) == (b"jpeg", "")
    with pytest.raises(NotFound, match="has no image 'back'; its images: 'front'"):
        cat.image("s-1", "back", "", deadline())
    with pytest.raises(InvalidArgument, match="page_size 1001"):
        cat.products("tops", None, 1001, "", deadline())


@pytest.mark.parametrize(
    "uri, says",
    [
        ("shop.example/a.jpg", "not an absolute uri"),
        ("https:", "not an absolute uri"),
        ("https://a.example/b c.jpg", "spaces"),
        ("https://a.example/" + "x" * 3000, "above the limit of 2048"),
    ],
)
def test_image_uris_are_absolute_and_bounded(uri, says):
    with pytest.raises(InvalidArgument) as error:
        check_image_uri(uri, 2048)
    assert says in error.value.message.lower()
    check_image_uri("gs://bucket/a.jpg", 2048)
