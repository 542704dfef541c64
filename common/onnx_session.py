"""ONNX Runtime sessions on the best execution provider that really starts: TensorRT > CUDA > CPU.

onnxruntime-gpu lists CUDA and TensorRT providers even where they cannot start (no driver, no
libnvinfer), and silently falls back to CPU; so each candidate is tried alone and kept only if
the created session reports it as its first provider.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort

log = logging.getLogger(__name__)

PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class GatedSession:
    """An InferenceSession that runs at most `concurrency` inferences at a time.

    A server thread per request would otherwise run as many inferences at once as it has calls in
    flight: on a CPU each already uses every core (intra-op threads), so more at once only
    multiplies memory (each run's activations; ONNX Runtime's arena keeps the peak), measured by
    bench/load.py at 32 clients as +2 GB of signature-server RSS. Everything else is the session's.
    """

    def __init__(self, session: ort.InferenceSession, concurrency: int = 1):
        if concurrency < 1:
            raise ValueError(f"inference concurrency {concurrency} must be >= 1")
        self._session = session
        self._gate = threading.BoundedSemaphore(concurrency)

    def run(self, output_names: list[str] | None, feeds: dict[str, Any]) -> list[Any]:
        with self._gate:
            return self._session.run(output_names, feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def create_session(
    model_path: Path,
    preferred: Sequence[str | tuple[str, dict[str, Any]]] = PREFERENCE,
    intra_op_threads: int = 0,
    concurrency: int = 1,
) -> GatedSession:
    """Opens `model_path` on the first provider of `preferred` that initialises, each a name or
    (name, provider options) (e.g. TensorRT's `trt_engine_cache_enable`, `trt_engine_cache_path`,
    `trt_timing_cache_enable`, `trt_fp16_enable`; a `_path` option's folder is created); at most
    `concurrency` of its inferences run at once."""
    if not Path(model_path).is_file():
        raise FileNotFoundError(f"model file {model_path} does not exist: run `make models`")
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    available = set(ort.get_available_providers())
    errors: list[str] = []
    for choice in preferred:
        provider, provider_options = (choice, {}) if isinstance(choice, str) else choice
        if provider not in available:
            continue
        for key, value in provider_options.items():
            if key.endswith("_path") and isinstance(value, str) and value:
                Path(value).mkdir(parents=True, exist_ok=True)
        providers: list[str | tuple[str, dict[str, Any]]] = (
            [(provider, provider_options)]
            if provider == "CPUExecutionProvider"
            else [(provider, provider_options), "CPUExecutionProvider"]
        )
        try:
            session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
        except Exception as exc:  # a GPU provider that cannot start raises here on some builds
            errors.append(f"{provider}: {exc}")
            continue
        if session.get_providers()[0] == provider:
            log.info("%s runs on %s", Path(model_path).name, provider)
            return GatedSession(session, concurrency)
        errors.append(f"{provider}: session fell back to {session.get_providers()[0]}")
    raise RuntimeError(f"no execution provider could start for {model_path}: {errors}")


def active_provider(session: ort.InferenceSession | GatedSession) -> str:
    return session.get_providers()[0]
