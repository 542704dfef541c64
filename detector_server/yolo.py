"""YOLO post-processing: decoded head rows -> scored, class-aware, NMS-filtered boxes."""

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


def postprocess(rows: np.ndarray, score_threshold: float, iou_threshold: float,
                max_detections: int) -> Detections:
    """(B, 5 + C) decoded rows (cx, cy, w, h, objectness, class probs) -> Detections.

    A box may carry several classes above the threshold (Darknet's behaviour); NMS is per class.
    """
    scores_all = rows[:, 5:] * rows[:, 4:5]
    box_ids, class_ids = np.nonzero(scores_all >= score_threshold)
    scores = scores_all[box_ids, class_ids]
    centre, size = rows[box_ids, :2], rows[box_ids, 2:4]
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    keep = nms(boxes, scores, iou_threshold, class_ids)[:max_detections]
    return Detections(boxes[keep].astype(np.float32), scores[keep].astype(np.float32),
                      class_ids[keep].astype(np.int64))
