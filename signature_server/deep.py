"""The deep global descriptor: EfficientNet-Lite0 features, GeM-pooled and L2-normalised.

Served from the model repository (common/model_repository.py): models/efficientnet-lite0/<version>/
holds the exported graph (`file`, input `images` (N, 3, H, W) float32, outputs `embedding`
(N, dimension), `logits` (N, 1000), `features` (N, C, H/32, W/32)) and config.json the rest:
input size, layout (NCHW only) and normalisation, `dimension`, `max_batch`, `dynamic_batching`
and the execution providers in order of preference. Its TensorRT entry keeps the built engines
and the timing cache in the version's `trt-cache/` (a restart reuses them instead of rebuilding,
which takes minutes) and allows fp16; its optimisation profile spans a batch of 1 to `max_batch`
at 224x224 and LocateObjects' feature maps (up to 640 pixels a side), so no shape rebuilds an
engine while serving. CUDA's cuDNN algorithm search is "HEURISTIC": LocateObjects sends a new
input shape for each aspect ratio, and an exhaustive search per new shape would stall that call.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from common.batching import BatchPolicy, DynamicBatcher
from common.model_repository import ModelSource
from common.onnx_session import PREFERENCE, active_provider, create_session
from signature_server.config import latest_source

INPUT = "images"
OUTPUTS = ("embedding", "logits", "features")
# Images per forward pass where no model config says (tests and benches that build a descriptor alone).
DEFAULT_MAX_BATCH = 32


@dataclass(frozen=True)
class DeepSpec:
    """One version of the descriptor, as its config.json says (paths resolved in its version folder)."""

    name: str
    version: str
    model_path: Path
    input_height: int
    input_width: int
    mean: float
    std: float
    dimension: int

    @staticmethod
    def load(model_dir: Path) -> DeepSpec:
        """The highest version on disk of models/<name>/ (tests, benches)."""
        return DeepSpec.from_source(latest_source(model_dir))

    @staticmethod
    def from_source(source: ModelSource) -> DeepSpec:
        """ValueError or FileNotFoundError saying what is missing or wrong in the version's settings."""
        c = source.settings
        layout = c.get("input_layout", "NCHW")
        if layout != "NCHW":
            raise ValueError(f"config.json of {source.name}: input_layout {layout!r} is not 'NCHW' (the only one read)")
        try:
            return DeepSpec(
                source.name,
                source.version,
                source.path("file"),
                int(c["input_height"]),
                int(c["input_width"]),
                float(c["mean"]),
                float(c["std"]),
                int(c["dimension"]),
            )
        except KeyError as exc:
            raise ValueError(f"config.json of {source.name} version {source.version} has no {exc.args[0]!r}") from None


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


def textured_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8 RGB: smooth colour gradients, a few flat rectangles and noise; what
    warm-ups describe (every path fires on it: keypoints, segments, salient regions)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([xs / max(width, 1), ys / max(height, 1), (xs + ys) / max(width + height, 1)], axis=-1) * 200
    for _ in range(4):
        y, x = int(rng.integers(0, max(height // 2, 1))), int(rng.integers(0, max(width // 2, 1)))
        image[y : y + height // 3, x : x + width // 3] = rng.integers(0, 256, 3)
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


class DeepDescriptor:
    """Batched descriptor extraction; thread-safe.

    `compute` preprocesses each call's images in the caller's thread, then runs them through a
    DynamicBatcher (common/batching.py): with `batching.enabled`, images of concurrent calls share
    forward passes of up to `max_batch`; without, each call runs its own in chunks of `max_batch`."""

    def __init__(
        self,
        spec: DeepSpec,
        batching: BatchPolicy | None = None,
        intra_op_threads: int = 0,
        inference_concurrency: int = 1,
        providers: Sequence[str | tuple[str, dict[str, Any]]] = PREFERENCE,
    ):
        self.spec = spec
        self.policy = batching or BatchPolicy(DEFAULT_MAX_BATCH)
        self.session = create_session(spec.model_path, providers, intra_op_threads, inference_concurrency)
        self.provider = active_provider(self.session)
        self._check_graph()
        # Forward passes of `compute` by batch size (how well batching works, for tests and benches).
        self.batch_sizes: Counter[int] = Counter()
        self._count_lock = threading.Lock()
        self._batcher: DynamicBatcher[np.ndarray, np.ndarray] = DynamicBatcher(
            self._embed, self.policy, f"{spec.name}/{spec.version}", inference_concurrency, self._count
        )

    @staticmethod
    def from_source(
        source: ModelSource, intra_op_threads: int = 0, inference_concurrency: int = 1, dynamic_batching: bool = True
    ) -> DeepDescriptor:
        """One version of the repository; `dynamic_batching` False turns its batching off whatever
        its config says."""
        policy = source.batching if dynamic_batching else dataclasses.replace(source.batching, enabled=False)
        return DeepDescriptor(
            DeepSpec.from_source(source), policy, intra_op_threads, inference_concurrency, source.providers
        )

    @property
    def max_batch(self) -> int:
        return self.policy.max_batch

    def _check_graph(self) -> None:
        """ValueError unless the graph takes `images` (N, 3, H, W) and gives the outputs this
        service reads, its embedding as wide as config.json's `dimension` where the graph says."""
        name = self.spec.model_path.name
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        if INPUT not in inputs or len(inputs[INPUT]) != 4:
            raise ValueError(f"{name} has inputs {sorted(inputs)}; expected {INPUT!r} (N, 3, H, W)")
        missing = [output for output in OUTPUTS if output not in outputs]
        if missing:
            raise ValueError(f"{name} has no output {missing} (it has {sorted(outputs)}): export it again")
        width = outputs["embedding"][-1]
        if isinstance(width, int) and width != self.spec.dimension:
            raise ValueError(
                f"{name} gives {width}-d embeddings where config.json says dimension {self.spec.dimension}: "
                "a different network, or a config of another model"
            )

    def _embed(self, tensors: list[np.ndarray]) -> list[np.ndarray]:
        """One forward pass: N (3, h, w) float32 tensors -> N (D,) float32 unit vectors."""
        out = self.session.run(["embedding"], {INPUT: np.stack(tensors)})[0]
        if out.shape != (len(tensors), self.spec.dimension):
            raise ValueError(
                f"{self.spec.model_path.name} gave embeddings of shape {out.shape} for {len(tensors)} images; "
                f"config.json says dimension {self.spec.dimension}"
            )
        return list(out)

    def _count(self, size: int) -> None:
        with self._count_lock:
            self.batch_sizes[size] += 1

    def compute(self, images: list[np.ndarray]) -> np.ndarray:
        """N images (H, W, 3) uint8 RGB -> (N, D) float32 unit vectors."""
        return self.compute_batched(images)[0]

    def compute_batched(self, images: list[np.ndarray]) -> tuple[np.ndarray, int]:
        """`compute`, and the largest forward pass (in images) any of them ran in."""
        if not images:
            return np.empty((0, self.spec.dimension), np.float32), 0
        rows, largest = self._batcher.run([preprocess(image, self.spec) for image in images])
        return np.stack(rows), largest

    def features(self, image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (C, h/32, w/32) float32 last feature map of the whole image
        resized to `size` = (h, w), multiples of 32 (the exported graph takes any such size)."""
        return self.session.run(["features"], {INPUT: preprocess(image, self.spec, size)[None]})[0][0]

    def classify(self, images: list[np.ndarray]) -> np.ndarray:
        """N images -> (N, 1000) ImageNet logits (sanity checks only)."""
        batch = np.stack([preprocess(im, self.spec) for im in images])
        return self.session.run(["logits"], {INPUT: batch})[0]

    def warm_up(self) -> None:
        """A forward pass of 1 image and one of `max_batch` (each batch size is its own compiled
        engine or kernel choice on TensorRT and CUDA); ValueError when the model's vectors are not
        the finite unit vectors a signature is."""
        image = textured_image(self.spec.input_height, self.spec.input_width)
        for count in sorted({1, self.max_batch}):
            vectors = self.compute([image] * count)
            norms = np.linalg.norm(vectors, axis=1)
            if not (np.isfinite(vectors).all() and np.allclose(norms, 1.0, atol=1e-2)):
                raise ValueError(
                    f"{self.spec.model_path.name} gives embeddings that are not finite unit vectors "
                    f"(norms {norms.min():.3g} to {norms.max():.3g}): not a GeM-normalised descriptor"
                )

    def settle(self) -> None:
        """A few one-image passes, the commonest call, after any other shape (the first runs after
        another shape are measurably slower: ONNX Runtime's arena and the interpreter settle)."""
        image = textured_image(self.spec.input_height, self.spec.input_width)
        for _ in range(3):
            self.compute([image])

    def close(self) -> None:
        """Finishes what its batcher holds and stops its workers (the session goes with the object)."""
        self._batcher.close()
