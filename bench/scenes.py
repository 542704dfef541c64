"""Multi-product scenes made of real photos: search by the suite's localisation vs the true box.

    .venv/bin/python bench/scenes.py [--scenes 120] [--kinds deep,bow] [--sweep]

The data set (bench/scene_data.py, built once from Debian's Tux Paint stamp photos and OpenCV's
sample photos, plus the photos bundled with scikit-image/scikit-learn): real object photos pasted,
scaled, rotated and partly occluded, 2-6 per scene, on real photo backgrounds, and products standing
in their own photo's context; the catalogue holds other views or crops of the same products (each
product has a white-background shot and an in-a-room shot, localised at ingest) and >= 1,000
distractors, spread over several categories.

Per signature kind, per product of every scene (R@k: the right product among an item's first k):
- true box: the true box given as a region with its category (the ceiling), and without a category;
- localised: MultiProductSearch with nothing but the photo; an object counts when an item whose box
  overlaps its true box with IoU >= 0.5 has it among its first k (localisation recall: some item
  with IoU >= 0.5, whatever it matched); localised_iou30 counts an item on the object from IoU 0.3
  (the right product found with a looser box);
- detector only: what the suite did before (the detector's product classes searched in their
  detected category, nothing else).
Also: the items per query, the share of items that are a true object with its right product
(item precision), queries without any item, client-side p50 latency, and where ingestion put the
box of the in-a-room catalogue shots. --sweep re-runs the localised path (deep kind) under several
category margins and proposal score floors, to calibrate the gateway's defaults. Last line: one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from scene_data import build, load  # noqa: E402

from common.images import decode_image  # noqa: E402
from common.local_suite import start_local_suite  # noqa: E402
from common.proto_convert import box_from_proto  # noqa: E402
from detector_server.nms import iou_matrix  # noqa: E402
from gateway.client import Product, VisualSearchClient  # noqa: E402
from gateway.report import draw_result  # noqa: E402
from mps.common.v1 import common_pb2  # noqa: E402
from mps.detector.v1 import detector_pb2, detector_pb2_grpc  # noqa: E402

KINDS = {"deep": common_pb2.SIGNATURE_KIND_DEEP, "bow": common_pb2.SIGNATURE_KIND_BOW}
PATHS = ("true_box", "true_box_no_category", "localised", "localised_iou30", "detector_only")


@dataclass
class Tally:
    """Per path: ranks of the right product per object (0 = not found) and per-query facts."""

    ranks: dict[str, list[int]] = field(default_factory=lambda: {p: [] for p in PATHS})
    located: list[bool] = field(default_factory=list)
    items: list[int] = field(default_factory=list)
    good_items: int = 0
    ms: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PATHS})
    right_scores: list[float] = field(default_factory=list)
    wrong_scores: list[float] = field(default_factory=list)
    # The true box's top-1 score when it is the right product / a wrong one (for min_score).
    box_right: list[float] = field(default_factory=list)
    box_wrong: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ms["localised_iou30"] = self.ms["localised"]  # one search, two criteria

    def recall(self, path: str, k: int) -> float:
        ranks = np.array(self.ranks[path])
        return float(np.mean((ranks > 0) & (ranks <= k))) if len(ranks) else 0.0


def rank_of(matches, product_id: str) -> int:
    ids = [m.product_id for m in matches]
    return ids.index(product_id) + 1 if product_id in ids else 0


def boxes_of(items) -> np.ndarray:
    return np.stack([box_from_proto(i.box) for i in items]) if items else np.zeros((0, 4), np.float32)


def located_ranks(items, objects, min_iou: float = 0.5) -> tuple[list[int], list[bool], list[bool]]:
    """Per object: the best rank among the items on it (IoU >= min_iou; 0 when none has it), and
    whether any item is on it; per item: whether it is a true object with its right product first."""
    if not items:
        return [0] * len(objects), [False] * len(objects), []
    truth = np.array([o.box for o in objects], np.float32)
    on = iou_matrix(truth, boxes_of(items)) >= min_iou
    ranks = []
    for o, obj in enumerate(objects):
        found = [r for r in (rank_of(items[j].matches, obj.product_id) for j in np.flatnonzero(on[o])) if r]
        ranks.append(min(found) if found else 0)
    right = [
        bool(item.matches)
        and any(on[o, j] and item.matches[0].product_id == obj.product_id for o, obj in enumerate(objects))
        for j, item in enumerate(items)
    ]
    return ranks, [bool(on[o].any()) for o in range(len(objects))], right


def ingest(client: VisualSearchClient, data, root: Path) -> tuple[float, list[float]]:
    """Indexes every catalogue image without its box (the gateway localises each) -> (images per
    second, IoU of the chosen box with the true box of each in-a-room shot)."""
    products = []
    truth = {}
    for product in data.products:
        for image in product.images:
            products.append(
                Product(
                    product.product_id,
                    product.category,
                    (root / image.path).read_bytes(),
                    {"path": str(root / image.path)},
                    image.image_id,
                )
            )
            if image.style == "room":
                truth[(product.product_id, image.image_id)] = np.array(image.box, np.float32)
    for distractor in data.distractors:
        products.append(
            Product(
                distractor.product_id,
                distractor.category,
                (root / distractor.path).read_bytes(),
                {"path": str(root / distractor.path)},
            )
        )
    start = time.perf_counter()
    response = client.index_products(products, timeout_s=7200)
    rate = len(products) / (time.perf_counter() - start)
    ious = [
        float(iou_matrix(box_from_proto(i.box)[None], truth[(i.product_id, i.image_id)][None])[0, 0])
        for i in response.images
        if (i.product_id, i.image_id) in truth
    ]
    return rate, ious


def run_kind(
    client: VisualSearchClient, detector, data, root: Path, kind: str, top_k: int, paths=PATHS, scenes=None
) -> Tally:
    tally = Tally()
    category_of = {p.product_id: p.category for p in data.products}
    for scene in scenes or data.scenes:
        photo = (root / scene.path).read_bytes()
        objects = scene.objects

        def timed(path, photo=photo, **kwargs):
            # min_score 0: R@k measures retrieval; the default floor's trade-off is printed apart.
            start = time.perf_counter()
            result = client.search(
                photo, top_k=top_k, signature_kind=KINDS[kind], timeout_s=120, min_score=0.0, **kwargs
            )
            tally.ms[path].append((time.perf_counter() - start) * 1000)
            return result

        if "true_box" in paths:
            result = timed("true_box", regions=[(tuple(o.box), category_of[o.product_id]) for o in objects])
            tally.ranks["true_box"] += [rank_of(i.matches, o.product_id) for i, o in zip(result.items, objects)]
            for item, obj in zip(result.items, objects):
                if item.matches:
                    (tally.box_right if item.matches[0].product_id == obj.product_id else tally.box_wrong).append(
                        item.matches[0].score
                    )
        if "true_box_no_category" in paths:
            result = timed("true_box_no_category", regions=[(tuple(o.box), "") for o in objects])
            tally.ranks["true_box_no_category"] += [
                rank_of(i.matches, o.product_id) for i, o in zip(result.items, objects)
            ]
        if "localised" in paths:
            result = timed("localised")
            items = list(result.items)
            ranks, located, right = located_ranks(items, objects)
            tally.ranks["localised"] += ranks
            tally.ranks["localised_iou30"] += located_ranks(items, objects, 0.3)[0]  # a looser criterion
            tally.located += located
            tally.items.append(len(items))
            tally.good_items += sum(right)
            for item, is_right in zip(items, right):
                if item.matches:
                    (tally.right_scores if is_right else tally.wrong_scores).append(item.matches[0].score)
        if "detector_only" in paths:
            # Before: the detector's product classes, searched in their own category only.
            start = time.perf_counter()
            found = detector.Detect(
                detector_pb2.DetectRequest(image=common_pb2.Image(encoded=photo), products_only=True), timeout=60
            )
            regions = [((d.box.x_min, d.box.y_min, d.box.x_max, d.box.y_max), d.category) for d in found.detections]
            items = (
                list(
                    client.search(
                        photo, top_k=top_k, signature_kind=KINDS[kind], regions=regions, min_score=0.0, timeout_s=120
                    ).items
                )
                if regions
                else []
            )
            tally.ms["detector_only"].append((time.perf_counter() - start) * 1000)
            tally.ranks["detector_only"] += located_ranks(items, objects)[0]
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default="deep,bow")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--sweep", action="store_true", help="calibrate category_margin and proposal_min_score")
    parser.add_argument("--gateway-flags", default="", help="extra gateway flags, e.g. '--max-segments 0'")
    parser.add_argument("--picture", type=Path, help="draw one scene's localised result (deep) here")
    args = parser.parse_args()

    root = build(REPO / "data" / "bench", seed=args.seed, scenes=args.scenes)
    data = load(root)
    print(
        f"data set: {len(data.products)} products, {len(data.distractors)} distractors, "
        f"{len(data.scenes)} scenes with {sum(len(s.objects) for s in data.scenes)} objects in {root}"
    )
    gateway_flags = args.gateway_flags.split()
    suite = start_local_suite(
        {
            "index": ["--data-dir", "", "--log-level", "WARNING"],
            "gateway": gateway_flags + ["--log-level", "WARNING"],
            "detector": ["--log-level", "WARNING"],
            "signature": ["--log-level", "WARNING"],
        }
    )
    import grpc

    figures: dict[str, float] = {}
    try:
        with (
            VisualSearchClient(suite.addresses["gateway"], timeout_s=120) as client,
            grpc.insecure_channel(suite.addresses["detector"]) as channel,
        ):
            detector = detector_pb2_grpc.DetectorServiceStub(channel)
            rate, ingest_ious = ingest(client, data, root)
            figures["ingest_images_per_s"] = rate
            figures["ingest_box_iou_median"] = float(np.median(ingest_ious)) if ingest_ious else 0.0
            figures["ingest_box_iou50_share"] = float(np.mean(np.array(ingest_ious) >= 0.5)) if ingest_ious else 0.0
            client.search((root / data.scenes[0].path).read_bytes())  # warm-up
            without_item = 0
            for kind in args.kinds.split(","):
                tally = run_kind(client, detector, data, root, kind, args.top_k)
                print(f"\n== {kind} ({len(tally.ranks['true_box'])} objects in {len(data.scenes)} scenes) ==")
                print(f"{'path':<22} {'R@1':>6} {'R@5':>6} {'p50 ms':>8}")
                for path in PATHS:
                    r1, r5 = tally.recall(path, 1), tally.recall(path, 5)
                    p50 = float(np.median(tally.ms[path]))
                    print(f"{path:<22} {r1:>6.3f} {r5:>6.3f} {p50:>8.0f}")
                    figures[f"r1_{path}_{kind}"], figures[f"r5_{path}_{kind}"] = r1, r5
                    figures[f"p50_ms_{path}_{kind}"] = p50
                figures[f"localisation_gap_r1_{kind}"] = tally.recall("true_box", 1) - tally.recall("localised", 1)
                figures[f"localisation_recall_iou50_{kind}"] = float(np.mean(tally.located))
                figures[f"items_per_query_{kind}"] = float(np.mean(tally.items))
                figures[f"item_precision_{kind}"] = tally.good_items / max(1, sum(tally.items))
                without_item += sum(1 for n in tally.items if n == 0)
                for name, scores in (
                    ("right", tally.right_scores),
                    ("wrong", tally.wrong_scores),
                    ("true-box right", tally.box_right),
                    ("true-box wrong", tally.box_wrong),
                ):
                    if scores:
                        print(
                            f"top-1 score of {name} items: p10 {np.percentile(scores, 10):.3f} "
                            f"p50 {np.median(scores):.3f} p90 {np.percentile(scores, 90):.3f}"
                        )
                right, wrong = np.array(tally.box_right), np.array(tally.box_wrong)
                print(
                    "min_score: right top-1 matches kept / wrong ones dropped (true box): "
                    + ", ".join(
                        f"{t:.2f}: {np.mean(right >= t):.2f} / {np.mean(wrong < t):.2f}"
                        for t in np.quantile(np.concatenate([right, wrong]), [0.05, 0.1, 0.2, 0.3, 0.5])
                    )
                )
                print(
                    f"localisation recall (IoU >= 0.5): {figures[f'localisation_recall_iou50_{kind}']:.3f}; "
                    f"items per query {figures[f'items_per_query_{kind}']:.2f}, of which right "
                    f"{figures[f'item_precision_{kind}']:.2f}"
                )
            figures["queries_without_item"] = without_item
            if args.picture:
                scene = max(data.scenes[:20], key=lambda s: len(s.objects))
                photo = (root / scene.path).read_bytes()
                result = client.search(photo, top_k=3)
                print(f"picture of {scene.scene_id}: {draw_result(decode_image(photo, 10**9), result, args.picture)}")
            print(
                f"\ningest: {rate:.1f} images/s; in-a-room shots boxed with IoU >= 0.5: "
                f"{figures['ingest_box_iou50_share']:.2f} (median IoU {figures['ingest_box_iou_median']:.2f})"
            )
        if args.sweep:
            sweep(suite, data, root, args.top_k, gateway_flags, figures)
    finally:
        suite.stop()
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))


def sweep(suite, data, root: Path, top_k: int, gateway_flags: list[str], figures: dict[str, float]) -> None:
    """The localised path (deep) under other gateway settings: R@1 and item precision."""
    print(f"\n== sweep (deep, localised) ==\n{'margin':>7} {'min score':>9} {'R@1':>6} {'items/q':>8} {'precision':>9}")
    for margin in (0.02, 0.05, 0.1):
        for floor in (0.6, 0.65):
            suite.start(
                "gateway",
                gateway_flags
                + ["--log-level", "WARNING", "--category-margin", str(margin), "--proposal-min-score", str(floor)],
            )
            with VisualSearchClient(suite.addresses["gateway"], timeout_s=120) as client:
                tally = run_kind(client, None, data, root, "deep", top_k, paths=("localised",))
            precision = tally.good_items / max(1, sum(tally.items))
            print(
                f"{margin:>7.2f} {floor:>9.2f} {tally.recall('localised', 1):>6.3f} "
                f"{np.mean(tally.items):>8.2f} {precision:>9.2f}"
            )
            figures[f"sweep_r1_m{margin}_s{floor}"] = tally.recall("localised", 1)
            figures[f"sweep_precision_m{margin}_s{floor}"] = precision


if __name__ == "__main__":
    main()
