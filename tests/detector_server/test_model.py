import numpy as np

from detector_server.nms import iou_matrix


def test_finds_the_cup_in_the_coffee_photo(detector_model, coffee):
    detections, _ = detector_model.detect(coffee)
    cups = [d for d in detections if d.class_name == "cup"]
    assert cups and cups[0].category == "tableware" and cups[0].confidence > 0.5
    # The cup and saucer fill the middle of the 600x400 photo: boxes are in original pixels.
    assert iou_matrix(cups[0].box[None], np.array([[150, 23, 429, 310]], dtype=np.float32))[0, 0] > 0.8


def test_letterbox_beats_a_plain_resize(detector_model, coffee):
    """A plain resize squashes the cup: it is no longer found (why the letterbox exists)."""
    import cv2

    squashed = cv2.resize(coffee, (416, 416)).astype(np.float32).transpose(2, 0, 1)[None] / 255
    rows = detector_model.session.run(["detections"], {"images": squashed})[0][0]
    cup = detector_model.spec.class_names.index("cup")
    plain_best = float((rows[:, 5 + cup] * rows[:, 4]).max())
    detections, _ = detector_model.detect(coffee)
    assert max(d.confidence for d in detections if d.class_name == "cup") > plain_best + 0.2


def test_products_only_and_threshold(detector_model):
    from common.photos import load_photo

    photo = load_photo("motorcycle_right")
    everything, _ = detector_model.detect(photo, score_threshold=0.1)
    products, _ = detector_model.detect(photo, score_threshold=0.1, products_only=True)
    assert any(d.class_name == "person" for d in everything)
    assert products and all(d.category for d in products)
    assert all(d.confidence >= 0.1 for d in everything)
