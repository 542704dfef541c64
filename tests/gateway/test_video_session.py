"""When a stream's tracks are searched, on clips made of real photos: once when they appear, again
only when they grew, got sharper or drifted; and the per-track summary."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from common.errors import InvalidArgument
from common.photos import load_photo
from gateway.ports import CatalogueMatch
from gateway.tracker import Observation, Track, Tracker
from gateway.video import ReSearch, VideoSession, appearance, appearance_distance, sharpness
from tests.helpers import CUP_BOX

FRAME_W, FRAME_H = 400, 267
OBJECT = np.array([270, 170, 370, 250], np.float32)  # a 100x80 part of the china.jpg photo (640x427)


def _zoom(photo: np.ndarray, zoom: float) -> tuple[np.ndarray, np.ndarray]:
    """A frame zoomed `zoom` times on OBJECT's centre (resized to FRAME_W x FRAME_H) and OBJECT's box in it."""
    height, width = photo.shape[:2]
    w, h = width / zoom, height / zoom
    cx, cy = (OBJECT[0] + OBJECT[2]) / 2, (OBJECT[1] + OBJECT[3]) / 2
    x, y = int(np.clip(cx - w / 2, 0, width - w)), int(np.clip(cy - h / 2, 0, height - h))
    window = photo[y : y + int(h), x : x + int(w)]
    frame = cv2.resize(window, (FRAME_W, FRAME_H), interpolation=cv2.INTER_AREA)
    scale = np.array([FRAME_W / window.shape[1], FRAME_H / window.shape[0]] * 2, np.float32)
    return frame, (OBJECT - np.array([x, y, x, y], np.float32)) * scale


def _track(frame: int, box: np.ndarray, track_id: int = 1, first_frame: int = 0) -> Track:
    return Track(track_id, np.asarray(box, np.float32), "tableware", "cup", first_frame, frame, frame + 1, True)


def _match(product: str, score: float) -> CatalogueMatch:
    return CatalogueMatch(product, f"{product}-image", score, {}, None)


def _area(box: np.ndarray) -> float:
    return float((box[2] - box[0]) * (box[3] - box[1]))


def test_a_panned_product_is_searched_once():
    coffee = load_photo("coffee")
    rng = np.random.default_rng(1)
    tracker, session = Tracker(), VideoSession(ReSearch())
    searched_at = []
    for frame in range(40):
        x, y = 5 * frame, frame // 4
        pixels = coffee[y : y + 300, x : x + 400]
        box = np.array(CUP_BOX, np.float32) - [x, y, x, y] + rng.normal(0, 3, 4).astype(np.float32)
        tracks = tracker.update(frame, [Observation(box, "tableware", "cup", 0.7)])
        for track_id in session.due(frame, pixels, tracks):
            searched_at.append(frame)
            session.searched(track_id, frame, pixels, tracks[0].box, [_match("cup-1", 0.8)])
    assert searched_at == [0]
    assert session.searches(1) == 1 and session.matches(1)[0].product_id == "cup-1"


def test_a_product_coming_closer_is_searched_again_each_time_it_grew_enough():
    china = load_photo("china.jpg")
    session = VideoSession(ReSearch())
    searched_at, areas = [], []
    for frame in range(30):
        pixels, box = _zoom(china, 1.03**frame)
        if session.due(frame, pixels, [_track(frame, box)]):
            searched_at.append(frame)
            areas.append(_area(box))
            session.searched(1, frame, pixels, box, [])
    # 1.03 a frame in width and height: 1.6 times the area after 8 frames.
    assert searched_at == [0, 8, 16, 24]
    assert all(later >= 1.6 * earlier for earlier, later in itertools.pairwise(areas))


def test_no_search_within_min_frames_between():
    china = load_photo("china.jpg")
    session = VideoSession(ReSearch(min_frames_between=5))
    pixels, box = _zoom(china, 1.0)
    assert session.due(0, pixels, [_track(0, box)]) == [1]
    session.searched(1, 0, pixels, box, [])
    pixels, box = _zoom(china, 1.5)  # 2.25 times the area at once
    assert [session.due(frame, pixels, [_track(frame, box)]) for frame in range(1, 7)] == [[]] * 4 + [[1]] * 2


def test_a_product_getting_sharp_is_searched_again():
    coffee = load_photo("coffee")
    box = np.array(CUP_BOX, np.float32)
    blurred = cv2.GaussianBlur(coffee, (0, 0), 2.5)  # motion or focus blur in the first frames
    session = VideoSession(ReSearch(drift=2.0))  # drift can never trigger: only sharpness
    due = []
    for frame in range(12):
        pixels = blurred if frame < 3 else coffee
        due.append(session.due(frame, pixels, [_track(frame, box)]))
        if due[-1]:
            session.searched(1, frame, pixels, box, [])
    assert due == [[1], [], [], [], [], [1]] + [[]] * 6
    assert sharpness(coffee[23:310, 150:429]) > 5 * sharpness(blurred[23:310, 150:429])


def test_a_track_whose_appearance_drifts_is_searched_again():
    coffee, chelsea = load_photo("coffee"), load_photo("chelsea")
    box = np.array(CUP_BOX, np.float32)
    x1, y1, x2, y2 = CUP_BOX
    # From frame 10 the box holds the cat: the tracker followed another object.
    swapped = coffee.copy()
    swapped[y1:y2, x1:x2] = chelsea[: y2 - y1, 100 : 100 + x2 - x1]
    session = VideoSession(ReSearch(sharper=100.0))  # sharpness can never trigger: only drift
    due = []
    for frame in range(16):
        pixels = coffee if frame < 10 else swapped
        due.append(session.due(frame, pixels, [_track(frame, box)]))
        if due[-1]:
            session.searched(1, frame, pixels, box, [])
    assert due == [[1]] + [[]] * 9 + [[1]] + [[]] * 5
    assert appearance_distance(appearance(coffee[y1:y2, x1:x2]), appearance(swapped[y1:y2, x1:x2])) > 0.35


def test_coasting_unconfirmed_and_outside_tracks_are_not_searched():
    coffee = load_photo("coffee")
    box = np.array(CUP_BOX, np.float32)
    session = VideoSession()
    coasting = Track(1, box, "tableware", "cup", 0, 3, 4, True)
    tentative = Track(2, box, "tableware", "cup", 5, 5, 1, False)
    outside = Track(3, np.array([700, 500, 800, 600], np.float32), "tableware", "cup", 5, 5, 3, True)
    assert session.due(5, coffee, [coasting, tentative, outside]) == []
    assert session.due(5, coffee, [_track(5, box, track_id=4)]) == [4]


def test_the_summary_keeps_the_best_match_per_product_over_the_searches():
    coffee = load_photo("coffee")
    box = np.array(CUP_BOX, np.float32)
    session = VideoSession()
    session.searched(7, 0, coffee, box, [_match("a", 0.6), _match("b", 0.5)])
    session.searched(7, 8, coffee, box, [_match("b", 0.7), _match("c", 0.4)])
    session.searched(7, 20, coffee, box, [_match("a", 0.55)])
    assert [m.product_id for m in session.matches(7)] == ["a"] and session.searches(7) == 3
    assert session.matches(9) == [] and session.searches(9) == 0
    later, seven = (
        Track(9, box, "bags", "handbag", 30, 41, 12, True),
        Track(7, box, "tableware", "cup", 0, 25, 26, True),
    )
    lines = session.summary([later, seven])
    assert [(line.track_id, line.first_frame, line.last_frame, line.searches) for line in lines] == [
        (7, 0, 25, 3),
        (9, 30, 41, 0),
    ]
    assert [(m.product_id, m.score) for m in lines[0].best_matches] == [("b", 0.7), ("a", 0.6), ("c", 0.4)]
    assert lines[1].best_matches == [] and lines[1].category == "bags"


def test_a_policy_that_would_search_every_frame_is_refused():
    with pytest.raises(InvalidArgument, match="growth and sharper must be > 1"):
        ReSearch(growth=1.0)
