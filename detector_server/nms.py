"""Non-maximum suppression and box geometry, vectorised numpy."""

from __future__ import annotations

import numpy as np


def box_area(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) xyxy -> (N,) areas, zero for degenerate boxes."""
    return (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4), (M, 4) xyxy -> (N, M) intersection over union."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clip(0).prod(axis=2)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float,
        classes: np.ndarray | None = None) -> np.ndarray:
    """Greedy NMS -> (K,) int64 indices kept, best score first.

    `boxes` (N, 4) xyxy, `scores` (N,). With `classes` (N,), only boxes of the same class
    suppress each other.
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    boxes = boxes.astype(np.float64)
    if classes is not None:
        # Shift each class into its own region of the plane so classes never overlap.
        offset = (boxes.max() + 1.0) * classes.astype(np.float64)
        boxes = boxes + offset[:, None]
    order = np.argsort(-scores, kind="stable")
    ious = iou_matrix(boxes[order], boxes[order])
    suppressed = np.zeros(len(order), dtype=bool)
    keep: list[int] = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= ious[i] > iou_threshold
    return order[np.array(keep, dtype=np.int64)]
