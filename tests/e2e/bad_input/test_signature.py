"""Bad input to the signature server (mps.signature.v1.SignatureService), every RPC: images that are
empty, truncated, random, bombs, raw with the wrong byte count or no size; too many images; unknown,
unspecified and repeated kinds; models and versions that are not served or not loaded; LocateObjects
limits; BLCF queries by region that mix kinds or images, too many regions, regions that are empty,
inverted, not numbers or outside the image, and images too large for a BLCF signature; model
control (LoadModel, UnloadModel) asked for what is not there, or to leave the server without its
deep model; hand-made bytes that are no protobuf message; and the inputs that used to
break it or answer wrongly (100000x1 strips: "cannot reshape"; 16-bit PNGs: decoded white; local
features of a strip 1 pixel thin at the described size: cv2.error), which must now be answered."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import cv2
import grpc
import numpy as np
import pytest

from common.blcf_codec import EMPTY
from common.blcf_codec import decode as decode_blcf
from common.bow_codec import decode
from common.images import encode_png
from common.local_features import EXTRACTOR, from_proto
from common.photos import load_photo
from common.proto_convert import dense_from_proto, image_to_proto
from mps.common.v1 import common_pb2, models_pb2
from mps.signature.v1 import signature_pb2
from signature_server.config import SignatureConfig
from tests.e2e.bad_input.harness import Case, Stubs, case_id, expecting, rpc_name
from tests.helpers import png_bomb

SIGN, KINDS, LOCATE, LIST_MODELS, LOAD_MODEL, UNLOAD_MODEL = (
    rpc_name(signature_pb2, "SignatureService", method)
    for method in ("ComputeSignatures", "ListKinds", "LocateObjects", "ListModels", "LoadModel", "UnloadModel")
)
INVALID, EXHAUSTED, OK = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OK
NOT_FOUND, PRECONDITION = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION
DEEP, BOW, BLCF, UNSPECIFIED = (
    common_pb2.SIGNATURE_KIND_DEEP,
    common_pb2.SIGNATURE_KIND_BOW,
    common_pb2.SIGNATURE_KIND_BLCF,
    common_pb2.SIGNATURE_KIND_UNSPECIFIED,
)
# The suite runs the server with its defaults.
LIMITS = SignatureConfig()
MAX_IMAGES, MAX_SALIENT, MAX_SEGMENTS = LIMITS.max_images_per_request, LIMITS.max_salient, LIMITS.max_segments
DEEP_MODEL, BOW_MODEL, BLCF_MODEL = LIMITS.deep_model, LIMITS.bow_model, LIMITS.blcf_model

COFFEE = load_photo("coffee")
CROP = COFFEE[40:200, 100:300]
RNG = np.random.default_rng(11)
RANDOM = RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes()
PNG = encode_png(CROP)
JPEG_TRUNCATED = cv2.imencode(".jpg", CROP)[1].tobytes()[:500]
# 1 pixel thick strips, textured and plain (no keypoint fires on a plain one).
STRIP = RNG.integers(0, 256, (1, 100_000, 3), dtype=np.uint8)
PLAIN_STRIP = np.full((1, 100_000, 3), 90, np.uint8)
# 9 pixels thick: 1 pixel at the local features' 320 (ORB's pyramid used to fail on it).
THIN_STRIP = RNG.integers(0, 256, (9, 5000, 3), dtype=np.uint8)


def png16(rgb8: np.ndarray, grey: bool = False) -> bytes:
    """The same picture with 16 bits per channel (v * 257), as a PNG."""
    wide = rgb8.astype(np.uint16) * 257
    return cv2.imencode(".png", wide[:, :, 0] if grey else cv2.cvtColor(wide, cv2.COLOR_RGB2BGR))[1].tobytes()


def encoded(data: bytes) -> common_pb2.Image:
    return common_pb2.Image(encoded=data)


def raw(width: int, height: int, rgb: bytes) -> common_pb2.Image:
    return common_pb2.Image(raw=common_pb2.RawImage(width=width, height=height, rgb=rgb))


def sign(
    *images: common_pb2.Image, kind: int = DEEP, kinds: tuple[int, ...] = (), local_features: bool = False
) -> Callable[[Stubs], Any]:
    # Any int, unknown ones included: the generated enum types are plain ints at runtime.
    request = signature_pb2.ComputeSignaturesRequest(
        images=images,
        kind=cast(common_pb2.SignatureKind, kind),
        kinds=[cast(common_pb2.SignatureKind, k) for k in kinds],
        local_features=local_features,
    )
    return lambda s: s.signature.ComputeSignatures(request, timeout=s.timeout)


def sign_both_kinds_validly(image: common_pb2.Image, like: np.ndarray | None = None) -> Callable[[Stubs], Any]:
    """Deep and bag of words, both valid; with `like`, the deep signature equals that picture's."""

    def call(s: Stubs) -> None:
        images = [image] + ([image_to_proto(like)] if like is not None else [])
        signed = s.signature.ComputeSignatures(
            signature_pb2.ComputeSignaturesRequest(images=images, kinds=[DEEP, BOW]), timeout=s.timeout
        ).signatures
        assert len(signed) == 2 * len(images)
        deep, bow = dense_from_proto(signed[0]), decode(signed[1].bow)
        assert deep.shape == (1280,) and np.isfinite(deep).all() and abs(np.linalg.norm(deep) - 1) < 1e-3
        assert bow.counts.sum() >= 1
        if like is not None:
            np.testing.assert_allclose(deep, dense_from_proto(signed[2]), atol=1e-4)
            assert signed[1].bow == signed[3].bow

    return call


def sign_with_local_features(*images: common_pb2.Image, textured: tuple[int, ...] = ()) -> Callable[[Stubs], Any]:
    """Both kinds and local features: one well-formed entry per image, in order, with keypoints
    exactly on the `textured` images (none on a plain, tiny or thin one)."""

    def call(s: Stubs) -> None:
        response = s.signature.ComputeSignatures(
            signature_pb2.ComputeSignaturesRequest(images=images, kinds=[DEEP, BOW], local_features=True),
            timeout=s.timeout,
        )
        assert len(response.signatures) == 2 * len(images) and len(response.local_features) == len(images)
        for i, message in enumerate(response.local_features):
            features = from_proto(message)  # well formed, or LocalFeaturesError
            assert features.extractor == EXTRACTOR
            assert (len(features) > 0) == (i in textured), (i, len(features))

    return call


def sign_16_bit_png_features_are_the_8_bit_ones(s: Stubs) -> None:
    response = s.signature.ComputeSignatures(
        signature_pb2.ComputeSignaturesRequest(
            images=[encoded(png16(CROP)), image_to_proto(CROP)], kind=DEEP, local_features=True
        ),
        timeout=s.timeout,
    )
    wide, narrow = response.local_features
    assert len(from_proto(narrow)) > 0 and wide == narrow


def locate(
    image: common_pb2.Image | None = None, max_salient: int = 2, max_segments: int = 10
) -> Callable[[Stubs], Any]:
    return lambda s: s.signature.LocateObjects(
        signature_pb2.LocateObjectsRequest(
            image=image if image is not None else s.photo, max_salient=max_salient, max_segments=max_segments
        ),
        timeout=s.timeout,
    )


def locate_inside(image: common_pb2.Image, width: int, height: int) -> Callable[[Stubs], Any]:
    """Answers OK, with the image's size and every box inside it."""

    def call(s: Stubs) -> None:
        found = locate(image)(s)
        assert (found.image_width, found.image_height) == (width, height)
        for located in [*found.salient, *found.segments]:
            box = located.box
            assert 0 <= box.x_min <= box.x_max <= width and 0 <= box.y_min <= box.y_max <= height, located
            assert 0 < located.score <= 1

    return call


def malformed(method: str, data: bytes) -> Callable[[Stubs], Any]:
    return lambda s: s.channels["signature"].unary_unary(method)(data, timeout=s.timeout)


def list_kinds(s: Stubs) -> None:
    response = s.signature.ListKinds(signature_pb2.ListKindsRequest(), timeout=s.timeout)
    assert [k.kind for k in response.kinds] == [DEEP, BOW, BLCF]
    assert response.max_images_per_call == MAX_IMAGES  # what the gateway splits its calls to


def sign_with(models: list[tuple[str, str]], kinds: tuple[int, ...] = (DEEP,)) -> Callable[[Stubs], Any]:
    """ComputeSignatures of a tiny crop naming (model, version) pairs."""
    request = signature_pb2.ComputeSignaturesRequest(
        images=[image_to_proto(COFFEE[:8, :8])],
        kinds=[cast(common_pb2.SignatureKind, k) for k in kinds],
        models=[models_pb2.ModelRef(name=name, version=version) for name, version in models],
    )
    return lambda s: s.signature.ComputeSignatures(request, timeout=s.timeout)


def sign_naming_the_serving_versions(s: Stubs) -> None:
    """Naming the versions that serve answers as naming none; served_by says which, kind by kind."""
    named = sign_with([(BOW_MODEL, "2"), (DEEP_MODEL, "1")], kinds=(BOW, DEEP))(s)
    unnamed = sign_with([], kinds=(BOW, DEEP))(s)
    assert [(m.name, m.version) for m in named.served_by] == [(BOW_MODEL, "2"), (DEEP_MODEL, "1")]
    assert named.signatures == unnamed.signatures and named.served_by == unnamed.served_by


def list_models(s: Stubs) -> None:
    """The three models, each with one READY default version that says where it runs."""
    listed = s.signature.ListModels(signature_pb2.ListModelsRequest(), timeout=s.timeout).models
    ready = [m for m in listed if m.state == models_pb2.MODEL_STATE_READY]
    assert sorted(m.name for m in ready) == sorted([DEEP_MODEL, BOW_MODEL, BLCF_MODEL]), listed
    assert all(m.is_default and m.execution_provider and m.max_batch >= 1 and m.load_ms > 0 for m in ready), ready


def load_model(name: str, version: str = "") -> Callable[[Stubs], Any]:
    request = signature_pb2.LoadModelRequest(name=name, version=version)
    return lambda s: s.signature.LoadModel(request, timeout=120)


def unload_model(name: str, version: str = "") -> Callable[[Stubs], Any]:
    request = signature_pb2.UnloadModelRequest(name=name, version=version)
    return lambda s: s.signature.UnloadModel(request, timeout=s.timeout)


def reload_the_serving_codebook(s: Stubs) -> None:
    """Loading the version that serves swaps in a fresh copy of it: the same answers afterwards
    (the module's last test compares them), one READY default version, the old copy draining."""
    rows = load_model(BOW_MODEL, "2")(s).models
    ready = [m for m in rows if m.state == models_pb2.MODEL_STATE_READY]
    assert [(m.version, m.is_default) for m in ready] == [("2", True)], rows


TINY = image_to_proto(COFFEE[:8, :8])
PHOTO = image_to_proto(COFFEE)  # 600x400
# A (x_min, y_min, x_max, y_max) region.
Region = tuple[float, float, float, float]


def sign_regions(
    *images: common_pb2.Image, regions: list[Region], kinds: tuple[int, ...] = (BLCF,)
) -> Callable[[Stubs], Any]:
    request = signature_pb2.ComputeSignaturesRequest(
        images=images,
        kinds=[cast(common_pb2.SignatureKind, k) for k in kinds],
        regions=[common_pb2.Box(x_min=a, y_min=b, x_max=c, y_max=d) for a, b, c, d in regions],
    )
    return lambda s: s.signature.ComputeSignatures(request, timeout=s.timeout)


def sign_blcf_validly(image: common_pb2.Image, width: int, height: int) -> Callable[[Stubs], Any]:
    """One BLCF signature: a map of the image's size, every cell a word of its vocabulary."""

    def call(s: Stubs) -> None:
        (signed,) = sign(image, kind=BLCF)(s).signatures
        assert signed.kind == BLCF
        assignment = decode_blcf(signed.blcf)  # well formed, or BlcfFormatError
        assert (assignment.width, assignment.height) == (width, height)
        assert (assignment.words != EMPTY).all()

    return call


def regions_answered(regions: list[Region], words: list[int | None]) -> Callable[[Stubs], Any]:
    """One BLCF signature per region of PHOTO, in order; `words[i]`: its count of cells with a word
    (None: any)."""

    def call(s: Stubs) -> None:
        signed = sign_regions(PHOTO, regions=regions)(s).signatures
        assert len(signed) == len(regions)
        for signature, count in zip(signed, words):
            assignment = decode_blcf(signature.blcf)
            assert (assignment.width, assignment.height) == (600, 400)
            kept = int((assignment.words != EMPTY).sum())
            assert kept >= 1 and (count is None or kept == count), (kept, count)

    return call


NAN, INF = float("nan"), float("inf")

SIGN_CASES = [
    Case("sign-no-images", SIGN, sign(), INVALID, ("no images", f"1 to {MAX_IMAGES}")),
    Case(
        "sign-image-without-source",
        SIGN,
        sign(common_pb2.Image()),
        INVALID,
        ("images[0]", "no image given", "image.encoded", "image.raw"),
    ),
    Case("sign-empty-encoded", SIGN, sign(encoded(b"")), INVALID, ("images[0]", "empty", "encoded file bytes")),
    Case("sign-truncated-jpeg", SIGN, sign(encoded(JPEG_TRUNCATED)), INVALID, ("cannot be decoded", "complete jpeg")),
    Case(
        "sign-truncated-png",
        SIGN,
        sign(encoded(PNG[: len(PNG) // 2])),
        INVALID,
        ("cannot be decoded", "complete jpeg, png"),
    ),
    Case("sign-random-bytes", SIGN, sign(encoded(RANDOM)), INVALID, ("cannot be decoded", "no image format")),
    Case(
        "sign-text-not-an-image",
        SIGN,
        sign(encoded(b"<svg>" + b"A" * 100_000 + b"</svg>")),
        INVALID,
        ("cannot be decoded", "png"),
    ),
    Case(
        "sign-png-bomb",
        SIGN,
        sign(encoded(png_bomb())),
        INVALID,
        ("100000x100000", f"limit of {LIMITS.max_pixels}", "downscale"),
    ),
    Case("sign-png-zero-width-header", SIGN, sign(encoded(png_bomb(0, 10))), INVALID, ("cannot be decoded",)),
    Case("sign-bad-second-image", SIGN, sign(TINY, encoded(RANDOM)), INVALID, ("images[1]", "cannot be decoded")),
    Case(
        "sign-raw-too-few-bytes",
        SIGN,
        sign(raw(4, 4, bytes(47))),
        INVALID,
        ("needs 48 rgb bytes", "got 47", "width x height x 3"),
    ),
    Case("sign-raw-too-many-bytes", SIGN, sign(raw(4, 4, bytes(49))), INVALID, ("needs 48 rgb bytes", "got 49")),
    Case("sign-raw-no-bytes", SIGN, sign(raw(4, 4, b"")), INVALID, ("needs 48 rgb bytes", "got 0")),
    Case("sign-raw-zero-width", SIGN, sign(raw(0, 4, b"")), INVALID, ("zero size", "raw.width")),
    Case("sign-raw-zero-height", SIGN, sign(raw(4, 0, b"")), INVALID, ("zero size", "raw.height")),
    Case(
        "sign-raw-over-the-pixel-limit",
        SIGN,
        sign(raw(2**32 - 1, 2**32 - 1, b"")),
        INVALID,
        (f"limit of {LIMITS.max_pixels}", "downscale"),
    ),
    expecting(
        Case(
            "sign-too-many-images",
            SIGN,
            sign(*[TINY] * (MAX_IMAGES + 1)),
            EXHAUSTED,
            (f"{MAX_IMAGES + 1} images are above the limit of {MAX_IMAGES} per call", "split the call"),
        ),
        quota=("images",),
    ),
    Case(
        "sign-too-many-images-with-two-kinds",
        SIGN,
        sign(*[TINY] * (MAX_IMAGES + 1), kinds=(DEEP, BOW)),
        EXHAUSTED,
        (f"limit of {MAX_IMAGES} per call", "split the call"),
    ),
    Case("sign-the-limit-exactly", SIGN, sign(*[TINY] * MAX_IMAGES), OK),
    Case(
        "sign-kind-unspecified",
        SIGN,
        sign(TINY, kind=UNSPECIFIED),
        INVALID,
        ("signature_kind_unspecified is not served", "signature_kind_deep", "listkinds"),
    ),
    Case("sign-unknown-kind-number", SIGN, sign(TINY, kind=99), INVALID, ("kind 99 is not served",)),
    Case(
        "sign-unknown-kind-in-kinds",
        SIGN,
        sign(TINY, kinds=(DEEP, 42)),
        INVALID,
        ("kinds[1]", "kind 42", "signature_kind_bow"),
    ),
    Case(
        "sign-unspecified-in-kinds",
        SIGN,
        sign(TINY, kinds=(UNSPECIFIED,)),
        INVALID,
        ("kinds[0]", "signature_kind_unspecified"),
    ),
    Case(
        "sign-duplicate-kinds",
        SIGN,
        sign(TINY, kinds=(BOW, DEEP, BOW)),
        INVALID,
        ("kinds[2]", "listed twice", "list each kind once"),
    ),
    Case("sign-negative-kind", SIGN, sign(TINY, kinds=(-1,)), INVALID, ("kind -1 is not served",)),
    Case("sign-one-pixel", SIGN, sign_both_kinds_validly(raw(1, 1, b"\x10\x20\x30")), OK),
    Case("sign-strip-raw-100000x1", SIGN, sign_both_kinds_validly(image_to_proto(STRIP)), OK),
    Case("sign-strip-raw-1x100000", SIGN, sign_both_kinds_validly(image_to_proto(STRIP.reshape(100_000, 1, 3))), OK),
    Case("sign-plain-strip-raw-100000x1", SIGN, sign_both_kinds_validly(image_to_proto(PLAIN_STRIP)), OK),
    Case(
        "sign-plain-strip-png-1x100000",
        SIGN,
        sign_both_kinds_validly(encoded(encode_png(PLAIN_STRIP.reshape(100_000, 1, 3)))),
        OK,
    ),
    Case("sign-strip-png-100000x1", SIGN, sign_both_kinds_validly(encoded(encode_png(STRIP))), OK),
    Case("sign-16-bit-rgb-png-is-the-8-bit-picture", SIGN, sign_both_kinds_validly(encoded(png16(CROP)), CROP), OK),
    Case(
        "sign-16-bit-grey-png-is-the-8-bit-picture",
        SIGN,
        sign_both_kinds_validly(encoded(png16(CROP, grey=True)), np.repeat(CROP[:, :, :1], 3, axis=2)),
        OK,
    ),
    expecting(
        Case(
            "sign-model-not-served-here",
            SIGN,
            sign_with([("yolov3-tiny", "1")]),
            INVALID,
            ("models[0].name", "'yolov3-tiny' is not served here", DEEP_MODEL, BOW_MODEL, "listmodels"),
        ),
        fields=("models[0].name",),
    ),
    Case("sign-model-empty-name", SIGN, sign_with([("", "1")]), INVALID, ("models[0].name is empty", DEEP_MODEL)),
    Case(
        "sign-model-named-twice",
        SIGN,
        sign_with([(DEEP_MODEL, "1"), (DEEP_MODEL, "")]),
        INVALID,
        ("models[1].name", "named twice", "name each model once"),
    ),
    Case(
        "sign-model-version-not-loaded",
        SIGN,
        sign_with([(DEEP_MODEL, "7")]),
        NOT_FOUND,
        ("version '7'", DEEP_MODEL, "not loaded", "listmodels"),
    ),
    Case(
        "sign-model-version-100000-characters",
        SIGN,
        sign_with([(BOW_MODEL, "9" * 100_000)], kinds=(BOW,)),
        INVALID,
        ("models[0].version", "(100000 bytes)", "is not a version: send a positive integer"),
    ),
    Case("sign-naming-the-serving-versions", SIGN, sign_naming_the_serving_versions, OK),
    Case("sign-blcf-photo", SIGN, sign_blcf_validly(PHOTO, 600, 400), OK),
    Case("sign-blcf-one-pixel", SIGN, sign_blcf_validly(raw(1, 1, b"\x10\x20\x30"), 1, 1), OK),
    Case(
        "sign-blcf-strip-1x60000",
        SIGN,
        sign_blcf_validly(image_to_proto(STRIP[:, :60_000].reshape(60_000, 1, 3)), 1, 60_000),
        OK,
    ),
    Case("sign-blcf-plain-strip-png", SIGN, sign_blcf_validly(encoded(encode_png(PLAIN_STRIP[:, :5000])), 5000, 1), OK),
    expecting(
        Case(
            "sign-blcf-strip-wider-than-a-signature-holds",
            SIGN,
            sign(image_to_proto(STRIP), kinds=(DEEP, BLCF)),
            INVALID,
            ("images[0]", "100000x1", "up to 65535 pixels a side", "downscale"),
        ),
        fields=("images[0]",),
    ),
    Case(
        "sign-blcf-model-version-not-loaded",
        SIGN,
        sign_with([(BLCF_MODEL, "7")], kinds=(BLCF,)),
        NOT_FOUND,
        ("version '7'", BLCF_MODEL, "not loaded"),
    ),
    expecting(
        Case(
            "sign-regions-of-the-deep-kind",
            SIGN,
            sign_regions(PHOTO, regions=[(0, 0, 100, 100)], kinds=(DEEP,)),
            INVALID,
            ("regions", "signature_kind_blcf alone", "signature_kind_deep", "only kind", "or send no regions"),
        ),
        fields=("regions",),
    ),
    Case(
        "sign-regions-with-blcf-and-bow",
        SIGN,
        sign_regions(PHOTO, regions=[(0, 0, 100, 100)], kinds=(BLCF, BOW)),
        INVALID,
        ("signature_kind_blcf alone", "signature_kind_bow"),
    ),
    Case(
        "sign-regions-with-the-kind-field-unset",
        SIGN,
        sign_regions(PHOTO, regions=[(0, 0, 100, 100)], kinds=()),
        INVALID,
        ("kind:", "signature_kind_unspecified is not served", "signature_kind_blcf"),
    ),
    expecting(
        Case(
            "sign-regions-of-two-images",
            SIGN,
            sign_regions(PHOTO, TINY, regions=[(0, 0, 4, 4)]),
            INVALID,
            ("regions are regions of one image", "2 images", "send exactly 1 image"),
        ),
        fields=("images",),
    ),
    Case("sign-regions-without-an-image", SIGN, sign_regions(regions=[(0, 0, 4, 4)]), INVALID, ("no images",)),
    Case(
        "sign-regions-of-an-undecodable-image",
        SIGN,
        sign_regions(encoded(RANDOM), regions=[(0, 0, 4, 4)]),
        INVALID,
        ("images[0]", "cannot be decoded"),
    ),
    expecting(
        Case(
            "sign-too-many-regions",
            SIGN,
            sign_regions(PHOTO, regions=[(0, 0, 100, 100)] * (MAX_IMAGES + 1)),
            EXHAUSTED,
            (f"{MAX_IMAGES + 1} regions are above the limit of {MAX_IMAGES} per call", "split the call"),
        ),
        quota=("regions",),
    ),
    Case(
        "sign-regions-the-limit-exactly",
        SIGN,
        regions_answered([(0.0, 0.0, 100.0 + i, 100.0) for i in range(MAX_IMAGES)], [None] * MAX_IMAGES),
        OK,
    ),
    expecting(
        Case(
            "sign-region-inverted",
            SIGN,
            sign_regions(PHOTO, regions=[(200, 100, 50, 300)]),
            INVALID,
            ("regions[0]", "(200, 100, 50, 300)", "empty or inverted", "x_min < x_max"),
        ),
        fields=("regions[0]",),
    ),
    Case(
        "sign-region-zero-height",
        SIGN,
        sign_regions(PHOTO, regions=[(10, 50, 200, 50)]),
        INVALID,
        ("regions[0]", "empty or inverted"),
    ),
    Case("sign-region-all-zero", SIGN, sign_regions(PHOTO, regions=[(0, 0, 0, 0)]), INVALID, ("empty or inverted",)),
    Case(
        "sign-region-outside-the-image",
        SIGN,
        sign_regions(PHOTO, regions=[(600, 0, 700, 100)]),
        INVALID,
        ("regions[0]", "lies outside the 600x400 image", "pixels of the image"),
    ),
    Case(
        "sign-region-above-the-image",
        SIGN,
        sign_regions(PHOTO, regions=[(0, -100, 100, -1)]),
        INVALID,
        ("lies outside the 600x400 image",),
    ),
    Case(
        "sign-region-not-a-number",
        SIGN,
        sign_regions(PHOTO, regions=[(NAN, 0, 100, 100)]),
        INVALID,
        ("regions[0]", "not a finite number"),
    ),
    Case(
        "sign-region-infinite",
        SIGN,
        sign_regions(PHOTO, regions=[(0, 0, INF, 100)]),
        INVALID,
        ("not a finite number",),
    ),
    expecting(
        Case(
            "sign-second-region-bad",
            SIGN,
            sign_regions(PHOTO, regions=[(0, 0, 100, 100), (5, 5, 5, 5)]),
            INVALID,
            ("regions[1]", "empty or inverted"),
        ),
        fields=("regions[1]",),
    ),
    Case(
        "sign-regions-of-an-image-too-wide",
        SIGN,
        sign_regions(image_to_proto(STRIP), regions=[(0, 0, 10, 1)]),
        INVALID,
        ("images[0]", "up to 65535 pixels a side"),
    ),
    Case(
        "sign-region-partly-outside-and-the-whole-image",
        SIGN,
        regions_answered([(-50.0, -50.0, 150.0, 150.0), (0.0, 0.0, 600.0, 400.0), (-1e9, -1e9, 1e9, 1e9)], [None] * 3),
        OK,
    ),
    Case(
        "sign-region-smaller-than-a-cell-keeps-one",
        SIGN,
        regions_answered([(300.0, 200.0, 300.5, 200.5)], [1]),
        OK,
    ),
    Case(
        "sign-local-features-without-a-kind",
        SIGN,
        sign(TINY, kind=UNSPECIFIED, local_features=True),
        INVALID,
        ("kind:", "signature_kind_unspecified is not served", "signature_kind_deep"),
    ),
    Case(
        "sign-local-features-bad-second-image",
        SIGN,
        sign(TINY, encoded(RANDOM), local_features=True),
        INVALID,
        ("images[1]", "cannot be decoded"),
    ),
    Case(
        "sign-local-features-too-many-images",
        SIGN,
        sign(*[TINY] * (MAX_IMAGES + 1), local_features=True),
        EXHAUSTED,
        (f"limit of {MAX_IMAGES} per call", "split the call"),
    ),
    Case(
        "sign-local-features-model-version-not-loaded",
        SIGN,
        lambda s: s.signature.ComputeSignatures(
            signature_pb2.ComputeSignaturesRequest(
                images=[TINY], kind=BOW, models=[models_pb2.ModelRef(name=BOW_MODEL, version="7")], local_features=True
            ),
            timeout=s.timeout,
        ),
        NOT_FOUND,
        ("version '7'", BOW_MODEL, "not loaded"),
    ),
    Case(
        "sign-local-features-one-per-image-in-order",
        SIGN,
        sign_with_local_features(
            image_to_proto(CROP), TINY, raw(1, 1, b"\x10\x20\x30"), image_to_proto(CROP), textured=(0, 3)
        ),
        OK,
    ),
    Case(
        "sign-local-features-of-strips",
        SIGN,
        sign_with_local_features(
            image_to_proto(STRIP),
            image_to_proto(PLAIN_STRIP.reshape(100_000, 1, 3)),
            image_to_proto(THIN_STRIP),
            image_to_proto(THIN_STRIP.transpose(1, 0, 2)),
        ),
        OK,
    ),
    Case("sign-local-features-the-limit-exactly", SIGN, sign(*[TINY] * MAX_IMAGES, local_features=True), OK),
    Case("sign-local-features-16-bit-png", SIGN, sign_16_bit_png_features_are_the_8_bit_ones, OK),
    Case(
        "sign-malformed-protobuf",
        SIGN,
        malformed(SIGN, b"\xff\xff\xff\xff"),
        INVALID,
        ("not a valid protobuf message", "computesignatures"),
    ),
    Case(
        "sign-malformed-protobuf-field-overruns",
        SIGN,
        malformed(SIGN, b"\x0a\xff\xff\xff\x0f\x01"),
        INVALID,
        ("not a valid protobuf message",),
    ),
]

KINDS_CASES = [
    Case("list-kinds-says-the-image-limit", KINDS, list_kinds, OK),
    Case("list-kinds-unknown-fields-are-ignored", KINDS, malformed(KINDS, b"\x08\x01\x12\x03abc"), OK),
    Case(
        "list-kinds-malformed-protobuf",
        KINDS,
        malformed(KINDS, b"\xff\xff\xff"),
        INVALID,
        ("not a valid protobuf message", "listkinds"),
    ),
]

LOCATE_CASES = [
    Case("locate-no-image", LOCATE, locate(common_pb2.Image()), INVALID, ("image:", "no image given")),
    Case("locate-empty-encoded", LOCATE, locate(encoded(b"")), INVALID, ("image:", "empty")),
    Case("locate-random-bytes", LOCATE, locate(encoded(RANDOM)), INVALID, ("cannot be decoded",)),
    Case("locate-truncated-jpeg", LOCATE, locate(encoded(JPEG_TRUNCATED)), INVALID, ("cannot be decoded",)),
    Case("locate-png-bomb", LOCATE, locate(encoded(png_bomb())), INVALID, ("above the limit", "downscale")),
    Case(
        "locate-raw-wrong-byte-count",
        LOCATE,
        locate(raw(10, 10, bytes(299))),
        INVALID,
        ("needs 300 rgb bytes", "got 299"),
    ),
    Case("locate-raw-zero-size", LOCATE, locate(raw(0, 0, b"")), INVALID, ("zero size", "raw.width")),
    Case("locate-nothing-asked", LOCATE, locate(max_salient=0, max_segments=0), INVALID, ("both 0", "at least one")),
    expecting(
        Case(
            "locate-too-many-salient",
            LOCATE,
            locate(max_salient=MAX_SALIENT + 1),
            EXHAUSTED,
            (f"max_salient is {MAX_SALIENT + 1}", f"at most {MAX_SALIENT}", "ask for fewer"),
        ),
        quota=("max_salient",),
    ),
    Case(
        "locate-too-many-segments",
        LOCATE,
        locate(max_segments=MAX_SEGMENTS + 1),
        EXHAUSTED,
        (f"max_segments is {MAX_SEGMENTS + 1}", f"at most {MAX_SEGMENTS}"),
    ),
    Case(
        "locate-uint32-max-segments",
        LOCATE,
        locate(max_salient=0, max_segments=2**32 - 1),
        EXHAUSTED,
        ("max_segments", f"at most {MAX_SEGMENTS}"),
    ),
    Case("locate-strip-raw-100000x1", LOCATE, locate_inside(image_to_proto(STRIP), 100_000, 1), OK),
    Case(
        "locate-strip-png-1x100000",
        LOCATE,
        locate_inside(encoded(encode_png(STRIP.reshape(100_000, 1, 3))), 1, 100_000),
        OK,
    ),
    Case("locate-one-pixel", LOCATE, locate_inside(raw(1, 1, b"\x00\x00\x00"), 1, 1), OK),
    Case("locate-16-bit-png", LOCATE, locate_inside(encoded(png16(COFFEE)), 600, 400), OK),
    Case(
        "locate-malformed-protobuf",
        LOCATE,
        malformed(LOCATE, b"\x10\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"),
        INVALID,
        ("not a valid protobuf message", "locateobjects"),
    ),
]

MODEL_CASES = [
    Case("list-models-both-models-ready", LIST_MODELS, list_models, OK),
    Case(
        "signature-list-models-malformed-protobuf",
        LIST_MODELS,
        malformed(LIST_MODELS, b"\xff\xff\xff"),
        INVALID,
        ("not a valid protobuf message", "listmodels"),
    ),
    expecting(
        Case("load-model-empty-name", LOAD_MODEL, load_model(""), INVALID, ("name is empty", "listmodels")),
        fields=("name",),
    ),
    Case(
        "load-model-not-served-here",
        LOAD_MODEL,
        load_model("yolov3-tiny"),
        NOT_FOUND,
        ("'yolov3-tiny'", "not one this server serves", DEEP_MODEL, BOW_MODEL),
    ),
    Case(
        "load-model-a-path-for-a-name",
        LOAD_MODEL,
        load_model(f"../../models/{DEEP_MODEL}"),
        NOT_FOUND,
        ("not one this server serves",),
    ),
    Case(
        "load-model-version-not-on-disk",
        LOAD_MODEL,
        load_model(DEEP_MODEL, "99"),
        NOT_FOUND,
        ("no version '99' on disk", "its versions are ['1']"),
    ),
    Case(
        "load-model-version-a-word",
        LOAD_MODEL,
        load_model(BOW_MODEL, "latest"),
        INVALID,
        ("version 'latest' is not a version", "positive integer"),
    ),
    Case(
        "load-model-version-a-path",
        LOAD_MODEL,
        load_model(BOW_MODEL, "../1"),
        INVALID,
        ("version '../1' is not a version", "positive integer"),
    ),
    Case(
        "load-model-version-100000-characters",
        LOAD_MODEL,
        load_model(BOW_MODEL, "1" * 100_000),
        INVALID,
        ("(100000 bytes)", "is not a version: send a positive integer"),
    ),
    Case("load-model-reload-the-serving-codebook", LOAD_MODEL, reload_the_serving_codebook, OK),
    Case(
        "load-model-blcf-version-not-on-disk",
        LOAD_MODEL,
        load_model(BLCF_MODEL, "99"),
        NOT_FOUND,
        ("no version '99' on disk", BLCF_MODEL),
    ),
    Case(
        "load-model-malformed-protobuf",
        LOAD_MODEL,
        malformed(LOAD_MODEL, b"\x0a\xff\xff\xff\x0f\x01"),
        INVALID,
        ("not a valid protobuf message", "loadmodel"),
    ),
    expecting(
        Case("unload-model-empty-name", UNLOAD_MODEL, unload_model(""), INVALID, ("name is empty",)),
        fields=("name",),
    ),
    Case(
        "unload-model-not-served-here",
        UNLOAD_MODEL,
        unload_model("yolov3-tiny", "1"),
        NOT_FOUND,
        ("'yolov3-tiny'", "not one this server serves"),
    ),
    Case(
        "unload-model-version-not-loaded",
        UNLOAD_MODEL,
        unload_model(DEEP_MODEL, "7"),
        NOT_FOUND,
        ("version '7'", "not loaded", "loaded are ['1']"),
    ),
    Case(
        "unload-model-the-deep-models-last-version",
        UNLOAD_MODEL,
        unload_model(DEEP_MODEL),
        PRECONDITION,
        ("default", "keeps at least one version", "load another version first"),
    ),
    Case(
        "unload-model-malformed-protobuf",
        UNLOAD_MODEL,
        malformed(UNLOAD_MODEL, b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"),
        INVALID,
        ("not a valid protobuf message", "unloadmodel"),
    ),
]

CASES = SIGN_CASES + KINDS_CASES + LOCATE_CASES + MODEL_CASES


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_case(hostile, case):
    hostile.check(case)


def test_every_service_unchanged_afterwards(hostile):
    hostile.assert_unchanged()
