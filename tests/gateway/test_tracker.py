"""The tracker on clips made of real photos: boxes of real objects followed through pans, gaps,
crossings and a cut; scene cuts told from pans and zooms on every bundled photo."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from common.errors import InvalidArgument
from common.photos import SKIMAGE_PHOTOS, SKLEARN_PHOTOS, load_photo
from gateway.tracker import Observation, Track, Tracker, cut_detected, iou_matrix
from tests.helpers import CUP_BOX

ASTRONAUT_FACE = (170, 20, 330, 230)  # the astronaut's head and helmet in the 512x512 photo
FRAME_W, FRAME_H = 400, 300


def _pan(photo: np.ndarray, box: tuple[int, ...], frames: int, dx: float, dy: float, seed: int):
    """A pan of a FRAME_W x FRAME_H window over `photo`: per frame the pixels and the object's true box
    in them plus detector noise (2 px)."""
    rng = np.random.default_rng(seed)
    clip = []
    for i in range(frames):
        x, y = round(i * dx), round(i * dy)
        pixels = photo[y : y + FRAME_H, x : x + FRAME_W]
        assert pixels.shape == (FRAME_H, FRAME_W, 3)
        true = np.array(box, np.float32) - np.array([x, y, x, y], np.float32)
        clip.append((pixels, true + rng.normal(0, 2, 4).astype(np.float32)))
    return clip


def _seen(obs_box: np.ndarray, category: str = "tableware", class_name: str = "cup", confidence: float = 0.7):
    return Observation(np.asarray(obs_box, np.float32), category, class_name, confidence)


def _photos() -> dict[str, np.ndarray]:
    photos = {name: load_photo(name) for name in SKIMAGE_PHOTOS + SKLEARN_PHOTOS}
    # The annotated scene in docs/, without its column of thumbnails.
    photos["scene"] = np.asarray(Image.open("docs/scene.jpg").convert("RGB"))[:, :1040]
    return photos


def _window(image: np.ndarray, dx: float = 0.0, dy: float = 0.0, zoom: float = 1.0) -> np.ndarray:
    """A window of 80 % of the photo around its centre, moved by dx, dy (fractions of the window) and
    zoomed by `zoom`."""
    height, width = image.shape[:2]
    w, h = int(width * 0.8 / zoom), int(height * 0.8 / zoom)
    x, y = int((width - w) / 2 + dx * width * 0.8), int((height - h) / 2 + dy * height * 0.8)
    return image[y : y + h, x : x + w]


def test_ids_stay_stable_across_a_pan_and_change_across_a_cut():
    coffee, astronaut = load_photo("coffee"), load_photo("astronaut")
    clip = _pan(coffee, CUP_BOX, 30, dx=5, dy=0.6, seed=1) + _pan(astronaut, ASTRONAUT_FACE, 20, dx=5, dy=4, seed=2)
    tracker = Tracker()
    ids: list[list[int]] = []
    cuts = []
    previous = None
    for frame, (pixels, box) in enumerate(clip):
        if previous is not None and cut_detected(previous, pixels):
            cuts.append(frame)
            tracker.reset()
        previous = pixels
        tracks = tracker.update(frame, [_seen(box)])
        ids.append([t.id for t in tracks])
        assert len(tracks) == 1
        assert iou_matrix(tracks[0].box, box)[0, 0] > 0.8
    assert cuts == [30]
    assert {i for frame_ids in ids[:30] for i in frame_ids} == {1}
    assert {i for frame_ids in ids[30:] for i in frame_ids} == {2}
    assert [t.id for t in tracker.seen()] == [1, 2]
    assert tracker.seen()[0].last_frame == 29 and tracker.seen()[1].first_frame == 30


def test_a_few_missed_detections_are_bridged_by_prediction():
    clip = _pan(load_photo("coffee"), CUP_BOX, 13, dx=16, dy=0.0, seed=3)
    tracker = Tracker()
    for frame, (_, box) in enumerate(clip):
        if 5 <= frame < 10:  # the detector misses the cup, or frames without detection (an interval)
            (track,) = tracker.predict(frame)
            assert track.last_frame == 4
        else:
            (track,) = tracker.update(frame, [_seen(box)])
            assert track.last_frame == frame
        assert track.id == 1
        # The box follows the pan while no detection comes, from the velocity learnt before.
        assert iou_matrix(track.box, box)[0, 0] > 0.75


def test_a_track_lost_longer_than_max_age_is_dropped_and_a_new_one_gets_a_new_id():
    clip = _pan(load_photo("coffee"), CUP_BOX, 12, dx=2, dy=0.0, seed=4)
    tracker = Tracker(max_age=3)
    assert [t.id for t in tracker.update(0, [_seen(clip[0][1])])] == [1]
    assert [t.id for t in tracker.predict(3)] == [1]
    assert tracker.update(4, []) == []
    tracker.update(10, [_seen(clip[10][1])])
    assert [t.id for t in tracker.update(11, [_seen(clip[11][1])])] == [2]


def test_two_crossing_objects_keep_their_ids():
    # Two boxes the size of the cup cross each other (one moving right, the other left, a little lower).
    width, height = 120, 110
    tracker = Tracker()
    rng = np.random.default_rng(5)
    owner: dict[int, int] = {}
    for frame in range(25):
        a = np.array([20 + 15 * frame, 60, 20 + 15 * frame + width, 60 + height], np.float32)
        b = np.array([380 - 15 * frame, 75, 380 - 15 * frame + width, 75 + height], np.float32)
        truths = [a + rng.normal(0, 2, 4), b + rng.normal(0, 2, 4)]
        order = rng.permutation(2)  # the detector lists them in any order
        tracks = tracker.update(frame, [_seen(truths[i]) for i in order])
        assert len(tracks) == 2
        for track in tracks:
            nearest = int(np.argmax(iou_matrix(track.box, np.stack(truths))[0]))
            assert owner.setdefault(track.id, nearest) == nearest, f"ids swapped at frame {frame}"
    assert iou_matrix(a, b)[0, 0] == 0.0 and sorted(owner) == [1, 2]


def test_the_category_is_a_vote_and_does_not_flip_on_one_odd_frame():
    clip = _pan(load_photo("coffee"), CUP_BOX, 12, dx=4, dy=0.0, seed=6)
    tracker = Tracker()
    for frame, (_, box) in enumerate(clip):
        if frame == 6:  # one confident odd label
            observations = [_seen(box, "bags", "handbag", 0.95)]
        elif frame in (8, 9, 10):  # the same object seen at once as two categories (e.g. two detectors)
            observations = [_seen(box, "tableware", "cup", 0.6), _seen(box + 3, "toys", "teddy bear", 0.9)]
        else:
            observations = [_seen(box, "tableware", "cup" if frame % 3 else "bowl", 0.7)]
        tracks = tracker.update(frame, observations)
        assert [(t.id, t.category) for t in tracks] == [(1, "tableware")], f"frame {frame}"
    assert tracks[0].class_name == "cup"  # cup on 9 frames, bowl on 2
    assert tracks[0].hits == 12


def test_a_single_spurious_detection_makes_no_track():
    clip = _pan(load_photo("coffee"), CUP_BOX, 8, dx=4, dy=0.0, seed=7)
    tracker = Tracker()
    for frame, (_, box) in enumerate(clip):
        observations = [_seen(box)]
        if frame == 5:
            observations.append(_seen(np.array([300, 200, 360, 260]), "bags", "handbag", 0.9))
        assert [t.id for t in tracker.update(frame, observations)] == [1]


def test_frames_must_increase_and_boxes_be_finite():
    tracker = Tracker()
    tracker.update(3, [])
    with pytest.raises(InvalidArgument, match="frame numbers must increase"):
        tracker.predict(3)
    with pytest.raises(InvalidArgument, match="4 finite numbers"):
        tracker.update(4, [_seen(np.array([0, 0, np.nan, 5]))])


def test_returned_tracks_are_copies():
    tracker = Tracker()
    (track,) = tracker.update(0, [_seen(np.array([10, 10, 50, 50]))])
    assert isinstance(track, Track) and track.confirmed  # in the first frames a track is confirmed at once
    track.box[:] = 0
    track.category = "changed"
    (again,) = tracker.predict(1)
    assert again.category == "tableware" and again.box[2] > 40


def test_a_cut_is_told_between_any_two_different_photos():
    photos = _photos()
    missed = [
        (a, b)
        for a, b in itertools.combinations(photos, 2)
        # The stereo pair is one scene from two viewpoints: a pan, not a cut.
        if {a, b} != {"motorcycle_left", "motorcycle_right"}
        and not cut_detected(_window(photos[a]), _window(photos[b]))
    ]
    assert missed == []


@pytest.mark.parametrize("move", [(0.05, 0.0), (0.0, 0.05), (-0.05, -0.05), (0.0, 0.0, 1.05), (0.0, 0.0, 0.95)])
def test_no_cut_on_a_pan_or_a_zoom_of_five_percent(move):
    photos = _photos()
    cuts = [name for name, image in photos.items() if cut_detected(_window(image), _window(image, *move))]
    assert cuts == []
