"""The catalogue as a retailer runs it, over the real suite on loopback: attributes and image URIs at
ingest, filtered searches that keep the full top k, GetProduct, ListProducts, UpdateProduct,
PurgeProducts, GetCatalogueStats, GetProductImage, and the CLI (filters, products, stats).

The suite is this module's own: its hundred-product category must not change what other modules'
searches over every category find."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from common.images import encode_jpeg, encode_png
from common.photos import SKIMAGE_PHOTOS, SKLEARN_PHOTOS, load_photo
from common.status import details_of
from gateway.cli import main
from gateway.client import Attributes, Product, VisualSearchClient
from gateway.report import CatalogueThumbnails, draw_result
from mps.common.v1 import common_pb2
from tests.helpers import start_suite, tiles

SHOP = "catalogue-shop"
PRODUCTS = 117  # 13 photos x 9 tiles
DEEP, BOW = common_pb2.SIGNATURE_KIND_DEEP, common_pb2.SIGNATURE_KIND_BOW


def _shop_tiles() -> list[np.ndarray]:
    return [t for name in SKIMAGE_PHOTOS + SKLEARN_PHOTOS for t in tiles(name, grid=3)]


def attributes_of_product(i: int) -> Attributes:
    """Product i's: brand acme for 4 of them (0, 30, 60, 90), striped for every 10th, in stock when even."""
    return Attributes(
        path=f"fashion/{'tops' if i % 2 else 'shoes'}/{'shirt' if i % 3 else 'boot'}",
        tags=["striped", "cotton"] if i % 10 == 0 else ["plain"],
        labels={"brand": "acme" if i % 30 == 0 else f"brand{i % 7}", "in_stock": "true" if i % 2 == 0 else "false"},
    )


def product_id(i: int) -> str:
    return f"p-{i:03d}"


@pytest.fixture(scope="module")
def shop():
    suite = start_suite()
    try:
        with VisualSearchClient(suite.addresses["gateway"], timeout_s=120) as client:
            images = _shop_tiles()
            assert len(images) == PRODUCTS
            products = [
                Product(
                    product_id(i),
                    SHOP,
                    encode_jpeg(image),
                    {"title": f"product {i}"},
                    "front",
                    (0, 0, image.shape[1], image.shape[0]),  # nothing to localise: faster
                    attributes_of_product(i),
                    f"https://shop.example/images/{i}.jpg" if i % 2 == 0 else "",
                )
                for i, image in enumerate(images)
            ]
            response = client.index_products(products, timeout_s=600)
            assert response.indexed == PRODUCTS
            yield suite, client, images
    finally:
        suite.stop()


@pytest.fixture(scope="module")
def client(shop):
    return shop[1]


def _query(shop, i: int, **options):
    """A search of product i's own tile as a region of its category (nothing to localise)."""
    _, client, images = shop
    image = images[i]
    box = (0.0, 0.0, float(image.shape[1]), float(image.shape[0]))
    result = client.search(encode_png(image), regions=[(box, SHOP)], min_score=0.0, **options)
    assert len(result.items) == 1
    return result.items[0]


def test_ingest_stores_attributes_and_image_uri_not_as_metadata(client):
    product = client.get_product(product_id(30))
    assert product.category == SHOP
    assert product.attributes.path == "fashion/shoes/boot"
    assert sorted(product.attributes.tags) == ["cotton", "striped"]
    assert dict(product.attributes.labels) == {"brand": "acme", "in_stock": "true"}
    [image] = product.images
    assert image.image_id == "front" and image.image_uri == "https://shop.example/images/30.jpg"
    assert dict(image.metadata) == {"title": "product 30"}  # the URI is not user metadata
    assert image.box.x_max > 0


def test_matches_carry_attributes_and_image_uri(shop):
    item = _query(shop, 4, top_k=1)
    top = item.matches[0]
    assert top.product_id == product_id(4) and top.score > 0.9
    assert top.attributes.path == "fashion/shoes/shirt" and top.attributes.labels["in_stock"] == "true"
    assert top.image_uri == "https://shop.example/images/4.jpg" and "mps:image_uri" not in top.metadata


@pytest.mark.parametrize("kind, query", [(DEEP, 7), (BOW, 108)])
def test_a_filter_keeping_4_of_117_products_still_returns_the_full_top_k(shop, kind, query):
    """4 products are acme: a query of another product gets the best 3 acme products, in the order
    an unfiltered search over everything ranks them, with the same scores (the filter is applied
    inside the index, not to a top k cut before it). A bag-of-words search returns only products
    sharing a visual word with the query (2 acme products for this one)."""
    acme = {product_id(i) for i in (0, 30, 60, 90)}
    item = _query(shop, query, top_k=3, signature_kind=kind, filter="brand=acme")
    found = [m.product_id for m in item.matches]
    everything = _query(shop, query, top_k=100, signature_kind=kind)
    ranked = [m.product_id for m in everything.matches if m.product_id in acme]
    assert found == ranked[:3] and len(found) == (3 if kind == DEEP else 2)
    assert all(m.attributes.labels["brand"] == "acme" for m in item.matches)
    scores = {m.product_id: m.score for m in everything.matches}
    assert all(abs(m.score - scores[m.product_id]) < 1e-5 for m in item.matches)


def test_filters_combine_path_tags_labels_and_or(shop):
    item = _query(shop, 7, top_k=100, filter=common_pb2.Filter(path_prefix="fashion/shoes", all_tags=["striped"]))
    assert {m.product_id for m in item.matches} == {product_id(i) for i in range(0, PRODUCTS, 10) if i % 2 == 0}
    either = common_pb2.Filter(
        any_of=[
            common_pb2.Filter(labels=[common_pb2.LabelClause(key="brand", values=["acme"])]),
            common_pb2.Filter(any_tags=["plain", "wool"], path_prefix="fashion/tops/boot"),
        ]
    )
    item = _query(shop, 7, top_k=100, filter=either)
    expected = {i for i in range(PRODUCTS) if i % 30 == 0 or (i % 2 == 1 and i % 3 == 0)}
    assert {m.product_id for m in item.matches} == {product_id(i) for i in expected}
    # "fashion/top" is no prefix of "fashion/tops/...": segments, not characters.
    assert not _query(shop, 7, top_k=5, filter=common_pb2.Filter(path_prefix="fashion/top")).matches


def test_a_category_where_nothing_passes_has_no_matches(shop):
    item = _query(shop, 7, top_k=5, filter="brand=nobody")
    assert not item.matches
    # Localised (no region): no candidate finds a match, so only the whole image is an item.
    _, client, images = shop
    result = client.search(encode_png(images[7]), min_score=0.0, filter="brand=nobody")
    assert all(not i.matches for i in result.items)


def test_a_bad_filter_is_invalid_argument_naming_its_field(client, coffee_png):
    bad = common_pb2.Filter(any_of=[common_pb2.Filter(labels=[common_pb2.LabelClause(key="bad key\n")])])
    with pytest.raises(grpc.RpcError) as error:
        client.search(coffee_png, filter=bad)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "filter.any_of[0].labels[0].key" in error.value.details()


def test_a_video_stream_applies_its_filter(shop):
    _, client, _ = shop
    scene = load_photo("coffee")  # its cup is tracked (a detector class) and searched in every category
    frames = [(1, scene), (2, scene)]
    results = list(client.stream(frames, top_k=3, min_score=0.0, filter="brand=acme", lockstep=True))
    matches = [m for r in results[:-1] for i in r.items for m in i.matches]
    assert matches and all(m.attributes.labels["brand"] == "acme" for m in matches)
    with pytest.raises(grpc.RpcError) as error:
        list(client.stream(frames, filter=common_pb2.Filter(path_prefix="/shoes")))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "options.filter.path_prefix" in error.value.details()


def test_list_products_pages_through_a_filter_without_gaps_or_repeats(client):
    striped = [product_id(i) for i in range(0, PRODUCTS, 10)]
    seen, token, pages = [], "", 0
    while True:
        page = client.list_products(SHOP, common_pb2.Filter(all_tags=["striped"]), 3, token)
        pages += bool(page.products)
        assert page.total == len(striped) and len(page.products) <= 3
        seen += [p.product_id for p in page.products]
        token = page.next_page_token
        if not token:
            break
    assert seen == striped and pages == 4
    assert all(p.attributes.tags and p.images for p in client.all_products(SHOP, "brand=acme"))
    everything = client.list_products(SHOP, page_size=1000)
    assert everything.total == PRODUCTS and not everything.next_page_token


def test_update_product_mask_variants_are_searchable_at_once_with_unchanged_scores(shop, client):
    before = {m.product_id: m.score for m in _query(shop, 7, top_k=100).matches}
    target = product_id(11)
    assert client.list_products(SHOP, "sale=yes").total == 0
    # One label, the others kept.
    updated = client.update_product(target, Attributes(labels={"sale": "yes"}), ["labels.sale"])
    assert dict(updated.attributes.labels) == {"brand": "brand4", "in_stock": "false", "sale": "yes"}
    item = _query(shop, 7, top_k=3, filter="sale=yes")
    assert [m.product_id for m in item.matches] == [target]
    assert abs(item.matches[0].score - before[target]) < 1e-5  # not signed again
    # Tags and path replaced, labels kept.
    updated = client.update_product(target, Attributes(path="sale/outlet", tags=["clearance"]), ["path", "tags"])
    assert updated.attributes.path == "sale/outlet" and list(updated.attributes.tags) == ["clearance"]
    assert updated.attributes.labels["sale"] == "yes"
    assert [m.product_id for m in _query(shop, 7, top_k=3, filter=common_pb2.Filter(path_prefix="sale")).matches] == [
        target
    ]
    # labels.KEY absent from the attributes removes it; the kind searched does not matter.
    client.update_product(target, Attributes(), ["labels.sale"])
    assert not _query(shop, 7, top_k=3, filter="sale=yes", signature_kind=BOW).matches
    # Empty mask: everything replaced.
    replaced = client.update_product(target, Attributes(labels={"brand": "zeta"}))
    assert replaced.attributes.path == "" and not replaced.attributes.tags
    assert dict(client.get_product(target).attributes.labels) == {"brand": "zeta"}
    client.update_product(target, attributes_of_product(11))  # as it was, for the other tests


def test_update_product_refusals(client):
    with pytest.raises(grpc.RpcError) as error:
        client.update_product(product_id(1), Attributes(), ["colour"])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "update_mask[0]" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        client.update_product("no-such-product", Attributes(tags=["x"]), ["tags"])
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as error:
        client.update_product(product_id(1), Attributes(path="a//b"), ["path"])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "attributes.path" in error.value.details()


def test_catalogue_stats_per_category_and_kind(client):
    [shop_stats] = client.catalogue_stats([SHOP]).categories
    assert shop_stats.category == SHOP and shop_stats.products == PRODUCTS
    kinds = {k.kind: k for k in shop_stats.kinds}
    assert set(kinds) == {DEEP, BOW}
    assert all(k.images == PRODUCTS and k.memory_bytes > 0 and k.index_type for k in kinds.values())
    assert kinds[BOW].index_type == "inverted"
    with pytest.raises(grpc.RpcError) as error:
        client.catalogue_stats(["no-such-category"])
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-category" in error.value.details()


def test_get_product_image_returns_a_decodable_thumbnail(client):
    stored = client.product_image(product_id(4), "front")
    with Image.open(io.BytesIO(stored.thumbnail)) as thumbnail:
        assert thumbnail.format == "JPEG" and max(thumbnail.size) == 160
    assert stored.image_uri == "https://shop.example/images/4.jpg"
    with pytest.raises(grpc.RpcError) as error:
        client.product_image(product_id(4), "back")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'back'" in error.value.details() and "'front'" in error.value.details()


def test_the_picture_shows_the_gateways_thumbnails(shop, client):
    _, _, images = shop
    photo = images[4]
    box = (0.0, 0.0, float(photo.shape[1]), float(photo.shape[0]))
    result = client.search(encode_png(photo), regions=[(box, SHOP)], top_k=1, min_score=0.0)
    drawn = draw_result(photo, result, _tmp_png(), 1, CatalogueThumbnails(client))
    with Image.open(drawn) as picture:
        panel = np.asarray(picture.convert("RGB"))[28 : 28 + 90, photo.shape[1] + 10 : photo.shape[1] + 100]
    assert panel.std() > 10  # a picture, not the white background


def _tmp_png():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp()) / "picture.png"


def test_a_product_in_two_categories_must_be_named(client):
    tile = encode_jpeg(tiles("coffee", 2)[0])
    client.index_products(
        [Product("twin", category, tile, box=(0, 0, 100, 100)) for category in ("catalogue-a", "catalogue-b")]
    )
    with pytest.raises(grpc.RpcError) as error:
        client.get_product("twin")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'catalogue-a'" in error.value.details() and "'catalogue-b'" in error.value.details()
    assert client.get_product("twin", "catalogue-b").category == "catalogue-b"
    client.delete_products(["twin"])


def test_purge_products_by_filter_and_the_force_rule(client):
    category = "catalogue-purge"
    pieces = tiles("astronaut", 2) + tiles("rocket", 2)
    client.index_products(
        [
            Product(
                f"old-{i}",
                category,
                encode_jpeg(piece),
                image_id=side,
                box=(0, 0, 50, 50),
                attributes=Attributes(labels={"season": "2023" if i < 2 else "2024"}),
            )
            for i, pair in enumerate(zip(pieces[::2], pieces[1::2]))
            for side, piece in zip(("front", "back"), pair)
        ]
    )
    with pytest.raises(grpc.RpcError) as error:
        client.purge_products(category)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "force" in error.value.details()
    assert [f for f, _ in details_of(error.value).violations] == ["filter"]
    purged = client.purge_products(category, "season=2023")
    assert (purged.products_deleted, purged.images_deleted) == (2, 4)
    assert [p.product_id for p in client.all_products(category)] == ["old-2", "old-3"]
    with pytest.raises(grpc.RpcError) as error:
        client.get_product("old-0", category)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    purged = client.purge_products(category, force=True)
    assert (purged.products_deleted, purged.images_deleted) == (2, 4)
    assert client.catalogue_stats([category]).categories[0].products == 0


def test_cli_filters_products_and_stats(shop, tmp_path, capsys):
    suite, _, images = shop
    address = ["--address", suite.addresses["gateway"]]
    photo = tmp_path / "query.png"
    photo.write_bytes(encode_png(images[7]))
    h, w = images[7].shape[:2]
    region = f"0,0,{w},{h}:{SHOP}"
    assert main(address + ["search", str(photo), "--region", region, "--min-score", "0", "--filter", "brand=acme"]) == 0
    out = capsys.readouterr().out
    assert "p-000" in out or "p-030" in out
    assert "p-007" not in out
    listing = [
        "products",
        "list",
        SHOP,
        "--tag",
        "striped",
        "--path",
        "fashion/shoes/boot",
        "--filter",
        "in_stock=true",
    ]
    assert main(address + listing) == 0
    out = capsys.readouterr().out
    assert "p-030" in out and "p-090" in out and "p-010" not in out and "4 of 4 products" in out
    assert main(address + ["products", "update", "p-005", "--label", "sale=yes", "--tag", "new"]) == 0
    assert '"sale": "yes"' in capsys.readouterr().out
    assert main(address + ["products", "get", "p-005"]) == 0
    out = capsys.readouterr().out
    assert '"new"' in out and '"brand": "brand5"' in out
    assert main(address + ["products", "update", "p-005", "--unset-label", "sale", "--tag", "plain"]) == 0
    assert main(address + ["stats", SHOP]) == 0
    out = capsys.readouterr().out
    assert SHOP in out and "inverted" in out and str(PRODUCTS) in out
    assert main(address + ["products", "purge", SHOP]) == 1
    assert "force" in capsys.readouterr().err


# -- mps import ----------------------------------------------------------------------------------------


def _manifest_images(folder):
    """Eight image files (tiles of two photos) under folder/images -> their paths relative to folder."""
    (folder / "images").mkdir(parents=True)
    names = []
    for n, tile in enumerate(tiles("chelsea", 2) + tiles("coffee", 2)):
        name = f"images/{n}.jpg"
        (folder / name).write_bytes(encode_jpeg(tile))
        names.append(name)
    return names


def _jsonl_rows(names):
    """Ten rows: eight good (product m-3 has two images), a missing file, a bad tag."""
    rows = []
    for n, name in enumerate(names):
        rows.append(
            {
                "product_id": f"m-{min(n, 3)}" if n <= 4 else f"m-{n}",
                "category": "catalogue-import",
                "image": name if n % 2 else f"file://{{folder}}/{name}",
                "image_uri": f"https://cdn.example/{n}.jpg",
                "path": "home/kitchen" if n < 4 else "home/garden",
                "tags": ["new"],
                "labels": {"brand": "acme" if n % 2 else "zeta"},
                "metadata": {"row": str(n)},
            }
        )
    rows.insert(5, {"product_id": "m-missing", "category": "catalogue-import", "image": "images/nowhere.jpg"})
    rows.insert(7, {"product_id": "m-badtag", "category": "catalogue-import", "image": names[0], "tags": ["a\tb"]})
    return rows


def _journal_lines(manifest):
    return manifest.with_name(manifest.name + ".progress").read_text().splitlines()


def test_import_a_jsonl_manifest_interrupted_then_resumed(client, shop, tmp_path, monkeypatch, capsys):
    import json

    import gateway.importer

    suite, _, _ = shop
    names = _manifest_images(tmp_path)
    manifest = tmp_path / "catalogue.jsonl"
    manifest.write_text(
        "\n".join(json.dumps(row).replace("{folder}", tmp_path.as_posix()) for row in _jsonl_rows(names)) + "\n"
    )
    command = ["--address", suite.addresses["gateway"], "import", str(manifest), "--batch", "3"]

    # Ctrl-C while the second batch is on its way: the first batch is journaled, nothing else.
    real_send, calls = gateway.importer.send, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_send(*args, **kwargs)

    monkeypatch.setattr(gateway.importer, "send", interrupted)
    assert main(command) == 130
    out = capsys.readouterr().out
    assert "imported 3 rows" in out and "interrupted" in out
    assert len(_journal_lines(manifest)) == 3
    assert client.list_products("catalogue-import").total == 3  # m-0, m-1, m-2

    # A crash after the gateway stored a batch but before it was journaled: sent again, no duplicate.
    monkeypatch.setattr(gateway.importer, "send", real_send)
    real_record, records = gateway.importer.Journal.record, []

    def crash_before_journaling(journal, rows):
        records.append(1)
        if len(records) == 1:
            raise KeyboardInterrupt
        return real_record(journal, rows)

    monkeypatch.setattr(gateway.importer.Journal, "record", crash_before_journaling)
    assert main(command) == 130
    assert len(_journal_lines(manifest)) == 3
    monkeypatch.setattr(gateway.importer.Journal, "record", real_record)

    assert main(command) == 1  # two rows failed
    out = capsys.readouterr().out
    assert "imported 5 rows, skipped 3 (already imported), failed 2" in out
    assert "row 6 (m-missing)" in out and "cannot be read" in out
    assert "row 8 (m-badtag)" in out and "attributes.tags[0]" in out
    failed = [json.loads(line) for line in (tmp_path / "catalogue.jsonl.failed.jsonl").read_text().splitlines()]
    assert [(f["row"], f["product_id"]) for f in failed] == [(6, "m-missing"), (8, "m-badtag")]
    # Every good row once: eight images of seven products, each journaled once.
    assert len(_journal_lines(manifest)) == len(set(_journal_lines(manifest))) == 8
    [stats] = client.catalogue_stats(["catalogue-import"]).categories
    assert stats.products == 7 and {k.images for k in stats.kinds} == {8}
    product = client.get_product("m-3", "catalogue-import")
    assert len(product.images) == 2 and product.attributes.path == "home/garden"  # the last row's attributes
    assert {i.image_uri for i in product.images} == {"https://cdn.example/3.jpg", "https://cdn.example/4.jpg"}

    # Nothing left to do but the failed rows.
    assert main(command) == 1
    assert "imported 0 rows, skipped 8 (already imported), failed 2" in capsys.readouterr().out
    # --restart sends everything again: still no duplicate.
    assert main(command + ["--restart"]) == 1
    assert "imported 8 rows, skipped 0" in capsys.readouterr().out
    assert client.catalogue_stats(["catalogue-import"]).categories[0].kinds[0].images == 8


def test_import_a_csv_manifest_with_a_limit_then_the_rest(client, shop, tmp_path, capsys):
    suite, _, _ = shop
    names = _manifest_images(tmp_path)
    manifest = tmp_path / "catalogue.csv"
    lines = ["product_id,category,image,image_uri,path,tags,labels,box"]
    for n, name in enumerate(names):
        lines.append(f'c-{n},catalogue-csv,{name},,shop/c{n % 2},red;sale,brand=acme;size=m,"0,0,40,40"')
    lines.insert(3, "c-remote,catalogue-csv,https://cdn.example/remote.jpg,,,,,")
    lines.insert(5, 'c-badbox,catalogue-csv,images/0.jpg,,,,,"50,50,10,10"')
    manifest.write_text("\n".join(lines) + "\n")
    command = ["--address", suite.addresses["gateway"], "import", str(manifest)]
    assert main(command + ["--limit", "4"]) == 1  # rows 1-4, the remote one fails
    out = capsys.readouterr().out
    assert "imported 3 rows, skipped 0 (already imported), failed 1" in out
    assert "row 3 (c-remote)" in out and "image_uri" in out
    assert main(command) == 1
    out = capsys.readouterr().out
    assert "imported 5 rows, skipped 3" in out and "row 5 (c-badbox)" in out and "box is empty" in out
    product = client.get_product("c-1")
    assert product.attributes.path == "shop/c1" and sorted(product.attributes.tags) == ["red", "sale"]
    assert dict(product.attributes.labels) == {"brand": "acme", "size": "m"}
    assert product.images[0].box.x_max == 40
    assert client.list_products("catalogue-csv", "brand=acme").total == 8
