"""A served detector: its config (beside the model file), its session, and detect(image)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.onnx_session import active_provider, create_session
from detector_server.letterbox import letterbox, unletterbox_boxes
from detector_server.yolo import objects, postprocess


@dataclass(frozen=True)
class ModelSpec:
    """Model facts read from `<model dir>/config.json`."""

    name: str
    version: str
    model_path: Path
    class_names: tuple[str, ...]
    input_height: int
    input_width: int
    score_threshold: float
    iou_threshold: float
    max_detections: int
    categories: dict[str, str]
    # Class-agnostic objects: NMS overlap and default count.
    objects_iou_threshold: float
    max_objects: int

    @staticmethod
    def load(model_dir: Path) -> ModelSpec:
        config = json.loads((model_dir / "config.json").read_text())
        classes_path = model_dir / config["classes_file"]
        if not classes_path.is_file():
            raise FileNotFoundError(f"{classes_path} does not exist: run `make models`")
        class_names = tuple(n.strip() for n in classes_path.read_text().splitlines() if n.strip())
        unknown = set(config["categories"]) - set(class_names)
        if unknown:
            raise ValueError(f"{model_dir}/config.json maps classes the model lacks: {sorted(unknown)}")
        return ModelSpec(
            config["name"],
            str(config["version"]),
            model_dir / config["file"],
            class_names,
            int(config["input_height"]),
            int(config["input_width"]),
            float(config["score_threshold"]),
            float(config["iou_threshold"]),
            int(config["max_detections"]),
            dict(config["categories"]),
            float(config["objects_iou_threshold"]),
            int(config["max_objects"]),
        )


@dataclass
class Detection:
    class_id: int
    class_name: str
    category: str  # empty when the class is not a product
    confidence: float
    box: np.ndarray  # (4,) float32 xyxy original pixels


@dataclass
class DetectionResult:
    """What one image holds: classified detections and class-agnostic objects, best first."""

    detections: list[Detection]
    objects: list[tuple[np.ndarray, float]]  # ((4,) float32 xyxy original pixels, objectness)
    inference_ms: float


class DetectorModel:
    """One loaded model; `detect` is thread-safe (ONNX Runtime sessions are)."""

    def __init__(self, spec: ModelSpec, intra_op_threads: int = 0, inference_concurrency: int = 1):
        self.spec = spec
        self.session = create_session(
            spec.model_path, intra_op_threads=intra_op_threads, concurrency=inference_concurrency
        )
        self.provider = active_provider(self.session)

    def detect(
        self,
        image: np.ndarray,
        score_threshold: float | None = None,
        products_only: bool = False,
        objectness_threshold: float = 0.0,
        max_objects: int = 0,
    ) -> DetectionResult:
        """(H, W, 3) uint8 RGB -> DetectionResult; objects only when objectness_threshold > 0."""
        spec = self.spec
        tensor, scale, pad = letterbox(image, (spec.input_height, spec.input_width))
        start = time.perf_counter()
        rows = self.session.run(["detections"], {"images": tensor[None]})[0][0]
        inference_ms = (time.perf_counter() - start) * 1000
        found = postprocess(rows, score_threshold or spec.score_threshold, spec.iou_threshold, spec.max_detections)
        boxes = unletterbox_boxes(found.boxes, scale, pad, image.shape[:2])
        detections = []
        for box, score, class_id in zip(boxes, found.scores, found.class_ids):
            name = spec.class_names[class_id]
            category = spec.categories.get(name, "")
            if products_only and not category:
                continue
            if _degenerate(box):
                continue  # clipped away entirely: nothing to crop
            detections.append(Detection(int(class_id), name, category, float(score), box))
        boxed = []
        if objectness_threshold > 0:
            agnostic = objects(rows, objectness_threshold, spec.objects_iou_threshold, max_objects or spec.max_objects)
            boxed = [
                (box, float(score))
                for box, score in zip(
                    unletterbox_boxes(agnostic.boxes, scale, pad, image.shape[:2]), agnostic.objectness
                )
                if not _degenerate(box)
            ]
        return DetectionResult(detections, boxed, inference_ms)


def _degenerate(box: np.ndarray) -> bool:
    return bool(box[2] - box[0] < 1 or box[3] - box[1] < 1)
