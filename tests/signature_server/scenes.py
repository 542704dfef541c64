"""LocateObjects test scenes: a real object (the coffee photo's cup) pasted where the test knows."""

from __future__ import annotations

import numpy as np

from gateway.demo_catalogue import cut, paste
from tests.helpers import CUP_BOX


def cup() -> np.ndarray:
    """(287, 279, 3) uint8 RGB: the cup cut out of the coffee photo."""
    return cut("coffee", CUP_BOX)


def paste_cup(background: np.ndarray, x: int, y: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """-> ((H, W, 3) uint8 RGB scene, (4,) float32 xyxy box of the cup in it)."""
    return paste(background, cup(), x, y, round(cup().shape[1] * scale))


def plain(width: int, height: int, grey: int = 255) -> np.ndarray:
    """(height, width, 3) uint8 RGB of one grey level: a studio backdrop."""
    return np.full((height, width, 3), grey, np.uint8)
