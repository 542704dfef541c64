import numpy as np

from detector_server.nms import iou_matrix, nms


def brute_force_nms(boxes, scores, threshold, classes):
    order = sorted(range(len(boxes)), key=lambda i: -scores[i])
    kept = []
    for i in order:
        if all(classes[i] != classes[j] or iou_matrix(boxes[[i]], boxes[[j]])[0, 0] <= threshold for j in kept):
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


def test_classes_never_suppress_each_other_with_negative_coordinates():
    """Boxes of anchors near the edge start below 0: the class shift must still separate classes."""
    boxes = np.array([[-300, -300, 10, 10], [5, 5, 400, 400], [-300, -300, 10, 10]], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.5, np.array([0, 1, 1])).tolist() == [0, 1, 2]


def test_matches_brute_force_with_negative_boxes_and_max_keep():
    rng = np.random.default_rng(1)
    for _ in range(20):
        xy = rng.uniform(-60, 100, (80, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 80, (80, 2))], axis=1).astype(np.float32)
        scores, classes = rng.uniform(size=80), rng.integers(0, 4, 80)
        reference = brute_force_nms(boxes, scores, 0.45, classes)
        assert nms(boxes, scores, 0.45, classes).tolist() == reference
        assert nms(boxes, scores, 0.45, classes, max_keep=5).tolist() == reference[:5]


def test_memory_is_linear_in_the_boxes():
    """20000 boxes: an N x N IoU matrix would be 3.2 GB of float64; the greedy loop needs a few MB."""
    import tracemalloc

    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 400, (20_000, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 30, (20_000, 2))], axis=1)
    tracemalloc.start()
    try:
        kept = nms(boxes, rng.uniform(size=20_000), 0.45, max_keep=100)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(kept) == 100 and peak < 50 * 2**20
