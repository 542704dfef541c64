import numpy as np

from detector_server.nms import iou_matrix, nms
from tests.helpers import CUP_BOX


def test_finds_the_cup_in_the_coffee_photo(detector_model, coffee):
    detections = detector_model.detect(coffee).detections
    cups = [d for d in detections if d.class_name == "cup"]
    assert cups and cups[0].category == "tableware" and cups[0].confidence > 0.5
    # The cup and saucer fill the middle of the 600x400 photo: boxes are in original pixels.
    assert iou_matrix(cups[0].box[None], np.array([CUP_BOX], dtype=np.float32))[0, 0] > 0.8


def test_letterbox_beats_a_plain_resize(detector_model, coffee):
    """A plain resize squashes the cup: it is no longer found (why the letterbox exists)."""
    import cv2

    squashed = cv2.resize(coffee, (416, 416)).astype(np.float32).transpose(2, 0, 1)[None] / 255
    rows = detector_model.session.run(["detections"], {"images": squashed})[0][0]
    cup = detector_model.spec.class_names.index("cup")
    plain_best = float((rows[:, 5 + cup] * rows[:, 4]).max())
    detections = detector_model.detect(coffee).detections
    assert max(d.confidence for d in detections if d.class_name == "cup") > plain_best + 0.2


def test_products_only_and_threshold(detector_model):
    from common.photos import load_photo

    photo = load_photo("motorcycle_right")
    everything = detector_model.detect(photo, score_threshold=0.1).detections
    products = detector_model.detect(photo, score_threshold=0.1, products_only=True).detections
    assert any(d.class_name == "person" for d in everything)
    assert products and all(d.category for d in products)
    assert all(d.confidence >= 0.1 for d in everything)


CAT_BOX = np.array([[0, 0, 400, 300]], dtype=np.float32)  # the cat's head fills chelsea's photo


def test_objectness_boxes_what_no_class_names(detector_model):
    """At the model's threshold no class claims Chelsea the cat; its objectness still boxes her."""
    from common.photos import load_photo

    result = detector_model.detect(load_photo("chelsea"), objectness_threshold=0.02)
    assert not result.detections
    boxes = np.stack([box for box, _ in result.objects])
    assert iou_matrix(boxes, CAT_BOX).max() > 0.7


def test_objects_are_one_per_place_best_first_and_capped(detector_model, coffee):
    result = detector_model.detect(coffee, objectness_threshold=0.001, max_objects=10)
    scores = [score for _, score in result.objects]
    assert 1 < len(scores) <= 10 and scores == sorted(scores, reverse=True)
    boxes = np.stack([box for box, _ in result.objects])
    overlaps = iou_matrix(boxes, boxes)[np.triu_indices(len(boxes), 1)]
    # NMS runs in network pixels; clipping to the photo afterwards moves an overlap by a hair.
    assert overlaps.max() <= detector_model.spec.objects_iou_threshold + 0.02
    # The cup is the most object-like thing in the photo.
    assert iou_matrix(boxes[:1], np.array([CUP_BOX], dtype=np.float32))[0, 0] > 0.8


def test_thresholds_near_zero_stay_bounded(detector_model, coffee, monkeypatch):
    """Every (anchor, class) pair passes 1e-30 (2535 x 80 of them): NMS sees a capped number."""
    from detector_server import yolo

    sizes = []

    def counting_nms(boxes, *args, **kwargs):
        sizes.append(len(boxes))
        return nms(boxes, *args, **kwargs)

    monkeypatch.setattr(yolo, "nms", counting_nms)
    result = detector_model.detect(coffee, score_threshold=1e-30, objectness_threshold=1e-30)
    assert len(sizes) == 2 and max(sizes) == 2000  # classes, then objects: both at the cap
    assert len(result.detections) <= detector_model.spec.max_detections
    assert len(result.objects) <= detector_model.spec.max_objects
