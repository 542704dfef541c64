"""Object localisation from the descriptor's feature map, on real photos with known objects."""

import numpy as np
import pytest

from common.photos import load_photo
from detector_server.nms import iou_matrix
from signature_server import saliency
from signature_server.saliency import feature_input_size, salient_objects, segment_proposals
from tests.signature_server.scenes import paste_cup, plain


def assert_well_formed(located, width, height, limit):
    assert len(located) <= limit
    for box, score in located:
        assert box.shape == (4,) and box.dtype == np.float32
        assert 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height
        assert 0 < score <= 1


def iou(box, truth):
    return float(iou_matrix(box[None], truth[None])[0, 0])


def test_feature_map_is_the_map_the_embedding_pools(deep_descriptor):
    # A square photo at the descriptor's own 224x224: GeM over the map must give its embedding,
    # so the map is read with the same normalisation as the signatures.
    astronaut = load_photo("astronaut")
    features = deep_descriptor.features(astronaut, (224, 224))
    assert features.shape == (1280, 7, 7) and features.dtype == np.float32
    gem = np.cbrt((np.clip(features, 1e-6, None) ** 3).mean(axis=(1, 2)))
    np.testing.assert_allclose(gem / np.linalg.norm(gem), deep_descriptor.compute([astronaut])[0], atol=1e-5)


def test_feature_map_keeps_the_aspect_in_multiples_of_32(deep_descriptor, coffee, locate_spec):
    multiple = locate_spec.input_multiple
    # 600x400 -> 640x416 (427 rounded to a multiple of 32) -> 20x13 cells.
    size = feature_input_size(400, 600, 640, multiple)
    assert size == (416, 640) and deep_descriptor.features(coffee, size).shape == (1280, 13, 20)
    # A sliver still gets one row of cells.
    size = feature_input_size(12, 600, 640, multiple)
    assert size == (32, 640) and deep_descriptor.features(coffee[:12], size).shape == (1280, 1, 20)


def test_scda_finds_a_product_photographed_on_a_plain_backdrop(locator):
    for x, y in ((50, 40), (230, 110), (420, 200)):
        scene, truth = paste_cup(plain(800, 600), x, y, 1.3)
        found = locator.locate(scene, max_salient=3, max_segments=0)
        assert found.segments == []
        assert_well_formed(found.salient, 800, 600, 3)
        assert iou(found.salient[0][0], truth) >= 0.5, (x, y, found.salient[0])


def test_scda_components_come_largest_first_with_shares_of_the_activation():
    # Three blobs of 9, 4 and 1 cells on a 12x16 map of a 640x480 image (40 px cells).
    activation = np.zeros((12, 16), np.float32)
    activation[1:4, 1:4] = 5  # 3x3 cells, top left
    activation[8:10, 10:12] = 9  # 2x2 cells, strongest but smaller
    activation[6, 14] = 4  # one cell
    found = salient_objects(activation, (640, 480), max_objects=8, upsample=4)
    assert len(found) == 3
    assert_well_formed(found, 640, 480, 8)
    areas = [float((b[2] - b[0]) * (b[3] - b[1])) for b, _ in found]
    assert areas == sorted(areas, reverse=True)
    centres = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b, _ in found]
    np.testing.assert_allclose(centres, [(100, 100), (440, 360), (580, 260)], atol=1)
    assert sum(score for _, score in found) == pytest.approx(1, abs=1e-5)
    # max_objects is honoured: the largest ones are kept.
    two = salient_objects(activation, (640, 480), max_objects=2, upsample=4)
    assert [s for _, s in two] == pytest.approx([s for _, s in found[:2]], abs=1e-6)
    assert salient_objects(np.ones((12, 16), np.float32), (640, 480), 8) == []


@pytest.mark.parametrize(
    "background,x,y,scale",
    [("china.jpg", 64, 85, 0.5), ("china.jpg", 320, 128, 0.7), ("rocket", 64, 85, 0.5), ("flower.jpg", 64, 85, 0.5)],
)
def test_segments_rank_an_object_pasted_into_a_real_photo_within_the_top_30(locator, background, x, y, scale):
    scene, truth = paste_cup(load_photo(background), x, y, scale)
    height, width = scene.shape[:2]
    found = locator.locate(scene, max_salient=0, max_segments=30)
    assert found.salient == []
    assert_well_formed(found.segments, width, height, 30)
    boxes = np.stack([box for box, _ in found.segments])
    assert (boxes[:, 2:] - boxes[:, :2] >= locator.spec.min_side).all()
    scores = [score for _, score in found.segments]
    assert scores[0] == 1 and scores == sorted(scores, reverse=True)
    assert iou_matrix(boxes, truth[None]).max() >= 0.5
    # NMS: no two kept segments overlap more than the threshold.
    overlaps = iou_matrix(boxes, boxes) - np.eye(len(boxes))
    assert overlaps.max() <= locator.spec.nms_iou + 1e-6


def test_no_segments_asked_no_selective_search(locator, coffee, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("selective search ran for max_segments = 0")

    monkeypatch.setattr(saliency, "selective_search", refuse)
    activation = np.ones((13, 20), np.float32)
    assert segment_proposals(coffee, activation, 0, locator.spec) == []
    assert locator.locate(coffee, max_salient=2, max_segments=0).segments == []
