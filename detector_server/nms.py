"""Non-maximum suppression and box geometry, vectorised numpy, in memory linear in the boxes."""

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


def nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    iou_threshold: float,
    classes: np.ndarray | None = None,
    max_keep: int | None = None,
) -> np.ndarray:
    """Greedy NMS -> (K,) int64 indices kept, best score first.

    `boxes` (N, 4) xyxy, `scores` (N,). With `classes` (N,), only boxes of the same class
    suppress each other. Stops once `max_keep` boxes are kept (the same first K as without).

    Memory is linear in N: each kept box is compared with the boxes still standing, never an
    N x N IoU matrix (2000 candidates made one of ~300 MB of temporaries).
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    boxes = boxes.astype(np.float64)
    if classes is not None:
        # Shift each class into its own region of the plane so classes never overlap: by the
        # span of all coordinates, since boxes may start below 0 (a centre near the edge).
        span = float(boxes.max() - boxes.min()) + 1.0
        boxes = boxes + (span * classes.astype(np.float64))[:, None]
    order = np.argsort(-scores, kind="stable")
    boxes = boxes[order]
    areas = box_area(boxes)
    standing = np.arange(len(order))
    keep: list[int] = []
    limit = len(order) if max_keep is None else max_keep
    while standing.size and len(keep) < limit:
        best, rest = standing[0], standing[1:]
        keep.append(int(best))
        top_left = np.maximum(boxes[best, :2], boxes[rest, :2])
        bottom_right = np.minimum(boxes[best, 2:], boxes[rest, 2:])
        inter = (bottom_right - top_left).clip(0).prod(axis=1)
        union = areas[best] + areas[rest] - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
        standing = rest[~(iou > iou_threshold)]  # NaN (a non-finite box) suppresses nothing
    return order[np.array(keep, dtype=np.int64)]
