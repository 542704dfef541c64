"""The CPU reference of every kernel in this folder: numpy (and OpenCV's SIMD filters), vectorised.

Each method computes exactly what the `.cu` kernel of the same name computes; `tests/kernels` holds
both to the same outputs. Arrays in and out are numpy; shapes and dtypes are in each docstring.
"""

from __future__ import annotations

import cv2
import numba
import numpy as np

from kernels import check_nearest, spec


class CpuKernels:
    name = "cpu"
    detail = f"cpu (numpy {np.__version__} + numba {numba.__version__} reference)"

    def rgb_to_lab(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 sRGB -> (H, W, 3) float32 CIE Lab (D65), each channel scaled to [0, 1]."""
        c = rgb.astype(np.float32) * np.float32(1 / 255)
        linear = np.where(
            c <= np.float32(0.04045),
            c * np.float32(1 / 12.92),
            ((c + np.float32(0.055)) * np.float32(1 / 1.055)) ** np.float32(2.4),
        )
        xyz = linear @ spec.RGB_TO_XYZ_OVER_WHITE.T
        f = np.where(
            xyz > np.float32(spec.LAB_EPSILON),
            np.cbrt(xyz),
            xyz * np.float32(spec.LAB_KAPPA / 116) + np.float32(16 / 116),
        )
        out = np.empty_like(f)
        out[..., 0] = np.float32(116 / 100) * f[..., 1] - np.float32(16 / 100)
        out[..., 1] = (np.float32(500) * (f[..., 0] - f[..., 1]) + np.float32(128)) * np.float32(1 / 255)
        out[..., 2] = (np.float32(200) * (f[..., 1] - f[..., 2]) + np.float32(128)) * np.float32(1 / 255)
        return np.clip(out, 0, 1, out=out)

    def pyr_down(self, image: np.ndarray) -> np.ndarray:
        """(H, W, C) float32 -> ((H+1)//2, (W+1)//2, C): 5-tap binomial blur, reflect-101, every 2nd pixel."""
        blurred = cv2.sepFilter2D(image, -1, spec.PYRAMID_TAPS, spec.PYRAMID_TAPS, borderType=cv2.BORDER_REFLECT_101)
        return np.ascontiguousarray(blurred[::2, ::2])

    def filter_basis(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) float32 -> (7, H, W, 3): the separable G2/H2 steerable basis responses, reflect-101."""
        return np.stack(
            [
                cv2.sepFilter2D(image, -1, spec.TAPS[tx], spec.TAPS[ty], borderType=cv2.BORDER_REFLECT_101)
                for tx, ty in spec.BASIS
            ]
        )

    def steer(self, basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(7, H, W, 3) basis -> responses (H, W, 3, 8) float32 [even, odd] x 4 orientations, and the
        orientation amplitudes (4, H, W) sqrt(even^2 + odd^2) of the lightness channel."""
        weights = spec.STEERING  # (8, 7)
        responses = np.tensordot(basis.transpose(1, 2, 3, 0), weights.T, axes=1)  # (H, W, 3, 8)
        light = responses[:, :, 0, :]
        amplitude = np.sqrt(light[..., 0::2] ** 2 + light[..., 1::2] ** 2)
        return responses.astype(np.float32), np.ascontiguousarray(amplitude.transpose(2, 0, 1))

    def saliency(self, amplitudes: list[np.ndarray]) -> np.ndarray:
        """Per level (4, Hs, Ws) amplitudes -> (H0, W0) float32 saliency at level 0.

        Per level, the geometric mean over orientations of (amplitude + delta), minus delta, so a point
        where every orientation responds (a corner, a blob, a texture) beats a straight edge; levels
        are summed at level-0 resolution, level s read at (y >> s, x >> s).
        """
        height, width = amplitudes[0].shape[1:]
        delta = np.float32(spec.SALIENCY_DELTA)
        total = np.zeros((height, width), np.float32)
        ys, xs = np.arange(height), np.arange(width)
        for level, amp in enumerate(amplitudes):
            per_level = np.exp(np.log(amp + delta).mean(axis=0)) - delta
            total += per_level[(ys >> level)[:, None], (xs >> level)[None, :]]
        return total

    def select_keypoints(
        self, saliency: np.ndarray, radius: int, threshold: float, max_count: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(H, W) saliency -> (K, 2) int32 (y, x), (K,) float32 saliency: local maxima over a
        (2r+1)^2 window (ties kept) above threshold, most salient first, ties by raster order."""
        window = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * radius + 1, 2 * radius + 1))
        local_max = cv2.dilate(saliency, window)  # pixels outside the image never win
        ys, xs = np.nonzero((saliency >= local_max) & (saliency > threshold))
        values = saliency[ys, xs]
        order = np.lexsort((ys * saliency.shape[1] + xs, -values))[:max_count]
        return np.stack([ys[order], xs[order]], axis=1).astype(np.int32), values[order]

    def patch_histograms(
        self, labs: list[np.ndarray], responses: list[np.ndarray], keypoints: np.ndarray
    ) -> np.ndarray:
        """Levels of (Hs, Ws, 3) Lab and (Hs, Ws, 3, 8) responses, (K, 2) level-0 keypoints ->
        (K, 576) float32 texture-weighted colour histograms, not normalised.

        For keypoint (y, x) on level s the patch is rows [(y >> s) - 16, (y >> s) + 16) and the same
        columns, clipped to the image. Pixel p adds |response_r(p)| + EPS to bin
        min(floor(6 * value_c(p)), 5) of channel c, for each of the 8 responses r; descriptor index
        ((c * 6 + bin) * 4 + s) * 8 + r.
        """
        out = np.zeros((len(keypoints), spec.CHANNELS, spec.BINS, len(labs), spec.RESPONSES), np.float32)
        ys = np.ascontiguousarray(keypoints[:, 0], np.int32)
        xs = np.ascontiguousarray(keypoints[:, 1], np.int32)
        for level, (lab, resp) in enumerate(zip(labs, responses)):
            _patch_histograms_level(lab, resp, ys >> level, xs >> level, level, out)
        return out.reshape(len(keypoints), -1)

    def nearest_words(
        self, descriptors: np.ndarray, codebook: np.ndarray, codebook_norms: np.ndarray, count: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(K, D) float32 descriptors, (V, D) float32 centres, (V,) their squared norms, m ->
        (K, m) int32 the m nearest centres of each descriptor by Euclidean distance, nearest first,
        ties to the lowest index; (K, m) float32 their |c|^2 - 2 d.c (the squared distance less
        |d|^2, which differences of distances to one descriptor do not need)."""
        nearest = check_nearest(count, len(codebook))
        if len(descriptors) == 0:
            return np.zeros((0, nearest), np.int32), np.zeros((0, nearest), np.float32)
        distances = codebook_norms[None, :].astype(np.float32) - np.float32(2) * (
            descriptors.astype(np.float32) @ codebook.astype(np.float32).T
        )
        words = np.empty((len(descriptors), nearest), np.int32)
        best = np.empty((len(descriptors), nearest), np.float32)
        _nearest(distances, words, best)
        return words, best


@numba.njit(cache=True, nogil=True)
def _nearest(distances, words, best):  # pragma: no cover - compiled
    # Per row, centres in index order into a sorted list of the m best: what kernels/assign.cu's
    # threads do over their shares (an equal distance never displaces the lower index).
    m = words.shape[1]
    for k in range(distances.shape[0]):
        for n in range(m):
            best[k, n] = np.inf
            words[k, n] = 0x7FFFFFFF
        for j in range(distances.shape[1]):
            d = distances[k, j]
            if d < best[k, m - 1]:
                n = m - 1
                while n > 0 and best[k, n - 1] > d:
                    best[k, n] = best[k, n - 1]
                    words[k, n] = words[k, n - 1]
                    n -= 1
                best[k, n] = d
                words[k, n] = j


@numba.njit(parallel=True, cache=True, nogil=True)
def _patch_histograms_level(lab, responses, ys, xs, level, out):  # pragma: no cover - compiled
    # One keypoint per iteration, pixels in raster order: what kernels/histograms.cu does per block.
    height, width = lab.shape[0], lab.shape[1]
    half = spec.PATCH // 2
    for k in numba.prange(ys.shape[0]):
        y0, y1 = max(ys[k] - half, 0), min(ys[k] + half, height)
        x0, x1 = max(xs[k] - half, 0), min(xs[k] + half, width)
        for y in range(y0, y1):
            for x in range(x0, x1):
                for c in range(spec.CHANNELS):
                    b = min(int(lab[y, x, c] * np.float32(spec.BINS)), spec.BINS - 1)
                    for r in range(spec.RESPONSES):
                        out[k, c, b, level, r] += abs(responses[y, x, c, r]) + np.float32(spec.EPS)
