"""Two-stage retrieval: R@1, R@5 and mAP of each signature kind with and without re-ranking by local
features, the added latency, words per image and signature bytes.

    .venv/bin/python bench/rerank.py [--k 20] [--scenes 120] [--skip-scenes]

Two harnesses, one run:
- tiles (bench/signature.py's): 117 tiles of the bundled photos as the catalogue, 216 queries (each
  held-out tile after a crop, half scale, 90/15-degree rotation, colour shift or occlusion), every
  crop at the gateway's crop size. First stage: the deep descriptor (cosine) and the colour-texture
  words (chi-squared), exact; second stage: gateway.rerank over the first K with the features the
  gateway computes (common.local_features: the whole catalogue image at ingest, the item's crop
  per query), in this process.
- scenes (bench/scenes.py's data set): the real suite on loopback, the catalogue ingested through
  the gateway (local features computed at ingest and stored at the index), every object of every
  scene searched by its true box and category, rerank_k 0 and K; the added latency is the
  gateway's own rerank_ms per query (describing the crops, fetching the candidates' features from
  the index, verifying) and the client-side p50 difference.
mAP: one right product per query, so the mean reciprocal rank (0 when it is not among the matches).
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench.reference import chi2_distances, dense  # noqa: E402
from bench.signature import CHANGES, HELD_OUT, MODELS, tiles  # noqa: E402
from common import local_features  # noqa: E402
from common.bow_codec import encode  # noqa: E402
from common.config import load_config  # noqa: E402
from common.photos import SKIMAGE_PHOTOS, SKLEARN_PHOTOS, load_photo  # noqa: E402
from gateway.config import GatewayConfig  # noqa: E402
from gateway.crops import crop  # noqa: E402
from gateway.ports import CatalogueMatch, item_id_of  # noqa: E402
from gateway.rerank import RerankSettings, rerank  # noqa: E402
from kernels import select_kernels  # noqa: E402
from signature_server.bow import BowExtractor, BowSpec  # noqa: E402
from signature_server.deep import DeepDescriptor, DeepSpec  # noqa: E402

KIND_NAMES = ("deep", "bow")


def quality(ranks: np.ndarray) -> dict[str, float]:
    """(Q,) 1-based ranks of the right product, 0 = not found -> R@1, R@5, mAP."""
    found = ranks > 0
    return {
        "r1": float(np.mean(found & (ranks == 1))),
        "r5": float(np.mean(found & (ranks <= 5))),
        "map": float(np.mean(np.where(found, 1.0 / np.maximum(ranks, 1), 0.0))),
    }


def row(figures: dict[str, float]) -> str:
    return f"{figures['r1']:>7.3f}{figures['r5']:>7.3f}{figures['map']:>7.3f}"


def rank_in(matches: list[CatalogueMatch], product: str) -> int:
    return next((i + 1 for i, m in enumerate(matches) if m.product_id == product), 0)


def gateway_crop(image: np.ndarray, side: int) -> np.ndarray:
    """The crop the gateway signs: the whole tile, at most `side` pixels on its longer side."""
    height, width = image.shape[:2]
    return crop(np.ascontiguousarray(image), np.array([0, 0, width, height], np.float32), side)


def tiles_harness(k: int, figures: dict[str, float]) -> None:
    config = load_config(GatewayConfig, "gateway", environ={})
    settings = RerankSettings.of(config)
    held = [t for name in HELD_OUT for t in tiles(load_photo(name))]
    others = [t for name in SKIMAGE_PHOTOS + SKLEARN_PHOTOS if name not in HELD_OUT for t in tiles(load_photo(name))]
    originals = [np.ascontiguousarray(t) for t in held + others]
    catalogue = [gateway_crop(t, config.crop_max_side) for t in originals]
    queries, truth = [], []
    for number, tile in enumerate(held):
        for apply in CHANGES.values():
            queries.append(gateway_crop(np.ascontiguousarray(apply(tile)), config.crop_max_side))
            truth.append(number)

    bow_spec = BowSpec.load(MODELS / "colour-texture-bow")
    bow = BowExtractor(bow_spec, bow_spec.load_codebook(), select_kernels("cpu"))
    deep = DeepDescriptor(DeepSpec.load(MODELS / "efficientnet-lite0"))
    cat_bags, query_bags = [bow.bag(c) for c in catalogue], [bow.bag(q) for q in queries]
    similarity = {
        "deep": deep.compute(queries) @ deep.compute(catalogue).T,
        "bow": 1 - chi2_distances(np.stack([dense(b) for b in query_bags]), np.stack([dense(b) for b in cat_bags])) / 2,
    }
    words = [len(b.words) for b in cat_bags + query_bags]
    sizes = [len(encode(b)) for b in cat_bags + query_bags]
    figures["words_per_image"] = int(np.median(words))
    figures["signature_bytes"] = int(np.median(sizes))
    figures["signature_bytes_max"] = int(max(sizes))

    # Catalogue features as the gateway computes them at ingest: the whole catalogue image.
    stored = {item_id_of(str(i), "0"): local_features.extract(t, settings.extractor) for i, t in enumerate(originals)}
    feature_bytes = [f.nbytes for f in stored.values()]
    print(
        f"tiles: {len(catalogue)} catalogue crops, {len(queries)} queries; words per image (median) "
        f"{figures['words_per_image']}, signature bytes median {figures['signature_bytes']} max "
        f"{figures['signature_bytes_max']}; local features {int(np.median(feature_bytes))} bytes per item (median)"
    )
    figures["local_feature_bytes"] = int(np.median(feature_bytes))
    added_ms: list[float] = []
    print(f"{'kind':<6}{'R@1':>7}{'R@5':>7}{'mAP':>7}   re-ranked: {'R@1':>7}{'R@5':>7}{'mAP':>7}")
    for kind in KIND_NAMES:
        before, after = [], []
        for q, query in enumerate(queries):
            order = np.argsort(-similarity[kind][q], kind="stable")[: max(k, 10)]
            first = [CatalogueMatch(str(j), "0", float(similarity[kind][q, j]), {}, None) for j in order]
            start = time.perf_counter()
            described = local_features.extract(query, settings.extractor)
            second = rerank(first, described, stored, k, settings)
            added_ms.append((time.perf_counter() - start) * 1000)
            before.append(rank_in(first, str(truth[q])))
            after.append(rank_in(second, str(truth[q])))
        b, a = quality(np.array(before)), quality(np.array(after))
        print(f"{kind:<6}{row(b)}   re-ranked: {row(a)}")
        for name in ("r1", "r5", "map"):
            figures[f"tiles_{name}_{kind}"] = round(b[name], 3)
            figures[f"tiles_{name}_{kind}_reranked"] = round(a[name], 3)
        figures[f"rerank_gain_r1_{kind}"] = round(a["r1"] - b["r1"], 3)
    figures["tiles_rerank_added_p50_ms"] = round(float(np.median(added_ms)), 1)
    added = figures["tiles_rerank_added_p50_ms"]
    print(f"added per query in process (describe the crop, verify {k} candidates): p50 {added} ms")


def scenes_harness(k: int, scenes: int, figures: dict[str, float]) -> None:
    from scene_data import build, load
    from scenes import KINDS, ingest

    from common.local_suite import start_local_suite
    from gateway.client import VisualSearchClient

    root = build(REPO / "data" / "bench", seed=0, scenes=scenes)
    data = load(root)
    quiet = ["--log-level", "WARNING"]
    suite = start_local_suite(
        {"index": ["--data-dir", ""] + quiet, "gateway": quiet, "detector": quiet, "signature": quiet}
    )
    category_of = {p.product_id: p.category for p in data.products}
    try:
        with VisualSearchClient(suite.addresses["gateway"], timeout_s=120) as client:
            rate, _ = ingest(client, data, root)
            print(f"scenes: {len(data.scenes)} scenes, catalogue ingested at {rate:.1f} images/s (with local features)")
            figures["scenes_ingest_images_per_s"] = round(rate, 2)
            client.search((root / data.scenes[0].path).read_bytes(), rerank_k=k)  # warm-up
            for kind in KIND_NAMES:
                ranks: dict[int, list[int]] = {0: [], k: []}
                total_ms: dict[int, list[float]] = {0: [], k: []}
                rerank_ms: list[float] = []
                for scene in data.scenes:
                    photo = (root / scene.path).read_bytes()
                    regions = [(tuple(o.box), category_of[o.product_id]) for o in scene.objects]
                    for depth in (0, k):
                        start = time.perf_counter()
                        result = client.search(
                            photo, top_k=10, signature_kind=KINDS[kind], regions=regions, min_score=0.0, rerank_k=depth
                        )
                        total_ms[depth].append((time.perf_counter() - start) * 1000)
                        if depth:
                            rerank_ms.append(result.timings.rerank_ms)
                        ranks[depth] += [
                            next((i + 1 for i, m in enumerate(item.matches) if m.product_id == obj.product_id), 0)
                            for item, obj in zip(result.items, scene.objects)
                        ]
                b, a = quality(np.array(ranks[0])), quality(np.array(ranks[k]))
                print(f"{kind:<6}{row(b)}   re-ranked: {row(a)}   ({len(ranks[0])} objects, true boxes)")
                for name in ("r1", "r5", "map"):
                    figures[f"scenes_{name}_{kind}"] = round(b[name], 3)
                    figures[f"scenes_{name}_{kind}_reranked"] = round(a[name], 3)
                figures[f"rerank_gain_r1_{kind}_scenes"] = round(a["r1"] - b["r1"], 3)
                figures[f"scenes_rerank_ms_p50_{kind}"] = round(float(np.median(rerank_ms)), 1)
                figures[f"scenes_total_ms_p50_{kind}"] = round(float(np.median(total_ms[0])), 1)
                figures[f"scenes_total_ms_p50_{kind}_reranked"] = round(float(np.median(total_ms[k])), 1)
                print(
                    f"       per query: rerank_ms p50 {figures[f'scenes_rerank_ms_p50_{kind}']}, client p50 "
                    f"{figures[f'scenes_total_ms_p50_{kind}']} -> {figures[f'scenes_total_ms_p50_{kind}_reranked']} ms"
                )
            figures["rerank_added_p50_ms"] = max(figures[f"scenes_rerank_ms_p50_{kind}"] for kind in KIND_NAMES)
    finally:
        suite.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--scenes", type=int, default=120)
    parser.add_argument("--skip-scenes", action="store_true")
    args = parser.parse_args()
    cv2.setNumThreads(1)  # as a gateway worker thread runs it
    figures: dict[str, float] = {"k": args.k}
    tiles_harness(args.k, figures)
    if not args.skip_scenes:
        scenes_harness(args.k, args.scenes, figures)
    else:
        figures["rerank_added_p50_ms"] = figures["tiles_rerank_added_p50_ms"]
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
