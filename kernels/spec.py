"""The colour-texture descriptor's fixed constants: filter taps, steering, colour matrices.

The single definition shared by the CPU reference (kernels/cpu.py) and the CUDA launchers
(kernels/cuda.py pass these arrays to the `.cu` kernels as arguments), so both compute one thing.
Changing any of them changes every signature: bump the codebook version (models/colour-texture-bow).
"""

from __future__ import annotations

import numpy as np

# Descriptor geometry (the paper, section 3.1): 3 colour channels x 6 bins x 4 scales x 4 orientations
# x 2 values (even = bar/line, odd = edge) = 576.
CHANNELS = 3
BINS = 6
LEVELS = 4
ORIENTATIONS = 4
VALUES = 2
RESPONSES = ORIENTATIONS * VALUES
DIMENSION = CHANNELS * BINS * LEVELS * RESPONSES
PATCH = 32
# Every pixel of a patch weighs at least this much: a flat patch still has a (smooth) texture, so a
# uniform image gets a plain colour histogram rather than an all-zero descriptor.
EPS = 1e-3
SALIENCY_DELTA = 1e-4
# Soft assignment: each descriptor's words are its `nearest` codebook centres, at most this many (the
# CUDA kernel's per-thread list has this length; models/colour-texture-bow/<version>/config.json
# chooses `nearest` within it).
MAX_NEAREST = 32

# sRGB (D65) -> XYZ, each row divided by the D65 white point so that white maps to (1, 1, 1).
_RGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
_WHITE = np.array([0.950456, 1.0, 1.088754])
RGB_TO_XYZ_OVER_WHITE = (_RGB_TO_XYZ / _WHITE[:, None]).astype(np.float32)
LAB_EPSILON = 216 / 24389
LAB_KAPPA = 24389 / 27

PYRAMID_TAPS = (np.array([1, 4, 6, 4, 1]) / 16).astype(np.float32)

# Freeman & Adelson's steerable quadrature pair G2/H2 (IEEE PAMI 1991, tables III and IV), sampled at
# 9 taps with spacing 0.67; every basis filter is separable, fx(x) * fy(y).
_x = (np.arange(9) - 4) * 0.67
_g = np.exp(-(_x**2))
_g2 = 0.9213 * (2 * _x**2 - 1) * _g
# Sampled, G2's radial part keeps a small DC response; removing it (with a Gaussian, so the taps stay
# smooth) makes every basis filter band-pass: a uniform image has exactly zero texture response.
_g2 -= _g2.sum() / _g.sum() * _g
TAPS = {
    name: taps.astype(np.float32)
    for name, taps in {
        "g": _g,
        "xg": _x * _g,
        "1.843xg": 1.843 * _x * _g,
        "g2": _g2,
        "h2a": 0.9780 * (-2.254 * _x + _x**3) * _g,
        "h2b": 0.9780 * (_x**2 - 0.7515) * _g,
    }.items()
}
# (taps along x, taps along y) of G2a, G2b, G2c, H2a, H2b, H2c, H2d.
BASIS = (("g2", "g"), ("1.843xg", "xg"), ("g", "g2"), ("h2a", "g"), ("h2b", "xg"), ("xg", "h2b"), ("g", "h2a"))
TAP_COUNT = 9


def _steering() -> np.ndarray:
    """(8, 7) float32: row 2k is G2 at angle k*pi/4 (even), row 2k+1 is H2 at that angle (odd)."""
    rows = []
    for k in range(ORIENTATIONS):
        c, s = np.cos(k * np.pi / ORIENTATIONS), np.sin(k * np.pi / ORIENTATIONS)
        rows.append([c * c, -2 * c * s, s * s, 0, 0, 0, 0])
        rows.append([0, 0, 0, c**3, -3 * c * c * s, 3 * c * s * s, -(s**3)])
    return np.array(rows, np.float32)


STEERING = _steering()
# The 7 basis filters' taps as one (7, 2, 9) array: [basis, axis (0 = x, 1 = y), tap].
BASIS_TAPS = np.array([[TAPS[tx], TAPS[ty]] for tx, ty in BASIS], np.float32)
