"""Model serving: throughput and latency of Detect and ComputeSignatures with and without dynamic
batching, the gRPC hop, and the first request after start against a warm one.

    .venv/bin/python bench/serving.py [--seconds 8] [--concurrency 1,4,8,16]

Each server is its own process (`python -m detector_server` / `signature_server`, two ONNX Runtime
threads, as deployed), started once with dynamic batching (each model's config.json) and once
without (`--dynamic-batching false`: one inference per call, at most `inference_concurrency` at
once, as before batching existed). C client threads in this process send calls back to back for
--seconds: Detect of one real photo as raw RGB at the detector's 416-pixel side, ComputeSignatures
of one 224x224 crop (deep kind) per call. Figures per (RPC, C): calls/s, p50 and p99 ms.

- batching_speedup_c8: calls/s with batching over without, at C = 8 (the smaller of the two RPCs;
  each is printed).
- grpc_hop_ms: what the gRPC hop adds to one call (C = 1, no batching): the p50 of
  ComputeSignatures (one 224x224 crop, deep) minus the p50 of the same descriptor called in this
  process (signature_server.deep.DeepDescriptor.compute, same thread count), the two interleaved
  call by call so that both see the same machine; Detect's likewise (grpc_hop_ms_detect; its 25 ms
  inference makes it noisier).
- cold_over_warm: the first call after the health check says SERVING (the channel already
  connected, after a 0.5 s pause) over the p50 of 10 later calls each after the same pause, per
  server and kind (Detect; ComputeSignatures deep, then bow), the median of --cold-starts fresh
  processes; the largest of the three is the figure.
- in_process_ms_per_image: one inference's ms per image at batch 1 and 8, in this process: what
  batching can gain on this hardware at most.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.config import MODELS_DIR, REPO_ROOT
from common.local_suite import free_port, wait_serving
from common.proto_convert import image_to_proto
from detector_server.model import DetectorModel, ModelSpec
from mps.common.v1 import common_pb2
from mps.detector.v1 import detector_pb2, detector_pb2_grpc
from mps.signature.v1 import signature_pb2, signature_pb2_grpc
from signature_server.deep import DeepDescriptor, DeepSpec

PHOTO = REPO_ROOT / "docs" / "scene.jpg"
THREADS = 2  # ONNX Runtime intra-op threads, in the servers and in-process alike


def photo(side: int) -> np.ndarray:
    bgr = cv2.imread(str(PHOTO))
    if bgr is None:
        raise SystemExit(f"{PHOTO} cannot be read")
    scale = side / max(bgr.shape[:2])
    return cv2.cvtColor(cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


@contextmanager
def server(module: str, batching: bool) -> Iterator[tuple[grpc.Channel, float]]:
    """A server process; yields a channel to it and the moment its health said SERVING."""
    address = f"127.0.0.1:{free_port()}"
    command = [
        sys.executable,
        "-m",
        module,
        "--port",
        address.rsplit(":", 1)[1],
        "--intra-op-threads",
        str(THREADS),
        "--dynamic-batching",
        "true" if batching else "false",
        "--log-level",
        "WARNING",
        "--access-log",
        "false",
    ]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        wait_serving(address, process, timeout_s=300)
        serving_at = time.perf_counter()
        channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
        grpc.channel_ready_future(channel).result(timeout=30)  # connected: the first call is the model's
        try:
            yield channel, serving_at
        finally:
            channel.close()
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def load(call: Callable[[], object], concurrency: int, seconds: float) -> dict[str, float]:
    """C threads calling back to back for `seconds`: calls/s, p50 and p99 ms; raises on any error."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []
    start = threading.Barrier(concurrency + 1)
    deadline = [0.0]

    def worker(number: int) -> None:
        start.wait()
        try:
            while time.perf_counter() < deadline[0]:
                began = time.perf_counter()
                call()
                latencies[number].append((time.perf_counter() - began) * 1000)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(concurrency)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    deadline[0] = began + seconds
    start.wait()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    elapsed = time.perf_counter() - began
    every = [ms for own in latencies for ms in own]
    return {
        "calls_per_s": round(len(every) / elapsed, 2),
        "p50_ms": round(percentile(every, 50), 2),
        "p99_ms": round(percentile(every, 99), 2),
    }


PAUSE_S = 0.5


def cold_and_warm(call: Callable[[], object]) -> tuple[float, float]:
    """The first call's ms, and the p50 of 10 later ones each made after PAUSE_S idle: a warm
    model called after a pause, as the first call is (ONNX Runtime's and numba's threads park when
    idle, so a call after a pause costs more than one right after another, warm or not)."""
    time.sleep(PAUSE_S)
    began = time.perf_counter()
    call()
    cold = (time.perf_counter() - began) * 1000
    warm = []
    for _ in range(10):
        time.sleep(PAUSE_S)
        began = time.perf_counter()
        call()
        warm.append((time.perf_counter() - began) * 1000)
    return cold, percentile(warm, 50)


def hop(
    remote: Callable[[], object], local: Callable[[], object], blocks: int = 4, calls: int = 25
) -> tuple[float, float]:
    """p50 ms of `remote` and of `local`, in alternating blocks of calls so that both see the same
    machine. Not call by call: ONNX Runtime's threads spin for a while after each run, so a call
    right after the other side's steals the cores from it (both measured about 2x slower so)."""
    remote(), local()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(blocks):
        for call, into in ((remote, times[0]), (local, times[1])):
            time.sleep(0.2)
            for _ in range(calls):
                began = time.perf_counter()
                call()
                into.append((time.perf_counter() - began) * 1000)
    return percentile(times[0], 50), percentile(times[1], 50)


def per_image_ms(run: Callable[[int], object], sizes: tuple[int, ...] = (1, 8)) -> dict[str, float]:
    """In-process ms per image of one inference at each batch size (p50 of 10 runs)."""
    figures = {}
    for size in sizes:
        run(size)
        times = []
        for _ in range(10):
            began = time.perf_counter()
            run(size)
            times.append((time.perf_counter() - began) * 1000 / size)
        figures[str(size)] = round(percentile(times, 50), 2)
    return figures


def detector_batch(model: DetectorModel, size: int) -> object:
    """One inference of `size` letterboxed images, straight on the session."""
    return model.session.run(["detections"], {"images": np.zeros((size, 3, 416, 416), np.float32)})


def descriptor_batch(descriptor: DeepDescriptor, crop: np.ndarray, size: int) -> object:
    return descriptor.compute([crop] * size)


def cold_starts(module: str, calls: dict[str, Callable[[grpc.Channel], object]], starts: int) -> dict[str, float]:
    """Per call: the median, over `starts` fresh server processes, of the first call after the
    health check said SERVING over the p50 of the 20 after it."""
    ratios: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(starts):
        with server(module, True) as (channel, _):
            for name, call in calls.items():
                first, warm = cold_and_warm(functools.partial(call, channel))
                ratios[name].append(first / warm)
                print(f"{name}: first call after SERVING {first:.1f} ms, warm after a pause {warm:.1f} ms", flush=True)
    return {name: float(np.median(values)) for name, values in ratios.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per (RPC, concurrency, batching)")
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--cold-starts", type=int, default=3, help="fresh server processes per cold figure")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    detect_rgb = photo(416)
    crop = cv2.resize(photo(640)[100:400, 150:450], (224, 224), interpolation=cv2.INTER_AREA)
    detect_request = detector_pb2.DetectRequest(image=image_to_proto(detect_rgb))
    deep_request = signature_pb2.ComputeSignaturesRequest(
        images=[image_to_proto(crop)], kind=common_pb2.SIGNATURE_KIND_DEEP
    )
    bow_request = signature_pb2.ComputeSignaturesRequest(
        images=[image_to_proto(crop)], kind=common_pb2.SIGNATURE_KIND_BOW
    )

    result: dict[str, object] = {}
    cold: dict[str, float] = {}
    hops: dict[str, tuple[float, float]] = {}
    batch_ms: dict[str, dict[str, float]] = {}
    throughput: dict[str, dict[str, dict[str, float]]] = {}
    for batching in (True, False):
        arm = "batching" if batching else "no_batching"
        with server("detector_server", batching) as (channel, _):
            detect = functools.partial(
                detector_pb2_grpc.DetectorServiceStub(channel).Detect, detect_request, timeout=120
            )

            if not batching:
                model = DetectorModel(ModelSpec.load(MODELS_DIR / "yolov3-tiny"), intra_op_threads=THREADS)
                hops["detect"] = hop(detect, functools.partial(model.detect, detect_rgb))
                batch_ms["detect"] = per_image_ms(functools.partial(detector_batch, model))
                del model
            for c in levels:
                figures = load(detect, c, args.seconds)
                throughput.setdefault(f"detect_{arm}", {})[str(c)] = figures
                print(f"Detect {arm:11s} C={c:2d}: {figures}", flush=True)
        with server("signature_server", batching) as (channel, _):
            signer = signature_pb2_grpc.SignatureServiceStub(channel)
            sign_deep = functools.partial(signer.ComputeSignatures, deep_request, timeout=120)

            if not batching:
                descriptor = DeepDescriptor(DeepSpec.load(MODELS_DIR / "efficientnet-lite0"), intra_op_threads=THREADS)
                hops["sign"] = hop(sign_deep, functools.partial(descriptor.compute, [crop]))
                batch_ms["sign"] = per_image_ms(functools.partial(descriptor_batch, descriptor, crop))
                del descriptor
            for c in levels:
                figures = load(sign_deep, c, args.seconds)
                throughput.setdefault(f"sign_{arm}", {})[str(c)] = figures
                print(f"ComputeSignatures {arm:11s} C={c:2d}: {figures}", flush=True)

    for rpc, (remote, local) in hops.items():
        print(f"{rpc}: over gRPC p50 {remote:.2f} ms, in-process p50 {local:.2f} ms (alternating blocks)", flush=True)
    for rpc, figures in batch_ms.items():
        print(f"{rpc}: in-process ms per image at batch 1 / 8: {figures['1']} / {figures['8']}", flush=True)

    def call(method: str, request: object, stub_class: type, channel: grpc.Channel) -> object:
        return getattr(stub_class(channel), method)(request, timeout=120)

    cold.update(
        cold_starts(
            "detector_server",
            {"detect": functools.partial(call, "Detect", detect_request, detector_pb2_grpc.DetectorServiceStub)},
            args.cold_starts,
        )
    )
    signer_stub = signature_pb2_grpc.SignatureServiceStub
    cold.update(
        cold_starts(
            "signature_server",
            {
                "sign_deep": functools.partial(call, "ComputeSignatures", deep_request, signer_stub),
                "sign_bow": functools.partial(call, "ComputeSignatures", bow_request, signer_stub),
            },
            args.cold_starts,
        )
    )
    speedups = {
        rpc: round(
            throughput[f"{rpc}_batching"]["8"]["calls_per_s"] / throughput[f"{rpc}_no_batching"]["8"]["calls_per_s"], 2
        )
        for rpc in ("detect", "sign")
        if "8" in throughput[f"{rpc}_batching"]
    }
    result.update(
        {
            "batching_speedup_c8": min(speedups.values()) if speedups else None,
            "batching_speedup_c8_detect": speedups.get("detect"),
            "batching_speedup_c8_sign": speedups.get("sign"),
            "grpc_hop_ms": round(hops["sign"][0] - hops["sign"][1], 2),
            "grpc_hop_ms_detect": round(hops["detect"][0] - hops["detect"][1], 2),
            "cold_over_warm": round(max(cold.values()), 2),
            "in_process_ms_per_image": batch_ms,
            **{f"cold_over_warm_{name}": round(value, 2) for name, value in cold.items()},
            "throughput": throughput,
        }
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
