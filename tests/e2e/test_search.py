"""The whole suite over loopback: ingest real photos, search real photos, bad input, deadlines."""

import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.images import encode_jpeg, encode_png
from common.photos import load_photo
from gateway.client import Product, VisualSearchClient
from mps.common.v1 import common_pb2
from mps.index.v1 import index_pb2, index_pb2_grpc
from tests.helpers import BAD_IMAGE_SAYS, CUP_BOX, bad_images, free_port, shop_catalogue, start_gateway, start_suite


@pytest.fixture(scope="module")
def client(suite):
    products = shop_catalogue()
    with VisualSearchClient(suite.addresses["gateway"]) as c:
        response = c.index_products(products)
        assert response.indexed == len(products)
        assert dict(response.per_category) == {"tableware": 6, "vehicles": 6}
        yield c


def healthy(address):
    with grpc.insecure_channel(address) as channel:
        return (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        )


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
    assert [(i.category, i.class_name, i.confidence) for i in result.items] == [
        ("tableware", "", 1.0),
        ("hats", "", 1.0),
    ]
    assert result.items[0].matches[0].product_id == "coffee-cup"
    assert not result.items[1].matches and result.items[1].warning == "no catalogue for category 'hats' yet"


@pytest.mark.parametrize(
    "regions, fragment",
    [
        ([((10, 10, 5, 50), "tableware")], "regions[0].box is empty: x_max must exceed x_min"),
        ([((0, 0, float("nan"), 50), "tableware")], "regions[0].box has NaN or infinite coordinates"),
        ([((900, 900, 950, 950), "tableware")], "regions[0].box lies outside the 600x400 image"),
    ],
)
def test_bad_regions(client, coffee_png, regions, fragment):
    with pytest.raises(grpc.RpcError) as error:
        client.search(coffee_png, regions=regions)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in error.value.details()


@pytest.mark.parametrize("name", ["empty", "truncated", "random", "zero_size_header", "bomb"])
def test_bad_images_get_invalid_argument_and_leave_every_server_healthy(client, suite, coffee_png, name):
    with pytest.raises(grpc.RpcError) as error:
        client.search(bad_images(coffee_png)[name])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(f"image: {BAD_IMAGE_SAYS[name]}"), error.value.details()
    assert all(healthy(address) for address in suite.addresses.values())
    assert client.search(coffee_png).items  # and still answers


def test_bad_catalogue_image_reports_what_was_indexed(client, suite):
    products = [
        Product("ok-1", "scratch", encode_jpeg(load_photo("rocket")), {}),
        Product("broken", "scratch", b"\xff\xd8\xff garbage", {}),
    ]
    with pytest.raises(grpc.RpcError) as error:
        client.index_products(products)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'broken'" in error.value.details() and "1 image of 1 product was stored" in error.value.details()
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
    for kwargs, fragment in (
        ({"top_k": 10_000}, "top_k 10000 is above the limit of 100: ask for at most 100"),
        ({"min_confidence": 1.5}, "min_confidence 1.5 is outside (0, 1]: set a threshold in (0, 1]"),
        ({"max_items": 1000}, "max_items 1000 is above the limit of 48"),
    ):
        with pytest.raises(grpc.RpcError) as error:
            client.search(coffee_png, **kwargs)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        client.search(coffee_png, signature_kind=7)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("signature_kind 7 is not indexed here; the catalogue is indexed with")


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
            table = next(i for i in result.items if i.category == "furniture")
            assert not table.matches and "DEADLINE_EXCEEDED" in table.warning
            assert next(i for i in result.items if i.class_name == "cup").matches
    finally:
        routed.stop()
        silent.close()


def test_a_signature_service_that_loses_signatures_is_reported(suite, signature_models, coffee_png):
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
    loses_one = LosesOne(signature_models, "efficientnet-lite0", "colour-texture-bow", 64, 10**8, 8, 200)
    signature_pb2_grpc.add_SignatureServiceServicer_to_server(loses_one, faulty)
    port = faulty.add_insecure_port("127.0.0.1:0")
    faulty.start()
    from common.config import load_config
    from gateway.config import GatewayConfig
    from gateway.server import create_server

    gateway, gateway_port = create_server(
        load_config(
            GatewayConfig,
            "gateway",
            environ={},
            port=0,
            detector_address=suite.addresses["detector"],
            signature_address=f"127.0.0.1:{port}",
            index_address=suite.addresses["index"],
        )
    )
    try:
        with VisualSearchClient(f"127.0.0.1:{gateway_port}") as c, pytest.raises(grpc.RpcError) as error:
            c.search(coffee_png, regions=[(CUP_BOX, "tableware"), ((0, 0, 50, 50), "tableware")])
        assert error.value.code() == grpc.StatusCode.INTERNAL
        assert "1 signatures for 2 images" in error.value.details()
    finally:
        gateway.stop(None)
        faulty.stop(None)


def test_a_dead_word_range_shard_behind_the_router_comes_back_as_a_flagged_item(suite, coffee_png):
    """Gateway -> router -> two word-range shards; one shard dies: matches still come, flagged."""
    from common.config import load_config
    from index_server.config import IndexConfig, RouterConfig
    from index_server.server import create_bundle, create_router_bundle

    shards = [
        create_bundle(
            load_config(IndexConfig, "index", environ={}, port=0, data_dir="", word_shard_index=i, word_shard_count=2)
        )
        for i in range(2)
    ]
    router = create_router_bundle(
        load_config(
            RouterConfig,
            "index_router",
            environ={},
            port=0,
            layout="word",
            shards=[[f"127.0.0.1:{s.port}"] for s in shards],
        )
    )
    gateway, port = start_gateway(suite.addresses, index_address=f"127.0.0.1:{router.port}")
    coffee = load_photo("coffee")
    x0, y0, x1, y1 = CUP_BOX
    try:
        with VisualSearchClient(f"127.0.0.1:{port}") as c:
            c.index_products(
                [
                    Product("cup", "tableware", encode_jpeg(coffee[y0:y1, x0:x1]), {}),
                    Product("rocket", "tableware", encode_jpeg(load_photo("rocket")), {}),
                ]
            )
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


# --- The gateway's contract under bad input and failing back ends (regressions) ---------------------


def gateway_over(suite, **overrides) -> tuple[grpc.Server, str]:
    """A gateway over the suite's detector and signature services (and its index, unless overridden)."""
    from common.config import load_config
    from gateway.config import GatewayConfig
    from gateway.server import create_server

    settings = {
        "detector_address": suite.addresses["detector"],
        "signature_address": suite.addresses["signature"],
        "index_address": suite.addresses["index"],
        **overrides,
    }
    server, port = create_server(load_config(GatewayConfig, "gateway", environ={}, port=0, **settings))
    return server, f"127.0.0.1:{port}"


def start_shard(port: int, data_dir):
    """An index shard on `port`, keeping its data in `data_dir` (so a restart finds it again)."""
    from common.config import load_config
    from index_server.config import IndexConfig
    from index_server.server import create_bundle

    return create_bundle(load_config(IndexConfig, "index", environ={}, port=port, data_dir=str(data_dir)))


def stop_shard(bundle) -> None:
    bundle.server.stop(None).wait()
    bundle.on_stop()


def stored_items(address: str) -> dict[str, int]:
    with grpc.insecure_channel(address) as channel:
        stats = index_pb2_grpc.IndexServiceStub(channel).Stats(index_pb2.StatsRequest(), timeout=5)
    return {d.name: d.items for d in stats.databases}


def catalogue_shot(name: str, size: int = 96) -> Product:
    """A small catalogue image of a real photo, with its box (nothing to localise: fast)."""
    photo = load_photo(name)
    h, w = photo.shape[:2]
    shot = photo[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4][:size, :size]
    return Product(name, "", encode_jpeg(np.ascontiguousarray(shot)), {}, box=(0, 0, shot.shape[1], shot.shape[0]))


def shot(name: str, product_id: str, category: str, **fields) -> Product:
    from dataclasses import replace

    return replace(catalogue_shot(name), product_id=product_id, category=category, **fields)


@pytest.mark.parametrize("where", ["search categories", "search region", "ingest", "delete"])
def test_category_names_are_checked_everywhere(client, coffee_png, where):
    from gateway.client import to_box
    from mps.gateway.v1 import gateway_pb2

    bad = "shoes\n" + "x" * 500
    with pytest.raises(grpc.RpcError) as error:
        if where == "search categories":
            client.search(coffee_png, categories=["tableware", bad])
        elif where == "search region":
            client.search(coffee_png, regions=[(CUP_BOX, bad)])
        elif where == "ingest":
            client.index_products([shot("rocket", "named-ok", "names"), shot("chelsea", "named-bad", bad)])
        else:
            client._stub.DeleteProducts(
                gateway_pb2.DeleteProductsRequest(product_ids=["x"], categories=[bad]), timeout=10
            )
    details = error.value.details()
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "category" in details and "letters, digits" in details and "128" in details
    assert len(details) < 600  # the 506-character name is not echoed whole
    if where == "ingest":
        assert "'named-bad'" in details and "1 image of 1 product was stored" in details
    del to_box


@pytest.mark.parametrize(
    "metadata, says",
    [
        ({"k" * 200: "v"}, ("'kkkk", "200 utf-8 bytes", "limit of 128")),
        ({"notes": "v" * 5000}, ("'notes'", "5000 utf-8 bytes", "limit of 4096")),
        ({f"k{i}": "v" for i in range(65)}, ("65 keys", "limit of 64")),
        ({f"k{i}": "v" * 4000 for i in range(5)}, ("in all", "limit of 16384")),
    ],
)
def test_metadata_over_the_limits_is_refused_before_anything_of_it_is_written(client, suite, metadata, says):
    with pytest.raises(grpc.RpcError) as error:
        client.index_products(
            [shot("rocket", "meta-ok", "meta"), shot("chelsea", "meta-bad", "meta", metadata=metadata)]
        )
    details = error.value.details()
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "product #1 ('meta-bad')" in details and "1 image of 1 product was stored" in details
    assert all(fragment in details.lower() for fragment in says), details
    assert stored_items(suite.addresses["index"])["meta.deep"] == 1  # meta-ok only


def test_counts_are_exact_when_an_image_is_sent_twice(client, suite):
    response = client.index_products(
        [
            shot("rocket", "dup-a", "dups"),
            shot("chelsea", "dup-b", "dups"),
            shot("rocket", "dup-a", "dups", metadata={"v": "2"}),
            shot("astronaut", "dup-c", "dups", image_id="front"),
            shot("coffee", "dup-c", "dups", image_id="back"),
        ]
    )
    assert (response.indexed, response.products, dict(response.per_category)) == (4, 3, {"dups": 4})
    assert [(i.product_id, i.image_id) for i in response.images][:2] == [
        ("dup-a", response.images[0].image_id),
        ("dup-b", response.images[1].image_id),
    ]
    items = stored_items(suite.addresses["index"])
    assert items["dups.deep"] == items["dups.bow"] == 4


def test_an_ingest_that_fails_on_one_shard_says_exactly_what_was_stored(suite):
    gateway, address = gateway_over(suite, index_routes={"lost": f"127.0.0.1:{free_port()}"})
    names = ["rocket", "chelsea", "astronaut", "coffee", "motorcycle_left"]
    products = [shot(name, f"kept-{name}", "kept") for name in names] + [shot("rocket", "lost-1", "lost")]
    try:
        with VisualSearchClient(address) as c, pytest.raises(grpc.RpcError) as error:
            c.index_products(products)
        details = error.value.details()
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE, details
        assert "5 images of 5 products were stored" in details and "'lost'" in details
        assert stored_items(suite.addresses["index"])["kept.deep"] == 5
    finally:
        gateway.stop(None)


def test_a_cancelled_index_stream_stores_nothing(suite):
    """The client cancels after the gateway has streamed two images to the index: none is stored."""
    import threading
    from concurrent import futures

    from mps.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    class CountingProxy(index_pb2_grpc.IndexServiceServicer):
        """Forwards to the suite's shard, counting the Add requests that went through."""

        def __init__(self, target: str):
            self.stub = index_pb2_grpc.IndexServiceStub(grpc.insecure_channel(target))
            self.received = 0
            self.add_ended = threading.Event()

        def Add(self, request_iterator, context):
            def counted():
                for request in request_iterator:
                    self.received += 1
                    yield request
                time.sleep(0.05)  # a cancel may end the iterator like a normal end, reported just after
                if not context.is_active():
                    raise RuntimeError("cancelled")  # so the forwarded stream is cancelled too

            try:
                return self.stub.Add(counted(), timeout=30)
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details() or "")
            finally:
                self.add_ended.set()

        def Stats(self, request, context):
            return self.stub.Stats(request, timeout=5)

    proxy = CountingProxy(suite.addresses["index"])
    proxy_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    index_pb2_grpc.add_IndexServiceServicer_to_server(proxy, proxy_server)
    proxy_port = proxy_server.add_insecure_port("127.0.0.1:0")
    proxy_server.start()
    gateway, address = gateway_over(suite, index_address=f"127.0.0.1:{proxy_port}", ingest_batch=2)
    more = threading.Event()

    def requests():
        for name in ("rocket", "chelsea", "astronaut"):
            p = shot(name, f"cancelled-{name}", "cancelled")
            request = gateway_pb2.IndexProductsRequest(
                product_id=p.product_id, category=p.category, image=common_pb2.Image(encoded=p.image)
            )
            request.box.CopyFrom(common_pb2.Box(x_min=0, y_min=0, x_max=p.box[2], y_max=p.box[3]))
            yield request
        more.wait(30)

    try:
        with grpc.insecure_channel(address) as channel:
            call = gateway_pb2_grpc.VisualSearchServiceStub(channel).IndexProducts.future(requests(), timeout=60)
            deadline = time.monotonic() + 30
            while proxy.received < 4 and time.monotonic() < deadline:  # two images, two kinds each
                time.sleep(0.05)
            assert proxy.received >= 4, "the gateway did not stream the first batch to the index"
            call.cancel()
            more.set()
            assert proxy.add_ended.wait(10), "the gateway left its index stream open"
        items = stored_items(suite.addresses["index"])
        assert items.get("cancelled.deep", 0) == items.get("cancelled.bow", 0) == 0
    finally:
        more.set()
        gateway.stop(None)
        proxy_server.stop(None)


def test_a_shard_that_goes_away_is_reported_and_used_again_as_soon_as_it_is_back(suite, coffee_png, tmp_path):
    """'gadgets' lives on its own shard, 'mugs' on the suite's. The shard stops: a search over both
    answers with 'gadgets' in failed_categories and its items degraded; one that needs only
    'gadgets' fails with UNAVAILABLE. The shard restarts on its port: searched again within 2 s."""
    port = free_port()
    shard = start_shard(port, tmp_path)
    gateway, address = gateway_over(suite, index_routes={"gadgets": f"127.0.0.1:{port}"})
    coffee = load_photo("coffee")
    x0, y0, x1, y1 = CUP_BOX
    cup = encode_jpeg(coffee[y0:y1, x0:x1])
    try:
        with VisualSearchClient(address) as c:
            c.index_products([Product("mug", "mugs", cup, {}, box=None), Product("gadget", "gadgets", cup, {})])
            both = c.search(coffee_png, categories=["mugs", "gadgets"], min_score=0.0)
            assert not both.failed_categories and not any(i.degraded for i in both.items)
            only = dict(regions=[(CUP_BOX, "gadgets")], min_score=0.0)
            assert c.search(coffee_png, **only).items[0].matches[0].product_id == "gadget"

            stop_shard(shard)
            shard = None
            result = c.search(coffee_png, categories=["mugs", "gadgets"], min_score=0.0)
            assert [(f.category, f.code, f.backend) for f in result.failed_categories] == [
                ("gadgets", "UNAVAILABLE", f"127.0.0.1:{port}")
            ]
            assert result.items and all(i.degraded and "'gadgets'" in i.warning for i in result.items)
            assert any(m.product_id == "mug" for i in result.items for m in i.matches)
            with pytest.raises(grpc.RpcError) as error:
                c.search(coffee_png, **only)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "'gadgets'" in error.value.details() and f"127.0.0.1:{port}" in error.value.details()

            shard = start_shard(port, tmp_path)
            back = time.monotonic()
            while True:
                try:
                    item = c.search(coffee_png, **only).items[0]
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE
                    assert time.monotonic() - back < 2.0, "still unavailable 2 s after the shard came back"
                    time.sleep(0.1)
            assert item.matches[0].product_id == "gadget" and not item.degraded
            assert time.monotonic() - back < 2.0
    finally:
        gateway.stop(None)
        if shard is not None:
            stop_shard(shard)


def test_a_photo_with_more_items_than_the_signature_service_takes_per_call(suite, signature_models, coffee_png):
    """A signature service taking 4 images per call; the gateway splits 10 regions into calls it
    accepts: by the limit ListKinds advertises, else by its own configured one."""
    from concurrent import futures

    from mps.signature.v1 import signature_pb2, signature_pb2_grpc
    from signature_server.service import SignatureService

    advertised = "max_images_per_call" in signature_pb2.ListKindsResponse.DESCRIPTOR.fields_by_name
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    signature_pb2_grpc.add_SignatureServiceServicer_to_server(
        SignatureService(signature_models, "efficientnet-lite0", "colour-texture-bow", 4, 10**8, 8, 200), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    # Without the advertised limit, the configured one must be right.
    gateway, address = gateway_over(
        suite, signature_address=f"127.0.0.1:{port}", **({} if advertised else {"signature_call_images": 4})
    )
    regions = [((20 * i, 20 * i, 20 * i + 200, 20 * i + 150), "tableware") for i in range(10)]
    try:
        with VisualSearchClient(address) as c:
            result = c.search(coffee_png, regions=regions, min_score=0.0)
        assert len(result.items) == 10
    finally:
        gateway.stop(None)
        server.stop(None)


@pytest.mark.parametrize("shape", [(1, 3000), (3000, 1), (2, 5000)])
def test_a_thin_photo_gets_items_inside_it(client, shape):
    """The decoder shrinks each axis by its own factor for a strip: boxes map back per axis."""
    rng = np.random.default_rng(3)
    strip = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    result = client.search(encode_png(strip), top_k=1)
    assert (result.image_width, result.image_height) == (shape[1], shape[0])
    for item in result.items:
        assert 0 <= item.box.x_min <= item.box.x_max <= shape[1] and 0 <= item.box.y_min <= item.box.y_max <= shape[0]
