import numpy as np

from gateway.exclusive import resolve_exclusive

GROUPS = [["dress", "top", "skirt"]]


def test_dress_top_skirt_on_the_same_area_keep_the_most_confident():
    boxes = np.array([[0, 0, 100, 200], [2, 0, 100, 190], [0, 5, 98, 200]], dtype=np.float32)
    kept = resolve_exclusive(boxes, np.array([0.6, 0.8, 0.7]), ["dress", "top", "skirt"], GROUPS, 0.5)
    assert kept.tolist() == [1]


def test_exclusive_classes_apart_are_both_kept():
    boxes = np.array([[0, 0, 100, 100], [0, 150, 100, 250]], dtype=np.float32)
    kept = resolve_exclusive(boxes, np.array([0.6, 0.8]), ["top", "skirt"], GROUPS, 0.5)
    assert sorted(kept.tolist()) == [0, 1]


def test_classes_in_no_common_group_never_suppress():
    boxes = np.array([[0, 0, 100, 100], [0, 0, 100, 100]], dtype=np.float32)
    kept = resolve_exclusive(boxes, np.array([0.9, 0.3]), ["top", "handbag"], GROUPS, 0.5)
    assert kept.tolist() == [0, 1]


def test_empty():
    assert resolve_exclusive(np.zeros((0, 4)), np.zeros(0), [], GROUPS, 0.5).size == 0
