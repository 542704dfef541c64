"""Bags of local convolutional features (BLCF) vs the deep global descriptor and the colour-texture words.

    .venv/bin/python bench/blcf.py [--rerank-k 50] [--query-expansion 3] [--repeats 3]

One run, two query sets, every method on each, all through the project's own code (the signature
extractors of signature_server/, the databases of index_server/):
- small: the instance fills a small part of the catalogue photo. Each of the 36 tiles of the four
  held-out photos (bench/signature.py: china, flower, hubble_deep_field, retina; neither the
  colour-texture codebook nor the BLCF vocabulary saw them) is pasted, at 22-40% of the width, into
  two larger real photos (random views of the other bundled photos, 640 pixels wide); the catalogue
  is those 72 photos, 20 such photos with nothing pasted, and the 81 tiles of the other photos.
  Queries: each held-out tile as is and after each of bench/signature.py's changes (252 queries);
  each has two right answers.
- changes: bench/signature.py's set (catalogue: every tile; queries: the held-out tiles after each
  change; one right answer each).
Methods: deep (cosine of the GeM vectors), colour-texture words (chi-squared, BowIndex), BLCF
(tf-idf cosine, BlcfIndex), BLCF with spatial re-ranking of the top K, and with average query
expansion over the first N re-ranked; and, as a variant, BLCF with re-ranking whose queries are one
level (the pyramid's smallest scale) instead of the model's pyramid. Figures: mAP, NDCG@10 and R@1
per method and set; latency p50 per query (BLCF search, added by the re-rank, by query expansion;
signature time per image); bytes per item (signature, and the database's memory per item). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.reference import chi2_distances, dense
from bench.signature import CHANGES, HELD_OUT, changes_set, tiles
from common.blcf_codec import AssignmentMap, encode
from common.photos import SKIMAGE_PHOTOS, SKLEARN_PHOTOS, load_photo
from index_server.blcf import BlcfIndex, Rerank
from kernels import select_kernels
from signature_server.blcf import BlcfExtractor, BlcfSpec
from signature_server.bow import BowExtractor, BowSpec
from signature_server.deep import DeepDescriptor, DeepSpec

MODELS = Path(__file__).resolve().parent.parent / "models"
SEED = 7


# -- the small-instance set -------------------------------------------------------------------------


def view(photo: np.ndarray, rng: np.random.Generator, width: int = 640) -> np.ndarray:
    """A random view (70-100% of each side) of a photo, resized to `width` pixels wide."""
    height, full = photo.shape[:2]
    h, w = int(height * rng.uniform(0.7, 1.0)), int(full * rng.uniform(0.7, 1.0))
    y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, full - w + 1))
    crop = photo[y : y + h, x : x + w]
    return cv2.resize(crop, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)


def paste(background: np.ndarray, instance: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """The instance resized to `share` of the background's width (its aspect kept, fitted in
    height), at a random place."""
    out = background.copy()
    height, width = out.shape[:2]
    w = int(width * share)
    h = min(int(w * instance.shape[0] / instance.shape[1]), height)
    w = int(h * instance.shape[1] / instance.shape[0])
    y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    out[y : y + h, x : x + w] = cv2.resize(instance, (w, h), interpolation=cv2.INTER_AREA)
    return out


def small_instance_set() -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray], np.ndarray, list[str]]:
    """(catalogue, (N,) instance number per catalogue photo (-1 none), queries, (Q,) instance
    number per query, change per query)."""
    rng = np.random.default_rng(SEED)
    held = [t for name in HELD_OUT for t in tiles(load_photo(name))]
    others = [name for name in SKIMAGE_PHOTOS + SKLEARN_PHOTOS if name not in HELD_OUT]
    photos = {name: load_photo(name) for name in others}
    catalogue, instance_of = [], []
    for number, tile in enumerate(held):
        for _ in range(2):
            background = view(photos[others[int(rng.integers(len(others)))]], rng)
            catalogue.append(paste(background, tile, float(rng.uniform(0.22, 0.4)), rng))
            instance_of.append(number)
    for _ in range(20):
        catalogue.append(view(photos[others[int(rng.integers(len(others)))]], rng))
        instance_of.append(-1)
    for name in others:
        for tile in tiles(photos[name]):
            catalogue.append(tile)
            instance_of.append(-1)
    queries, truth, change_of = [], [], []
    for number, tile in enumerate(held):
        for change, apply in (("none", lambda im: im), *CHANGES.items()):
            queries.append(np.ascontiguousarray(apply(tile)))
            truth.append(number)
            change_of.append(change)
    return catalogue, np.array(instance_of), queries, np.array(truth), change_of


# -- measures ----------------------------------------------------------------------------------------


def measures(order: np.ndarray, relevant: np.ndarray) -> tuple[float, float, float]:
    """One query: catalogue rows best first (all of them), (N,) bool relevant -> (AP, NDCG@10, R@1)."""
    hits = relevant[order]
    positions = np.flatnonzero(hits) + 1
    ap = float((np.arange(1, len(positions) + 1) / positions).mean()) if len(positions) else 0.0
    gains = hits[:10] / np.log2(np.arange(2, min(10, len(hits)) + 2))
    ideal = (1 / np.log2(np.arange(2, min(10, int(relevant.sum())) + 2))).sum()
    return ap, float(gains.sum() / ideal) if ideal else 0.0, float(hits[0])


def evaluate(scores: np.ndarray, instance_of: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(Q, N) scores (higher better; ties by catalogue row) -> (Q, 3) AP, NDCG@10, R@1."""
    out = np.empty((len(truth), 3))
    for q, right in enumerate(truth):
        order = np.lexsort((np.arange(scores.shape[1]), -scores[q]))
        out[q] = measures(order, instance_of == right)
    return out


def p50(times: Sequence[float]) -> float:
    return round(float(statistics.median(times)), 2)


# -- methods -----------------------------------------------------------------------------------------


class Methods:
    def __init__(self, kernels: str):
        bow_spec = BowSpec.load(MODELS / "colour-texture-bow")
        self.bow = BowExtractor(bow_spec, bow_spec.load_codebook(), select_kernels(kernels))
        self.deep = DeepDescriptor(DeepSpec.load(MODELS / "efficientnet-lite0"))
        self.blcf = BlcfExtractor.load(MODELS / "blcf", kernels=kernels)

    def describe_item(self, image: np.ndarray) -> AssignmentMap:
        return self.blcf.map(image)

    def describe_query(self, image: np.ndarray) -> AssignmentMap:
        """A query is a region: the whole query image as its region (the model's query pyramid)."""
        height, width = image.shape[:2]
        return self.blcf.maps(image, [(0.0, 0.0, float(width), float(height))])[0]

    def describe_query_single(self, image: np.ndarray) -> AssignmentMap:
        """The variant: one level only, the query pyramid's first (its smallest scale)."""
        return self.blcf.map(image, self.blcf.spec.query_sides[0])


def blcf_scores(
    index: BlcfIndex, size: int, queries: list[AssignmentMap], rerank: Rerank | None
) -> tuple[np.ndarray, list[float]]:
    """(Q, N) scores from the index's answers (every item asked for; unreturned = -1) and the
    time per query in ms."""
    scores = np.full((len(queries), size), -1.0)
    times = []
    for q, amap in enumerate(queries):
        start = time.perf_counter()
        hits = index.search(amap, size, rerank=rerank)
        times.append((time.perf_counter() - start) * 1000)
        for hit in hits:
            # Re-ranked items come first whatever their score: keep the returned order.
            scores[q, int(hit.item_id)] = hit.score + (10.0 if hit.reranked else 0.0)
    return scores, times


def run_set(
    name: str,
    methods: Methods,
    data: tuple[list[np.ndarray], np.ndarray, list[np.ndarray], np.ndarray, list[str]],
    rerank_k: int,
    expansion: int,
) -> dict[str, object]:
    catalogue, instance_of, queries, truth, change_of = data
    print(f"[{name}] catalogue {len(catalogue)} photos, {len(queries)} queries", flush=True)
    results: dict[str, np.ndarray] = {}
    timing: dict[str, list[float]] = {}

    deep_items = methods.deep.compute(catalogue)
    deep_queries = []
    for im in queries:
        start = time.perf_counter()
        deep_queries.append(methods.deep.compute([im])[0])
        timing.setdefault("signature_query_deep", []).append((time.perf_counter() - start) * 1000)
    results["deep"] = evaluate(np.stack(deep_queries) @ deep_items.T, instance_of, truth)

    histograms = lambda images: np.stack([dense(methods.bow.bag(im)) for im in images])  # noqa: E731
    results["bow"] = evaluate(-chi2_distances(histograms(queries), histograms(catalogue)), instance_of, truth)

    start = time.perf_counter()
    item_maps = [methods.describe_item(im) for im in catalogue]
    timing["signature_item"] = [(time.perf_counter() - start) * 1000 / len(catalogue)]
    query_maps = []
    for im in queries:
        start = time.perf_counter()
        query_maps.append(methods.describe_query(im))
        timing.setdefault("signature_query", []).append((time.perf_counter() - start) * 1000)
    single_maps = [methods.describe_query_single(im) for im in queries]
    blcf = methods.blcf
    index = BlcfIndex(blcf.vocabulary.size, blcf.vocabulary.fingerprint, background_merge=False)
    empty_bytes = index.nbytes()  # the vocabulary-sized arrays and spare capacity: not per item
    for number, amap in enumerate(item_maps):
        index.add(str(number), amap, {})
    index.merge()  # postings in their compact base, as a database of any size holds most of them
    variants: dict[str, tuple[list[AssignmentMap], Rerank | None]] = {
        "blcf": (query_maps, None),
        "blcf_rerank": (query_maps, Rerank(rerank_k, 0)),
        "blcf_rerank_qe": (query_maps, Rerank(rerank_k, expansion)),
        "blcf_single_scale_rerank": (single_maps, Rerank(rerank_k, 0)),
    }
    for method, (maps, rerank) in variants.items():
        blcf_scores(index, len(catalogue), maps[:5], rerank)  # warm the compiled kernels
        scores, times = blcf_scores(index, len(catalogue), maps, rerank)
        results[method] = evaluate(scores, instance_of, truth)
        timing[method] = times

    changes = np.array(change_of)
    print(f"  {'method':<16}{'mAP':>7}{'NDCG@10':>9}{'R@1':>7}   mAP by change")
    for method, values in results.items():
        by_change = " ".join(f"{c} {values[changes == c, 0].mean():.2f}" for c in dict.fromkeys(change_of))
        mean = values.mean(axis=0)
        print(f"  {method:<16}{mean[0]:>7.3f}{mean[1]:>9.3f}{mean[2]:>7.3f}   {by_change}")
    signature_bytes = [len(encode(m)) for m in item_maps]
    return {
        "results": {m: v.mean(axis=0) for m, v in results.items()},
        "timing": timing,
        "signature_bytes": int(np.median(signature_bytes)),
        "index_bytes_per_item": round((index.nbytes() - empty_bytes) / len(catalogue)),
        "cells": int(np.median([m.rows * m.columns for m in item_maps])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rerank-k", type=int, default=50)
    parser.add_argument("--query-expansion", type=int, default=3)
    parser.add_argument("--kernels", default="auto")
    args = parser.parse_args()

    methods = Methods(args.kernels)
    spec: BlcfSpec = methods.blcf.spec
    print(
        f"BLCF: {spec.name} version {spec.version}, {methods.blcf.vocabulary.size} words "
        f"(fingerprint {methods.blcf.vocabulary.fingerprint:08x}), tensor {spec.tensor} (stride {spec.stride}), "
        f"items at long side {spec.long_side}, queries by region at {list(spec.query_sides)}; "
        f"re-rank K = {args.rerank_k}, "
        f"query expansion N = {args.query_expansion}",
        flush=True,
    )
    small = run_set("small", methods, small_instance_set(), args.rerank_k, args.query_expansion)
    changed = run_set("changes", methods, changes_set(), args.rerank_k, args.query_expansion)

    figures: dict[str, float] = {}
    for set_name, outcome in (("small", small), ("changes", changed)):
        results = outcome["results"]
        assert isinstance(results, dict)
        for method, values in results.items():
            ap, ndcg, r1 = (float(v) for v in values)
            figures[f"map_{method}_{set_name}"] = round(float(ap), 3)
            figures[f"ndcg10_{method}_{set_name}"] = round(float(ndcg), 3)
            figures[f"r1_{method}_{set_name}"] = round(float(r1), 3)
    timing = small["timing"]
    assert isinstance(timing, dict)
    figures["blcf_search_p50_ms"] = p50(timing["blcf"])
    figures["blcf_rerank_p50_ms"] = p50(timing["blcf_rerank"])
    figures["blcf_rerank_added_p50_ms"] = round(p50(timing["blcf_rerank"]) - p50(timing["blcf"]), 2)
    figures["blcf_qe_added_p50_ms"] = round(p50(timing["blcf_rerank_qe"]) - p50(timing["blcf_rerank"]), 2)
    figures["blcf_signature_item_ms"] = round(timing["signature_item"][0], 1)
    figures["blcf_signature_query_p50_ms"] = p50(timing["signature_query"])
    figures["deep_signature_query_p50_ms"] = p50(timing["signature_query_deep"])
    for name, key in (
        ("blcf_signature_bytes", "signature_bytes"),
        ("blcf_index_bytes_per_item", "index_bytes_per_item"),
        ("blcf_cells_per_item", "cells"),
    ):
        value = small[key]
        assert isinstance(value, int)
        figures[name] = value
    # The names the issue asks for (map_blcf_rerank_small is one of the per-set figures).
    figures["ndcg10_blcf_rerank"] = figures["ndcg10_blcf_rerank_small"]
    gain = figures["map_blcf_rerank_small"] - figures["map_deep_small"]
    print(
        f"small instances: BLCF + re-rank mAP {figures['map_blcf_rerank_small']:.3f} vs deep "
        f"{figures['map_deep_small']:.3f} ({gain:+.3f}; target >= +0.05), re-rank adds "
        f"{figures['blcf_rerank_added_p50_ms']} ms p50 at K = {args.rerank_k} (target <= 50)"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
