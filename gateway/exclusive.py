"""Mutually exclusive classes (the Cortexica paper, section 4): on the same area, the most confident wins."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from detector_server.nms import iou_matrix


def resolve_exclusive(
    boxes: np.ndarray,
    confidences: np.ndarray,
    labels: Sequence[str],
    groups: Sequence[Sequence[str]],
    iou_threshold: float,
) -> np.ndarray:
    """Indices of the items to keep, most confident first.

    `boxes` (N, 4) float xyxy, `confidences` (N,), `labels` (N,) each item's class name or
    catalogue category. An item is dropped when a more confident item whose label shares an
    exclusive group with its label overlaps it with IoU >= iou_threshold (a dress, a top and a
    skirt on the same area: only the most confident stays). Items whose labels are in no common
    group never suppress each other.
    """
    n = len(labels)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    group_of: dict[str, set[int]] = {}
    for g, members in enumerate(groups):
        for name in members:
            group_of.setdefault(name, set()).add(g)
    order = np.argsort(-np.asarray(confidences), kind="stable")
    ious = iou_matrix(np.asarray(boxes, dtype=np.float64), np.asarray(boxes, dtype=np.float64))
    kept: list[int] = []
    for i in order:
        groups_i = group_of.get(labels[i], set())
        if any(groups_i & group_of.get(labels[j], set()) and ious[i, j] >= iou_threshold for j in kept):
            continue
        kept.append(int(i))
    return np.array(kept, dtype=np.int64)
