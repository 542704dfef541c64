"""Candidate regions of a photo from several sources, merged into one list (no gRPC here)."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from detector_server.nms import iou_matrix


class Source(enum.StrEnum):
    """Where a candidate region came from (mps.gateway.v1.ItemSource)."""

    DETECTOR = "detector"  # a detector class that is a product
    OBJECTNESS = "objectness"  # the detector's class-agnostic objectness
    SALIENT = "salient"  # SCDA on the deep descriptor's feature map
    SEGMENT = "segment"  # selective search, ranked by activation contrast
    WHOLE_IMAGE = "whole_image"  # the fallback when nothing else qualifies
    USER_REGION = "user_region"  # given by the caller


# Which source's box stays when two sources box the same thing: the one that knows more.
PRIORITY = {
    Source.USER_REGION: 0,
    Source.DETECTOR: 1,
    Source.OBJECTNESS: 2,
    Source.SALIENT: 3,
    Source.SEGMENT: 4,
    Source.WHOLE_IMAGE: 5,
}
LOCALISING = (Source.DETECTOR, Source.OBJECTNESS, Source.SALIENT, Source.SEGMENT)


@dataclass
class Proposal:
    """A region to search."""

    box: np.ndarray  # (4,) float32 xyxy pixels of the working photo
    source: Source
    confidence: float  # the source's own score in [0, 1]
    class_name: str = ""
    # The detector class's category, or the region's; "" = to be decided from the catalogue.
    category: str = ""


def merge_proposals(proposals: Iterable[Proposal], iou_threshold: float, limit: int) -> list[Proposal]:
    """The proposals to search, at most `limit`: near-duplicates across sources merged, the
    best of each source taken in turn so that one prolific source cannot crowd out the others.

    Two proposals overlapping with IoU >= iou_threshold are one region and the higher-priority
    source's box stays (detector class > objectness > salient > segment); two detector boxes never
    merge here (different classes on one box are settled by the exclusive-category rule).
    """
    by_source: dict[Source, list[Proposal]] = {}
    for proposal in proposals:
        by_source.setdefault(proposal.source, []).append(proposal)
    queues = [sorted(by_source[s], key=lambda p: -p.confidence) for s in sorted(by_source, key=PRIORITY.__getitem__)]
    # Round robin over the sources, each queue best first; detector classes come first in full.
    ordered: list[Proposal] = []
    if queues and queues[0] and queues[0][0].source in (Source.DETECTOR, Source.USER_REGION):
        ordered.extend(queues.pop(0))
    while any(queues):
        for queue in queues:
            if queue:
                ordered.append(queue.pop(0))
    kept: list[Proposal] = []
    for proposal in ordered:
        if len(kept) >= limit:
            break
        if kept:
            overlaps = iou_matrix(
                proposal.box[None].astype(np.float64), np.stack([k.box for k in kept]).astype(np.float64)
            )[0]
            duplicate = [
                k
                for k, o in zip(kept, overlaps)
                if o >= iou_threshold and not (k.source == proposal.source == Source.DETECTOR)
            ]
            if duplicate:
                continue
        kept.append(proposal)
    return kept


def clip_box(box: np.ndarray, width: int, height: int) -> np.ndarray:
    """(4,) xyxy -> (4,) float32 clipped to a width x height image."""
    return np.array(
        [
            min(max(box[0], 0), width),
            min(max(box[1], 0), height),
            min(max(box[2], 0), width),
            min(max(box[3], 0), height),
        ],
        dtype=np.float32,
    )


def overlap_of_smaller(a: np.ndarray, b: np.ndarray) -> float:
    """(4,), (4,) xyxy -> intersection over the smaller box's area (1 when one holds the other)."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return float(inter / smaller) if smaller > 0 else 0.0
