"""`make run`: starts the four services, ingests the demo catalogue, searches real photos."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.config import REPO_ROOT
from common.images import encode_png
from common.proto_convert import box_from_proto, image_to_proto
from gateway.cli import ingest
from gateway.client import VisualSearchClient
from gateway.config import GatewayConfig
from common.photos import load_photo
from gateway.demo_catalogue import QUERY_PHOTOS, Detected, build
from mps.common.v1 import common_pb2
from gateway.report import draw_result, format_table
from mps.detector.v1 import detector_pb2, detector_pb2_grpc

OUT = REPO_ROOT / "out"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(address: str, process: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """Waits until the process at `address` reports SERVING; raises if it dies or takes too long."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server for {address} exited with {process.returncode}; see its log above")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise TimeoutError(f"{address} did not become healthy in {timeout_s} s")


def main() -> int:
    ports = {name: free_port() for name in ("detector", "signature", "index", "gateway")}
    addr = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    commands = {
        "detector": ["-m", "detector_server", "--port", str(ports["detector"])],
        "signature": ["-m", "signature_server", "--port", str(ports["signature"])],
        "index": ["-m", "index_server", "--port", str(ports["index"])],
        "gateway": ["-m", "gateway", "--port", str(ports["gateway"]),
                    "--detector-address", addr["detector"], "--signature-address", addr["signature"],
                    "--index-address", addr["index"]],
    }
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    processes = {}
    try:
        for name, args in commands.items():
            processes[name] = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=env)
        for name, process in processes.items():
            wait_serving(addr[name], process)
        print(f"\nservices up: {addr}")

        catalogue = OUT / "catalogue"
        shutil.rmtree(catalogue, ignore_errors=True)
        with grpc.insecure_channel(addr["detector"]) as channel:
            detector = detector_pb2_grpc.DetectorServiceStub(channel)

            def detect(image):
                response = detector.Detect(detector_pb2.DetectRequest(
                    image=image_to_proto(image), min_confidence=0.1, products_only=True), timeout=30)
                return [Detected(d.category, d.class_name, d.confidence, box_from_proto(d.box))
                        for d in response.detections]

            counts = build(catalogue, detect, GatewayConfig().exclusive_groups)
        print(f"demo catalogue: {sum(counts.values())} images in {counts} under {catalogue}")

        with VisualSearchClient(addr["gateway"]) as client:
            for category in sorted(counts):
                ingest(client, catalogue / category, category)
            for name in QUERY_PHOTOS:
                photo = load_photo(name)
                for kind, label in ((common_pb2.SIGNATURE_KIND_DEEP, "deep"),
                                    (common_pb2.SIGNATURE_KIND_BOW, "bow")):
                    result = client.search(encode_png(photo), top_k=3, min_confidence=0.1, signature_kind=kind)
                    print(f"\n== MultiProductSearch: {name} ({photo.shape[1]}x{photo.shape[0]}), "
                          f"{label} signatures ==")
                    print(format_table(result))
                    print(f"picture: {draw_result(photo, result, OUT / f'demo_{name}_{label}.png')}")
        return 0
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    sys.exit(main())
