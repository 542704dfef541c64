"""Letterbox preprocessing: resize keeping the aspect ratio, pad to the network size."""

from __future__ import annotations

import cv2
import numpy as np

# Darknet pads with 0.5 grey; a plain resize distorts objects and loses detections.
PAD_VALUE = 0.5


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float, tuple[float, float]]:
    """(H, W, 3) uint8 RGB -> ((3, h, w) float32 in [0, 1], scale, (pad_x, pad_y)).

    `size` is (h, w) of the network input. A pixel (x, y) of the image lands at
    (x * scale + pad_x, y * scale + pad_y) in the tensor.
    """
    target_h, target_w = size
    height, width = image.shape[:2]
    scale = min(target_w / width, target_h / height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    pad_x, pad_y = (target_w - new_w) / 2, (target_h - new_h) / 2
    left, top = int(pad_x), int(pad_y)
    canvas = np.full((target_h, target_w, 3), PAD_VALUE, dtype=np.float32)
    canvas[top : top + new_h, left : left + new_w] = resized.astype(np.float32) / 255.0
    return canvas.transpose(2, 0, 1), scale, (float(left), float(top))


def unletterbox_boxes(
    boxes: np.ndarray, scale: float, pad: tuple[float, float], image_size: tuple[int, int]
) -> np.ndarray:
    """(N, 4) float32 xyxy network pixels -> (N, 4) float32 xyxy original pixels, clipped.

    `image_size` is (h, w) of the original image.
    """
    out = boxes.astype(np.float32).copy()
    out[:, [0, 2]] = (out[:, [0, 2]] - pad[0]) / scale
    out[:, [1, 3]] = (out[:, [1, 3]] - pad[1]) / scale
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, image_size[1])
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, image_size[0])
    return out
