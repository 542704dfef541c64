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
