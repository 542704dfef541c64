"""Provider choice: what really starts, not what onnxruntime lists."""

import onnxruntime as ort
import pytest

from common.config import MODELS_DIR
from common.onnx_session import create_session

MODEL = MODELS_DIR / "yolov3-tiny/1/model.onnx"


def test_listed_gpu_providers_that_cannot_start_fall_back_to_cpu(monkeypatch):
    # onnxruntime-gpu lists these even where no driver or TensorRT exists; here they cannot start.
    listed = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: listed)
    session = create_session(MODEL)
    assert session.get_providers()[0] == "CPUExecutionProvider"


def test_no_provider_that_starts_is_an_error(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider"])
    with pytest.raises(RuntimeError, match="no execution provider could start"):
        create_session(MODEL)


def test_missing_model_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="make models"):
        create_session(tmp_path / "absent.onnx")
