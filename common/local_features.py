"""Local features for two-stage retrieval: ORB keypoints and descriptors of a crop (computed once per
catalogue image at ingest, once per query crop), and the geometric verification that re-ranks a
first stage's candidates (seeds 001 and 002: a fast global search picks candidates, local matches
that agree on one geometric transform reorder them).

- Extraction (`extract`): the crop at `side` pixels on its longer side, grey, OpenCV's ORB (FAST
  corners over an 8-level pyramid, oriented BRIEF, 32-byte descriptors), at most `max_points`
  keypoints by Harris response. Positions are kept as uint16 pixels of the described size, so an
  item's features are 36 bytes a keypoint (`LocalFeatures.nbytes`).
- Verification (`verify`): each query descriptor's two nearest candidate descriptors by Hamming
  distance (brute force), Lowe's ratio test, then a similarity transform (rotation, uniform scale,
  translation: what a product photographed again undergoes, up to perspective) fitted by RANSAC;
  its inliers, and how much of the query crop they spread over, are the evidence.
- Fusion (`fuse`): the first stage's score plus a bonus that grows with the inliers past a
  minimum, so verified candidates move up in proportion to the evidence and unverified ones keep
  their order.

Pure functions over numpy arrays; `to_proto` / `from_proto` convert to and from the wire form.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from mps.common.v1 import common_pb2

EXTRACTOR = "orb-v1"
DESCRIPTOR_BYTES = 32
MAX_POINTS = 512  # the protocol's limit (mps.common.v1.LocalFeatures)
# ORB's border (edgeThreshold) and patch: no keypoint lies within 15 pixels of an edge, so a region
# under 31 pixels on a side has none.
EDGE = 15
PATCH = 31
MIN_SIDE = 2 * EDGE + 1


class LocalFeaturesError(ValueError):
    """Local features that are not well formed; the message says what is wrong."""


@dataclass(frozen=True)
class Features:
    """(n, 2) uint16 (x, y) keypoints in a width x height region and their (n, 32) uint8 descriptors."""

    extractor: str
    width: int
    height: int
    points: np.ndarray
    descriptors: np.ndarray

    def __len__(self) -> int:
        return len(self.points)

    @property
    def nbytes(self) -> int:
        return int(self.points.nbytes + self.descriptors.nbytes)


@dataclass(frozen=True)
class ExtractorSettings:
    """How crops are described; the defaults are bench/rerank.py's choice (see BENCHMARKS.md)."""

    side: int = 320
    max_points: int = 256
    fast_threshold: int = 12
    levels: int = 8
    scale_factor: float = 1.2


@dataclass(frozen=True)
class Verification:
    """The geometric evidence for one candidate: RANSAC inliers, the matches that passed the ratio
    test, and the share of the query crop's area the inliers' bounding box covers."""

    inliers: int
    matches: int
    spread: float


NOT_VERIFIED = Verification(0, 0, 0.0)


def empty(width: int = 0, height: int = 0) -> Features:
    return Features(EXTRACTOR, width, height, np.zeros((0, 2), np.uint16), np.zeros((0, DESCRIPTOR_BYTES), np.uint8))


def extract(image: np.ndarray, settings: ExtractorSettings = ExtractorSettings()) -> Features:
    """(H, W, 3) uint8 RGB (or (H, W) grey) -> its ORB features at settings.side on the longer side."""
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    height, width = grey.shape[:2]
    if min(height, width) < 8:
        return empty(width, height)
    scale = settings.side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if min(size) < MIN_SIDE:
        # A thin strip stays thin at `side`: no keypoint fits, and ORB's pyramid fails on 1 pixel.
        return empty(size[0], size[1])
    if size != (width, height):
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    orb = cv2.ORB.create(
        nfeatures=min(settings.max_points, MAX_POINTS),
        scaleFactor=settings.scale_factor,
        nlevels=settings.levels,
        edgeThreshold=EDGE,
        patchSize=PATCH,
        fastThreshold=settings.fast_threshold,
    )
    keypoints, descriptors = orb.detectAndCompute(grey, None)
    if descriptors is None or not keypoints:
        return empty(size[0], size[1])
    points = np.array([k.pt for k in keypoints], np.float32)
    points = np.clip(np.rint(points), 0, [size[0] - 1, size[1] - 1]).astype(np.uint16)
    return Features(EXTRACTOR, size[0], size[1], points, np.ascontiguousarray(descriptors, np.uint8))


def verify(
    query: Features,
    candidate: Features,
    ratio: float = 0.8,
    reprojection: float = 0.03,
    min_matches: int = 6,
) -> Verification:
    """Matches `query` against `candidate` and counts the matches one similarity transform explains
    (RANSAC, within `reprojection` x the query crop's longer side). Features of another extractor
    (or another descriptor width), or too few matches to fit a transform, are NOT_VERIFIED."""
    return verify_many(query, [candidate], ratio, reprojection, min_matches)[0]


def verify_many(
    query: Features,
    candidates: Sequence[Features],
    ratio: float = 0.8,
    reprojection: float = 0.03,
    min_matches: int = 6,
) -> list[Verification]:
    """`verify` of the query against each candidate (OpenCV's brute-force Hamming matcher, SIMD
    popcounts: faster here than one matrix product over the descriptors' bits)."""
    out = [NOT_VERIFIED] * len(candidates)
    if len(query) < 2:
        return out
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    threshold = reprojection * max(query.width, query.height)
    for i, candidate in enumerate(candidates):
        if (
            candidate.extractor != query.extractor
            or len(candidate) < 2
            or candidate.descriptors.shape[1] != query.descriptors.shape[1]
        ):
            continue  # another extractor, or the same name on descriptors of another width
        pairs = matcher.knnMatch(query.descriptors, candidate.descriptors, k=2)
        good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < ratio * p[1].distance]
        if len(good) < min_matches:
            out[i] = Verification(0, len(good), 0.0)
            continue
        source = query.points[[m.queryIdx for m in good]].astype(np.float32)
        target = candidate.points[[m.trainIdx for m in good]].astype(np.float32)
        transform, mask = cv2.estimateAffinePartial2D(
            source, target, method=cv2.RANSAC, ransacReprojThreshold=threshold, maxIters=500, confidence=0.99
        )
        if transform is None or mask is None or int(mask.sum()) < 3:
            out[i] = Verification(0, len(good), 0.0)
            continue
        kept = mask.ravel().astype(bool)
        inside = source[kept]
        extent = (inside.max(axis=0) - inside.min(axis=0)).astype(np.float64)
        spread = float(extent[0] * extent[1] / max(1.0, float(query.width * query.height)))
        out[i] = Verification(int(kept.sum()), len(good), min(1.0, spread))
    return out


def fuse(score: float, check: Verification, min_inliers: int = 12, weight: float = 0.5, half: int = 25) -> float:
    """The re-ranked score: `score`, plus weight x n / (n + half) for n inliers at or above
    min_inliers (and spread over some of the crop), else `score` unchanged."""
    if check.inliers < min_inliers or check.spread < 0.01:
        return score
    return score + weight * check.inliers / (check.inliers + half)


# --- the wire form (mps.common.v1.LocalFeatures) ---------------------------------------------------


def to_proto(features: Features) -> common_pb2.LocalFeatures:
    return common_pb2.LocalFeatures(
        extractor=features.extractor,
        width=features.width,
        height=features.height,
        points_u16le=features.points.astype("<u2").tobytes(),
        descriptors=features.descriptors.tobytes(),
        descriptor_bytes=DESCRIPTOR_BYTES,
    )


def check_parts(
    extractor: str, width: int, height: int, points: bytes, descriptors: bytes, descriptor_bytes: int
) -> int:
    """The number of keypoints; LocalFeaturesError saying what is wrong with the parts otherwise."""
    if not extractor or len(extractor) > 64:
        raise LocalFeaturesError("local_features.extractor must name the extractor (1 to 64 characters)")
    if not 0 < descriptor_bytes <= 128:
        raise LocalFeaturesError(f"local_features.descriptor_bytes {descriptor_bytes} is not in 1..128")
    if len(points) % 4:
        raise LocalFeaturesError("local_features.points_u16le must hold (x, y) uint16 pairs: 4 bytes a keypoint")
    count = len(points) // 4
    if count > MAX_POINTS:
        raise LocalFeaturesError(f"local_features has {count} keypoints; at most {MAX_POINTS}")
    if len(descriptors) != count * descriptor_bytes:
        raise LocalFeaturesError(
            f"local_features.descriptors holds {len(descriptors)} bytes; {count} keypoints of "
            f"{descriptor_bytes} bytes need {count * descriptor_bytes}"
        )
    if count and not (0 < width <= 65535 and 0 < height <= 65535):
        raise LocalFeaturesError("local_features.width and height must give the described size (1..65535)")
    if count:
        xy = np.frombuffer(points, "<u2").reshape(-1, 2)
        if int(xy[:, 0].max()) >= width or int(xy[:, 1].max()) >= height:
            raise LocalFeaturesError("local_features has a keypoint outside its width x height")
    return count


def from_proto(message: common_pb2.LocalFeatures) -> Features:
    """The message as Features; LocalFeaturesError saying what is wrong when it is malformed."""
    m = message
    count = check_parts(m.extractor, m.width, m.height, m.points_u16le, m.descriptors, m.descriptor_bytes)
    return Features(
        m.extractor,
        int(m.width),
        int(m.height),
        np.frombuffer(m.points_u16le, "<u2").reshape(count, 2).astype(np.uint16),
        np.frombuffer(m.descriptors, np.uint8).reshape(count, m.descriptor_bytes),
    )
