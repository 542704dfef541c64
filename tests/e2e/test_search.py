"""The whole suite over loopback: ingest real photos, search real photos, bad input, deadlines."""

import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.images import encode_jpeg, encode_png
from gateway.client import Product, VisualSearchClient
from common.photos import load_photo
from mps.common.v1 import common_pb2
from mps.index.v1 import index_pb2, index_pb2_grpc
from tests.conftest import bad_images, start_suite

CUP_BOX = (150, 23, 429, 310)


@pytest.fixture(scope="module")
def client(suite):
    coffee = load_photo("coffee")
    left = load_photo("motorcycle_left")
    x0, y0, x1, y1 = CUP_BOX
    products = [Product("coffee-cup", "tableware", encode_jpeg(coffee[y0:y1, x0:x1][:, ::-1]), {"title": "cup"}),
                Product("moto-left", "vehicles", encode_jpeg(left[54:455, 55:697]), {"title": "bike"})]
    for name in ("chelsea", "astronaut", "rocket", "china.jpg", "flower.jpg"):
        photo = load_photo(name)
        h, w = photo.shape[:2]
        for category in ("tableware", "vehicles"):
            products.append(Product(f"{category}-{name}", category,
                                    encode_jpeg(photo[h // 4:3 * h // 4, w // 4:3 * w // 4]), {}))
    with VisualSearchClient(suite.addresses["gateway"]) as c:
        response = c.index_products(products)
        assert response.indexed == len(products)
        assert dict(response.per_category) == {"tableware": 6, "vehicles": 6}
        yield c


def healthy(address):
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status \
            == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("kind", [common_pb2.SIGNATURE_KIND_DEEP, common_pb2.SIGNATURE_KIND_BOW])
def test_finds_the_cup_and_its_catalogue_product(client, coffee_png, kind):
    result = client.search(coffee_png, top_k=3, signature_kind=kind, min_score=0.0)
    cups = [i for i in result.items if i.class_name == "cup"]
    assert len(cups) == 1 and cups[0].category == "tableware"
    assert cups[0].matches[0].product_id == "coffee-cup" and cups[0].matches[0].metadata["title"] == "cup"
    # A bag-of-words search returns only items sharing a visual word with the query.
    assert len(cups[0].matches) == 3 if kind == common_pb2.SIGNATURE_KIND_DEEP else 1 <= len(cups[0].matches) <= 3
    assert all(a.score >= b.score for a, b in zip(cups[0].matches, cups[0].matches[1:]))
    t = result.timings
    assert t.detect_ms > 0 and t.sign_ms > 0 and t.search_ms > 0 and t.total_ms >= t.detect_ms


def test_mutually_exclusive_cup_and_bowl_keep_the_cup(client, coffee_png):
    """At 0.1 the detector also calls the cup a bowl (0.16) on the same box: only the cup stays."""
    result = client.search(coffee_png, min_confidence=0.1)
    names = [i.class_name for i in result.items]
    assert "cup" in names and "bowl" not in names


def test_another_view_finds_the_other_view(client):
    result = client.search(encode_png(load_photo("motorcycle_right")), top_k=1)
    bikes = [i for i in result.items if i.class_name == "motorbike"]
    assert bikes and bikes[0].matches[0].product_id == "moto-left"


def test_user_regions_replace_detection(client, coffee_png):
    result = client.search(coffee_png, top_k=2, regions=[(CUP_BOX, "tableware"), ((0, 0, 50, 50), "hats")])
    assert [(i.category, i.class_name, i.confidence) for i in result.items] == \
        [("tableware", "", 1.0), ("hats", "", 1.0)]
    assert result.items[0].matches[0].product_id == "coffee-cup"
    assert not result.items[1].matches and "no catalogue" in result.items[1].warning


@pytest.mark.parametrize("regions, fragment", [([((10, 10, 5, 50), "tableware")], "empty"),
                                               ([((0, 0, float("nan"), 50), "tableware")], "NaN"),
                                               ([((900, 900, 950, 950), "tableware")], "outside")])
def test_bad_regions(client, coffee_png, regions, fragment):
    with pytest.raises(grpc.RpcError) as error:
        client.search(coffee_png, regions=regions)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in error.value.details()


@pytest.mark.parametrize("name", ["empty", "truncated", "random", "zero_size_header", "bomb"])
def test_bad_images_get_invalid_argument_and_leave_every_server_healthy(client, suite, coffee_png, name):
    with pytest.raises(grpc.RpcError) as error:
        client.search(bad_images(coffee_png)[name])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image" in error.value.details()
    assert all(healthy(address) for address in suite.addresses.values())
    assert client.search(coffee_png).items  # and still answers


def test_bad_catalogue_image_reports_what_was_indexed(client, suite):
    products = [Product("ok-1", "scratch", encode_jpeg(load_photo("rocket")), {}),
                Product("broken", "scratch", b"\xff\xd8\xff garbage", {})]
    with pytest.raises(grpc.RpcError) as error:
        client.index_products(products)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'broken'" in error.value.details() and "1 products before it were indexed" in error.value.details()
    with grpc.insecure_channel(suite.addresses["index"]) as channel:
        stats = index_pb2_grpc.IndexServiceStub(channel).Stats(index_pb2.StatsRequest(), timeout=5)
    items = {d.name: d.items for d in stats.databases}
    assert items["scratch.deep"] == items["scratch.bow"] == 1


def test_a_20_mb_photo_gets_through(client):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (2600, 2600, 3), dtype=np.uint8)
    data = encode_png(noise)
    assert len(data) > 20_000_000
    result = client.search(data, timeout_s=60)
    assert (result.image_width, result.image_height) == (2600, 2600)


def test_invalid_arguments(client, coffee_png):
    for kwargs, fragment in (({"top_k": 10_000}, "top_k"), ({"min_confidence": 1.5}, "min_confidence")):
        with pytest.raises(grpc.RpcError) as error:
            client.search(coffee_png, **kwargs)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        client.search(coffee_png, signature_kind=7)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "signature_kind 7" in error.value.details()


def test_deadline_is_honoured(client, coffee_png):
    start = time.perf_counter()
    with pytest.raises(grpc.RpcError) as error:
        client.search(coffee_png, timeout_s=0.005)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.perf_counter() - start < 1.0


def test_a_query_never_waits_on_a_database_it_does_not_need(suite, coffee_png):
    """'furniture' lives on a shard that never answers; a cup query must not notice it."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts connections, never speaks HTTP/2
    routed = start_suite(index_routes={"furniture": f"127.0.0.1:{silent.getsockname()[1]}"})
    try:
        with VisualSearchClient(routed.addresses["gateway"]) as c:
            c.index_products([Product("cup", "tableware", encode_jpeg(load_photo("coffee")), {})])
            start = time.perf_counter()
            result = c.search(coffee_png, timeout_s=10)
            assert time.perf_counter() - start < 3
            assert [i.class_name for i in result.items] == ["cup"]
            # The table (0.11) needs the silent shard: its item comes back flagged at the deadline.
            result = c.search(coffee_png, min_confidence=0.1, timeout_s=5)
            table = [i for i in result.items if i.category == "furniture"][0]
            assert not table.matches and "DEADLINE_EXCEEDED" in table.warning
            assert [i for i in result.items if i.class_name == "cup"][0].matches
    finally:
        routed.stop()
        silent.close()


def test_a_signature_service_that_loses_signatures_is_reported(suite, deep_descriptor, bow_extractor, locator,
                                                               coffee_png):
    """A mismatched signature server (fewer signatures than crops) must not silently drop items."""
    from concurrent import futures

    from mps.signature.v1 import signature_pb2_grpc
    from signature_server.service import SignatureService

    class LosesOne(SignatureService):
        def ComputeSignatures(self, request, context):
            response = super().ComputeSignatures(request, context)
            del response.signatures[-1]
            return response

    faulty = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    loses_one = LosesOne(deep_descriptor, bow_extractor, locator, 64, 10**8, 8, 200)
    signature_pb2_grpc.add_SignatureServiceServicer_to_server(loses_one, faulty)
    port = faulty.add_insecure_port("127.0.0.1:0")
    faulty.start()
    from gateway.config import GatewayConfig
    from gateway.server import create_server
    from common.config import load_config

    gateway, gateway_port = create_server(load_config(
        GatewayConfig, "gateway", environ={}, port=0, detector_address=suite.addresses["detector"],
        signature_address=f"127.0.0.1:{port}", index_address=suite.addresses["index"]))
    try:
        with VisualSearchClient(f"127.0.0.1:{gateway_port}") as c:
            with pytest.raises(grpc.RpcError) as error:
                c.search(coffee_png, regions=[(CUP_BOX, "tableware"), ((0, 0, 50, 50), "tableware")])
        assert error.value.code() == grpc.StatusCode.INTERNAL
        assert "1 signatures for 2 images" in error.value.details()
    finally:
        gateway.stop(None)
        faulty.stop(None)


def test_a_dead_word_range_shard_behind_the_router_comes_back_as_a_flagged_item(suite, coffee_png):
    """Gateway -> router -> two word-range shards; one shard dies: matches still come, flagged."""
    from common.config import load_config
    from gateway.config import GatewayConfig
    from gateway.server import create_server
    from index_server.config import IndexConfig, RouterConfig
    from index_server.server import create_bundle, create_router_bundle

    shards = [create_bundle(load_config(IndexConfig, "index", environ={}, port=0, data_dir="",
                                        word_shard_index=i, word_shard_count=2)) for i in range(2)]
    router = create_router_bundle(load_config(RouterConfig, "index_router", environ={}, port=0, layout="word",
                                              shards=[[f"127.0.0.1:{s.port}"] for s in shards]))
    gateway, port = create_server(load_config(
        GatewayConfig, "gateway", environ={}, port=0, detector_address=suite.addresses["detector"],
        signature_address=suite.addresses["signature"], index_address=f"127.0.0.1:{router.port}"))
    coffee = load_photo("coffee")
    x0, y0, x1, y1 = CUP_BOX
    try:
        with VisualSearchClient(f"127.0.0.1:{port}") as c:
            c.index_products([Product("cup", "tableware", encode_jpeg(coffee[y0:y1, x0:x1]), {}),
                              Product("rocket", "tableware", encode_jpeg(load_photo("rocket")), {})])
            query = dict(regions=[(CUP_BOX, "tableware")], signature_kind=common_pb2.SIGNATURE_KIND_BOW)
            whole = c.search(coffee_png, **query).items[0]
            assert not whole.degraded and whole.matches[0].product_id == "cup"
            shards[1].server.stop(None)
            item = c.search(coffee_png, **query).items[0]
            assert item.degraded and item.matches and "did not answer" in item.warning
            assert [(r.first, r.end) for r in item.missing_word_ranges] == [(2500, 5000)]
            assert item.matches[0].score <= whole.matches[0].score  # only the other words scored
    finally:
        gateway.stop(None)
        router.server.stop(None)
        router.on_stop()
        for shard in shards:
            shard.server.stop(None)
