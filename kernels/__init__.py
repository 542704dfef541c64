"""Kernels of the colour-texture signature: CUDA sources (`*.cu`), their launchers, their CPU reference.

`select_kernels("auto")` returns the CUDA backend when a GPU and a launcher (PyCUDA, else CuPy) can
really start, and the CPU reference otherwise; `"cuda"` insists, `"cpu"` never tries. The chosen
backend's `name` and `detail` go to the server's log and to ListKinds/Stats.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

from kernels import spec

log = logging.getLogger(__name__)

__all__ = ["KernelUnavailable", "Kernels", "check_nearest", "select_kernels", "spec"]


class KernelUnavailable(RuntimeError):
    """The requested kernel backend cannot start here; the message says why."""


class Kernels(Protocol):
    name: str
    detail: str

    def rgb_to_lab(self, rgb: np.ndarray) -> np.ndarray: ...
    def pyr_down(self, image: np.ndarray) -> np.ndarray: ...
    def filter_basis(self, image: np.ndarray) -> np.ndarray: ...
    def steer(self, basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def saliency(self, amplitudes: list[np.ndarray]) -> np.ndarray: ...
    def select_keypoints(
        self, saliency: np.ndarray, radius: int, threshold: float, max_count: int
    ) -> tuple[np.ndarray, np.ndarray]: ...
    def patch_histograms(
        self, labs: list[np.ndarray], responses: list[np.ndarray], keypoints: np.ndarray
    ) -> np.ndarray: ...
    def nearest_words(
        self, descriptors: np.ndarray, codebook: np.ndarray, codebook_norms: np.ndarray, count: int
    ) -> tuple[np.ndarray, np.ndarray]: ...


def check_nearest(count: int, vocabulary: int) -> int:
    """The number of nearest words a kernel may look for: 1..MAX_NEAREST and at most the vocabulary."""
    if not 1 <= count <= min(spec.MAX_NEAREST, vocabulary):
        raise ValueError(
            f"{count} nearest words: the kernels find 1 to {min(spec.MAX_NEAREST, vocabulary)} "
            f"(MAX_NEAREST {spec.MAX_NEAREST}, a {vocabulary}-word codebook)"
        )
    return count


def select_kernels(name: str = "auto") -> Kernels:
    """ "auto" | "cuda" | "cpu" -> a started backend."""
    from kernels.cpu import CpuKernels

    if name == "cpu":
        return CpuKernels()
    if name not in ("auto", "cuda"):
        raise ValueError(f"kernel backend {name!r} is not one of auto, cuda, cpu")
    try:
        from kernels.cuda import CudaKernels

        return CudaKernels()
    except KernelUnavailable as exc:
        if name == "cuda":
            raise
        log.info("colour-texture kernels on the CPU reference: %s", exc)
        return CpuKernels()
