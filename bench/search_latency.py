"""MultiProductSearch latency through all four services on loopback, per stage.

Prints p50/p99 of the whole call (client-side) and the gateway's per-stage p50s for the demo photos;
the last line is one JSON object. The figure to beat is < 1 s per search (the paper, section 4).
    .venv/bin/python bench/search_latency.py [--queries 50]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from bench.suite import start_suite
from common.images import encode_jpeg, encode_png
from common.photos import SKIMAGE_PHOTOS, SKLEARN_PHOTOS, load_photo
from gateway.client import Product, VisualSearchClient
from gateway.demo_catalogue import variants


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=50)
    args = parser.parse_args()
    suite = start_suite()
    try:
        with VisualSearchClient(suite.addresses["gateway"]) as client:
            products = []
            for name in SKIMAGE_PHOTOS + SKLEARN_PHOTOS:
                for variant, image in variants(load_photo(name)).items():
                    for category in ("tableware", "vehicles", "furniture"):
                        products.append(Product(f"{name}-{variant}", category, encode_jpeg(image), {}))
            start = time.perf_counter()
            client.index_products(products, timeout_s=600)
            ingest_rate = len(products) / (time.perf_counter() - start)
            photos = [encode_png(load_photo(n)) for n in ("coffee", "motorcycle_right")]
            for data in photos:  # warm-up
                client.search(data, min_confidence=0.1)
            totals: list[float] = []
            stages: dict[str, list[float]] = {k: [] for k in ("decode_ms", "detect_ms", "sign_ms", "search_ms")}
            items = 0
            for q in range(args.queries):
                start = time.perf_counter()
                result = client.search(photos[q % 2], top_k=10, min_confidence=0.1)
                totals.append((time.perf_counter() - start) * 1000)
                items += len(result.items)
                for key in stages:
                    stages[key].append(getattr(result.timings, key))
    finally:
        suite.stop()
    figures = {
        "total_p50_ms": float(np.percentile(totals, 50)),
        "total_p99_ms": float(np.percentile(totals, 99)),
        "items_per_query": items / args.queries,
        "catalogue_items": len(products),
        "ingest_images_per_s": ingest_rate,
        **{f"{k.removesuffix('_ms')}_p50_ms": float(np.median(v)) for k, v in stages.items()},
    }
    for key, value in figures.items():
        print(f"{key:>22}: {value:.1f}")
    print(json.dumps({k: round(v, 2) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
