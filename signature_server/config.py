"""Signature server configuration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.config import MODELS_DIR, ConfigError, ServerConfig
from common.local_features import MAX_POINTS, MIN_SIDE, ExtractorSettings
from common.model_repository import ModelSource, read_source, versions_on_disk

# The colour-texture kernels' backends (kernels.select_kernels).
KernelBackend = Literal["auto", "cuda", "cpu"]


@dataclass
class SignatureConfig(ServerConfig):
    """Computes image signatures over gRPC (mps.signature.v1.SignatureService)."""

    port: int = 50052
    # The model repository (common/model_repository.py: models/<name>/<version>/ beside a config.json).
    models_dir: str = str(MODELS_DIR)
    # The deep descriptor's model (SIGNATURE_KIND_DEEP, and LocateObjects on its feature map): the
    # network, its input, max batch, dynamic batching and execution providers are its config.json's.
    deep_model: str = "efficientnet-lite0"
    # The colour-texture bag of words' model (SIGNATURE_KIND_BOW): its parameters and versioned codebook.
    bow_model: str = "colour-texture-bow"
    # The bags of local convolutional features' model (SIGNATURE_KIND_BLCF): the network's feature
    # tensor, sizes and versioned vocabulary (signature_server/blcf.py).
    blcf_model: str = "blcf"
    # Dynamic batching across concurrent calls where a model's config.json asks for it; false turns
    # it off for every model (each call then runs its own images in chunks of the model's max_batch).
    dynamic_batching: bool = True
    # Seconds a replaced or unloaded model version may take to finish its requests before it is
    # released anyway.
    drain_timeout_s: float = 120.0
    # Where its kernels run: "auto" (CUDA when a GPU and PyCUDA or CuPy start, else CPU), "cuda", "cpu".
    # BLCF's nearest words use them where the kernel fits its vocabulary's width (signature_server/blcf.py).
    kernels: KernelBackend = "auto"
    # Crops described in parallel (the CPU path; the CUDA path serialises on one context).
    bow_threads: int = 2
    # Images per ComputeSignatures call; more is RESOURCE_EXHAUSTED.
    max_images_per_request: int = 64
    max_pixels: int = 50_000_000
    intra_op_threads: int = 0
    # Inferences of one model running at once (common.onnx_session.GatedSession), and so the deep
    # model's dynamic batches in flight at once. Each uses every core already; 2 overlaps one's
    # single-threaded parts with another's, more only multiplies memory (bench/load.py, 32
    # clients: signature server peak RSS 5.4 GB ungated, 1.65 GB at 2, 1.42 GB at 1 with 15 % less
    # throughput).
    inference_concurrency: int = 2
    # LocateObjects: most salient objects and segments one call may ask for; more is RESOURCE_EXHAUSTED.
    # (How it locates, e.g. the feature map's size, is the model's config.json `locate` section.)
    max_salient: int = 8
    max_segments: int = 200
    # OpenCV's own thread pool (cv2.setNumThreads, process-wide; -1 = OpenCV's default). Selective search
    # runs on one thread whatever this says, and concurrent calls already fill the cores, so 1 avoids
    # OpenCV's pool competing with ONNX Runtime's and the bag of words' threads.
    opencv_threads: int = 1
    # Local features (ComputeSignaturesRequest.local_features; common/local_features.py): the crop is
    # described at local_feature_side pixels on its longer side, with at most local_feature_points
    # ORB keypoints (the protocol allows 512; 256 are 9.2 kB an image), on local_feature_threads
    # threads beside the signatures. Catalogue features are stored at ingest and compared with
    # query features: change these only with a catalogue re-ingested under the new values.
    local_feature_side: int = 320
    local_feature_points: int = 256
    local_feature_threads: int = 2

    def _check(self) -> None:
        super()._check()
        names = ("deep_model", "bow_model", "blcf_model")
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                if getattr(self, first) == getattr(self, second):
                    raise ConfigError(
                        f"{first} and {second} are both {getattr(self, first)!r}: each kind has its own model"
                    )
        for name in names:
            value = getattr(self, name)
            if not value or "/" in value or "\\" in value or value.startswith("."):
                raise ConfigError(f"{name} {value!r} is not a folder name under models_dir")
        self._at_least(1, "bow_threads", "max_images_per_request", "max_pixels", "inference_concurrency")
        self._at_least(0, "max_salient", "max_segments", "drain_timeout_s")
        self._at_least(0, "intra_op_threads", note="0 lets ONNX Runtime choose")
        self._at_least(-1, "opencv_threads", note="-1 = OpenCV's default")
        self._within("local_feature_side", MIN_SIDE, 4096)
        self._within("local_feature_points", 1, MAX_POINTS)
        self._at_least(1, "local_feature_threads")

    def local_feature_settings(self) -> ExtractorSettings:
        """How the service describes crops' local features."""
        return ExtractorSettings(side=self.local_feature_side, max_points=self.local_feature_points)


def latest_source(model_dir: Path) -> ModelSource:
    """The highest version on disk of a model folder (models/<name>/), read as the repository reads
    it: what tests, benchmarks and tools use where no server chooses a version."""
    on_disk = versions_on_disk(model_dir)
    if not on_disk:
        raise FileNotFoundError(f"{model_dir} has no version folder (1/, 2/, ...): run `make models`")
    return read_source(model_dir.parent, model_dir.name, on_disk[-1])
