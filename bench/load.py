"""The suite under load: concurrent clients for a bounded time, search only, then mixed with ingest.

The four services run as their own processes (their RSS is sampled from /proc every 0.25 s). For
8 and then 32 clients, each phase runs for `--seconds`: every client loops over the photos,
searching; in the mixed phases one call in five is an ingest of a fresh product (a one-image
IndexProducts stream) instead. Prints, per phase, throughput, p50/p99 latency of each call kind,
errors by status code and each service's RSS (at the start, the peak, the end); the last line is
one JSON object. Target (issue 10): 0 errors, RSS flat over the run.
    .venv/bin/python bench/load.py [--seconds 20] [--clients 8,32]
"""

from __future__ import annotations

import argparse
import itertools
import json
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

from common.images import encode_jpeg
from common.local_suite import start_local_suite
from common.photos import SKIMAGE_PHOTOS, load_photo
from gateway.client import Product, VisualSearchClient


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssSampler(threading.Thread):
    def __init__(self, pids: dict[str, int], every_s: float = 0.25):
        super().__init__(daemon=True)
        self.pids, self.every_s = pids, every_s
        self.samples: dict[str, list[float]] = {name: [] for name in pids}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            for name, pid in self.pids.items():
                self.samples[name].append(rss_mb(pid))
            self.stopped.wait(self.every_s)

    def window(self) -> dict[str, list[float]]:
        return {name: list(values) for name, values in self.samples.items()}


def run_phase(
    address: str,
    clients: int,
    seconds: float,
    mixed: bool,
    photos: list[bytes],
    crops: list[bytes],
    serial: itertools.count,
) -> dict:
    latencies: dict[str, list[float]] = {"search": [], "ingest": []}
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client_loop(worker: int) -> None:
        with VisualSearchClient(address, timeout_s=120) as client:
            for call in itertools.count(worker):
                if time.monotonic() >= end:
                    return
                ingest = mixed and call % 5 == 4
                started = time.perf_counter()
                try:
                    if ingest:
                        crop = crops[call % len(crops)]
                        client.index_products(
                            [Product(f"load-{next(serial)}", "load", crop, {"n": str(call)}, box=None)]
                        )
                    else:
                        client.search(photos[call % len(photos)], top_k=10)
                    kind = "ingest" if ingest else "search"
                    with lock:
                        latencies[kind].append((time.perf_counter() - started) * 1000)
                except grpc.RpcError as error:
                    with lock:
                        errors[error.code().name] += 1

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    result = {
        "calls_per_s": sum(len(v) for v in latencies.values()) / elapsed,
        "errors": sum(errors.values()),
        "errors_by_code": dict(errors),
    }
    for kind, values in latencies.items():
        if values:
            result[f"{kind}_p50_ms"] = float(np.percentile(values, 50))
            result[f"{kind}_p99_ms"] = float(np.percentile(values, 99))
            result[f"{kind}_calls"] = len(values)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", default="8,32")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    pictures = [load_photo(name) for name in SKIMAGE_PHOTOS]
    photos = [encode_jpeg(p) for p in pictures]
    crops = [
        encode_jpeg(p[p.shape[0] // 4 : 3 * p.shape[0] // 4, p.shape[1] // 4 : 3 * p.shape[1] // 4]) for p in pictures
    ]
    suite = start_local_suite({"index": ["--data-dir", ""]})
    sampler = RssSampler({name: process.pid for name, process in suite.processes.items()})
    serial = itertools.count()
    phases = {}
    try:
        with VisualSearchClient(suite.addresses["gateway"], timeout_s=600) as client:
            client.index_products(
                [
                    Product(f"base-{i}", category, crop, {})
                    for i, crop in enumerate(crops)
                    for category in ("load", "other")
                ]
            )
            for photo in photos[:2]:  # warm-up
                client.search(photo)
        sampler.start()
        for mixed in (False, True):
            for clients in counts:
                name = f"{'mixed' if mixed else 'search'}_{clients}"
                before = {k: len(v) for k, v in sampler.window().items()}
                phases[name] = run_phase(
                    suite.addresses["gateway"], clients, args.seconds, mixed, photos, crops, serial
                )
                window = {k: v[before[k] :] for k, v in sampler.window().items()}
                phases[name]["rss_mb"] = {
                    k: {"start": v[0], "peak": max(v), "end": v[-1]} for k, v in window.items() if v
                }
                print(name, json.dumps(phases[name], default=lambda x: round(x, 1)), flush=True)
        samples = sampler.window()
    finally:
        sampler.stopped.set()
        suite.stop()
    # Flat: the RSS at the end of the last phase against the end of the first (after warm-up).
    first_end = {k: v["rss_mb"] for k, v in phases.items()}
    names = list(phases)
    growth = {
        service: first_end[names[-1]][service]["end"] - first_end[names[0]][service]["end"] for service in samples
    }
    summary = {
        "errors": sum(p["errors"] for p in phases.values()),
        **{f"{name}_calls_per_s": round(p["calls_per_s"], 2) for name, p in phases.items()},
        **{f"{name}_search_p50_ms": round(p["search_p50_ms"], 1) for name, p in phases.items()},
        **{f"{name}_search_p99_ms": round(p["search_p99_ms"], 1) for name, p in phases.items()},
        **{f"{name}_ingest_p50_ms": round(p["ingest_p50_ms"], 1) for name, p in phases.items() if "ingest_p50_ms" in p},
        **{f"{service}_peak_rss_mb": round(max(v), 1) for service, v in samples.items()},
        **{f"{service}_rss_growth_mb": round(g, 1) for service, g in growth.items()},
    }
    for key, value in summary.items():
        print(f"{key:>36}: {value}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
