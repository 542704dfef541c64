"""The deep global descriptor: EfficientNet-Lite0 features, GeM-pooled and L2-normalised."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from common.onnx_session import active_provider, create_session


@dataclass(frozen=True)
class DeepSpec:
    name: str
    model_path: Path
    input_height: int
    input_width: int
    mean: float
    std: float
    dimension: int

    @staticmethod
    def load(model_dir: Path) -> DeepSpec:
        c = json.loads((model_dir / "config.json").read_text())
        return DeepSpec(
            c["name"],
            model_dir / c["file"],
            int(c["input_height"]),
            int(c["input_width"]),
            float(c["mean"]),
            float(c["std"]),
            int(c["dimension"]),
        )


def preprocess(image: np.ndarray, spec: DeepSpec, size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, h, w) float32, resized whole (a crop is the product) to `size`
    = (h, w) (the model's input size by default) and normalised."""
    input_height, input_width = size or (spec.input_height, spec.input_width)
    height, width = image.shape[:2]
    shrink = width > input_width or height > input_height
    resized = cv2.resize(
        image, (input_width, input_height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    )
    return ((resized.astype(np.float32) - spec.mean) / spec.std).transpose(2, 0, 1)


class DeepDescriptor:
    """Batched descriptor extraction; thread-safe."""

    def __init__(self, spec: DeepSpec, max_batch: int = 32, intra_op_threads: int = 0, inference_concurrency: int = 1):
        self.spec = spec
        self.max_batch = max_batch
        self.session = create_session(
            spec.model_path, intra_op_threads=intra_op_threads, concurrency=inference_concurrency
        )
        self.provider = active_provider(self.session)

    def compute(self, images: list[np.ndarray]) -> np.ndarray:
        """N images (H, W, 3) uint8 RGB -> (N, D) float32 unit vectors."""
        out = np.empty((len(images), self.spec.dimension), dtype=np.float32)
        for start in range(0, len(images), self.max_batch):
            batch = np.stack([preprocess(im, self.spec) for im in images[start : start + self.max_batch]])
            out[start : start + len(batch)] = self.session.run(["embedding"], {"images": batch})[0]
        return out

    def features(self, image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (C, h/32, w/32) float32 last feature map of the whole image
        resized to `size` = (h, w), multiples of 32 (the exported graph takes any such size)."""
        return self.session.run(["features"], {"images": preprocess(image, self.spec, size)[None]})[0][0]

    def classify(self, images: list[np.ndarray]) -> np.ndarray:
        """N images -> (N, 1000) ImageNet logits (sanity checks only)."""
        batch = np.stack([preprocess(im, self.spec) for im in images])
        return self.session.run(["logits"], {"images": batch})[0]
