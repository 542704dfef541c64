import numpy as np

from detector_server.nms import iou_matrix, nms


def brute_force_nms(boxes, scores, threshold, classes):
    order = sorted(range(len(boxes)), key=lambda i: -scores[i])
    kept = []
    for i in order:
        if all(classes[i] != classes[j] or iou_matrix(boxes[[i]], boxes[[j]])[0, 0] <= threshold
               for j in kept):
            kept.append(i)
    return kept


def test_iou_known_values():
    a = np.array([[0, 0, 10, 10]], dtype=np.float32)
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]], dtype=np.float32)
    assert np.allclose(iou_matrix(a, b), [[50 / 150, 0, 1]])


def test_suppresses_overlaps_of_the_same_class_only():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10]], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.5, np.array([0, 0, 1])).tolist() == [0, 2]
    assert nms(boxes, scores, 0.5).tolist() == [0]


def test_matches_brute_force_on_random_boxes():
    rng = np.random.default_rng(0)
    for _ in range(20):
        xy = rng.uniform(0, 100, (60, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (60, 2))], axis=1).astype(np.float32)
        scores, classes = rng.uniform(size=60), rng.integers(0, 3, 60)
        assert nms(boxes, scores, 0.45, classes).tolist() == brute_force_nms(boxes, scores, 0.45, classes)


def test_empty():
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).size == 0
