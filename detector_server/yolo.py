"""YOLO post-processing: decoded head rows -> scored, class-aware detections and class-agnostic objects."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detector_server.nms import nms


@dataclass
class Detections:
    """Kept detections of one image, best first."""

    boxes: np.ndarray  # (K, 4) float32 xyxy network-input pixels
    scores: np.ndarray  # (K,) float32 objectness * class probability
    class_ids: np.ndarray  # (K,) int64


@dataclass
class Objects:
    """Class-agnostic boxes of one image, highest objectness first."""

    boxes: np.ndarray  # (K, 4) float32 xyxy network-input pixels
    objectness: np.ndarray  # (K,) float32


def _xyxy(rows: np.ndarray) -> np.ndarray:
    """(N, >=4) rows (cx, cy, w, h, ...) -> (N, 4) float32 xyxy."""
    centre, size = rows[:, :2], rows[:, 2:4]
    return np.concatenate([centre - size / 2, centre + size / 2], axis=1).astype(np.float32)


def _top(scores: np.ndarray, limit: int) -> np.ndarray:
    """(K,) indices of the `limit` best scores, best first (all when fewer)."""
    if len(scores) > limit:
        keep = np.argpartition(-scores, limit - 1)[:limit]
        return keep[np.argsort(-scores[keep], kind="stable")]
    return np.argsort(-scores, kind="stable")


def _nms_best(
    rows: np.ndarray,
    candidates: np.ndarray,
    scores: np.ndarray,
    iou_threshold: float,
    limit: int,
    max_candidates: int,
    classes: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(B, >=4) rows, (K,) row index and score of each candidate -> the kept (boxes, scores,
    indices into the candidates), best first. The one path of detections and objects.

    Only the `max_candidates` best enter NMS, as TensorRT's EfficientNMS keeps a top k first: a
    threshold near 0 (every anchor x class passes 1e-30) then costs a bounded NMS, and only the
    top k rows are ever copied.
    """
    best = _top(scores, max_candidates)
    boxes = _xyxy(rows[candidates[best]])
    keep = nms(boxes, scores[best], iou_threshold, None if classes is None else classes[best], max_keep=limit)
    return boxes[keep], scores[best][keep].astype(np.float32), best[keep]


def postprocess(
    rows: np.ndarray, score_threshold: float, iou_threshold: float, max_detections: int, max_candidates: int = 2000
) -> Detections:
    """(B, 5 + C) decoded rows (cx, cy, w, h, objectness, class probs) -> Detections.

    A box may carry several classes above the threshold (Darknet's behaviour); NMS is per class.
    """
    scores_all = rows[:, 5:] * rows[:, 4:5]
    box_ids, class_ids = np.nonzero(scores_all >= score_threshold)
    boxes, scores, kept = _nms_best(
        rows, box_ids, scores_all[box_ids, class_ids], iou_threshold, max_detections, max_candidates, class_ids
    )
    return Detections(boxes, scores, class_ids[kept].astype(np.int64))


def objects(
    rows: np.ndarray, objectness_threshold: float, iou_threshold: float, max_objects: int, max_candidates: int = 2000
) -> Objects:
    """(B, 5 + C) decoded rows -> class-agnostic Objects.

    Every anchor's objectness (the head's "something is here", before the class split) is a score
    of its own: things the model has no class for still get boxes. NMS across classes.
    """
    candidates = np.flatnonzero(rows[:, 4] >= objectness_threshold)
    boxes, scores, _ = _nms_best(rows, candidates, rows[candidates, 4], iou_threshold, max_objects, max_candidates)
    return Objects(boxes, scores)
