"""The detector on a model repository, over loopback: versions hot-swapped under load (a corrupt
version and one whose classes do not fit are refused, and no request fails), dynamic batching that
answers as calls made alone do, the control calls' refusals, and a warm first request."""

from __future__ import annotations

import contextlib
import json
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.config import MODELS_DIR, load_config
from common.images import encode_png
from common.model_repository import ModelRepository
from common.photos import load_photo
from common.proto_convert import image_to_proto
from detector_server.config import DetectorConfig
from detector_server.model import DetectorModel
from detector_server.server import start_detector
from mps.common.v1 import common_pb2, models_pb2
from mps.detector.v1 import detector_pb2, detector_pb2_grpc

NAME = "yolov3-tiny"
REAL = MODELS_DIR / NAME
OK, INVALID, NOT_FOUND, PRECONDITION = (
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
)
# What each broken version's refusal says.
SAYS = {
    "corrupt": "model.onnx cannot be opened by ONNX Runtime",
    "misfit": "the classes file does not fit the model",
}
# A small batch limit keeps each load's warm-up short on two cores.
SMALL_BATCHES = {"max_batch": 4, "dynamic_batching": {"max_queue_delay_ms": 2, "preferred_batch_sizes": [4]}}


def make_repository(root: Path, versions: dict[str, str], name: str = NAME, **settings: Any) -> Path:
    """root/<name>/: the real model's config.json updated with `settings`, and one folder per
    version: "good" (the real model file, linked), "corrupt" (the model file cut to a third) or
    "misfit" (a classes file with one class more than the model has)."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(json.loads((REAL / "config.json").read_text()) | settings))
    real_model, classes = REAL / "1" / "model.onnx", (REAL / "1" / "classes.txt").read_text()
    for version, kind in versions.items():
        (folder / version).mkdir()
        if kind == "corrupt":
            data = real_model.read_bytes()
            (folder / version / "model.onnx").write_bytes(data[: len(data) // 3])
        else:
            (folder / version / "model.onnx").symlink_to(real_model)
        (folder / version / "classes.txt").write_text(
            classes.rstrip("\n") + "\nunicorn\n" if kind == "misfit" else classes
        )
    return root


class Served(NamedTuple):
    stub: detector_pb2_grpc.DetectorServiceStub
    repository: ModelRepository[DetectorModel]
    channel: grpc.Channel


@contextlib.contextmanager
def serving(models_dir: Path, **overrides: Any) -> Iterator[Served]:
    """A detector server on the repository at `models_dir`: a stub on it, its repository, the channel."""
    settings: dict[str, Any] = {"port": 0, "intra_op_threads": 1, "models_dir": str(models_dir)} | overrides
    config = load_config(DetectorConfig, "detector", environ={}, **settings)
    bundle, repository = start_detector(config)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{bundle.port}") as channel:
            yield Served(detector_pb2_grpc.DetectorServiceStub(channel), repository, channel)
    finally:
        bundle.server.stop(None)
        repository.close()


def load_model(stub: detector_pb2_grpc.DetectorServiceStub, name: str, version: str) -> Any:
    return stub.LoadModel(detector_pb2.LoadModelRequest(name=name, version=version), timeout=60)


def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return OK, ""


def listed(stub: detector_pb2_grpc.DetectorServiceStub) -> dict[tuple[str, str], detector_pb2.ModelInfo]:
    """ListModels by (name, version); a version shown twice (reloaded while its old copy drains)
    keeps its READY row."""
    rows: dict[tuple[str, str], detector_pb2.ModelInfo] = {}
    for info in stub.ListModels(detector_pb2.ListModelsRequest(), timeout=10).models:
        if info.state == models_pb2.MODEL_STATE_READY or (info.name, info.version) not in rows:
            rows[info.name, info.version] = info
    return rows


@pytest.fixture(scope="module")
def coffee_raw() -> common_pb2.Image:
    return image_to_proto(load_photo("coffee"))


def follows(observed: list[str], sequence: list[str]) -> bool:
    """Whether `observed` (one client's versions, in order) walks `sequence` (the versions that
    served, in the order they were swapped in) forwards: no request went back to a replaced one."""
    position = 0
    for version in observed:
        while position < len(sequence) and sequence[position] != version:
            position += 1
        if position == len(sequence):
            return False
    return True


def test_ten_swaps_under_load_fail_no_request(tmp_path, coffee_raw):
    kinds = {"1": "corrupt", "2": "misfit", "3": "good", "4": "good", "5": "good"}
    swaps = ["3", "4", "1", "5", "2", "3", "4", "5", "3", "4"]
    root = make_repository(tmp_path, kinds, **SMALL_BATCHES)
    with serving(root) as (stub, repository, _):
        served = ["5"]  # the policy (latest 1) serves the highest version on disk from the start
        observed: list[list[str]] = [[], []]
        errors: list[str] = []
        stop = threading.Event()

        def client(seen: list[str]) -> None:
            while not stop.is_set():
                try:
                    response = stub.Detect(detector_pb2.DetectRequest(image=coffee_raw, model=NAME), timeout=60)
                except grpc.RpcError as error:
                    errors.append(f"{error.code().name}: {error.details()}")
                    continue
                assert response.detections[0].class_name == "cup"
                seen.append(response.model_version)

        clients = [threading.Thread(target=client, args=(seen,)) for seen in observed]
        for thread in clients:
            thread.start()
        try:
            for version in swaps:
                before = sum(map(len, observed))
                code, details = code_of(partial(load_model, stub, NAME, version))
                if kinds[version] == "good":
                    assert code == OK, details
                    served.append(version)
                    default = [info for info in listed(stub).values() if info.is_default]
                    assert [(d.version, d.state) for d in default] == [(version, models_pb2.MODEL_STATE_READY)]
                else:
                    assert code == PRECONDITION, details
                    assert SAYS[kinds[version]] in details and f"version {served[-1]} keeps serving" in details
                    row = listed(stub)[NAME, version]
                    assert row.state == models_pb2.MODEL_STATE_FAILED and SAYS[kinds[version]] in row.reason
                    again = stub.Detect(detector_pb2.DetectRequest(image=coffee_raw), timeout=60)
                    assert again.model_version == served[-1]  # the old version keeps serving
                deadline = time.monotonic() + 10
                while sum(map(len, observed)) < before + 2 and time.monotonic() < deadline:
                    time.sleep(0.01)  # requests on this version, while the previous one drains
        finally:
            stop.set()
            for thread in clients:
                thread.join()
        assert not errors, errors[:5]
        assert all(seen for seen in observed)
        assert {v for seen in observed for v in seen} <= set(served)
        assert all(follows(seen, served) for seen in observed), (observed, served)
        assert len({v for seen in observed for v in seen}) >= 3  # the clients saw the swaps
        assert repository.wait_drained(30)
        states = {version: info.state for (_, version), info in listed(stub).items()}
        assert states == {
            "1": models_pb2.MODEL_STATE_FAILED,
            "2": models_pb2.MODEL_STATE_FAILED,
            "3": models_pb2.MODEL_STATE_UNLOADED,
            "4": models_pb2.MODEL_STATE_READY,
            "5": models_pb2.MODEL_STATE_UNLOADED,
        }


def test_concurrent_calls_share_batches_and_answer_as_alone(tmp_path):
    """Four calls at once leave as one batch of the preferred size 4; each answer is the one the
    same image gets on a server without batching."""
    batching = {"max_batch": 4, "dynamic_batching": {"max_queue_delay_ms": 1000, "preferred_batch_sizes": [4]}}
    root = make_repository(tmp_path, {"1": "good"}, **batching)
    images = [image_to_proto(load_photo(name)) for name in ("coffee", "chelsea", "astronaut", "motorcycle_right")]
    with serving(root) as (batched, _, _), serving(root, dynamic_batching=False) as (alone, _, _):
        start = threading.Barrier(len(images))

        def detect(image: common_pb2.Image) -> detector_pb2.DetectResponse:
            start.wait()
            request = detector_pb2.DetectRequest(image=image, min_confidence=0.05, objectness_threshold=0.05)
            return batched.Detect(request, timeout=60)

        with ThreadPoolExecutor(len(images)) as pool:
            together = list(pool.map(detect, images))
        singly = [
            alone.Detect(
                detector_pb2.DetectRequest(image=image, min_confidence=0.05, objectness_threshold=0.05), timeout=60
            )
            for image in images
        ]
    assert [r.batch_size for r in together] == [4] * 4
    assert [r.batch_size for r in singly] == [1] * 4
    assert sum(len(r.detections) for r in together) > 5 and all(r.objects for r in together)
    for shared, single in zip(together, singly):
        assert list(shared.detections) == list(single.detections)
        assert list(shared.objects) == list(single.objects)


def test_control_calls_refuse_what_they_cannot_do(tmp_path, coffee_raw):
    """Versions 1 and 2 of the default model serve (policy "all"), and another model folder beside."""
    root = make_repository(tmp_path, {"1": "good", "2": "good"}, version_policy={"all": {}}, **SMALL_BATCHES)
    make_repository(tmp_path, {"1": "good"}, name="other", **SMALL_BATCHES)

    with serving(root) as (stub, repository, _):

        def detect(**fields: Any) -> Any:
            return lambda: stub.Detect(detector_pb2.DetectRequest(image=coffee_raw, **fields), timeout=60)

        def load(name: str, version: str = "") -> Any:
            return lambda: load_model(stub, name, version)

        def unload(name: str, version: str = "") -> Any:
            return lambda: stub.UnloadModel(detector_pb2.UnloadModelRequest(name=name, version=version), timeout=60)

        assert stub.Detect(detector_pb2.DetectRequest(image=coffee_raw), timeout=60).model_version == "2"
        assert (
            stub.Detect(detector_pb2.DetectRequest(image=coffee_raw, model_version="1"), timeout=60).model_version
            == "1"
        )
        cases = [
            (detect(model_version="9"), NOT_FOUND, "version '9' of model 'yolov3-tiny' is not loaded"),
            (detect(model_version="v1"), INVALID, "model_version 'v1' is not a version: send a positive integer"),
            (detect(model_version="0"), INVALID, "model_version '0' is not a version"),
            (detect(model="other"), NOT_FOUND, "model 'other' is not served here"),
            (load("rfcn"), NOT_FOUND, "model 'rfcn' has no folder with a config.json"),
            (load(NAME, "9"), NOT_FOUND, "has no version '9' on disk: its versions are ['1', '2']"),
            (load(NAME, "-1"), INVALID, "version '-1' is not a version"),
            (load(NAME, "1.0"), INVALID, "version '1.0' is not a version"),
            (load(NAME, "\u0663"), INVALID, "is not a version"),  # an Arabic-Indic three: a digit, not ASCII
            (load("../" + NAME), INVALID, "no '/'"),
            (load(""), INVALID, "model is required"),
            (unload("rfcn"), NOT_FOUND, "model 'rfcn' has no version loaded"),
            (unload(NAME, "9"), NOT_FOUND, "version '9' of model 'yolov3-tiny' is not loaded: loaded are ['1', '2']"),
            (unload(NAME, "x"), INVALID, "version 'x' is not a version"),
            (unload(NAME), PRECONDITION, "this server's default: it keeps at least one version"),
        ]
        for call, code, says in cases:
            got, details = code_of(call)
            assert (got, says) == (code, says) and says in details, details
        assert listed(stub)[NAME, "2"].state == models_pb2.MODEL_STATE_READY  # the refusals changed nothing

        # One version of several may go; the default falls back to the other; the last one stays.
        unloaded = stub.UnloadModel(detector_pb2.UnloadModelRequest(name=NAME, version="2"), timeout=60)
        assert {m.version: m.state for m in unloaded.models}["2"] in (
            models_pb2.MODEL_STATE_DRAINING,
            models_pb2.MODEL_STATE_UNLOADED,
        )
        assert stub.Detect(detector_pb2.DetectRequest(image=coffee_raw), timeout=60).model_version == "1"
        code, details = code_of(unload(NAME, "1"))
        assert code == PRECONDITION and "this server's default" in details

        # Another folder of the repository loads beside the default model, serves, and goes.
        loaded = stub.LoadModel(detector_pb2.LoadModelRequest(name="other"), timeout=60)
        [info] = loaded.models
        assert (info.version, info.state, len(info.class_names)) == ("1", models_pb2.MODEL_STATE_READY, 80)
        assert not info.is_default or info.name == "other"
        response = stub.Detect(detector_pb2.DetectRequest(image=coffee_raw, model="other"), timeout=60)
        assert (response.model, response.model_version) == ("other", "1")
        stub.UnloadModel(detector_pb2.UnloadModelRequest(name="other"), timeout=60)
        assert repository.wait_drained(30)
        rows = listed(stub)
        assert rows["other", "1"].state == models_pb2.MODEL_STATE_UNLOADED and not rows["other", "1"].class_names
        assert rows[NAME, "1"].is_default and rows[NAME, "1"].class_names


def output_of_the_wrong_width(path: Path, width: int) -> None:
    """Writes a small ONNX graph at `path` that takes `images` (N, 3, 416, 416) and returns
    `detections` (N, 2, width), the width found by NonZero at run time: the graph's declared
    output shape cannot say it, only running it shows it."""
    from onnx import TensorProto, helper, save

    constants = [
        helper.make_tensor("ones", TensorProto.FLOAT, [width], [1.0] * width),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("axis_0", TensorProto.INT64, [1], [0]),
        helper.make_tensor("axis_3", TensorProto.INT64, [1], [3]),
        helper.make_tensor("two_boxes", TensorProto.INT64, [3], [1, 2, 1]),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], axes=[1, 2, 3], keepdims=1),  # (N, 1, 1, 1)
        helper.make_node("Squeeze", ["mean", "axis_3"], ["column"]),  # (N, 1, 1)
        helper.make_node("NonZero", ["ones"], ["found"]),  # (1, width), width unknown until run
        helper.make_node("Cast", ["found"], ["found_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["found_float", "zero"], ["zeros"]),
        helper.make_node("Unsqueeze", ["zeros", "axis_0"], ["row"]),  # (1, 1, width)
        helper.make_node("Add", ["column", "row"], ["one_box"]),  # (N, 1, width)
        helper.make_node("Expand", ["one_box", "two_boxes"], ["detections"]),  # (N, 2, width)
    ]
    graph = helper.make_graph(
        nodes,
        "output-width-known-at-run-time",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 416, 416])],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT, ["batch", "boxes", "width"])],
        initializer=constants,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    save(model, str(path))


def test_a_version_whose_output_does_not_fit_fails_its_warm_up(tmp_path, coffee_raw):
    """Version 2 declares a symbolic output shape, so it opens: the warm-up's inference finds 84
    values per box where 80 classes need 85, and the load is refused. Version 3, the same graph
    with 85, loads."""
    root = make_repository(tmp_path, {"1": "good", "2": "good", "3": "good"}, **SMALL_BATCHES)
    for version, width in (("2", 84), ("3", 85)):
        (root / NAME / version / "model.onnx").unlink()
        output_of_the_wrong_width(root / NAME / version / "model.onnx", width)
    (root / NAME / "config.json").write_text(
        json.dumps(json.loads((root / NAME / "config.json").read_text()) | {"version_policy": {"specific": ["1"]}})
    )
    with serving(root) as (stub, _, _):
        code, details = code_of(partial(load_model, stub, NAME, "2"))
        assert code == PRECONDITION and "returned detections of shape (1, 2, 84) for a batch of 1" in details, details
        assert "expected (1, boxes, 85)" in details and "version 1 keeps serving" in details
        assert stub.Detect(detector_pb2.DetectRequest(image=coffee_raw), timeout=60).model_version == "1"
        assert listed(stub)[NAME, "2"].state == models_pb2.MODEL_STATE_FAILED
        code, details = code_of(partial(load_model, stub, NAME, "3"))
        assert code == OK, details


def test_the_first_detect_after_start_is_warm(tmp_path):
    """The model is warmed before health says SERVING: the first Detect is not a cold one."""
    root = make_repository(tmp_path, {"1": "good"})
    image = common_pb2.Image(encoded=encode_png(load_photo("coffee")))
    with serving(root) as (stub, _, channel):
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        times = []
        for _ in range(6):
            started = time.perf_counter()
            stub.Detect(detector_pb2.DetectRequest(image=image), timeout=60)
            times.append(time.perf_counter() - started)
    cold, warm = times[0], statistics.median(times[1:])
    assert cold < 3 * warm, (cold, warm)
