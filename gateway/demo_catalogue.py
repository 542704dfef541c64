"""The demo catalogue: product shots cut from real photos that ship in packages, plus variants.

Sources are scikit-image's bundled photos and scikit-learn's sample images. Product crops come from
the real detector; each gets variants a catalogue really holds (mirrored, recoloured, rescaled),
and every category also receives crops of unrelated photos as distractors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from common.images import encode_jpeg
from common.photos import load_photo
from gateway.exclusive import resolve_exclusive

# Catalogue sources. motorcycle_right is held out: it is a query, another view of motorcycle_left.
CATALOGUE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle_left",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "china.jpg",
    "flower.jpg",
)
QUERY_PHOTOS = ("coffee", "motorcycle_right")
ROCKET_BOX = (292, 120, 352, 420)  # the rocket on its pad, in the 640x427 "rocket" photo


def cut(name: str, box: tuple[int, int, int, int]) -> np.ndarray:
    """A region of a bundled photo."""
    x0, y0, x1, y1 = box
    return np.ascontiguousarray(load_photo(name)[y0:y1, x0:x1])


def paste(background: np.ndarray, thing: np.ndarray, x: int, y: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pastes `thing` resized to `width` with its top-left at (x, y) -> (new image, (4,) float32 box)."""
    height = round(thing.shape[0] * width / thing.shape[1])
    out = background.copy()
    out[y : y + height, x : x + width] = cv2.resize(thing, (width, height), interpolation=cv2.INTER_AREA)
    return out, np.array([x, y, x + width, y + height], np.float32)


def two_product_scene() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """China's temple (960x640) with a rocket and a cat's portrait on it: products the COCO
    detector has no product class for -> (scene, product id -> (4,) true box)."""
    background = cv2.resize(load_photo("china.jpg"), (960, 640), interpolation=cv2.INTER_LINEAR)
    scene, rocket = paste(background, cut("rocket", ROCKET_BOX), 90, 100, 90)
    scene, cat = paste(scene, load_photo("chelsea"), 560, 330, 330)
    return scene, {"rocket": rocket, "cat-portrait": cat}


def variants(image: np.ndarray) -> dict[str, np.ndarray]:
    """A product shot and the variants of it a catalogue holds."""
    height, width = image.shape[:2]
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.int16)
    lab[..., 1] += 6  # a warmer colourway
    lab[..., 2] += 10
    small = cv2.resize(image, (max(1, width // 2), max(1, height // 2)), interpolation=cv2.INTER_AREA)
    return {
        "shot": image,
        "mirror": np.ascontiguousarray(image[:, ::-1]),
        "warm": cv2.cvtColor(lab.clip(0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB),
        "small": small,
    }


def random_crops(image: np.ndarray, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    height, width = image.shape[:2]
    out = []
    for _ in range(count):
        w, h = int(width * rng.uniform(0.3, 0.7)), int(height * rng.uniform(0.3, 0.7))
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        out.append(image[y : y + h, x : x + w])
    return out


@dataclass
class Detected:
    category: str
    class_name: str
    confidence: float
    box: np.ndarray  # (4,) xyxy


def build(
    folder: Path, detect, groups: list[list[str]], distractors_per_photo: int = 3, seed: int = 0
) -> dict[str, int]:
    """Writes `folder/<category>/<product id>.jpg`; returns items per category.

    `detect(image) -> list[Detected]` finds the products of a photo (the real detector service).
    """
    rng = np.random.default_rng(seed)
    photos = {name.removesuffix(".jpg"): load_photo(name) for name in CATALOGUE_PHOTOS}
    counts: dict[str, int] = {}

    def write(category: str, product_id: str, image: np.ndarray) -> None:
        path = folder / category / f"{product_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_jpeg(image))
        counts[category] = counts.get(category, 0) + 1

    for name, photo in photos.items():
        found = detect(photo)
        if not found:
            continue
        keep = resolve_exclusive(
            np.stack([d.box for d in found]),
            np.array([d.confidence for d in found]),
            [d.class_name for d in found],
            groups,
            0.5,
        )
        for n, index in enumerate(keep):
            d = found[index]
            x0, y0, x1, y1 = (round(v) for v in d.box)
            for variant, image in variants(photo[y0:y1, x0:x1]).items():
                write(d.category, f"{name}-{d.class_name.replace(' ', '_')}{n}-{variant}", image)
    # Products the detector has no class for, each with two images (a sub-folder is one product):
    # the whole rocket photo is localised at ingest.
    write("toys", "rocket/front", cut("rocket", ROCKET_BOX)[:, ::-1])
    write("toys", "rocket/on-pad", load_photo("rocket"))
    write("pets", "cat-portrait/portrait", load_photo("chelsea"))
    for category in list(counts):
        for name, photo in photos.items():
            for i, image in enumerate(random_crops(photo, distractors_per_photo, rng)):
                write(category, f"{name}-crop{i}", image)
    return counts
