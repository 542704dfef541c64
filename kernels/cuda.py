"""CUDA backend: the `.cu` kernels of this folder, launched through PyCUDA, or CuPy's RawModule.

Each method takes and returns numpy arrays with the shapes of the CPU reference (kernels/cpu.py),
so the two are interchangeable and comparable kernel by kernel. Constants come from kernels/spec.py
as -D flags; descriptor.cuh is inlined into each source so NVRTC and nvcc see the same text.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from kernels import KernelUnavailable, check_nearest, spec

SOURCES = Path(__file__).resolve().parent
MODULES = ("colour", "filters", "orientation", "keypoints", "histograms", "assign")

_T = TypeVar("_T")


def defines() -> list[str]:
    """-D flags carrying kernels/spec.py's constants to every kernel."""
    values = {
        "CHANNELS": spec.CHANNELS,
        "BINS": spec.BINS,
        "RESPONSES": spec.RESPONSES,
        "ORIENTATIONS": spec.ORIENTATIONS,
        "BASIS_COUNT": len(spec.BASIS),
        "PATCH": spec.PATCH,
        "DIMENSION": spec.DIMENSION,
        "MAX_NEAREST": spec.MAX_NEAREST,
    }
    return [f"-D{name}={value}" for name, value in values.items()]


def module_source(name: str) -> str:
    header = (SOURCES / "descriptor.cuh").read_text()
    return (SOURCES / f"{name}.cu").read_text().replace('#include "descriptor.cuh"', header)


class _PyCuda:
    """PyCUDA: one context, pushed around each call so any server thread may launch."""

    def __init__(self) -> None:
        try:
            import pycuda.driver as driver
            from pycuda.compiler import SourceModule
        except ImportError as exc:
            raise KernelUnavailable(f"PyCUDA is not installed ({exc})") from exc
        try:
            driver.init()
            if driver.Device.count() == 0:
                raise KernelUnavailable("PyCUDA sees no CUDA device")
            device = driver.Device(0)
            self.context = device.make_context()
        except driver.Error as exc:
            raise KernelUnavailable(f"CUDA does not start: {exc}") from exc
        self.driver = driver
        try:
            self.modules = {m: SourceModule(module_source(m), options=defines(), no_extern_c=True) for m in MODULES}
        finally:
            self.context.pop()
        major, minor = device.compute_capability()
        self.detail = f"pycuda on {device.name()} (sm_{major}{minor})"

    def function(self, module: str, name: str) -> Any:
        return self.modules[module].get_function(name)

    def upload(self, array: np.ndarray) -> Any:
        return self.driver.to_device(np.ascontiguousarray(array))

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        size = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
        buffer = self.driver.mem_alloc(size)
        self.driver.memset_d8(buffer, 0, size)
        return buffer

    def download(self, buffer: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        out = np.empty(shape, dtype)
        if out.size:
            self.driver.memcpy_dtoh(out, buffer)
        return out

    def launch(self, function: Any, grid: tuple[int, ...], block: tuple[int, ...], *args: Any) -> None:
        function(*args, grid=grid, block=block)

    def enter(self) -> None:
        self.context.push()

    def leave(self) -> None:
        self.context.synchronize()
        self.context.pop()


class _CuPy:
    """CuPy's RawModule over the same sources, where PyCUDA is absent."""

    def __init__(self) -> None:
        try:
            import cupy
        except ImportError as exc:
            raise KernelUnavailable(f"neither PyCUDA nor CuPy is installed ({exc})") from exc
        try:
            if cupy.cuda.runtime.getDeviceCount() == 0:
                raise KernelUnavailable("CuPy sees no CUDA device")
            self.modules = {m: cupy.RawModule(code=module_source(m), options=tuple(defines())) for m in MODULES}
            properties = cupy.cuda.runtime.getDeviceProperties(0)
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            raise KernelUnavailable(f"CUDA does not start: {exc}") from exc
        self.cupy = cupy
        name = properties["name"].decode() if isinstance(properties["name"], bytes) else properties["name"]
        self.detail = f"cupy {cupy.__version__} on {name} (sm_{properties['major']}{properties['minor']})"

    def function(self, module: str, name: str) -> Any:
        return self.modules[module].get_function(name)

    def upload(self, array: np.ndarray) -> Any:
        return self.cupy.asarray(np.ascontiguousarray(array))

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return self.cupy.zeros(shape, dtype)

    def download(self, buffer: Any, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return self.cupy.asnumpy(buffer).reshape(shape).astype(dtype, copy=False)

    def launch(self, function: Any, grid: tuple[int, ...], block: tuple[int, ...], *args: Any) -> None:
        function(grid, block, args)

    def enter(self) -> None:
        pass

    def leave(self) -> None:
        self.cupy.cuda.get_current_stream().synchronize()


def _grid2(width: int, height: int, block: int = 16) -> tuple[tuple[int, int], tuple[int, int, int]]:
    return ((width + block - 1) // block, (height + block - 1) // block), (block, block, 1)


def _grid1(count: int, block: int = 256) -> tuple[tuple[int, int], tuple[int, int, int]]:
    return (max(1, (count + block - 1) // block), 1), (block, 1, 1)


class CudaKernels:
    """The GPU backend; calls are serialised (one context), each a few launches on small images."""

    name = "cuda"

    def __init__(self) -> None:
        try:
            self._gpu: _PyCuda | _CuPy = _PyCuda()
        except KernelUnavailable as pycuda_missing:
            try:
                self._gpu = _CuPy()
            except KernelUnavailable as cupy_missing:
                raise KernelUnavailable(f"{pycuda_missing}; {cupy_missing}") from None
        self.detail = self._gpu.detail
        self._lock = threading.Lock()
        g = self._gpu
        g.enter()
        try:
            self._xyz = g.upload(spec.RGB_TO_XYZ_OVER_WHITE)
            self._pyramid = g.upload(spec.PYRAMID_TAPS)
            self._basis = [(g.upload(spec.TAPS[tx]), g.upload(spec.TAPS[ty])) for tx, ty in spec.BASIS]
            self._steering = g.upload(spec.STEERING)
        finally:
            g.leave()

    def _run(self, body: Callable[[Any], _T]) -> _T:
        with self._lock:
            self._gpu.enter()
            try:
                return body(self._gpu)
            finally:
                self._gpu.leave()

    def rgb_to_lab(self, rgb: np.ndarray) -> np.ndarray:
        height, width = rgb.shape[:2]

        def body(g: Any) -> np.ndarray:
            src, dst = g.upload(rgb.astype(np.uint8)), g.zeros((height, width, 3), np.float32)
            grid, block = _grid1(height * width)
            g.launch(
                g.function("colour", "rgb_to_lab"),
                grid,
                block,
                src,
                dst,
                np.int32(height * width),
                self._xyz,
                np.float32(spec.LAB_EPSILON),
                np.float32(spec.LAB_KAPPA),
            )
            return g.download(dst, (height, width, 3), np.float32)

        return self._run(body)

    def _separable(
        self, g: Any, src: Any, height: int, width: int, channels: int, taps_x: Any, taps_y: Any, count: int
    ) -> Any:
        grid, block = _grid2(width, height)
        rows, out = g.zeros((height, width, channels), np.float32), g.zeros((height, width, channels), np.float32)
        args = (np.int32(height), np.int32(width), np.int32(channels))
        g.launch(g.function("filters", "filter_rows"), grid, block, src, rows, *args, taps_x, np.int32(count))
        g.launch(g.function("filters", "filter_cols"), grid, block, rows, out, *args, taps_y, np.int32(count))
        return out

    def pyr_down(self, image: np.ndarray) -> np.ndarray:
        height, width, channels = image.shape
        half = ((height + 1) // 2, (width + 1) // 2, channels)

        def body(g: Any) -> np.ndarray:
            blurred = self._separable(
                g,
                g.upload(image.astype(np.float32)),
                height,
                width,
                channels,
                self._pyramid,
                self._pyramid,
                len(spec.PYRAMID_TAPS),
            )
            out = g.zeros(half, np.float32)
            grid, block = _grid2(half[1], half[0])
            g.launch(
                g.function("filters", "decimate2"),
                grid,
                block,
                blurred,
                out,
                np.int32(height),
                np.int32(width),
                np.int32(channels),
            )
            return g.download(out, half, np.float32)

        return self._run(body)

    def filter_basis(self, image: np.ndarray) -> np.ndarray:
        height, width, channels = image.shape

        def body(g: Any) -> np.ndarray:
            src = g.upload(image.astype(np.float32))
            return np.stack(
                [
                    g.download(
                        self._separable(g, src, height, width, channels, tx, ty, spec.TAP_COUNT),
                        (height, width, channels),
                        np.float32,
                    )
                    for tx, ty in self._basis
                ]
            )

        return self._run(body)

    def steer(self, basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _, height, width, channels = basis.shape
        pixels = height * width

        def body(g: Any) -> tuple[np.ndarray, np.ndarray]:
            responses = g.zeros((height, width, channels, spec.RESPONSES), np.float32)
            amplitude = g.zeros((spec.ORIENTATIONS, height, width), np.float32)
            grid, block = _grid1(pixels)
            g.launch(
                g.function("orientation", "steer"),
                grid,
                block,
                g.upload(basis.astype(np.float32)),
                responses,
                amplitude,
                np.int32(pixels),
                self._steering,
            )
            return (
                g.download(responses, (height, width, channels, spec.RESPONSES), np.float32),
                g.download(amplitude, (spec.ORIENTATIONS, height, width), np.float32),
            )

        return self._run(body)

    def saliency(self, amplitudes: list[np.ndarray]) -> np.ndarray:
        height, width = amplitudes[0].shape[1:]

        def body(g: Any) -> np.ndarray:
            total = g.zeros((height, width), np.float32)
            grid, block = _grid2(width, height)
            for level, amp in enumerate(amplitudes):
                g.launch(
                    g.function("orientation", "saliency_add"),
                    grid,
                    block,
                    g.upload(amp.astype(np.float32)),
                    total,
                    np.int32(height),
                    np.int32(width),
                    np.int32(amp.shape[1]),
                    np.int32(amp.shape[2]),
                    np.int32(level),
                    np.float32(spec.SALIENCY_DELTA),
                )
            return g.download(total, (height, width), np.float32)

        return self._run(body)

    def select_keypoints(
        self, saliency: np.ndarray, radius: int, threshold: float, max_count: int
    ) -> tuple[np.ndarray, np.ndarray]:
        height, width = saliency.shape
        capacity = height * width

        def body(g: Any) -> np.ndarray:
            found, count = g.zeros((capacity,), np.int32), g.zeros((1,), np.int32)
            grid, block = _grid2(width, height)
            g.launch(
                g.function("keypoints", "local_maxima"),
                grid,
                block,
                g.upload(saliency.astype(np.float32)),
                np.int32(height),
                np.int32(width),
                np.int32(radius),
                np.float32(threshold),
                found,
                count,
                np.int32(capacity),
            )
            n = int(g.download(count, (1,), np.int32)[0])
            return g.download(found, (capacity,), np.int32)[: min(n, capacity)]

        index = np.sort(self._run(body))
        values = saliency.reshape(-1)[index]
        order = np.lexsort((index, -values))[:max_count]
        index = index[order]
        return np.stack([index // width, index % width], axis=1).astype(np.int32), values[order]

    def patch_histograms(
        self, labs: list[np.ndarray], responses: list[np.ndarray], keypoints: np.ndarray
    ) -> np.ndarray:
        count, levels = len(keypoints), len(labs)
        shape = (count, spec.CHANNELS, spec.BINS, levels, spec.RESPONSES)
        if count == 0:
            return np.zeros((0, spec.DIMENSION), np.float32)

        def body(g: Any) -> np.ndarray:
            out = g.zeros(shape, np.float32)
            for level, (lab, resp) in enumerate(zip(labs, responses)):
                ys = g.upload((keypoints[:, 0] >> level).astype(np.int32))
                xs = g.upload((keypoints[:, 1] >> level).astype(np.int32))
                g.launch(
                    g.function("histograms", "patch_histograms"),
                    (count, 1),
                    (256, 1, 1),
                    g.upload(lab.astype(np.float32)),
                    g.upload(resp.astype(np.float32)),
                    np.int32(lab.shape[0]),
                    np.int32(lab.shape[1]),
                    ys,
                    xs,
                    np.int32(level),
                    np.int32(levels),
                    np.float32(spec.EPS),
                    out,
                )
            return g.download(out, shape, np.float32)

        return self._run(body).reshape(count, -1)

    def nearest_words(
        self, descriptors: np.ndarray, codebook: np.ndarray, codebook_norms: np.ndarray, count: int
    ) -> tuple[np.ndarray, np.ndarray]:
        nearest = check_nearest(count, len(codebook))
        rows = len(descriptors)
        if rows == 0:
            return np.zeros((0, nearest), np.int32), np.zeros((0, nearest), np.float32)

        def body(g: Any) -> tuple[np.ndarray, np.ndarray]:
            words, distances = g.zeros((rows, nearest), np.int32), g.zeros((rows, nearest), np.float32)
            g.launch(
                g.function("assign", "nearest_words"),
                (rows, 1),
                (256, 1, 1),
                g.upload(descriptors.astype(np.float32)),
                self._centres(g, codebook),
                g.upload(codebook_norms.astype(np.float32)),
                np.int32(len(codebook)),
                np.int32(nearest),
                words,
                distances,
            )
            return g.download(words, (rows, nearest), np.int32), g.download(distances, (rows, nearest), np.float32)

        return self._run(body)

    def _centres(self, g: Any, codebook: np.ndarray) -> Any:
        # The codebook (11 MB) is uploaded once and kept while the same array is passed.
        cached = getattr(self, "_codebook", None)
        if cached is None or cached[0] is not codebook:
            self._codebook = (codebook, g.upload(codebook.astype(np.float32)))
        return self._codebook[1]
