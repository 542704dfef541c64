"""Bad input to the detector (mps.detector.v1.DetectorService), every RPC: images (empty, truncated,
random, bombs, raw sizes, thin strips), thresholds, model names, limits, malformed bytes, and the
inputs that used to break it (a 1 MiB model name echoed into the status; min_confidence 1e-30
asking for a 472 GiB NMS matrix)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cv2
import grpc
import numpy as np
import pytest

from common.images import encode_png
from common.proto_convert import image_to_proto
from mps.common.v1 import common_pb2
from mps.detector.v1 import detector_pb2
from tests.e2e.bad_input.harness import Case, Stubs, case_id, expecting, rpc_name
from tests.helpers import png_bomb

DETECT, LIST_MODELS, LOAD_MODEL, UNLOAD_MODEL = (
    rpc_name(detector_pb2, "DetectorService", method) for method in ("Detect", "ListModels", "LoadModel", "UnloadModel")
)
INVALID, NOT_FOUND, EXHAUSTED, PRECONDITION, OK = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OK,
)
VERSION_RULE = ("is not a version", "positive integer")
NAME_RULE = ("letters, digits",)
FRACTION = ("(0, 1]",)
RNG = np.random.default_rng(7)
NOISE = RNG.integers(0, 256, (120, 160, 3), dtype=np.uint8)


def detect(
    image: common_pb2.Image | Callable[[Stubs], common_pb2.Image] | None = None,
    check: Callable[[detector_pb2.DetectResponse], None] | None = None,
    **fields: Any,
) -> Callable[[Stubs], Any]:
    """One Detect; image None = the reference photo; `check` looks at an OK answer."""

    def call(s: Stubs) -> Any:
        chosen = s.photo if image is None else image(s) if callable(image) else image
        response = s.detector.Detect(detector_pb2.DetectRequest(image=chosen, **fields), timeout=s.timeout)
        if check is not None:
            check(response)
        return response

    return call


def encoded(data: bytes) -> common_pb2.Image:
    return common_pb2.Image(encoded=data)


def raw(width: int, height: int, rgb: bytes) -> common_pb2.Image:
    return common_pb2.Image(raw=common_pb2.RawImage(width=width, height=height, rgb=rgb))


def png16(channels: int) -> common_pb2.Image:
    shape = (90, 120, 3) if channels == 3 else (90, 120)
    ok, data = cv2.imencode(".png", RNG.integers(0, 65536, shape, dtype=np.uint16))
    assert ok
    return encoded(data.tobytes())


def sized(width: int, height: int, objects_at_most: int | None = None) -> Callable[[detector_pb2.DetectResponse], None]:
    """An answer for a width x height image: the size echoed, every box inside the image."""

    def check(response: detector_pb2.DetectResponse) -> None:
        assert (response.image_width, response.image_height) == (width, height), response
        for found in list(response.detections) + list(response.objects):
            box = found.box
            assert 0 <= box.x_min < box.x_max <= width and 0 <= box.y_min < box.y_max <= height, box
        if objects_at_most is not None:
            assert len(response.objects) <= objects_at_most

    return check


def thin(width: int, height: int, as_png: bool) -> common_pb2.Image:
    pixels = RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encoded(encode_png(pixels)) if as_png else image_to_proto(pixels)


def finds_the_cup(response: detector_pb2.DetectResponse) -> None:
    assert any(d.class_name == "cup" for d in response.detections), response.detections


def served_by_version_one(response: detector_pb2.DetectResponse) -> None:
    finds_the_cup(response)
    assert (response.model, response.model_version) == ("yolov3-tiny", "1"), response.model_version


def capped_detections(response: detector_pb2.DetectResponse) -> None:
    assert len(response.detections) == 100 and response.detections[0].class_name == "cup"


def no_objects(response: detector_pb2.DetectResponse) -> None:
    assert not response.objects, "max_objects alone asks for no objects"


def capped(response: detector_pb2.DetectResponse) -> None:
    """Every (anchor, class) pair passed the threshold: the answer is still the capped best."""
    assert len(response.detections) == 100 and len(response.objects) == 200
    assert response.detections[0].class_name == "cup"


def list_models(metadata: tuple[tuple[str, str | bytes], ...] = ()) -> Callable[[Stubs], Any]:
    def call(s: Stubs) -> None:
        response = s.detector.ListModels(detector_pb2.ListModelsRequest(), timeout=s.timeout, metadata=metadata or None)
        assert [m.name for m in response.models if m.is_default] == ["yolov3-tiny"], response

    return call


def load_model(name: str, version: str = "", serving: str = "") -> Callable[[Stubs], Any]:
    """One LoadModel; `serving`: the version the default model must serve afterwards."""

    def call(s: Stubs) -> Any:
        response = s.detector.LoadModel(detector_pb2.LoadModelRequest(name=name, version=version), timeout=s.timeout)
        if serving:
            assert [m.version for m in response.models if m.is_default] == [serving], response
            detected = s.detector.Detect(detector_pb2.DetectRequest(image=s.photo), timeout=s.timeout)
            assert detected.model_version == serving and detected.batch_size >= 1, detected
        return response

    return call


def unload_model(name: str, version: str = "") -> Callable[[Stubs], Any]:
    return lambda s: s.detector.UnloadModel(
        detector_pb2.UnloadModelRequest(name=name, version=version), timeout=s.timeout
    )


def raw_bytes(method: str, data: bytes) -> Callable[[Stubs], Any]:
    return lambda s: s.channels["detector"].unary_unary(method)(data, timeout=s.timeout)


def unknown_fields(method: str, message: Any) -> Callable[[Stubs], Any]:
    """A valid message with a field this version does not know (number 99): proto3 skips it."""
    extra = bytes([0x98, 0x06, 0x01])  # field 99, varint, value 1
    return lambda s: s.channels["detector"].unary_unary(method)(
        message(s).SerializeToString() + extra, timeout=s.timeout
    )


CASES = [
    # -- Detect: images
    Case("detect-no-image", DETECT, detect(common_pb2.Image()), INVALID, ("no image given", "image.encoded")),
    Case("detect-empty-encoded", DETECT, detect(encoded(b"")), INVALID, ("image is empty", "send the encoded")),
    Case(
        "detect-truncated-jpeg",
        DETECT,
        detect(lambda s: encoded(s.photo.encoded[: len(s.photo.encoded) // 3])),
        INVALID,
        ("cannot be decoded", "send a complete"),
    ),
    Case(
        "detect-random-bytes",
        DETECT,
        detect(encoded(RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes())),
        INVALID,
        ("cannot be decoded", "jpeg, png"),
    ),
    Case(
        "detect-png-bomb",
        DETECT,
        detect(encoded(png_bomb())),
        INVALID,
        ("100000x100000", "above the limit of 50000000", "downscale"),
    ),
    Case(
        "detect-png-zero-width-header",
        DETECT,
        detect(encoded(png_bomb(0, 10))),
        INVALID,
        ("cannot be decoded", "send a complete"),
    ),
    Case(
        "detect-raw-wrong-byte-count",
        DETECT,
        detect(raw(100, 50, b"\0" * 100)),
        INVALID,
        ("needs 15000 rgb bytes", "got 100"),
    ),
    Case("detect-raw-zero-size", DETECT, detect(raw(0, 50, b"")), INVALID, ("zero size", "0x50")),
    Case(
        "detect-raw-huge-claimed-size",
        DETECT,
        detect(raw(2**32 - 1, 2**32 - 1, b"\0" * 30)),
        INVALID,
        ("above the limit of 50000000 pixels",),
    ),
    Case(
        "detect-raw-over-the-message-limit",
        DETECT,
        detect(raw(4096, 2731, b"\0" * (4096 * 2731 * 3))),
        EXHAUSTED,
        ("larger than max",),
    ),
    Case(
        "detect-thin-raw-100000x1",
        DETECT,
        detect(thin(100_000, 1, False), sized(100_000, 1), min_confidence=0.001, objectness_threshold=0.001),
        OK,
    ),
    Case(
        "detect-thin-raw-1x100000",
        DETECT,
        detect(thin(1, 100_000, False), sized(1, 100_000), min_confidence=0.001, objectness_threshold=0.001),
        OK,
    ),
    Case(
        "detect-thin-png-100000x1",
        DETECT,
        detect(thin(100_000, 1, True), sized(100_000, 1), objectness_threshold=0.001),
        OK,
    ),
    Case(
        "detect-thin-png-1x100000",
        DETECT,
        detect(thin(1, 100_000, True), sized(1, 100_000), objectness_threshold=0.001),
        OK,
    ),
    Case("detect-one-pixel", DETECT, detect(raw(1, 1, b"\x80\x80\x80"), sized(1, 1), objectness_threshold=0.01), OK),
    Case("detect-16-bit-rgb-png", DETECT, detect(png16(3), sized(120, 90)), OK),
    Case("detect-16-bit-grey-png", DETECT, detect(png16(1), sized(120, 90)), OK),
    Case(
        "detect-noise-raw",
        DETECT,
        detect(image_to_proto(NOISE), sized(160, 120, 5), objectness_threshold=0.2, max_objects=5),
        OK,
    ),
    # -- Detect: thresholds
    Case(
        "detect-min-confidence-nan",
        DETECT,
        detect(min_confidence=float("nan")),
        INVALID,
        ("min_confidence", "nan") + FRACTION,
    ),
    Case(
        "detect-min-confidence-negative",
        DETECT,
        detect(min_confidence=-0.5),
        INVALID,
        ("min_confidence -0.5",) + FRACTION,
    ),
    Case(
        "detect-min-confidence-above-one",
        DETECT,
        detect(min_confidence=1.5),
        INVALID,
        ("min_confidence 1.5",) + FRACTION,
    ),
    Case(
        "detect-min-confidence-infinite",
        DETECT,
        detect(min_confidence=float("inf")),
        INVALID,
        ("min_confidence inf",) + FRACTION,
    ),
    Case("detect-min-confidence-1e-30", DETECT, detect(check=capped_detections, min_confidence=1e-30), OK),
    Case("detect-min-confidence-3e-6", DETECT, detect(check=finds_the_cup, min_confidence=3e-6), OK),
    Case("detect-min-confidence-smallest-float", DETECT, detect(check=finds_the_cup, min_confidence=1e-45), OK),
    Case(
        "detect-everything-near-zero",
        DETECT,
        detect(check=capped, min_confidence=1e-30, objectness_threshold=1e-30, max_objects=200),
        OK,
    ),
    Case("detect-min-confidence-one", DETECT, detect(check=lambda r: None, min_confidence=1.0), OK),
    Case(
        "detect-objectness-nan",
        DETECT,
        detect(objectness_threshold=float("nan")),
        INVALID,
        ("objectness_threshold", "nan") + FRACTION,
    ),
    Case(
        "detect-objectness-above-one",
        DETECT,
        detect(objectness_threshold=2.0),
        INVALID,
        ("objectness_threshold 2",) + FRACTION,
    ),
    Case(
        "detect-objectness-negative",
        DETECT,
        detect(objectness_threshold=-1e-3),
        INVALID,
        ("objectness_threshold -0.001",) + FRACTION,
    ),
    # -- Detect: limits
    expecting(
        Case(
            "detect-max-objects-over-limit",
            DETECT,
            detect(objectness_threshold=0.1, max_objects=201),
            INVALID,
            ("max_objects 201", "ask for at most 200"),
        ),
        fields=("max_objects",),
        quota=("max_objects",),
    ),
    Case(
        "detect-max-objects-max-uint32",
        DETECT,
        detect(objectness_threshold=0.1, max_objects=2**32 - 1),
        INVALID,
        ("max_objects 4294967295", "ask for at most 200"),
    ),
    Case("detect-max-objects-without-objectness", DETECT, detect(check=no_objects, max_objects=7), OK),
    # -- Detect: model names
    Case("detect-model-1-mib", DETECT, detect(model="m" * 2**20), INVALID, ("limit of 128",) + NAME_RULE),
    Case("detect-model-nul", DETECT, detect(model="yolov3-tiny\0"), INVALID, ("u+0000",) + NAME_RULE),
    Case("detect-model-newline", DETECT, detect(model="yolo\nv3"), INVALID, ("u+000a",) + NAME_RULE),
    Case("detect-model-surrounding-space", DETECT, detect(model=" yolov3-tiny "), INVALID, ("whitespace",)),
    Case(
        "detect-model-unknown",
        DETECT,
        detect(model="rfcn-resnet101"),
        NOT_FOUND,
        ("'rfcn-resnet101' is not served here", "'yolov3-tiny'", "listmodels"),
    ),
    Case(
        "detect-model-unknown-128-bytes", DETECT, detect(model="r" * 128), NOT_FOUND, ("(128 bytes)", "'yolov3-tiny'")
    ),
    Case("detect-model-default-by-name", DETECT, detect(check=finds_the_cup, model="yolov3-tiny"), OK),
    # -- Detect: model versions
    Case(
        "detect-version-unknown",
        DETECT,
        detect(model_version="99"),
        NOT_FOUND,
        ("version '99' of model 'yolov3-tiny' is not loaded", "listmodels"),
    ),
    expecting(
        Case("detect-version-word", DETECT, detect(model_version="latest"), INVALID, VERSION_RULE),
        fields=("model_version",),
    ),
    Case("detect-version-zero", DETECT, detect(model_version="0"), INVALID, VERSION_RULE),
    Case("detect-version-negative", DETECT, detect(model_version="-1"), INVALID, VERSION_RULE),
    Case("detect-version-1-mib", DETECT, detect(model_version="9" * 2**20), INVALID, VERSION_RULE + ("bytes)",)),
    Case("detect-version-nul", DETECT, detect(model_version="1\0"), INVALID, VERSION_RULE),
    Case(
        "detect-version-of-unknown-model",
        DETECT,
        detect(model="rfcn", model_version="1"),
        NOT_FOUND,
        ("'rfcn' is not served here",),
    ),
    Case(
        "detect-version-one",
        DETECT,
        detect(check=served_by_version_one, model="yolov3-tiny", model_version="1"),
        OK,
    ),
    # -- Detect: bytes that are not a DetectRequest
    Case(
        "detect-malformed-protobuf",
        DETECT,
        raw_bytes(DETECT, b"\xff\xff\xff\xff"),
        INVALID,
        ("not a valid protobuf message",),
    ),
    # Hand-made bytes that parse: field 3 (min_confidence, fixed32) = a NaN no client library would send.
    Case(
        "detect-hand-made-nan-bytes",
        DETECT,
        raw_bytes(DETECT, b"\x1d\x00\x00\xc0\x7f"),
        INVALID,
        ("min_confidence", "nan"),
    ),
    Case(
        "detect-unknown-field", DETECT, unknown_fields(DETECT, lambda s: detector_pb2.DetectRequest(image=s.photo)), OK
    ),
    # -- LoadModel / UnloadModel (the swaps reload the model that serves: answers stay the same)
    Case("detector-load-model-reload-version", LOAD_MODEL, load_model("yolov3-tiny", "1", serving="1"), OK),
    Case("detector-load-model-reload-by-policy", LOAD_MODEL, load_model("yolov3-tiny", serving="1"), OK),
    Case("detector-load-model-empty-name", LOAD_MODEL, load_model(""), INVALID, ("model is required",) + NAME_RULE),
    Case("detector-load-model-1-mib-name", LOAD_MODEL, load_model("m" * 2**20), INVALID, ("limit of 128",) + NAME_RULE),
    Case("detector-load-model-nul-name", LOAD_MODEL, load_model("yolov3-tiny\0"), INVALID, ("u+0000",) + NAME_RULE),
    Case("detector-load-model-parent-folder", LOAD_MODEL, load_model("../models/yolov3-tiny"), INVALID, ("no '/'",)),
    Case("detector-load-model-dot-folder", LOAD_MODEL, load_model(".."), INVALID, ("leading '.'",)),
    Case(
        "detector-load-model-absolute-path",
        LOAD_MODEL,
        load_model("/etc"),
        INVALID,
        ("is a folder name under the repository",),
    ),
    Case(
        "detector-load-model-unknown",
        LOAD_MODEL,
        load_model("rfcn-resnet101"),
        NOT_FOUND,
        ("has no folder", "config.json"),
    ),
    Case(
        "detector-load-model-unknown-version",
        LOAD_MODEL,
        load_model("yolov3-tiny", "99"),
        NOT_FOUND,
        ("no version '99' on disk", "its versions are ['1']"),
    ),
    expecting(
        Case(
            "detector-load-model-version-word", LOAD_MODEL, load_model("yolov3-tiny", "latest"), INVALID, VERSION_RULE
        ),
        fields=("version",),
    ),
    Case("detector-load-model-version-float", LOAD_MODEL, load_model("yolov3-tiny", "1.0"), INVALID, VERSION_RULE),
    Case("detector-load-model-version-spaces", LOAD_MODEL, load_model("yolov3-tiny", " 1 "), INVALID, VERSION_RULE),
    Case(
        "detector-load-model-version-non-ascii-digit",
        LOAD_MODEL,
        load_model("yolov3-tiny", "\u0661"),
        INVALID,
        VERSION_RULE,
    ),
    Case(
        "detector-load-model-version-huge",
        LOAD_MODEL,
        load_model("yolov3-tiny", "1" * 4096),
        INVALID,
        VERSION_RULE + ("bytes)",),
    ),
    Case(
        "detector-load-model-malformed-protobuf",
        LOAD_MODEL,
        raw_bytes(LOAD_MODEL, b"\xff\xff\xff\xff"),
        INVALID,
        ("not a valid protobuf message",),
    ),
    Case(
        "detector-unload-model-default-last-version",
        UNLOAD_MODEL,
        unload_model("yolov3-tiny"),
        PRECONDITION,
        ("this server's default", "keeps at least one version"),
    ),
    Case(
        "detector-unload-model-default-by-version",
        UNLOAD_MODEL,
        unload_model("yolov3-tiny", "1"),
        PRECONDITION,
        ("this server's default", "load another version first"),
    ),
    Case(
        "detector-unload-model-unknown",
        UNLOAD_MODEL,
        unload_model("rfcn-resnet101"),
        NOT_FOUND,
        ("has no version loaded",),
    ),
    Case(
        "detector-unload-model-unknown-version",
        UNLOAD_MODEL,
        unload_model("yolov3-tiny", "99"),
        NOT_FOUND,
        ("version '99' of model 'yolov3-tiny' is not loaded", "loaded are ['1']"),
    ),
    Case("detector-unload-model-empty-name", UNLOAD_MODEL, unload_model(""), INVALID, ("model is required",)),
    Case("detector-unload-model-version-word", UNLOAD_MODEL, unload_model("yolov3-tiny", "all"), INVALID, VERSION_RULE),
    Case(
        "detector-unload-model-malformed-protobuf",
        UNLOAD_MODEL,
        raw_bytes(UNLOAD_MODEL, b"\xff\xff\xff\xff"),
        INVALID,
        ("not a valid protobuf message",),
    ),
    # -- ListModels
    Case("list-models-plain", LIST_MODELS, list_models(), OK),
    Case("list-models-odd-request-id", LIST_MODELS, list_models((("x-request-id", "a" * 4000),)), OK),
    Case("list-models-binary-metadata", LIST_MODELS, list_models((("x-odd-bin", b"\x00\xff" * 64),)), OK),
    Case("list-models-many-metadata", LIST_MODELS, list_models(tuple((f"x-k{i}", "v") for i in range(100))), OK),
    Case(
        "list-models-unknown-field",
        LIST_MODELS,
        unknown_fields(LIST_MODELS, lambda s: detector_pb2.ListModelsRequest()),
        OK,
    ),
    Case(
        "list-models-malformed-protobuf",
        LIST_MODELS,
        raw_bytes(LIST_MODELS, b"\xff\xff\xff\xff"),
        INVALID,
        ("not a valid protobuf message",),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_case(hostile, case):
    hostile.check(case)


def test_every_service_unchanged_afterwards(hostile):
    hostile.assert_unchanged()
