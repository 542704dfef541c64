"""The exported detector against an independent reference: OpenCV 4.x's own Darknet reader."""

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from common.config import MODELS_DIR
from detector_server.darknet_onnx import export, packaged_yolov3_tiny, parse_cfg
from detector_server.letterbox import letterbox

# OpenCV zeroes class scores (objectness * probability) below this; compare only above it.
OPENCV_SCORE_FLOOR = 0.2


@pytest.fixture(scope="module")
def reference_and_export(coffee):
    cfg, weights, _ = packaged_yolov3_tiny()
    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    tensor, _, _ = letterbox(coffee, (416, 416))
    net.setInput(tensor[None])
    reference = np.concatenate(net.forward(net.getUnconnectedOutLayersNames()))
    session = ort.InferenceSession(str(MODELS_DIR / "yolov3-tiny/1/model.onnx"), providers=["CPUExecutionProvider"])
    batch = np.stack([tensor, tensor[:, ::-1].copy(), tensor])  # dynamic batch of 3
    ours = session.run(["detections"], {"images": batch})[0]
    return reference, ours


def test_boxes_and_objectness_equal_opencv(reference_and_export):
    reference, ours = reference_and_export
    assert ours.shape == (3, 2535, 85) and reference.shape == (2535, 85)
    decoded = ours[0].copy()
    decoded[:, :4] /= 416  # OpenCV gives coordinates relative to the input size
    np.testing.assert_allclose(decoded[:, :5], reference[:, :5], atol=1e-4)


def test_class_scores_equal_opencv(reference_and_export):
    reference, ours = reference_and_export
    scores = ours[0, :, 5:] * ours[0, :, 4:5]
    above = reference[:, 5:] > 0
    assert above.sum() >= 1, "the photo should give OpenCV at least one confident class"
    np.testing.assert_allclose(scores[above], reference[:, 5:][above], atol=1e-4)
    assert scores[~above].max() < OPENCV_SCORE_FLOOR + 1e-4


def test_batch_items_are_independent(reference_and_export):
    _, ours = reference_and_export
    np.testing.assert_array_equal(ours[0], ours[2])
    assert not np.allclose(ours[0], ours[1])


def test_every_weight_is_used_and_mismatches_are_refused():
    cfg, weights, _ = packaged_yolov3_tiny()
    data = weights.read_bytes()
    with pytest.raises(ValueError) as error:
        export(cfg.read_text(), data + b"\0" * 16)
    assert str(error.value) == "weights file has 4 values the cfg does not use"
    with pytest.raises(ValueError) as error:
        export(cfg.read_text(), data[:-400])
    assert str(error.value) == "weights file is shorter than the cfg needs"


def test_cfg_parser_reads_sections_and_ignores_comments():
    sections = parse_cfg("[net]\nwidth=416 # comment\n\n[yolo]\nmask = 0,1\n")
    assert [s.kind for s in sections] == ["net", "yolo"]
    assert sections[0].get_int("width") == 416 and sections[1].get_ints("mask") == [0, 1]
