"""Detector server configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.config import MODELS_DIR, ConfigError, ServerConfig


@dataclass
class DetectorConfig(ServerConfig):
    """Serves object detectors over gRPC (mps.detector.v1.DetectorService)."""

    port: int = 50051
    # The model repository (common/model_repository.py): models/<name>/config.json and a folder per
    # version. `models` are served from the start (the versions their version policy selects); the
    # first is the default. LoadModel may load any other model folder of models_dir.
    models: list[str] = field(default_factory=lambda: ["yolov3-tiny"])
    models_dir: str = str(MODELS_DIR)
    # Dynamic batching of concurrent Detect calls as each model's config.json sets it
    # (`dynamic_batching`, common/batching.py); false runs every image as its own inference, for
    # every model (the benchmark's "without batching" arm).
    dynamic_batching: bool = True
    # Seconds a replaced or unloaded version may take to finish its requests before it is
    # released anyway.
    drain_timeout_s: float = 120.0
    max_pixels: int = 50_000_000
    # Most class-agnostic objects one Detect may ask for.
    max_objects: int = 200
    # ONNX Runtime threads per session; 0 lets it choose.
    intra_op_threads: int = 0
    # Inferences of one model running at once (common.onnx_session.GatedSession). Each uses every
    # core already; 2 overlaps one's single-threaded parts with another's, more only multiplies
    # memory (bench/load.py, 32 clients: signature server peak RSS 5.4 GB ungated, 1.65 GB at 2,
    # 1.42 GB at 1 with 15 % less throughput).
    inference_concurrency: int = 2

    def _check(self) -> None:
        super()._check()
        if not self.models:
            raise ConfigError("models [] is empty: name at least one model directory under models_dir")
        self._at_least(1, "max_pixels", "inference_concurrency")
        self._at_least(0, "max_objects")
        self._at_least(0, "intra_op_threads", note="0 lets ONNX Runtime choose")
        self._above(0, "drain_timeout_s")
