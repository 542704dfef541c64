"""Colour-texture bag of words vs the deep descriptor: time per crop, signature size, retrieval.

    .venv/bin/python bench/signature.py [--kernels auto|cpu|cuda]

Catalogue: 3x3 tiles of four real photos the codebook never saw (china, flower, hubble_deep_field,
retina) plus, as distractors, 3x3 tiles of every other bundled photo. Queries: each of the 36 held-out
tiles after one change: a 70% crop, half scale, a 90-degree rotation, a 15-degree rotation, a colour
shift, a 30% occlusion. Each query has one right answer (its tile): recall@1 and mAP (= mean
reciprocal rank). Time per crop: one 256x256 crop, signature computed end to end, single caller.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.reference import chi2_distances, dense
from common.bow_codec import decode, encode
from common.photos import SKIMAGE_PHOTOS, SKLEARN_PHOTOS, load_photo
from index_server.inverted import BowIndex
from kernels import select_kernels
from signature_server.bow import BowExtractor, BowSpec
from signature_server.deep import DeepDescriptor, DeepSpec
from signature_server.train_codebook import TRAINING_PHOTOS

MODELS = Path(__file__).resolve().parent.parent / "models"
HELD_OUT = ("china.jpg", "flower.jpg", "hubble_deep_field", "retina")


def tiles(image: np.ndarray, grid: int = 3) -> list[np.ndarray]:
    height, width = image.shape[:2]
    return [
        image[r * height // grid : (r + 1) * height // grid, c * width // grid : (c + 1) * width // grid]
        for r in range(grid)
        for c in range(grid)
    ]


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0)
    return cv2.warpAffine(image, matrix, (width, height), borderMode=cv2.BORDER_REFLECT_101)


def colour_shift(image: np.ndarray) -> np.ndarray:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.int16)
    hsv[..., 0] = (hsv[..., 0] + 6) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] * 0.85, 0, 255)
    hsv[..., 2] = np.clip(hsv[..., 2] * 1.1 + 5, 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def occlude(image: np.ndarray) -> np.ndarray:
    out = image.copy()
    height, width = image.shape[:2]
    out[: int(height * 0.55), : int(width * 0.55)] = 128
    return out


CHANGES = {
    "crop70": lambda im: im[
        int(im.shape[0] * 0.15) : int(im.shape[0] * 0.85), int(im.shape[1] * 0.15) : int(im.shape[1] * 0.85)
    ],
    "half_scale": lambda im: cv2.resize(im, (im.shape[1] // 2, im.shape[0] // 2), interpolation=cv2.INTER_AREA),
    "rotate90": lambda im: np.ascontiguousarray(np.rot90(im)),
    "rotate15": lambda im: rotate(im, 15),
    "colour_shift": colour_shift,
    "occlusion30": occlude,
}


def ranks(distances: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(Q, N) distances, (Q,) right index -> (Q,) 1-based rank of the right item."""
    return 1 + (distances < distances[np.arange(len(truth)), truth][:, None]).sum(axis=1)


def quality(rank: np.ndarray) -> tuple[float, float]:
    return float((rank == 1).mean()), float((1.0 / rank).mean())


def changes_set() -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray], np.ndarray, list[str]]:
    """The catalogue (the held-out photos' tiles first, then every other photo's), the instance each
    catalogue tile is ((N,) int: its held-out tile's number, -1 for a distractor), the queries (each
    held-out tile after each change), each query's instance ((Q,) int, also its catalogue row) and
    its change."""
    held = [t for name in HELD_OUT for t in tiles(load_photo(name))]
    distractors = [
        t for name in SKIMAGE_PHOTOS + SKLEARN_PHOTOS if name not in HELD_OUT for t in tiles(load_photo(name))
    ]
    queries, truth, change_of = [], [], []
    for number, tile in enumerate(held):
        for change, apply in CHANGES.items():
            queries.append(np.ascontiguousarray(apply(tile)))
            truth.append(number)
            change_of.append(change)
    instance_of = np.array(list(range(len(held))) + [-1] * len(distractors))
    return held + distractors, instance_of, queries, np.array(truth), change_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default="auto")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    bow_spec = BowSpec.load(MODELS / "colour-texture-bow")
    kernels = select_kernels(args.kernels)
    bow = BowExtractor(bow_spec, bow_spec.load_codebook(), kernels)
    deep = DeepDescriptor(DeepSpec.load(MODELS / "efficientnet-lite0"))

    catalogue, instance_of, queries, truth_a, change_of = changes_set()
    held = [tile for tile, number in zip(catalogue, instance_of) if number >= 0]
    print(
        f"catalogue {len(catalogue)} tiles ({len(held)} of held-out photos), {len(queries)} queries; "
        f"codebook trained on {', '.join(TRAINING_PHOTOS)}; kernels: {kernels.detail}"
    )
    a = bow.codebook.assignment
    print(
        f"colour-texture words: {bow_spec.name} version {bow_spec.version}, codebook {bow.codebook.fingerprint:08x}, "
        + ("hard assignment" if a.hard else f"soft assignment: {a.nearest} nearest, sigma {a.sigma}, {a.units} units")
    )

    crop = cv2.resize(held[0], (256, 256), interpolation=cv2.INTER_AREA)
    figures: dict[str, float] = {}
    for name, run in (("bow", lambda: encode(bow.bag(crop))), ("deep", lambda: deep.compute([crop]))):
        run()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1000)
        figures[f"ms_per_crop_{name}"] = round(float(np.median(times)), 1)
    key = "ms_per_crop_gpu" if kernels.name == "cuda" else "ms_per_crop_cpu"
    figures[key] = figures.pop("ms_per_crop_bow")
    figures["ms_per_crop_deep_onnx"] = figures.pop("ms_per_crop_deep")

    cat_bags = [bow.bag(im) for im in catalogue]
    query_bags = [bow.bag(im) for im in queries]
    sizes = [len(encode(b)) for b in cat_bags + query_bags]
    assert all(decode(encode(b)).counts.sum() == b.counts.sum() for b in cat_bags)
    histograms = lambda bags: np.stack([dense(b) for b in bags])  # noqa: E731
    bow_distances = chi2_distances(histograms(query_bags), histograms(cat_bags))
    cat_deep, query_deep = deep.compute(catalogue), deep.compute(queries)
    deep_distances = 1 - query_deep @ cat_deep.T

    words = [len(b.words) for b in cat_bags + query_bags]
    # Each keypoint shares out `units` (1 when hard-assigned).
    keypoints = [int(b.counts.sum()) // bow.codebook.assignment.units for b in cat_bags + query_bags]
    print(
        f"signature bytes: median {int(np.median(sizes))}, max {max(sizes)}; distinct words per image: "
        f"median {int(np.median(words))} of {bow.codebook.vocabulary}; keypoints median {int(np.median(keypoints))}"
    )
    print(f"{'change':<14}{'R@1 bow':>9}{'mAP bow':>9}{'R@1 deep':>10}{'mAP deep':>10}")
    bow_rank, deep_rank = ranks(bow_distances, truth_a), ranks(deep_distances, truth_a)
    change_a = np.array(change_of)
    for change in CHANGES:
        sel = change_a == change
        (rb, mb), (rd, md) = quality(bow_rank[sel]), quality(deep_rank[sel])
        print(f"{change:<14}{rb:>9.2f}{mb:>9.2f}{rd:>10.2f}{md:>10.2f}")
    stop_words = {}
    for share in (0.2, 0.1):  # the index's stop-word variant: R@1 when common words are skipped
        index = BowIndex(bow.codebook.vocabulary, bow.codebook.fingerprint, max_word_share=share)
        for i, bag in enumerate(cat_bags):
            index.add(str(i), bag, {})
        variant = np.full(bow_distances.shape, 2.0)
        for row, bag in enumerate(query_bags):
            for hit in index.search(bag, len(cat_bags)):
                variant[row, int(hit.item_id)] = 2 - 2 * hit.score
        stop_words[f"recall_at_1_bow_stopwords_{share}"] = round(quality(ranks(variant, truth_a))[0], 3)
    print("stop-word variant, R@1 bow: " + ", ".join(f"{k} {v}" for k, v in stop_words.items()))
    figures.update(stop_words)
    (rb, mb), (rd, md) = quality(bow_rank), quality(deep_rank)
    print(f"{'all':<14}{rb:>9.2f}{mb:>9.2f}{rd:>10.2f}{md:>10.2f}")
    print(
        f"time per 256x256 crop: colour-texture {figures[key]} ms ({kernels.name}), "
        f"deep {figures['ms_per_crop_deep_onnx']} ms (ONNX Runtime)"
    )
    figures.update(
        {
            "signature_bytes": int(np.median(sizes)),
            "signature_bytes_max": int(max(sizes)),
            "words_per_image": int(np.median(words)),
            "recall_at_1_bow": round(rb, 3),
            "map_bow": round(mb, 3),
            "recall_at_1_deep": round(rd, 3),
            "map_deep": round(md, 3),
        }
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
