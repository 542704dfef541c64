"""Multi-object tracking of detections across video frames (SORT: Bewley et al. 2016), and scene cuts.

Each track is a constant-velocity Kalman filter on (cx, cy, s, r) — box centre, area and aspect
ratio, the ratio held constant — matched to the frame's observations by IoU with the Hungarian
algorithm. A track's category and class are the confidence-weighted vote over every observation it
was matched with, so one odd frame does not flip them; observations of another category on the
same object (two detectors, or one detector hesitating) are matched on IoU whatever their class and
only add their vote. No gRPC here: the gateway's stream feeds it domain observations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment

from common.errors import InvalidArgument

__all__ = ["CUT_THRESHOLD", "Observation", "Track", "Tracker", "cut_detected", "iou_matrix"]

# Bhattacharyya distance between the HSV histograms of two consecutive frames above which the scene
# changed. Tuned on the bundled photos (common.photos) and docs/scene.jpg: two different photos are
# 0.45 apart or more, the same photo panned by 5 % of the frame or zoomed by 5 % at most 0.17.
CUT_THRESHOLD = 0.3
# Observations that overlap a matched one this much are the same object seen as another class.
SAME_OBJECT_IOU = 0.7


@dataclass
class Observation:
    """One detection in one frame."""

    box: np.ndarray  # (4,) float32 xyxy pixels
    category: str
    class_name: str
    confidence: float


@dataclass
class Track:
    """A snapshot of one tracked object at a frame (a copy: changing it changes nothing)."""

    id: int
    box: np.ndarray  # (4,) float32 xyxy pixels, smoothed (predicted when not matched at this frame)
    category: str
    class_name: str
    first_frame: int
    last_frame: int  # the last frame where an observation was matched to it
    hits: int  # frames with a matched observation
    confirmed: bool


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) float64 IoU of (N, 4) and (M, 4) xyxy boxes."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _to_state(box: np.ndarray) -> np.ndarray:
    """(4,) xyxy -> (4,) float64 (cx, cy, s = area, r = width / height); sides at least one pixel."""
    x1, y1, x2, y2 = (float(v) for v in box)
    width, height = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    return np.array([(x1 + x2) / 2, (y1 + y2) / 2, width * height, width / height])


def _to_box(state: np.ndarray) -> np.ndarray:
    """(cx, cy, s, r, ...) -> (4,) float32 xyxy."""
    cx, cy, s, r = (float(v) for v in state[:4])
    s, r = max(s, 1.0), max(r, 1e-3)
    width = np.sqrt(s * r)
    height = s / width
    return np.array([cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2], np.float32)


class _Kalman:
    """Constant-velocity Kalman filter on x = (cx, cy, s, r, vcx, vcy, vs), observing (cx, cy, s, r);
    the noise settings are SORT's."""

    H = np.eye(4, 7)
    R = np.diag([1.0, 1.0, 10.0, 10.0])

    def __init__(self, box: np.ndarray):
        self.x = np.zeros(7)
        self.x[:4] = _to_state(box)
        # Velocities are unknown at birth: a large initial uncertainty on them.
        self.P = np.diag([10.0, 10.0, 10.0, 10.0, 1e4, 1e4, 1e4])
        self.Q = np.diag([1.0, 1.0, 1.0, 1.0, 0.01, 0.01, 1e-4])

    def predict(self, steps: int) -> None:
        """Advance `steps` frames (a detection interval or dropped frames are several steps)."""
        for _ in range(steps):
            if self.x[2] + self.x[6] <= 0:  # the area would vanish: stop shrinking
                self.x[6] = 0.0
            F = np.eye(7)
            F[0, 4] = F[1, 5] = F[2, 6] = 1.0
            self.x = F @ self.x
            self.P = F @ self.P @ F.T + self.Q

    def update(self, box: np.ndarray) -> None:
        z = _to_state(box)
        innovation = z - self.H @ self.x
        S = self.H @ self.P @ self.H.T + self.R
        K = self.P @ self.H.T @ np.linalg.inv(S)
        self.x = self.x + K @ innovation
        self.P = (np.eye(7) - K @ self.H) @ self.P


@dataclass
class _State:
    """A live track: its filter and votes."""

    kalman: _Kalman
    first_frame: int
    last_frame: int
    born_early: bool  # born in the first min_hits updates after a start or a cut: confirmed at once
    id: int = 0  # 0 until confirmed: public ids are given to confirmed tracks only, in order
    hits: int = 0
    category_votes: dict[str, float] = field(default_factory=dict)
    class_votes: dict[tuple[str, str], float] = field(default_factory=dict)
    category: str = ""
    class_name: str = ""

    def vote(self, observation: Observation) -> None:
        # A zero-confidence observation still counts a little, so ties go to what was seen.
        weight = max(float(observation.confidence), 1e-6)
        self.category_votes[observation.category] = self.category_votes.get(observation.category, 0.0) + weight
        key = (observation.category, observation.class_name)
        self.class_votes[key] = self.class_votes.get(key, 0.0) + weight
        # The leader keeps its place on a tie: a label changes only when another one has more weight.
        if self.category_votes[observation.category] > self.category_votes.get(self.category, 0.0):
            self.category = observation.category
        classes = {c: w for (k, c), w in self.class_votes.items() if k == self.category}
        if self.class_votes.get((self.category, self.class_name), 0.0) < max(classes.values()):
            self.class_name = max(classes, key=lambda c: classes[c])

    def snapshot(self) -> Track:
        return Track(
            id=self.id,
            box=_to_box(self.kalman.x),
            category=self.category,
            class_name=self.class_name,
            first_frame=self.first_frame,
            last_frame=self.last_frame,
            hits=self.hits,
            confirmed=self.id > 0,
        )


class Tracker:
    """SORT over one stream: update() with a frame's observations, predict() for a frame without
    detection (an inference interval), reset() after a cut. Frame numbers must increase."""

    def __init__(self, iou_threshold: float = 0.3, max_age: int = 30, min_hits: int = 2):
        if not 0.0 < iou_threshold <= 1.0:
            raise InvalidArgument(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        if max_age < 0 or min_hits < 1:
            raise InvalidArgument(f"max_age must be >= 0 and min_hits >= 1, got {max_age} and {min_hits}")
        self.iou_threshold = iou_threshold
        self.max_age = max_age
        self.min_hits = min_hits
        self._next_id = 1
        self._tracks: list[_State] = []
        self._frame: int | None = None
        self._updates = 0  # update() calls since the start or the last reset
        self._seen: dict[int, _State] = {}

    def reset(self) -> None:
        """Forget every live track (a scene cut): the next objects get new ids; ids are never reused."""
        self._tracks = []
        self._updates = 0

    def seen(self) -> list[Track]:
        """Every track ever confirmed on this stream, live or not, across resets, by id."""
        return [state.snapshot() for _, state in sorted(self._seen.items())]

    def predict(self, frame: int) -> list[Track]:
        """(A frame without detection) the confirmed tracks alive at `frame`, their boxes predicted."""
        self._advance(frame)
        return self._alive()

    def update(self, frame: int, observations: list[Observation]) -> list[Track]:
        """Match the frame's observations to the tracks; the confirmed tracks alive at `frame`."""
        for number, observation in enumerate(observations):
            box = np.asarray(observation.box, np.float64)
            if box.shape != (4,) or not np.all(np.isfinite(box)):
                raise InvalidArgument(
                    f"observations[{number}].box must be 4 finite numbers x1 y1 x2 y2, got {observation.box!r}"
                )
        self._advance(frame)
        self._updates += 1
        boxes = np.array([np.asarray(o.box, np.float64) for o in observations]).reshape(-1, 4)
        predicted = np.array([_to_box(t.kalman.x) for t in self._tracks]).reshape(-1, 4)
        overlap = iou_matrix(predicted, boxes)
        pairs: list[tuple[int, int]] = []
        if overlap.size:
            rows, cols = linear_sum_assignment(-overlap)
            pairs = [(r, c) for r, c in zip(rows, cols) if overlap[r, c] >= self.iou_threshold]
        matched_boxes = {c for _, c in pairs}
        for r, c in pairs:
            track = self._tracks[r]
            track.kalman.update(boxes[c])
            track.vote(observations[c])
            track.hits += 1
            track.last_frame = frame
        # The rest: another label on an object already matched only votes; otherwise a new track,
        # most confident first, absorbing the other labels of the same object.
        owners = [(boxes[c], self._tracks[r]) for r, c in pairs]
        rest = sorted(set(range(len(observations))) - matched_boxes, key=lambda i: -observations[i].confidence)
        for i in rest:
            owner = next((t for b, t in owners if iou_matrix(b, boxes[i])[0, 0] >= SAME_OBJECT_IOU), None)
            if owner is not None:
                owner.vote(observations[i])
                continue
            state = _State(_Kalman(boxes[i]), frame, frame, born_early=self._updates <= self.min_hits, hits=1)
            state.vote(observations[i])
            self._tracks.append(state)
            owners.append((boxes[i], state))
        # A tentative track missed once is dropped (as DeepSORT does): a one-frame false detection
        # must not linger max_age frames and later capture a real object.
        self._tracks = [t for t in self._tracks if t.id > 0 or t.last_frame == frame]
        for track in self._tracks:
            if track.id == 0 and (track.hits >= self.min_hits or track.born_early):
                track.id = self._next_id
                self._next_id += 1
                self._seen[track.id] = track
        return self._alive()

    def _advance(self, frame: int) -> None:
        if self._frame is not None and frame <= self._frame:
            raise InvalidArgument(f"frame numbers must increase: got {frame} after {self._frame}")
        steps = 1 if self._frame is None else frame - self._frame
        self._frame = frame
        for track in self._tracks:
            # A track lost for max_age frames is not predicted further: it is about to be dropped.
            track.kalman.predict(min(steps, self.max_age + 1))
        self._tracks = [t for t in self._tracks if frame - t.last_frame <= self.max_age]

    def _alive(self) -> list[Track]:
        return [t.snapshot() for t in self._tracks if t.id > 0]


def _colour_histogram(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (8, 4, 4) float32 HSV histogram summing to 1, of the frame at 64x36."""
    image = np.asarray(rgb)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise InvalidArgument(f"a frame must be (height, width, 3) RGB pixels, got shape {image.shape}")
    # Every step-th pixel first: averaging a 720p frame down costs more than the rest together.
    step = max(1, min(image.shape[0] // 72, image.shape[1] // 128))
    small = cv2.resize(np.ascontiguousarray(image[::step, ::step], np.uint8), (64, 36), interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
    histogram = cv2.calcHist([hsv], [0, 1, 2], None, [8, 4, 4], [0, 180, 0, 256, 0, 256])
    return histogram / max(float(histogram.sum()), 1.0)


def cut_detected(previous_rgb: np.ndarray, current_rgb: np.ndarray, threshold: float = CUT_THRESHOLD) -> bool:
    """Whether the scene changed between two (H, W, 3) uint8 RGB frames (sizes may differ): the
    Bhattacharyya distance of their coarse HSV histograms is over `threshold`. A global histogram
    barely moves on a pan or a zoom, and costs well under a millisecond on 64x36 pixels."""
    distance = cv2.compareHist(
        _colour_histogram(previous_rgb), _colour_histogram(current_rgb), cv2.HISTCMP_BHATTACHARYYA
    )
    return bool(distance > threshold)
