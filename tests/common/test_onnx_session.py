"""Provider choice: what really starts, not what onnxruntime lists."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

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


def test_a_gated_session_runs_at_most_its_concurrency_at_once():
    import threading
    import time

    from common.onnx_session import GatedSession

    class Recorder:
        """Stands for an InferenceSession: records how many runs overlap."""

        def __init__(self):
            self.now = self.most = 0
            self.lock = threading.Lock()

        def run(self, outputs, feeds):
            with self.lock:
                self.now += 1
                self.most = max(self.most, self.now)
            time.sleep(0.02)
            with self.lock:
                self.now -= 1
            return [feeds["x"]]

        def get_providers(self):
            return ["CPUExecutionProvider"]

    for concurrency in (1, 2):
        recorder = Recorder()
        session = GatedSession(recorder, concurrency)
        threads = [threading.Thread(target=session.run, args=(None, {"x": i})) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert recorder.most == concurrency
        assert session.get_providers() == ["CPUExecutionProvider"]  # the rest is the session's


@pytest.fixture
def add_one(tmp_path):
    """A one-node model, y = x + 1 on (N, 3) float32: sessions open in milliseconds."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        "add_one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    path = tmp_path / "add_one.onnx"
    onnx.save(model, str(path))
    return path


def test_a_provider_with_options_runs(add_one, tmp_path):
    folder = tmp_path / "arena" / "nested"
    session = create_session(add_one, [("CPUExecutionProvider", {"dump_path": str(folder)})], concurrency=2)
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert folder.is_dir()  # a `_path` option's folder exists before the session opens
    (y,) = session.run(None, {"x": np.zeros((2, 3), np.float32)})
    np.testing.assert_array_equal(y, np.ones((2, 3), np.float32))


def test_tensorrt_options_where_tensorrt_cannot_start_fall_back_to_the_next_choice(add_one, tmp_path, monkeypatch):
    # a model config's TensorRT options on a machine where onnxruntime lists TensorRT but cannot start it
    listed = ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: listed)
    engines = tmp_path / "1" / "trt_engines"
    options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(engines), "trt_fp16_enable": True}
    session = create_session(add_one, [("TensorrtExecutionProvider", options), "CPUExecutionProvider"])
    assert session.get_providers()[0] == "CPUExecutionProvider"
    assert engines.is_dir()


def test_providers_that_are_not_listed_are_skipped(add_one, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    session = create_session(add_one, [("CUDAExecutionProvider", {"device_id": 0}), ("CPUExecutionProvider", {})])
    assert session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match="no execution provider could start"):
        create_session(add_one, ["CUDAExecutionProvider"])
