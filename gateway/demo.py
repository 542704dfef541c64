"""`make run`: starts the four services, ingests the demo catalogue, searches real photos, over gRPC
and once over HTTP/JSON. `python -m gateway.demo --serve` then keeps the suite and the search page
(http://127.0.0.1:8080/) up until Ctrl-C."""

from __future__ import annotations

import base64
import json
import shutil
import sys
import threading
import urllib.request

import grpc

from common.config import REPO_ROOT, load_config
from common.images import encode_png
from common.local_suite import start_local_suite
from common.photos import load_photo
from common.proto_convert import box_from_proto, image_to_proto
from gateway.cli import catalogue_files, ingest
from gateway.client import VisualSearchClient
from gateway.config import GatewayConfig
from gateway.demo_catalogue import QUERY_PHOTOS, Detected, build, two_product_scene
from gateway.http.config import HttpConfig
from gateway.http.server import start as start_http
from gateway.report import CatalogueThumbnails, draw_result, format_table
from mps.common.v1 import common_pb2
from mps.detector.v1 import detector_pb2, detector_pb2_grpc

OUT = REPO_ROOT / "out"


KINDS = (
    (common_pb2.SIGNATURE_KIND_DEEP, "deep"),
    (common_pb2.SIGNATURE_KIND_BOW, "bow"),
    (common_pb2.SIGNATURE_KIND_BLCF, "blcf"),
)


def search_over_http(url: str, photo: bytes) -> dict:
    """One MultiProductSearch as a plain HTTP client makes it: JSON in, JSON out."""
    body = json.dumps({"image": {"encoded": base64.b64encode(photo).decode()}, "topK": 3, "minConfidence": 0.1})
    request = urllib.request.Request(
        f"{url}/v1/search", data=body.encode(), headers={"content-type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())


def main(argv: list[str] | None = None) -> int:
    serve = "--serve" in (sys.argv[1:] if argv is None else argv)
    # The services' own logs in text, warnings and errors only: the demo's report is what to read.
    quiet = ["--log-format", "text", "--access-log", "false", "--log-level", "WARNING"]
    flags = {name: list(quiet) for name in ("detector", "signature", "index", "gateway")}
    # Every kind indexed, bags of local convolutional features included (off by default: its
    # signature is the slowest), so each query below is searched with each.
    flags["gateway"] += ["--index-kinds", '["deep", "bow", "blcf"]']
    suite = start_local_suite(flags)
    addr = suite.addresses
    try:
        print(f"\nservices up: {addr}")
        catalogue = OUT / "catalogue"
        shutil.rmtree(catalogue, ignore_errors=True)
        with grpc.insecure_channel(addr["detector"]) as channel:
            detector = detector_pb2_grpc.DetectorServiceStub(channel)

            def detect(image):
                response = detector.Detect(
                    detector_pb2.DetectRequest(image=image_to_proto(image), min_confidence=0.1, products_only=True),
                    timeout=30,
                )
                return [
                    Detected(d.category, d.class_name, d.confidence, box_from_proto(d.box)) for d in response.detections
                ]

            counts = build(catalogue, detect, GatewayConfig().exclusive_groups)
        print(f"demo catalogue: {sum(counts.values())} images in {counts} under {catalogue}")

        scene, _ = two_product_scene()
        queries = {name: load_photo(name) for name in QUERY_PHOTOS} | {"scene": scene}
        with VisualSearchClient(addr["gateway"], timeout_s=60) as client:
            # A second `make run` finds the first one's catalogue in data/index: start afresh.
            stale = sorted({product for category in counts for product, _, _ in catalogue_files(catalogue / category)})
            print(f"deleted {client.delete_products(stale).images_deleted} images of an earlier run")
            for category in sorted(counts):
                ingest(client, catalogue / category, category)
            thumbnails = CatalogueThumbnails(client)  # the matches' pictures as a remote client gets them
            for name, photo in queries.items():
                for kind, label in KINDS:
                    result = client.search(encode_png(photo), top_k=3, min_confidence=0.1, signature_kind=kind)
                    print(f"\n== MultiProductSearch: {name} ({photo.shape[1]}x{photo.shape[0]}), {label} signatures ==")
                    print(format_table(result))
                    drawn = draw_result(photo, result, OUT / f"demo_{name}_{label}.png", 3, thumbnails)
                    print(f"picture: {drawn}")
        http = start_http(
            load_config(HttpConfig, "http", environ={}, port=8080 if serve else 0, gateway_address=addr["gateway"])
        )
        try:
            reply = search_over_http(http.url, encode_png(queries["scene"]))
            found = [
                f"{i['category'] or '?'}: {i['matches'][0]['productId'] if i['matches'] else '-'}"
                for i in reply["items"]
            ]
            print(f"\n== the same over HTTP/JSON: POST {http.url}/v1/search -> {', '.join(found)} ==")
            if serve:
                print(f"search page: {http.url}/   API: {http.url}/openapi.json   (Ctrl-C stops)")
                threading.Event().wait()
        except KeyboardInterrupt:
            pass
        finally:
            http.stop()
        return 0
    finally:
        suite.stop()


if __name__ == "__main__":
    sys.exit(main())
