"""Signature server configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.config import MODELS_DIR, ServerConfig

# The colour-texture kernels' backends (kernels.select_kernels).
KernelBackend = Literal["auto", "cuda", "cpu"]


@dataclass
class SignatureConfig(ServerConfig):
    """Computes image signatures over gRPC (mps.signature.v1.SignatureService)."""

    port: int = 50052
    deep_model_dir: str = str(MODELS_DIR / "efficientnet-lite0")
    # The colour-texture bag of words: its config.json and versioned codebook.
    bow_model_dir: str = str(MODELS_DIR / "colour-texture-bow")
    # Where its kernels run: "auto" (CUDA when a GPU and PyCUDA or CuPy start, else CPU), "cuda", "cpu".
    kernels: KernelBackend = "auto"
    # Crops described in parallel (the CPU path; the CUDA path serialises on one context).
    bow_threads: int = 2
    # Images per ComputeSignatures call; more is RESOURCE_EXHAUSTED.
    max_images_per_request: int = 64
    # Images per forward pass.
    max_batch: int = 32
    max_pixels: int = 50_000_000
    intra_op_threads: int = 0
    # Inferences of one model running at once (common.onnx_session.GatedSession). Each uses every
    # core already; 2 overlaps one's single-threaded parts with another's, more only multiplies
    # memory (bench/load.py, 32 clients: signature server peak RSS 5.4 GB ungated, 1.65 GB at 2,
    # 1.42 GB at 1 with 15 % less throughput).
    inference_concurrency: int = 2
    # LocateObjects: most salient objects and segments one call may ask for; more is RESOURCE_EXHAUSTED.
    # (How it locates, e.g. the feature map's size, is the model's config.json `locate` section.)
    max_salient: int = 8
    max_segments: int = 200
    # OpenCV's own thread pool (cv2.setNumThreads, process-wide; -1 = OpenCV's default). Selective search
    # runs on one thread whatever this says, and concurrent calls already fill the cores, so 1 avoids
    # OpenCV's pool competing with ONNX Runtime's and the bag of words' threads.
    opencv_threads: int = 1

    def _check(self) -> None:
        super()._check()
        self._at_least(1, "bow_threads", "max_images_per_request", "max_batch", "max_pixels", "inference_concurrency")
        self._at_least(0, "max_salient", "max_segments")
        self._at_least(0, "intra_op_threads", note="0 lets ONNX Runtime choose")
        self._at_least(-1, "opencv_threads", note="-1 = OpenCV's default")
