"""Cropping detected items out of the decoded image."""

from __future__ import annotations

import cv2
import numpy as np


def crop(image: np.ndarray, box: np.ndarray, max_side: int) -> np.ndarray:
    """(H, W, 3) uint8 image, (4,) xyxy box -> (h, w, 3) uint8 crop, downscaled to max_side.

    The box is rounded outwards and clipped to the image; at least one pixel is kept. Crops are
    shrunk before they travel (the gateway's crop_max_side): the signatures look at 224 px (the deep
    descriptor's input) or 192 px (the colour-texture one's working size), so bigger only costs bytes.
    """
    height, width = image.shape[:2]
    x0 = int(np.clip(np.floor(box[0]), 0, width - 1))
    y0 = int(np.clip(np.floor(box[1]), 0, height - 1))
    x1 = int(np.clip(np.ceil(box[2]), x0 + 1, width))
    y1 = int(np.clip(np.ceil(box[3]), y0 + 1, height))
    out = image[y0:y1, x0:x1]
    longest = max(out.shape[:2])
    if longest > max_side:
        scale = max_side / longest
        out = cv2.resize(
            out,
            (max(1, round(out.shape[1] * scale)), max(1, round(out.shape[0] * scale))),
            interpolation=cv2.INTER_AREA,
        )
    return np.ascontiguousarray(out)


def valid_box(box: np.ndarray, width: int, height: int) -> str:
    """Why a user-given (4,) xyxy box cannot be used, or '' when it can."""
    if not np.all(np.isfinite(box)):
        return "has NaN or infinite coordinates: give finite pixel coordinates"
    if box[2] <= box[0] or box[3] <= box[1]:
        return "is empty: x_max must exceed x_min and y_max exceed y_min"
    if box[2] <= 0 or box[3] <= 0 or box[0] >= width or box[1] >= height:
        return f"lies outside the {width}x{height} image: give a box that overlaps it, in its pixels"
    return ""


def plain_background(image: np.ndarray, ring: float = 0.04, tolerance: int = 24, share: float = 0.9) -> bool:
    """(H, W, 3) uint8 -> whether it looks like a catalogue shot on a plain backdrop: at least
    `share` of the pixels of its border ring (`ring` of the shorter side) lie within `tolerance` of
    the ring's median colour (a catalogue shot is taken on a studio backdrop, a street photo is not)."""
    height, width = image.shape[:2]
    t = max(1, round(min(height, width) * ring))
    border = np.concatenate(
        [image[:t].reshape(-1, 3), image[-t:].reshape(-1, 3), image[:, :t].reshape(-1, 3), image[:, -t:].reshape(-1, 3)]
    ).astype(np.int16)
    median = np.median(border, axis=0)
    return float(np.mean(np.abs(border - median).max(axis=1) <= tolerance)) >= share
