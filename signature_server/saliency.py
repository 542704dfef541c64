"""Where the objects of a photo are, from the deep descriptor's last feature map (SCDA, ranked segments)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from common.images import shrink
from common.model_repository import ModelSource
from detector_server.nms import nms
from signature_server.config import latest_source
from signature_server.deep import DeepDescriptor, textured_image

# A located object: (4,) float32 xyxy box in pixels of the original image, and its score in (0, 1].
Located = tuple[np.ndarray, float]


@dataclass(frozen=True)
class LocateSpec:
    """The `locate` section of the descriptor's config.json: how LocateObjects runs this model."""

    # The model takes any input height and width that are multiples of this (its total stride).
    input_multiple: int
    # The whole photo is resized to this longer side (rounded to input_multiple) for its feature map.
    feature_long_side: int
    # SCDA thresholds the map upsampled this many times, so boxes are not whole cells.
    salient_upsample: int
    # Selective search runs on a copy with this longer side: its cost grows with the pixel count.
    segment_long_side: int
    # The activation map is resized to this fraction of the image to rank segments.
    contrast_scale: float
    # The surround of a segment: the box grown by this fraction of its size per side.
    ring_growth: float
    nms_iou: float
    # Segments narrower or shorter than this (original image pixels) are dropped.
    min_side: float

    @staticmethod
    def load(model_dir: Path) -> LocateSpec:
        """The highest version on disk of models/<name>/ (tests, benches)."""
        return LocateSpec.from_source(latest_source(model_dir))

    @staticmethod
    def from_source(source: ModelSource) -> LocateSpec:
        """ValueError naming what the version's `locate` section lacks."""
        c: dict[str, Any] = source.settings.get("locate") or {}
        try:
            return LocateSpec(
                int(c["input_multiple"]),
                int(c["feature_long_side"]),
                int(c["salient_upsample"]),
                int(c["segment_long_side"]),
                float(c["contrast_scale"]),
                float(c["ring_growth"]),
                float(c["nms_iou"]),
                float(c["min_side"]),
            )
        except KeyError as exc:
            raise ValueError(
                f"config.json of {source.name} version {source.version} has no locate.{exc.args[0]}"
            ) from None


@dataclass(frozen=True)
class Localisation:
    """What LocateObjects answers: salient objects largest first, segments best first."""

    salient: list[Located]
    segments: list[Located]


def feature_input_size(height: int, width: int, long_side: int, multiple: int) -> tuple[int, int]:
    """(height, width) of the model input: longer side `long_side`, both sides multiples of `multiple`."""
    scale = long_side / max(height, width)

    def snap(side: float) -> int:
        return max(multiple, round(side / multiple) * multiple)

    return snap(height * scale), snap(width * scale)


def activation_map(features: np.ndarray) -> np.ndarray:
    """(C, h, w) float32 feature map -> (h, w) float32 channel sum, SCDA's aggregation map A."""
    return features.sum(axis=0, dtype=np.float32)


def salient_objects(
    activation: np.ndarray, image_size: tuple[int, int], max_objects: int, upsample: int = 4
) -> list[Located]:
    """(h, w) float32 map A -> up to `max_objects` (box, score), largest first.

    SCDA (Wei et al. 2017): A's cells above mean(A) are the object; each 8-connected component is
    one object, its box in pixels of the (width, height) = `image_size` image, its score its share
    of the map's activation above the mean, in (0, 1] (all components' scores sum to 1).
    """
    if max_objects <= 0:
        return []
    width, height = image_size
    rows, columns = activation.shape
    # Bilinear upsampling before the threshold: the mask's border then falls between cell centres.
    up = cv2.resize(activation, (columns * upsample, rows * upsample), interpolation=cv2.INTER_LINEAR)
    excess = up - activation.mean()
    mask = (excess > 0).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:  # a constant map has nothing above its mean
        return []
    total = float(excess[mask > 0].sum())
    share = np.bincount(labels.ravel(), weights=np.where(mask > 0, excess, 0).ravel(), minlength=count)
    order = 1 + np.argsort(-stats[1:, cv2.CC_STAT_AREA], kind="stable")
    sx, sy = width / up.shape[1], height / up.shape[0]
    out: list[Located] = []
    for label in order[:max_objects]:
        x, y, w, h = (int(v) for v in stats[label, :4])
        box = np.array([x * sx, y * sy, (x + w) * sx, (y + h) * sy], dtype=np.float32)
        # Every pixel of a component is above the mean, so its share is > 0.
        out.append((box, min(1.0, float(share[label] / total))))
    return out


def selective_search(image: np.ndarray, long_side: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (N, 4) float32 xyxy boxes in its pixels, sorted: selective search (fast mode)
    run on a copy whose longer side is at most `long_side`."""
    height, width = image.shape[:2]
    small = shrink(image, long_side)
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    # Its colour strategies convert from BGR.
    search.setBaseImage(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    search.switchToSelectiveSearchFast()
    # Its order is random (OpenCV ranks by a random draw times the hierarchy level); sorted, equal
    # contrasts break ties the same way on every call, so one photo always gets the same answer.
    rects = np.unique(np.asarray(search.process(), dtype=np.float32).reshape(-1, 4), axis=0)
    boxes = np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1)
    return boxes * np.array([width / small.shape[1], height / small.shape[0]] * 2, dtype=np.float32)


def activation_contrast(
    activation: np.ndarray, boxes: np.ndarray, image_size: tuple[int, int], scale: float, growth: float
) -> np.ndarray:
    """(h, w) map A, (N, 4) xyxy image-pixel boxes -> (N,) float32 mean of A inside each box minus
    its mean in the surrounding ring (the box grown by `growth` of its size per side, clipped).

    A is resized to `scale` of the (width, height) image and read through its integral image, so
    every box costs four look-ups whatever its size. A box with no ring (the whole image) gets 0.
    """
    width, height = image_size
    grid_w, grid_h = max(1, round(width * scale)), max(1, round(height * scale))
    grid = cv2.resize(activation, (grid_w, grid_h), interpolation=cv2.INTER_LINEAR)
    integral = cv2.integral(grid, sdepth=cv2.CV_64F)
    cells = boxes.astype(np.float64) * np.array([grid_w / width, grid_h / height] * 2)
    x0 = np.clip(np.floor(cells[:, 0]), 0, grid_w - 1).astype(np.int64)
    y0 = np.clip(np.floor(cells[:, 1]), 0, grid_h - 1).astype(np.int64)
    x1 = np.clip(np.ceil(cells[:, 2]), x0 + 1, grid_w).astype(np.int64)
    y1 = np.clip(np.ceil(cells[:, 3]), y0 + 1, grid_h).astype(np.int64)
    grow_x = np.round((x1 - x0) * growth).astype(np.int64)
    grow_y = np.round((y1 - y0) * growth).astype(np.int64)
    ox0, oy0 = np.maximum(x0 - grow_x, 0), np.maximum(y0 - grow_y, 0)
    ox1, oy1 = np.minimum(x1 + grow_x, grid_w), np.minimum(y1 + grow_y, grid_h)

    def box_sum(bx0: np.ndarray, by0: np.ndarray, bx1: np.ndarray, by1: np.ndarray) -> np.ndarray:
        return integral[by1, bx1] - integral[by0, bx1] - integral[by1, bx0] + integral[by0, bx0]

    inner_sum, inner_area = box_sum(x0, y0, x1, y1), (x1 - x0) * (y1 - y0)
    ring_sum = box_sum(ox0, oy0, ox1, oy1) - inner_sum
    ring_area = (ox1 - ox0) * (oy1 - oy0) - inner_area
    contrast = np.where(ring_area > 0, inner_sum / inner_area - ring_sum / np.maximum(ring_area, 1), 0.0)
    return contrast.astype(np.float32)


def segment_proposals(image: np.ndarray, activation: np.ndarray, max_segments: int, spec: LocateSpec) -> list[Located]:
    """(H, W, 3) uint8 RGB, (h, w) map A of it -> up to `max_segments` (box, score), best first.

    Selective search segments of the photo, ranked by activation contrast (how much more the
    descriptor's features fire inside than around them), greedy NMS; score = contrast / the best
    contrast, in (0, 1]. Segments that fire less inside than around are not objects: dropped.
    """
    if max_segments <= 0:
        return []  # selective search is the expensive part: never run it for nothing
    height, width = image.shape[:2]
    boxes = selective_search(image, spec.segment_long_side)
    sides = boxes[:, 2:] - boxes[:, :2]
    boxes = boxes[(sides >= spec.min_side).all(axis=1)]
    contrast = activation_contrast(activation, boxes, (width, height), spec.contrast_scale, spec.ring_growth)
    positive = contrast > 0
    boxes, contrast = boxes[positive], contrast[positive]
    if len(boxes) == 0:
        return []
    keep = nms(boxes, contrast, spec.nms_iou)[:max_segments]
    best = float(contrast.max())
    return [(boxes[i].copy(), float(contrast[i]) / best) for i in keep]


class ObjectLocator:
    """LocateObjects' pipeline: one feature map per photo, then salient objects and segments; thread-safe."""

    def __init__(self, descriptor: DeepDescriptor, spec: LocateSpec):
        self.descriptor = descriptor
        self.spec = spec

    def locate(self, image: np.ndarray, max_salient: int, max_segments: int) -> Localisation:
        """(H, W, 3) uint8 RGB -> its salient objects and segments, boxes in its pixels."""
        height, width = image.shape[:2]
        size = feature_input_size(height, width, self.spec.feature_long_side, self.spec.input_multiple)
        activation = activation_map(self.descriptor.features(image, size))
        return Localisation(
            salient_objects(activation, (width, height), max_salient, self.spec.salient_upsample),
            segment_proposals(image, activation, max_segments, self.spec),
        )

    def warm_up(self) -> None:
        """One locate of a synthetic 4:3 photo: the feature map at the locate size (its own engine
        on TensorRT), and selective search's first run (OpenCV allocates its strategies' buffers)."""
        long_side = self.spec.feature_long_side
        self.locate(textured_image(long_side * 3 // 4, long_side, seed=1), 1, 1)


class DeepModel:
    """The deep model as the signature service serves it (common.model_repository.ServedModel): the
    descriptor and the object locator over its one ONNX Runtime session."""

    def __init__(self, descriptor: DeepDescriptor, locator: ObjectLocator):
        self.descriptor = descriptor
        self.locator = locator

    @staticmethod
    def from_source(
        source: ModelSource, intra_op_threads: int = 0, inference_concurrency: int = 1, dynamic_batching: bool = True
    ) -> DeepModel:
        """Builds one version (not yet warm); ValueError or FileNotFoundError if it cannot serve."""
        locate = LocateSpec.from_source(source)  # a config without its locate section fails before the session
        descriptor = DeepDescriptor.from_source(source, intra_op_threads, inference_concurrency, dynamic_batching)
        return DeepModel(descriptor, ObjectLocator(descriptor, locate))

    @property
    def provider(self) -> str:
        return self.descriptor.provider

    @property
    def max_batch(self) -> int:
        return self.descriptor.max_batch

    def warm_up(self) -> None:
        self.descriptor.warm_up()
        self.locator.warm_up()
        self.descriptor.settle()

    def close(self) -> None:
        self.descriptor.close()
