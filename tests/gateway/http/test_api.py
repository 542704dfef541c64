"""The gateway's RPCs over HTTP/JSON, through a real HTTP server in front of the real suite: search by
JSON and by multipart upload, ingest as newline-delimited JSON, management, the video stream,
health, the OpenAPI description, and every refusal as its HTTP status with Google's error JSON."""

from __future__ import annotations

import base64
import json
import threading
import time

import httpx
import pytest
from openapi_spec_validator import validate

from common.images import encode_jpeg
from common.photos import load_photo
from tests.gateway.http.conftest import start_front
from tests.helpers import CUP_BOX, free_port, video_clip


@pytest.fixture(scope="module")
def http(front):
    with httpx.Client(base_url=front.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def coffee_jpeg() -> bytes:
    return encode_jpeg(load_photo("coffee"))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tops(reply: dict) -> dict[str, str]:
    return {item["category"]: item["matches"][0]["productId"] for item in reply["items"] if item["matches"]}


def test_search_by_json_with_base64_finds_the_cup(http, coffee_jpeg):
    reply = http.post("/v1/search", json={"image": {"encoded": b64(coffee_jpeg)}, "topK": 3})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert tops(body)["tableware"] == "coffee-cup"
    assert body["imageWidth"] == 600 and body["imageHeight"] == 400
    item = next(i for i in body["items"] if i["category"] == "tableware")
    assert set(item["box"]) == {"xMin", "yMin", "xMax", "yMax"} and item["source"].startswith("ITEM_SOURCE_")
    assert len(item["matches"]) <= 3 and item["matches"][0]["metadata"] == {"title": "cup"}
    assert reply.headers["x-request-id"]


def test_search_by_multipart_upload_with_form_fields(http, coffee_jpeg):
    reply = http.post(
        "/v1/search",
        files={"image": ("coffee.jpg", coffee_jpeg, "image/jpeg")},
        data={
            "signature_kind": "SIGNATURE_KIND_BOW",
            "top_k": "2",
            "request": json.dumps({"categories": ["tableware"]}),
        },
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert {item["category"] for item in body["items"]} <= {"tableware", ""}
    assert tops(body)["tableware"] == "coffee-cup"
    assert all(len(item["matches"]) <= 2 for item in body["items"])


def test_search_of_a_region(http, coffee_jpeg):
    x0, y0, x1, y1 = CUP_BOX
    reply = http.post(
        "/v1/search",
        json={
            "image": {"encoded": b64(coffee_jpeg)},
            "regions": [{"box": {"xMin": x0, "yMin": y0, "xMax": x1, "yMax": y1}}],
        },
    )
    assert reply.status_code == 200, reply.text
    (item,) = reply.json()["items"]
    assert item["source"] == "ITEM_SOURCE_USER_REGION" and item["matches"][0]["productId"] == "coffee-cup"


def test_product_management_and_thumbnails(http):
    got = http.get("/v1/products/coffee-cup")
    assert got.status_code == 200, got.text
    product = got.json()["product"]
    assert product["category"] == "tableware" and product["images"][0]["metadata"] == {"title": "cup"}
    image_id = product["images"][0]["imageId"]

    listed = http.get("/v1/categories/tableware/products", params={"page_size": 2})
    assert listed.status_code == 200 and len(listed.json()["products"]) == 2 and listed.json()["nextPageToken"]
    assert int(listed.json()["total"]) >= 6

    updated = http.patch(
        "/v1/products/coffee-cup",
        json={"attributes": {"tags": ["porcelain"], "labels": {"brand": "acme"}}, "updateMask": ["tags", "labels"]},
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["product"]["attributes"]["labels"] == {"brand": "acme"}
    filtered = http.get("/v1/categories/tableware/products", params={"filter.all_tags": "porcelain"})
    assert [p["productId"] for p in filtered.json()["products"]] == ["coffee-cup"]

    thumbnail = http.get(f"/v1/products/coffee-cup/images/{image_id}/thumbnail", params={"category": "tableware"})
    assert thumbnail.status_code == 200 and base64.b64decode(thumbnail.json()["thumbnail"]).startswith(b"\xff\xd8")
    media = http.get(f"/v1/products/coffee-cup/images/{image_id}/thumbnail", params={"alt": "media"})
    assert media.status_code == 200 and media.headers["content-type"] == "image/jpeg"
    assert media.content.startswith(b"\xff\xd8")

    stats = http.get("/v1/stats", params={"categories": "tableware"})
    assert stats.status_code == 200
    (category,) = stats.json()["categories"]
    assert category["category"] == "tableware" and {k["kind"] for k in category["kinds"]} == {
        "SIGNATURE_KIND_DEEP",
        "SIGNATURE_KIND_BOW",
    }


def test_ingest_as_lines_array_and_upload_then_delete_and_purge(http, coffee_jpeg):
    cup = encode_jpeg(load_photo("coffee")[CUP_BOX[1] : CUP_BOX[3], CUP_BOX[0] : CUP_BOX[2]])
    lines = "\n".join(
        json.dumps(
            {"productId": f"line-{i}", "category": "http-ingest", "image": {"encoded": b64(cup)}, "imageId": f"v{i}"}
        )
        for i in range(3)
    )
    streamed = http.post("/v1/products:index", content=lines.encode(), headers={"content-type": "application/x-ndjson"})
    assert streamed.status_code == 200, streamed.text
    assert streamed.json()["indexed"] == "3" and streamed.json()["perCategory"] == {"http-ingest": "3"}

    array = http.post(
        "/v1/products:index",
        json=[{"productId": "array-0", "category": "http-ingest", "image": {"encoded": b64(cup)}, "imageId": "a"}],
    )
    assert array.status_code == 200 and array.json()["indexed"] == "1"
    uploaded = http.post(
        "/v1/products:index",
        files={"image": ("cup.jpg", cup, "image/jpeg")},
        data={"product_id": "upload-0", "category": "http-ingest", "metadata": json.dumps({"title": "uploaded"})},
    )
    assert uploaded.status_code == 200, uploaded.text
    assert http.get("/v1/products/upload-0").json()["product"]["images"][0]["metadata"] == {"title": "uploaded"}

    deleted = http.post("/v1/products:delete", json={"productIds": ["line-0", "nothing-here"]})
    assert deleted.status_code == 200 and deleted.json() == {"imagesDeleted": "1", "notFound": ["nothing-here"]}
    assert http.get("/v1/products/line-0").status_code == 404
    refused = http.post("/v1/categories/http-ingest/products:purge", json={})
    assert refused.status_code == 400 and "force" in refused.json()["error"]["message"]
    purged = http.post("/v1/categories/http-ingest/products:purge", json={"force": True})
    assert purged.status_code == 200 and purged.json()["productsDeleted"] == "4"


def test_a_bad_line_cancels_the_whole_ingest(http, coffee_jpeg):
    lines = (
        json.dumps({"productId": "half-0", "category": "http-half", "image": {"encoded": b64(coffee_jpeg)}})
        + "\n{not json\n"
    )
    reply = http.post("/v1/products:index", content=lines.encode(), headers={"content-type": "application/x-ndjson"})
    assert reply.status_code == 400
    assert reply.json()["error"]["status"] == "INVALID_ARGUMENT" and "line 2" in reply.json()["error"]["message"]
    assert http.get("/v1/products/half-0").status_code == 404  # nothing of the stream was stored


def test_the_video_stream_as_lines_in_and_out(http):
    clip, _cut = video_clip(pan=4, zoom=0, after_cut=0)
    messages = [
        {"frameNumber": n + 1, "timestampMs": n * 40, "image": {"encoded": b64(encode_jpeg(frame))}}
        for n, frame in enumerate(clip)
    ]
    messages[0]["options"] = {"topK": 2, "signatureKind": "SIGNATURE_KIND_DEEP"}
    reply = http.post(
        "/v1/video:search",
        content="\n".join(json.dumps(m) for m in messages).encode(),
        headers={"content-type": "application/x-ndjson"},
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("application/x-ndjson")
    results = [json.loads(line) for line in reply.text.splitlines()]
    assert "summary" in results[-1] and results[-1]["summary"]["framesReceived"] == "4"
    processed = results[:-1]
    assert processed and all(int(r["frameNumber"]) >= 1 for r in processed)
    assert any(item["matches"] for r in processed for item in r["items"])
    assert all(len(item["matches"]) <= 2 for r in processed for item in r["items"])
    skipped = sum(len(r["skippedFrames"]) for r in processed)
    assert len(processed) + skipped == 4  # every frame processed or reported skipped, once


def test_a_bad_frame_is_a_400_naming_it(http, coffee_jpeg):
    frames = [
        {"frameNumber": 1, "image": {"encoded": b64(coffee_jpeg)}},
        {"frameNumber": 1, "image": {"encoded": b64(coffee_jpeg)}},
    ]
    reply = http.post(
        "/v1/video:search",
        content="\n".join(json.dumps(f) for f in frames).encode(),
        headers={"content-type": "application/x-ndjson"},
    )
    lines = [json.loads(line) for line in reply.text.splitlines()]
    error = reply.json()["error"] if reply.status_code != 200 else lines[-1]["error"]
    assert error["status"] == "INVALID_ARGUMENT" and "frame" in error["message"]


@pytest.mark.parametrize(
    ("verb", "path", "kwargs", "status", "says"),
    [
        ("post", "/v1/search", {"json": {"image": {"encoded": b64(b"not an image")}}}, 400, "cannot be decoded"),
        ("post", "/v1/search", {"json": {"image": {"encoded": "%%%"}}}, 400, "not base64"),
        ("post", "/v1/search", {"json": {"topKay": 3}}, 400, "topKay"),
        (
            "post",
            "/v1/search",
            {"content": b'{"topK": ', "headers": {"content-type": "application/json"}},
            400,
            "not JSON",
        ),
        ("post", "/v1/search", {"content": b"<xml/>", "headers": {"content-type": "text/xml"}}, 415, "Content-Type"),
        ("post", "/v1/search", {"json": {}}, 400, "image"),
        ("get", "/v1/products/no-such-product", {}, 404, "not in the catalogue"),
        ("get", "/v1/categories/tableware/products", {"params": {"page_size": "lots"}}, 400, "not an integer"),
        ("get", "/v1/categories/tableware/products", {"params": {"colour": "red"}}, 400, "no field 'colour'"),
        ("delete", "/v1/stats", {}, 405, "use GET"),
        ("get", "/v1/nothing/here", {}, 404, "no API route"),
        ("get", "/v1/stats", {"params": {"alt": "xml"}}, 400, "alt="),
        ("get", "/v1/products/coffee-cup", {"params": {"alt": "media"}}, 400, "returns no bytes"),
        ("get", "/v1/stats", {"headers": {"x-server-timeout": "soon"}}, 400, "X-Server-Timeout"),
        ("post", "/v1/products:index", {"params": {"product_id": "x"}, "json": []}, 400, "is a stream"),
        ("post", "/v1/products:index", {"json": [{"productId": "x", "category": "c", "image": {}}]}, 400, "image"),
    ],
)
def test_refusals_are_their_http_status_with_googles_error_json(http, verb, path, kwargs, status, says):
    reply = getattr(http, verb)(path, **kwargs)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == status and error["status"] and says in error["message"], error


def test_errors_carry_the_google_rpc_details(http):
    reply = http.get("/v1/products/no-such-product")
    (info,) = [d for d in reply.json()["error"]["details"] if d["@type"].endswith("google.rpc.ErrorInfo")]
    assert info["reason"] == "PRODUCT_NOT_FOUND"


def test_request_ids_and_deadlines_travel_with_the_call(http, coffee_jpeg):
    reply = http.get("/v1/stats", headers={"x-request-id": "my-request-0001"})
    assert reply.status_code == 200 and reply.headers["x-request-id"] == "my-request-0001"
    late = http.post("/v1/search", json={"image": {"encoded": b64(coffee_jpeg)}}, headers={"x-server-timeout": "0.001"})
    assert late.status_code == 504 and late.json()["error"]["status"] == "DEADLINE_EXCEEDED"


def test_a_body_over_the_limit_is_refused_before_it_is_read(front, coffee_jpeg):
    small = start_front(front.suite.addresses["gateway"], max_body_bytes=4096)
    try:
        with httpx.Client(base_url=small.url, timeout=60) as client:
            reply = client.post("/v1/search", json={"image": {"encoded": b64(coffee_jpeg)}})
            assert reply.status_code == 413 and reply.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
            assert "4096" in reply.json()["error"]["message"]

            def chunks():  # no Content-Length: counted as it arrives
                yield b'{"image": {"encoded": "'
                yield b"A" * 8192
                yield b'"}}'

            streamed = client.post("/v1/search", content=chunks(), headers={"content-type": "application/json"})
            assert streamed.status_code == 413
    finally:
        small.stop()


def test_health_follows_the_gateway(http):
    assert http.get("/healthz").json() == {"status": "SERVING"}
    dead = start_front(f"127.0.0.1:{free_port()}")
    try:
        reply = httpx.get(dead.url + "/healthz", timeout=30)
        assert reply.status_code == 503 and reply.json()["status"] == "UNREACHABLE"
        search = httpx.post(dead.url + "/v1/search", json={"image": {"encoded": b64(b"x")}}, timeout=30)
        assert search.status_code == 503 and search.json()["error"]["status"] == "UNAVAILABLE"
    finally:
        dead.stop()


def test_the_openapi_description_is_valid_and_generated_from_the_protos(http):
    spec = http.get("/openapi.json").json()
    validate(spec)
    assert spec["openapi"].startswith("3.1")
    paths = spec["paths"]
    assert set(paths["/v1/products/{product_id}"]) == {"get", "patch"}
    assert paths["/v1/search"]["post"]["x-grpc-method"] == "/mps.gateway.v1.VisualSearchService/MultiProductSearch"
    assert "multipart/form-data" in paths["/v1/search"]["post"]["requestBody"]["content"]
    assert "application/x-ndjson" in paths["/v1/products:index"]["post"]["requestBody"]["content"]
    assert "application/x-ndjson" in paths["/v1/video:search"]["post"]["responses"]["200"]["content"]
    schemas = spec["components"]["schemas"]
    item = schemas["mps.gateway.v1.Item"]["properties"]
    assert "classCame" not in item and "className" in item and "missingWordRanges" in item  # JSON names
    assert "category" in schemas["mps.gateway.v1.Item"]["properties"]["category"]["description"]  # proto comments
    assert schemas["mps.common.v1.SignatureKind"]["enum"][0] == "SIGNATURE_KIND_UNSPECIFIED"
    assert schemas["mps.gateway.v1.IndexProductsResponse"]["properties"]["indexed"]["format"] == "uint64"
    # Every $ref resolves.
    text = json.dumps(spec)
    for name in {part.split('"')[0] for part in text.split('"$ref": "#/components/schemas/')[1:]}:
        assert name in schemas, name


def test_a_bad_frame_deep_in_a_stream_ends_it_with_its_own_status(http, coffee_jpeg):
    """The gateway ends the call while frames are still being written: the client gets the
    gateway's INVALID_ARGUMENT, never a write error of its own (grpc/grpc#36066)."""
    small = encode_jpeg(load_photo("coffee")[::4, ::4])
    frames = [{"frameNumber": n, "image": {"encoded": b64(small)}} for n in range(1, 40)]
    frames[3] = {"frameNumber": 4}  # no image
    for _ in range(3):
        reply = http.post(
            "/v1/video:search",
            content="\n".join(json.dumps(f) for f in frames).encode(),
            headers={"content-type": "application/x-ndjson"},
        )
        error = reply.json()["error"] if reply.status_code != 200 else json.loads(reply.text.splitlines()[-1])["error"]
        assert error["status"] == "INVALID_ARGUMENT" and "frame_number 4" in error["message"], error


def test_streams_beyond_the_limit_are_429(front, coffee_jpeg):
    narrow = start_front(front.suite.addresses["gateway"], max_streams=1)
    sent, release = threading.Event(), threading.Event()
    held: dict[str, int] = {}

    def slow_frames():
        yield (json.dumps({"frameNumber": 1, "image": {"encoded": b64(coffee_jpeg)}}) + "\n").encode()
        sent.set()  # httpx asks for more once the first frame is on its way
        release.wait(30)

    def hold() -> None:
        with httpx.Client(base_url=narrow.url, timeout=60) as own:
            reply = own.post(
                "/v1/video:search", content=slow_frames(), headers={"content-type": "application/x-ndjson"}
            )
            held["status"] = reply.status_code

    holder = threading.Thread(target=hold)
    try:
        holder.start()
        assert sent.wait(30)
        with httpx.Client(base_url=narrow.url, timeout=60) as client:
            deadline = time.monotonic() + 20
            while True:  # the held stream's handler takes the only slot before it reads the frame
                second = client.post("/v1/products:index", json=[])
                if second.status_code == 429 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert second.status_code == 429 and "1 streams are in flight" in second.json()["error"]["message"]
            release.set()
            holder.join(30)
            assert held["status"] == 200
            assert client.post("/v1/products:index", json=[]).status_code == 200  # the slot is free again
    finally:
        release.set()
        holder.join(30)
        narrow.stop()
