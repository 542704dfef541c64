"""The signature service's models, served from a model repository: a real server on loopback over a
temporary repository (the real model files linked or copied as versions 1, 2, ...). Hot swaps of
the deep model under continuous load (a corrupt and a wrong-dimension version refused while the
old one serves), a codebook swap, dynamic batching across concurrent calls (the vectors of calls
made one at a time), and a server process whose first calls are already warm."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from common.batching import BatchPolicy
from common.bow_codec import decode
from common.config import MODELS_DIR, REPO_ROOT, load_config
from common.proto_convert import image_to_proto
from mps.common.v1 import common_pb2, models_pb2
from mps.signature.v1 import signature_pb2, signature_pb2_grpc
from signature_server.config import SignatureConfig, latest_source
from signature_server.deep import DeepDescriptor
from tests.helpers import free_port, tiles, wait_serving

DEEP, BOW, BLCF = "efficientnet-lite0", "colour-texture-bow", "blcf"
KIND_DEEP, KIND_BOW, KIND_BLCF = (
    common_pb2.SIGNATURE_KIND_DEEP,
    common_pb2.SIGNATURE_KIND_BOW,
    common_pb2.SIGNATURE_KIND_BLCF,
)
READY, FAILED = models_pb2.MODEL_STATE_READY, models_pb2.MODEL_STATE_FAILED


def add_version(root: Path, name: str, version: str, files: Mapping[str, Path | bytes]) -> None:
    """models/<name>/<version>/ with each file a link to a real one, or the bytes given."""
    folder = root / name / version
    folder.mkdir(parents=True)
    for filename, content in files.items():
        if isinstance(content, Path):
            (folder / filename).symlink_to(content)
        else:
            (folder / filename).write_bytes(content)


DEEP_FILES = {"model.onnx": MODELS_DIR / DEEP / "1" / "model.onnx"}
BOW_FILES = {name: MODELS_DIR / BOW / "1" / name for name in ("codebook.npz", "provenance.json")}
BLCF_FILES = {name: MODELS_DIR / BLCF / "1" / name for name in ("vocabulary.npz", "provenance.json", "config.json")}


def wrong_dimension_model() -> bytes:
    """A valid ONNX graph with the descriptor's input and outputs whose embedding is 3-d (the
    channel means), not the 1280-d the config says."""
    from onnx import TensorProto, helper

    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "height", "width"])
    outputs = [
        helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 3]),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3]),
        helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 3, "height", "width"]),
    ]
    nodes = [
        helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["embedding"]),
        helper.make_node("Identity", ["embedding"], ["logits"]),
        helper.make_node("Identity", ["images"], ["features"]),
    ]
    graph = helper.make_graph(nodes, "wrong-dimension", [images], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


@pytest.fixture
def repository(tmp_path) -> Path:
    """A model repository with version 1 of each model (the real files, linked). The deep model's
    batches are at most 8 here and LocateObjects looks at smaller copies, so that each of the many
    warm-ups below stays short."""
    root = tmp_path / "models"
    for name in (DEEP, BOW, BLCF):
        (root / name).mkdir(parents=True)
    config = json.loads((MODELS_DIR / DEEP / "config.json").read_text())
    config["max_batch"] = 8
    config["dynamic_batching"] = {"max_queue_delay_ms": 5, "preferred_batch_sizes": [4, 8]}
    config["locate"].update(feature_long_side=320, segment_long_side=128)
    (root / DEEP / "config.json").write_text(json.dumps(config))
    # One version served at a time, as the swaps below expect (the real model serves its last two).
    bow_config = json.loads((MODELS_DIR / BOW / "config.json").read_text())
    bow_config["version_policy"] = {"latest": 1}
    (root / BOW / "config.json").write_text(json.dumps(bow_config))
    (root / BLCF / "config.json").symlink_to(MODELS_DIR / BLCF / "config.json")
    add_version(root, DEEP, "1", DEEP_FILES)
    add_version(root, BOW, "1", BOW_FILES)
    add_version(root, BLCF, "1", BLCF_FILES)
    return root


@dataclass
class Served:
    stub: signature_pb2_grpc.SignatureServiceStub
    root: Path


@contextlib.contextmanager
def serving(root: Path, **overrides) -> Iterator[Served]:
    from signature_server.server import create_server

    config = load_config(
        SignatureConfig,
        "signature",
        environ={},
        port=0,
        models_dir=str(root),
        kernels="cpu",
        intra_op_threads=2,
        **overrides,
    )
    server, port = create_server(config)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Served(signature_pb2_grpc.SignatureServiceStub(channel), root)
    finally:
        channel.close()
        server.stop(None)


def rows(stub, name: str) -> dict[str, models_pb2.ModelStatus]:
    """The model's versions by version (a draining copy of a version comes before its new one)."""
    listed = stub.ListModels(signature_pb2.ListModelsRequest(), timeout=10).models
    return {row.version: row for row in listed if row.name == name}


def default_version(stub, name: str) -> str:
    (version,) = [v for v, row in rows(stub, name).items() if row.is_default and row.state == READY]
    return version


def load(stub, name: str, version: str) -> tuple[grpc.StatusCode, str]:
    try:
        stub.LoadModel(signature_pb2.LoadModelRequest(name=name, version=version), timeout=120)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


@dataclass
class Outcome:
    started: float
    ended: float
    code: grpc.StatusCode
    deep_version: str = ""
    bow_version: str = ""


def test_ten_deep_model_swaps_under_load_fail_no_request_and_refuse_broken_versions(repository, coffee):
    request = signature_pb2.ComputeSignaturesRequest(
        images=[image_to_proto(coffee[40:200, 100:300])], kinds=[KIND_DEEP, KIND_BOW]
    )
    with serving(repository) as served:
        stub = served.stub
        # Versions added once the server runs: the version policy (latest 1) would pick 4 at start.
        add_version(repository, DEEP, "2", DEEP_FILES)
        add_version(repository, DEEP, "3", {"model.onnx": b"\x08\x07corrupt" * 1000})
        add_version(repository, DEEP, "4", {"model.onnx": wrong_dimension_model()})
        outcomes: list[Outcome] = []
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    response = stub.ComputeSignatures(request, timeout=60)
                except grpc.RpcError as error:
                    outcomes.append(Outcome(started, time.monotonic(), error.code()))
                    continue
                deep, bow = response.served_by
                # A version of another model would show as a failure below.
                code = grpc.StatusCode.OK if (deep.name, bow.name) == (DEEP, BOW) else grpc.StatusCode.UNKNOWN
                outcomes.append(Outcome(started, time.monotonic(), code, deep.version, bow.version))

        clients = [threading.Thread(target=client) for _ in range(2)]
        for thread in clients:
            thread.start()
        plan = ["2", "1", "3", "2", "4", "1", "3", "2", "1", "2"]
        # (version asked, when the call began, when it returned, status, the default afterwards)
        swaps: list[tuple[str, float, float, grpc.StatusCode, str]] = []
        try:
            for version in plan:
                before = default_version(stub, DEEP)
                began = time.monotonic()
                code, details = load(stub, DEEP, version)
                returned = time.monotonic()
                serving_now = default_version(stub, DEEP)
                swaps.append((version, began, returned, code, serving_now))
                if version == "3":
                    assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, details)
                    assert "version 3 cannot be loaded" in details, details
                    assert rows(stub, DEEP)["3"].state == FAILED and rows(stub, DEEP)["3"].reason
                elif version == "4":
                    assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, details)
                    assert "3-d embeddings" in details and "dimension 1280" in details, details
                    assert rows(stub, DEEP)["4"].state == FAILED and "dimension" in rows(stub, DEEP)["4"].reason
                else:
                    assert code == grpc.StatusCode.OK, (code, details)
                    assert serving_now == version
                if code != grpc.StatusCode.OK:  # the old one keeps serving
                    assert f"version {before} keeps serving" in details and serving_now == before, details
                # Let some requests run on what serves now before the next swap.
                deadline = time.monotonic() + 10
                while len([o for o in outcomes if o.started > returned]) < 2:
                    assert time.monotonic() < deadline, "no request completed after a swap"
                    time.sleep(0.02)
        finally:
            stopped = time.monotonic()
            stop.set()
            for thread in clients:
                thread.join()
        assert outcomes and all(o.code == grpc.StatusCode.OK for o in outcomes), {o.code for o in outcomes}
        assert {o.deep_version for o in outcomes} <= {"1", "2"} and {o.bow_version for o in outcomes} == {"1"}
        # Requests were in flight while versions were swapped in.
        loads = [(began, returned) for _, began, returned, code, _ in swaps if code == grpc.StatusCode.OK]
        assert any(o.started < returned and o.ended > began for o in outcomes for began, returned in loads)
        # A request made wholly between two swaps is served by the version the first left serving.
        next_swaps = [began for _, began, _, _, _ in swaps[1:]] + [stopped]
        for (_, _, returned, _, serving_now), next_began in zip(swaps, next_swaps):
            window = [o for o in outcomes if returned <= o.started and o.ended <= next_began]
            assert window and {o.deep_version for o in window} == {serving_now}
        listed = rows(stub, DEEP)
        assert listed["2"].state == READY and listed["2"].is_default and listed["2"].execution_provider
        assert listed["3"].state == FAILED and listed["4"].state == FAILED
        assert listed["1"].state in (models_pb2.MODEL_STATE_DRAINING, models_pb2.MODEL_STATE_UNLOADED)


def test_a_codebook_swap_serves_the_new_version_and_unload_and_reload_the_kind(repository, coffee):
    crop = image_to_proto(coffee[40:260, 100:400])
    bow_request = signature_pb2.ComputeSignaturesRequest(images=[crop], kind=KIND_BOW)
    with serving(repository) as served:
        stub = served.stub
        before = stub.ComputeSignatures(bow_request, timeout=30)
        assert [(m.name, m.version) for m in before.served_by] == [(BOW, "1")]
        # Version 2: a copy of the same codebook; version 3: another vocabulary (centres moved).
        add_version(repository, BOW, "2", {name: path.read_bytes() for name, path in BOW_FILES.items()})
        with np.load(MODELS_DIR / BOW / "1" / "codebook.npz") as archive:
            moved = np.roll(archive["centres_u8"], 1, axis=0)
        add_version(repository, BOW, "3", {})
        np.savez_compressed(repository / BOW / "3" / "codebook.npz", centres_u8=moved)

        assert load(stub, BOW, "2") == (grpc.StatusCode.OK, "")
        after = stub.ComputeSignatures(bow_request, timeout=30)
        assert [(m.name, m.version) for m in after.served_by] == [(BOW, "2")]
        assert after.signatures[0].bow == before.signatures[0].bow  # the same codebook, the same words
        kinds = stub.ListKinds(signature_pb2.ListKindsRequest(), timeout=10).kinds
        assert kinds[1].model.startswith(f"{BOW} v2 (codebook ")
        # Version 1 was replaced: naming it is NOT_FOUND, naming what serves now answers.
        with pytest.raises(grpc.RpcError) as error:
            stub.ComputeSignatures(
                signature_pb2.ComputeSignaturesRequest(
                    images=[crop], kind=KIND_BOW, models=[models_pb2.ModelRef(name=BOW, version="1")]
                ),
                timeout=30,
            )
        assert error.value.code() == grpc.StatusCode.NOT_FOUND and "'1'" in (error.value.details() or "")

        # Another vocabulary: its signatures carry another fingerprint (indexes of the old refuse them).
        assert load(stub, BOW, "3") == (grpc.StatusCode.OK, "")
        other = stub.ComputeSignatures(bow_request, timeout=30)
        assert decode(other.signatures[0].bow).codebook != decode(before.signatures[0].bow).codebook

        # The colour-texture model unloaded: its kind is refused and not listed; the deep one serves on.
        stub.UnloadModel(signature_pb2.UnloadModelRequest(name=BOW), timeout=30)
        with pytest.raises(grpc.RpcError) as error:
            stub.ComputeSignatures(bow_request, timeout=30)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "LoadModel" in (
            error.value.details() or ""
        )
        kinds = stub.ListKinds(signature_pb2.ListKindsRequest(), timeout=10).kinds
        assert [k.kind for k in kinds] == [KIND_DEEP, KIND_BLCF]
        # The deep model serves LocateObjects too: its last version stays.
        with pytest.raises(grpc.RpcError) as error:
            stub.UnloadModel(signature_pb2.UnloadModelRequest(name=DEEP), timeout=30)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # Loaded again by its version policy (the latest on disk).
        assert load(stub, BOW, "") == (grpc.StatusCode.OK, "")
        assert stub.ComputeSignatures(bow_request, timeout=30).served_by[0].version == "3"


def test_dynamic_batches_across_concurrent_calls_give_the_vectors_of_one_call_at_a_time(deep_descriptor):
    images = tiles("chelsea", 3) + tiles("astronaut", 2)  # 13 distinct crops
    calls = [images[i : i + 2] for i in range(0, 12, 2)] + [images[12:]]
    batched = DeepDescriptor(
        deep_descriptor.spec, BatchPolicy(8, enabled=True, max_queue_delay_ms=200), intra_op_threads=2
    )
    try:
        results: list[np.ndarray | None] = [None] * len(calls)
        together = threading.Barrier(len(calls))

        def call(i: int) -> None:
            together.wait()
            results[i] = batched.compute(calls[i])

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(calls))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # Calls of 1-2 images shared forward passes: fewer passes than calls, one of more than 2 images.
        assert sum(batched.batch_sizes.values()) < len(calls) and max(batched.batch_sizes) > 2, batched.batch_sizes
        for i, vectors in enumerate(results):
            assert vectors is not None
            alone = np.stack([deep_descriptor.compute([image])[0] for image in calls[i]])
            np.testing.assert_allclose(vectors, alone, atol=1e-5)
    finally:
        batched.close()


def test_without_dynamic_batching_each_call_runs_alone_whatever_the_config(repository, deep_descriptor):
    """The benchmark's "without" arm (dynamic_batching false): the config asks for batching, each
    call still runs its own images in one forward pass (chunks of max_batch)."""
    source = latest_source(repository / DEEP)
    assert source.batching.enabled
    alone = DeepDescriptor.from_source(source, intra_op_threads=2, dynamic_batching=False)
    try:
        assert not alone.policy.enabled and alone.max_batch == 8
        images = tiles("coffee", 3) + tiles("chelsea", 1)  # 10 images: a pass of 8, then one of 2
        vectors, largest = alone.compute_batched(images)
        assert largest == 8 and alone.batch_sizes == {8: 1, 2: 1}
        np.testing.assert_allclose(vectors, deep_descriptor.compute(images), atol=1e-5)
    finally:
        alone.close()


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def test_the_first_calls_after_the_server_says_serving_are_warm(tmp_path, coffee):
    """A fresh process with an empty numba cache (so nothing compiled is left from other runs): its
    first colour-texture, deep and BLCF calls take about what later ones take."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "signature_server", "--port", str(port), "--kernels", "cpu"]
        + ["--intra-op-threads", "2", "--access-log", "false", "--log-format", "text"],
        cwd=REPO_ROOT,
        env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache"), "PYTHONUNBUFFERED": "1"},
    )
    try:
        address = f"127.0.0.1:{port}"
        wait_serving(address, process, timeout_s=120)
        with grpc.insecure_channel(address) as channel:
            stub = signature_pb2_grpc.SignatureServiceStub(channel)
            stub.ListKinds(signature_pb2.ListKindsRequest(), timeout=10)  # connected; nothing computed
            for kind in (KIND_BOW, KIND_DEEP, KIND_BLCF):
                request = signature_pb2.ComputeSignaturesRequest(
                    images=[image_to_proto(coffee[40:300, 100:450])], kind=kind
                )
                sign = functools.partial(stub.ComputeSignatures, request, timeout=60)
                first = timed(sign)
                warm = float(np.median([timed(sign) for _ in range(3)]))
                # Generous: a cold call (numba compiling, ONNX Runtime's first run) takes seconds.
                assert first < 3 * warm + 0.15, (common_pb2.SignatureKind.Name(kind), first, warm)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def test_a_corrupt_blcf_vocabulary_is_refused_and_the_old_version_keeps_serving(repository, coffee):
    """A vocabulary swap: a corrupt file or one edited after training (its provenance no longer
    matches) is FAILED_PRECONDITION and the serving version answers as before; a sound new
    vocabulary serves its own fingerprint."""
    from common.blcf_codec import decode as decode_blcf

    blcf_request = signature_pb2.ComputeSignaturesRequest(images=[image_to_proto(coffee)], kind=KIND_BLCF)
    with serving(repository) as served:
        stub = served.stub
        before = stub.ComputeSignatures(blcf_request, timeout=30)
        assert [(m.name, m.version) for m in before.served_by] == [(BLCF, "1")]
        add_version(repository, BLCF, "2", {**BLCF_FILES, "vocabulary.npz": b"PK\x03\x04 corrupt" * 100})
        with np.load(MODELS_DIR / BLCF / "1" / "vocabulary.npz") as archive:
            arrays = {name: archive[name] for name in archive.files}
        add_version(repository, BLCF, "3", {"provenance.json": BLCF_FILES["provenance.json"]})
        (repository / BLCF / "3" / "config.json").symlink_to(BLCF_FILES["config.json"])
        np.savez_compressed(
            repository / BLCF / "3" / "vocabulary.npz", **(arrays | {"centres": np.roll(arrays["centres"], 1, axis=0)})
        )
        add_version(repository, BLCF, "4", {"config.json": BLCF_FILES["config.json"]})
        np.savez_compressed(
            repository / BLCF / "4" / "vocabulary.npz", **(arrays | {"centres": np.roll(arrays["centres"], 1, axis=0)})
        )
        for version, says in [("2", "cannot be read as a vocabulary"), ("3", "changed after training")]:
            code, details = load(stub, BLCF, version)
            assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, details)
            assert f"version {version} cannot be loaded" in details and says in details, details
            assert "version 1 keeps serving" in details, details
            assert rows(stub, BLCF)[version].state == FAILED and default_version(stub, BLCF) == "1"
            after = stub.ComputeSignatures(blcf_request, timeout=30)
            assert after.signatures == before.signatures and after.served_by == before.served_by
        # Version 4 (moved centres, no provenance to contradict them): another vocabulary, served.
        assert load(stub, BLCF, "4") == (grpc.StatusCode.OK, "")
        other = stub.ComputeSignatures(blcf_request, timeout=30)
        assert [(m.name, m.version) for m in other.served_by] == [(BLCF, "4")]
        assert decode_blcf(other.signatures[0].blcf).fingerprint != decode_blcf(before.signatures[0].blcf).fingerprint
        kinds = stub.ListKinds(signature_pb2.ListKindsRequest(), timeout=10).kinds
        assert [k.kind for k in kinds] == [KIND_DEEP, KIND_BOW, KIND_BLCF] and kinds[2].model.startswith("blcf v4 ")
