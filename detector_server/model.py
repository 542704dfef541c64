"""A served detector: its config (beside the model file, in the model repository), its session, its
dynamic batcher, and detect(image)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from common.batching import BatchPolicy, DynamicBatcher
from common.model_repository import DEFAULT_PROVIDERS, ModelSource, read_source, versions_on_disk
from common.onnx_session import GatedSession, active_provider, create_session
from detector_server.letterbox import letterbox, unletterbox_boxes
from detector_server.yolo import objects, postprocess

INPUT_NAME = "images"
OUTPUT_NAME = "detections"
# The one layout the exported graphs take (detector_server/darknet_onnx.py): (N, 3, H, W).
LAYOUTS = ("NCHW",)


@dataclass(frozen=True)
class ModelSpec:
    """Model facts read from a version's settings (models/<name>/config.json, updated with
    models/<name>/<version>/config.json where there is one)."""

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
    # Images one inference takes at most, and how calls are batched (common/batching.py).
    batching: BatchPolicy = field(default_factory=BatchPolicy)
    # ONNX Runtime execution providers in order of preference, with their options.
    providers: tuple[tuple[str, dict[str, Any]], ...] = DEFAULT_PROVIDERS

    @property
    def max_batch(self) -> int:
        return self.batching.max_batch

    @staticmethod
    def load(model_dir: Path) -> ModelSpec:
        """The spec of the highest version on disk of `model_dir` (models/<name>/)."""
        on_disk = versions_on_disk(model_dir)
        if not on_disk:
            raise FileNotFoundError(f"{model_dir} has no version folder (1/, 2/...): run `make models`")
        return ModelSpec.from_source(read_source(model_dir.parent, model_dir.name, on_disk[-1]))

    @staticmethod
    def from_source(source: ModelSource) -> ModelSpec:
        """ValueError (or FileNotFoundError) saying what to fix in the version's config or files."""
        settings = source.settings
        where = f"config.json of {source.name} version {source.version}"
        layout = settings.get("input_layout", "NCHW")
        if layout not in LAYOUTS:
            raise ValueError(f"{where}: input_layout {layout!r} is not one of {list(LAYOUTS)}")
        classes_path = source.path("classes_file")
        class_names = tuple(n.strip() for n in classes_path.read_text().splitlines() if n.strip())
        if not class_names:
            raise ValueError(f"{classes_path} names no class: one class name per line")
        try:
            categories = settings["categories"]
            if not isinstance(categories, dict):
                raise ValueError(f"{where}: categories is not an object (class name -> category)")
            unknown = set(categories) - set(class_names)
            if unknown:
                raise ValueError(f"{where} maps classes the model lacks: {sorted(unknown)[:8]}")
            return ModelSpec(
                source.name,
                source.version,
                source.path("file"),
                class_names,
                int(settings["input_height"]),
                int(settings["input_width"]),
                float(settings["score_threshold"]),
                float(settings["iou_threshold"]),
                int(settings["max_detections"]),
                {str(k): str(v) for k, v in categories.items()},
                float(settings["objects_iou_threshold"]),
                int(settings["max_objects"]),
                source.batching,
                source.providers,
            )
        except KeyError as missing:
            raise ValueError(f"{where} lacks {missing}") from None
        except (TypeError, ValueError) as exc:
            if str(exc).startswith(where):
                raise
            raise ValueError(f"{where} has a value of the wrong type: {exc}") from None


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
    inference_ms: float  # the inference this image ran in (its whole batch)
    batch_size: int = 1  # images in that inference


# One image's network output: (B, 5 + C) float32 rows, and the milliseconds its inference took.
Rows = tuple[np.ndarray, float]


class DetectorModel:
    """One loaded version of a detector (a ServedModel of common/model_repository.py); `detect` is
    thread-safe. With `batching` on (the server's choice), concurrent `detect` calls share
    inferences as the model config's `dynamic_batching` says; off (the default, for one caller in
    a process, who would only wait), each image is one inference, as before batching existed."""

    def __init__(
        self,
        model: ModelSource | ModelSpec,
        intra_op_threads: int = 0,
        inference_concurrency: int = 1,
        batching: bool = False,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.spec = model if isinstance(model, ModelSpec) else ModelSpec.from_source(model)
        spec = self.spec
        try:
            session = create_session(spec.model_path, spec.providers, intra_op_threads, inference_concurrency)
        except RuntimeError as exc:
            # every provider refused the file: say so first (the repository cuts long reasons short)
            raise ValueError(f"{spec.model_path.name} cannot be opened by ONNX Runtime (corrupt?): {exc}") from None
        _check_signature(session, spec)
        self._session: GatedSession | None = session
        self.provider: str = active_provider(session)
        self.max_batch: int = spec.max_batch
        self.policy = spec.batching if batching else replace(spec.batching, enabled=False)
        # On a CPU one inference already uses every core: a second batch running beside it only
        # splits the queue into smaller batches (measured at 8 clients on 2 cores: mean batch 2.9
        # instead of 4.0, 12-15 % fewer images/s), so there batches run one at a time.
        workers = 1 if self.provider == "CPUExecutionProvider" else inference_concurrency
        self._batcher: DynamicBatcher[np.ndarray, Rows] = DynamicBatcher(
            self._run_batch, self.policy, f"{spec.name}:{spec.version}", workers, on_batch
        )

    @property
    def session(self) -> GatedSession:
        if self._session is None:
            raise RuntimeError(f"model {self.spec.name} version {self.spec.version} is closed")
        return self._session

    def _run_batch(self, tensors: Sequence[np.ndarray]) -> list[Rows]:
        """(3, h, w) float32 letterboxed tensors -> each one's rows, from one session.run."""
        batch = np.stack(tensors) if len(tensors) > 1 else tensors[0][None]
        start = time.perf_counter()
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        inference_ms = (time.perf_counter() - start) * 1000
        return [(out[i], inference_ms) for i in range(len(tensors))]

    def warm_sizes(self) -> list[int]:
        """The batch sizes warm_up runs: 1, and with batching on the sizes the batcher forms most
        (the preferred ones and max_batch; running max_batch sizes the CPU arena for every smaller
        one). A GPU provider builds kernels (cuDNN's algorithm search, TensorRT profiles) per shape,
        so there every size up to max_batch runs."""
        if not self.policy.enabled:
            return [1]
        if self.provider != "CPUExecutionProvider":
            return list(range(1, self.max_batch + 1))
        return sorted({1, *self.policy.preferred_sizes, self.max_batch})

    def warm_up(self) -> None:
        """Runs every path a request takes once (letterbox, the session at each batch size of
        warm_sizes(), postprocessing), so that no caller sees a cold call; ValueError when the
        model's output does not have the shape its config promises."""
        spec = self.spec
        black = np.zeros((spec.input_height, spec.input_width, 3), np.uint8)
        tensor, _, _ = letterbox(black, (spec.input_height, spec.input_width))
        width = 5 + len(spec.class_names)
        for size in self.warm_sizes():
            batch = np.stack([tensor] * size)
            shape = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0].shape
            if len(shape) != 3 or shape[0] != size or shape[2] != width:
                raise ValueError(
                    f"{spec.model_path.name} returned {OUTPUT_NAME} of shape {shape} for a batch of {size}; "
                    f"expected ({size}, boxes, {width}): 5 + {len(spec.class_names)} classes"
                )
        self.detect(black, score_threshold=1e-4, objectness_threshold=1e-4)  # NMS runs on a few boxes

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
        [(rows, inference_ms)], batch_size = self._batcher.run([tensor])
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
        return DetectionResult(detections, boxed, inference_ms, batch_size)

    def close(self) -> None:
        """Finishes what is queued, stops the batcher's threads and lets the session go."""
        self._batcher.close()
        self._session = None


def _check_signature(session: GatedSession, spec: ModelSpec) -> None:
    """ValueError unless the graph takes `images` (N, 3, H, W) of the config's size with room for
    max_batch images, and returns `detections` (N, boxes, 5 + classes): a classes file or config
    that does not fit the model is refused at load, not found out by a wrong answer."""
    inputs = {i.name: list(i.shape) for i in session.get_inputs()}
    outputs = {o.name: list(o.shape) for o in session.get_outputs()}
    name = spec.model_path.name
    if INPUT_NAME not in inputs:
        raise ValueError(f"{name} has no input {INPUT_NAME!r} (it has {sorted(inputs)[:8]})")
    if OUTPUT_NAME not in outputs:
        raise ValueError(f"{name} has no output {OUTPUT_NAME!r} (it has {sorted(outputs)[:8]})")
    shape = inputs[INPUT_NAME]
    expected: list[Any] = ["N", 3, spec.input_height, spec.input_width]
    if len(shape) != 4 or any(isinstance(got, int) and got != want for got, want in zip(shape[1:], expected[1:])):
        raise ValueError(
            f"{name} takes {INPUT_NAME} of shape {shape}; its config says {expected} (NCHW, input_height "
            f"{spec.input_height}, input_width {spec.input_width})"
        )
    if isinstance(shape[0], int) and shape[0] < spec.max_batch:
        raise ValueError(
            f"{name} takes batches of {shape[0]} image(s) only; its config says max_batch {spec.max_batch}: "
            "lower max_batch, or export the model with a dynamic batch"
        )
    out = outputs[OUTPUT_NAME]
    width = 5 + len(spec.class_names)
    if len(out) != 3 or (isinstance(out[2], int) and out[2] != width):
        raise ValueError(
            f"{name} returns {OUTPUT_NAME} of shape {out}; with the {len(spec.class_names)} classes of its "
            f"classes file it should be (N, boxes, {width}) (5 + classes): the classes file does not fit the model"
        )


def _degenerate(box: np.ndarray) -> bool:
    return bool(box[2] - box[0] < 1 or box[3] - box[1] < 1)
