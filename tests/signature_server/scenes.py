"""LocateObjects test scenes: a real object (the coffee photo's cup) pasted where the test knows."""

from __future__ import annotations

import cv2
import numpy as np

from common.photos import load_photo

# The cup and saucer in skimage's 600x400 "coffee" photo, xyxy pixels.
CUP_BOX = (150, 23, 429, 310)


def cup() -> np.ndarray:
    """(287, 279, 3) uint8 RGB: the cup cut out of the coffee photo."""
    x0, y0, x1, y1 = CUP_BOX
    return load_photo("coffee")[y0:y1, x0:x1].copy()


def paste(background: np.ndarray, obj: np.ndarray, x: int, y: int, scale: float = 1.0
          ) -> tuple[np.ndarray, np.ndarray]:
    """-> ((H, W, 3) uint8 RGB scene, (4,) float32 xyxy box of the object in it)."""
    if scale != 1.0:
        obj = cv2.resize(obj, None, fx=scale, fy=scale,
                         interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    height, width = obj.shape[:2]
    if y + height > background.shape[0] or x + width > background.shape[1]:
        raise ValueError(f"a {width}x{height} object does not fit at ({x}, {y}) in {background.shape}")
    scene = background.copy()
    scene[y:y + height, x:x + width] = obj
    return scene, np.array([x, y, x + width, y + height], dtype=np.float32)


def plain(width: int, height: int, grey: int = 255) -> np.ndarray:
    """(height, width, 3) uint8 RGB of one grey level: a studio backdrop."""
    return np.full((height, width, 3), grey, np.uint8)
