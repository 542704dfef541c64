"""Which tracked objects of one video stream to search at a frame, and what each one matched.

A track is searched when it appears, and again only when a new search could find better: its box
grew markedly (more pixels of the product), its crop got sharper (motion blur gone), or its
appearance drifted (it turned round, or the tracker followed another object); otherwise its last
matches are reused. No gRPC here: the gateway's stream asks due() and reports searched().
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from common.errors import InvalidArgument
from gateway.ports import CatalogueMatch
from gateway.tracker import Track

__all__ = ["ReSearch", "TrackSummary", "VideoSession", "appearance", "appearance_distance", "sharpness"]

# Crops are resized to this many pixels a side before their sharpness is measured, so that a box
# that merely grew does not count as sharper (its Laplacian would see finer detail per pixel).
SHARPNESS_SIDE = 96
# Below this variance of the Laplacian a crop is flat; ratios against it would be noise.
SHARPNESS_FLOOR = 5.0


@dataclass
class ReSearch:
    """When a track already searched is searched again."""

    growth: float = 1.6  # its box area over its area at its last search
    sharper: float = 1.5  # its sharpness (variance of the Laplacian) over its value at its last search
    drift: float = 0.35  # appearance distance (1 - correlation of HSV histograms) from its last search
    min_frames_between: int = 5  # never twice within this many frames

    def __post_init__(self) -> None:
        if self.growth <= 1.0 or self.sharper <= 1.0 or not 0.0 < self.drift <= 2.0 or self.min_frames_between < 0:
            raise InvalidArgument(
                "re-search policy: growth and sharper must be > 1, drift in (0, 2], min_frames_between >= 0; "
                f"got {self.growth}, {self.sharper}, {self.drift}, {self.min_frames_between}"
            )


@dataclass
class TrackSummary:
    """One product seen in the stream."""

    track_id: int
    category: str
    class_name: str
    first_frame: int
    last_frame: int
    searches: int
    best_matches: list[CatalogueMatch]  # the best score per product over its searches, best first


def appearance(crop_rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB crop -> (128,) float32 HSV histogram (8 hue x 4 saturation x 4 value bins)
    summing to 1."""
    crop = np.ascontiguousarray(crop_rgb, np.uint8)
    if crop.ndim != 3 or crop.shape[2] != 3 or crop.size == 0:
        raise InvalidArgument(f"a crop must be (height, width, 3) RGB pixels, got shape {crop.shape}")
    hsv = cv2.cvtColor(crop, cv2.COLOR_RGB2HSV)
    histogram = cv2.calcHist([hsv], [0, 1, 2], None, [8, 4, 4], [0, 180, 0, 256, 0, 256]).reshape(-1)
    return (histogram / max(float(histogram.sum()), 1.0)).astype(np.float32)


def appearance_distance(a: np.ndarray, b: np.ndarray) -> float:
    """1 - correlation of two appearance() histograms: 0 alike, 1 unrelated, up to 2 opposite."""
    return 1.0 - float(cv2.compareHist(a, b, cv2.HISTCMP_CORREL))


def sharpness(crop_rgb: np.ndarray) -> float:
    """Variance of the Laplacian of an (H, W, 3) uint8 RGB crop in grey at SHARPNESS_SIDE pixels a side."""
    crop = np.ascontiguousarray(crop_rgb, np.uint8)
    if crop.ndim != 3 or crop.shape[2] != 3 or crop.size == 0:
        raise InvalidArgument(f"a crop must be (height, width, 3) RGB pixels, got shape {crop.shape}")
    grey = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    grey = cv2.resize(grey, (SHARPNESS_SIDE, SHARPNESS_SIDE), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def _crop(rgb: np.ndarray, box: np.ndarray) -> np.ndarray | None:
    """The pixels of an xyxy box clipped to the frame, or None when nothing of it is inside."""
    height, width = rgb.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box)
    left, top = max(int(np.floor(x1)), 0), max(int(np.floor(y1)), 0)
    right, bottom = min(int(np.ceil(x2)), width), min(int(np.ceil(y2)), height)
    if right - left < 2 or bottom - top < 2:
        return None
    return rgb[top:bottom, left:right]


def _area(box: np.ndarray) -> float:
    x1, y1, x2, y2 = (float(v) for v in box)
    return max(x2 - x1, 0.0) * max(y2 - y1, 0.0)


@dataclass
class _Searched:
    """A track's state at its last search, its matches and the best match per product so far."""

    frame: int
    area: float
    sharpness: float
    appearance: np.ndarray | None
    matches: list[CatalogueMatch]
    searches: int = 1
    best: dict[str, CatalogueMatch] = field(default_factory=dict)


class VideoSession:
    """The search state of one stream's tracks (ids are the tracker's, never reused in a stream)."""

    def __init__(self, policy: ReSearch | None = None):
        self.policy = policy or ReSearch()
        self._tracks: dict[int, _Searched] = {}

    def due(self, frame: int, rgb: np.ndarray, tracks: Sequence[Track]) -> list[int]:
        """Ids of the tracks to search at `frame` (rgb: (H, W, 3) uint8): those never searched, and those
        that grew, got sharper or drifted since their last search at least min_frames_between frames ago.
        Only tracks observed at this frame (last_frame == frame) qualify: a coasting box is a guess."""
        policy = self.policy
        ids = []
        for track in tracks:
            if not track.confirmed or track.last_frame != frame:
                continue
            last = self._tracks.get(track.id)
            if last is None:
                if _crop(rgb, track.box) is not None:
                    ids.append(track.id)
                continue
            if frame - last.frame < policy.min_frames_between:
                continue
            if self._changed(last, rgb, track.box):
                ids.append(track.id)
        return ids

    def _changed(self, last: _Searched, rgb: np.ndarray, box: np.ndarray) -> bool:
        """Whether the box grew, got sharper or drifted since its last search; cheapest test first."""
        policy = self.policy
        if _area(box) >= policy.growth * max(last.area, 1.0):
            return True
        crop = _crop(rgb, box)
        if crop is None:
            return False
        if sharpness(crop) >= policy.sharper * max(last.sharpness, SHARPNESS_FLOOR):
            return True
        return last.appearance is not None and appearance_distance(appearance(crop), last.appearance) >= policy.drift

    def searched(
        self, track_id: int, frame: int, rgb: np.ndarray, box: np.ndarray, matches: Sequence[CatalogueMatch]
    ) -> None:
        """Record a search of a track at `frame` with its box (xyxy pixels) and the matches it found."""
        crop = _crop(rgb, box)
        previous = self._tracks.get(track_id)
        state = _Searched(
            frame=frame,
            area=_area(box),
            sharpness=sharpness(crop) if crop is not None else 0.0,
            appearance=appearance(crop) if crop is not None else None,
            matches=list(matches),
            searches=1 if previous is None else previous.searches + 1,
            best={} if previous is None else previous.best,
        )
        for match in matches:
            kept = state.best.get(match.product_id)
            if kept is None or match.score > kept.score:
                state.best[match.product_id] = match
        self._tracks[track_id] = state

    def matches(self, track_id: int) -> list[CatalogueMatch]:
        """The matches of the track's last search ([] if never searched)."""
        state = self._tracks.get(track_id)
        return list(state.matches) if state else []

    def searches(self, track_id: int) -> int:
        state = self._tracks.get(track_id)
        return state.searches if state else 0

    def summary(self, tracks_ever: Sequence[Track]) -> list[TrackSummary]:
        """One line per track (by first frame, then id), with the best match per product over its searches."""
        lines = []
        for track in sorted(tracks_ever, key=lambda t: (t.first_frame, t.id)):
            state = self._tracks.get(track.id)
            best = sorted(state.best.values(), key=lambda m: (-m.score, m.product_id)) if state else []
            lines.append(
                TrackSummary(
                    track_id=track.id,
                    category=track.category,
                    class_name=track.class_name,
                    first_frame=track.first_frame,
                    last_frame=track.last_frame,
                    searches=state.searches if state else 0,
                    best_matches=best,
                )
            )
        return lines
