"""ComputeSignatures with local_features: a real in-process SignatureService (grpcio-testing) over the
real models, its settings in SignatureConfig."""

from __future__ import annotations

import io
import threading
from unittest import mock

import grpc
import numpy as np
import pytest
from PIL import Image

from common.config import ConfigError, load_config
from common.errors import InvalidArgument, ServiceError
from common.local_features import EXTRACTOR, ExtractorSettings, extract, from_proto, to_proto, verify
from common.photos import load_photo
from common.proto_convert import image_from_proto, image_to_proto
from mps.common.v1 import common_pb2
from mps.signature.v1 import signature_pb2
from signature_server import service as service_module
from signature_server.config import SignatureConfig
from signature_server.service import SignatureService
from tests.common.test_local_features import CROP, turned
from tests.servicer import unary

SERVICE = signature_pb2.DESCRIPTOR.services_by_name["SignatureService"]
DEEP, BOW = common_pb2.SIGNATURE_KIND_DEEP, common_pb2.SIGNATURE_KIND_BOW
PLAIN = np.full((120, 160, 3), 200, np.uint8)
TINY = load_photo("coffee")[:5, :5]


def make_servicer(signature_models, **settings) -> SignatureService:
    return SignatureService(
        signature_models,
        "efficientnet-lite0",
        "colour-texture-bow",
        max_images=64,
        max_pixels=50_000_000,
        max_salient=8,
        max_segments=200,
        **settings,
    )


@pytest.fixture(scope="module")
def servicer(signature_models):
    servicer = make_servicer(signature_models)
    yield servicer
    servicer.close()


def compute(servicer, images, local_features=True, kind=DEEP, kinds=()):
    request = signature_pb2.ComputeSignaturesRequest(
        images=images, kind=kind, kinds=list(kinds), local_features=local_features
    )
    response, code, details = unary(servicer, SERVICE, "ComputeSignatures", request, timeout=60)
    assert code == grpc.StatusCode.OK, details
    return response


def test_features_come_one_per_image_in_order_beside_unchanged_signatures(servicer):
    pictures = [CROP, PLAIN, load_photo("astronaut")[:300, :300], TINY]
    images = [image_to_proto(p) for p in pictures]
    both = compute(servicer, images, kinds=(BOW, DEEP))
    assert len(both.local_features) == 4
    for message, picture in zip(both.local_features, pictures):
        assert message == to_proto(extract(picture))
    counts = [len(from_proto(m)) for m in both.local_features]
    assert counts[0] == counts[2] == 256 and counts[1] == counts[3] == 0  # a plain and a tiny crop: none
    assert both.local_features[1].extractor == EXTRACTOR and both.local_features[1].width == 320
    # The signatures and who served them are what the same call without features answers.
    plain = compute(servicer, images, local_features=False, kinds=(BOW, DEEP))
    assert not plain.local_features
    assert both.signatures == plain.signatures and both.served_by == plain.served_by


@pytest.mark.parametrize("kind", [DEEP, BOW])
def test_one_kind_with_features(servicer, kind):
    response = compute(servicer, [image_to_proto(CROP)], kind=kind)
    assert [s.kind for s in response.signatures] == [kind]
    assert [m.width for m in response.local_features] == [320] and response.compute_ms > 0


def test_the_same_crop_gets_the_same_features(servicer):
    images = [image_to_proto(CROP), image_to_proto(CROP.copy())]
    first = compute(servicer, images).local_features
    assert first[0] == first[1]
    assert compute(servicer, images[:1], kinds=(BOW,)).local_features[0] == first[0]


def test_an_encoded_photo_is_described_as_displayed(servicer):
    """EXIF orientation 6 (turn 90 degrees clockwise): the features are the upright picture's."""
    buffers = []
    for orientation in (1, 6):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buffer = io.BytesIO()
        Image.fromarray(CROP).save(buffer, format="JPEG", quality=95, exif=exif)
        buffers.append(buffer.getvalue())
    stored = image_from_proto(common_pb2.Image(encoded=buffers[0]), 10**8)  # as stored: 360 x 300
    upright = np.ascontiguousarray(np.rot90(stored, k=-1))  # as displayed: 300 x 360
    features = compute(servicer, [common_pb2.Image(encoded=b) for b in buffers]).local_features
    assert (features[0].width, features[0].height) == (320, 267)
    assert (features[1].width, features[1].height) == (267, 320)
    assert features[0] == to_proto(extract(stored)) and features[1] == to_proto(extract(upright))


def test_a_turned_scaled_copy_verifies_against_the_original_and_an_unrelated_photo_does_not(servicer):
    pictures = [CROP, turned(CROP, 25, 0.7), turned(CROP, 90, 1.2), load_photo("chelsea"), load_photo("rocket")]
    original, *others = (from_proto(m) for m in compute(servicer, [image_to_proto(p) for p in pictures]).local_features)
    inliers = [verify(original, other).inliers for other in others]
    assert min(inliers[:2]) >= 80, inliers
    assert max(inliers[2:]) < 8, inliers
    # Either way round: a catalogue item's stored features against a query crop's.
    assert verify(others[0], original).inliers >= 80


def test_features_are_extracted_on_the_services_threads_the_batch_at_once(servicer):
    names, lock = set(), threading.Lock()

    def recording(image, settings):
        with lock:
            names.add(threading.current_thread().name)
        return extract(image, settings)

    with mock.patch.object(service_module, "extract", side_effect=recording) as patched:
        response = compute(servicer, [image_to_proto(CROP)] * 8)
    assert patched.call_count == 8 and len(response.local_features) == 8
    assert names and all(name.startswith("local-features") for name in names), names


def test_features_alone_are_refused_as_a_call_without_a_kind_is(servicer):
    request = signature_pb2.ComputeSignaturesRequest(images=[image_to_proto(CROP)], local_features=True)
    with pytest.raises(ServiceError) as error:
        servicer.ComputeSignatures(request, mock.create_autospec(grpc.ServicerContext, instance=True))
    assert isinstance(error.value, InvalidArgument)
    assert "kind: signature kind SIGNATURE_KIND_UNSPECIFIED is not served" in error.value.message


def test_the_configured_settings_describe_the_crops(signature_models):
    config = SignatureConfig(local_feature_side=160, local_feature_points=32, local_feature_threads=1)
    servicer = make_servicer(
        signature_models,
        local_features=config.local_feature_settings(),
        local_feature_threads=config.local_feature_threads,
    )
    try:
        message = compute(servicer, [image_to_proto(CROP)]).local_features[0]
    finally:
        servicer.close()
    assert (message.width, message.height) == (160, 133)
    assert 0 < len(from_proto(message)) <= 32


# --- configuration ---------------------------------------------------------------------------------


def test_the_default_settings_are_the_extractors():
    config = SignatureConfig()
    assert (config.local_feature_side, config.local_feature_points, config.local_feature_threads) == (320, 256, 2)
    assert config.local_feature_settings() == ExtractorSettings()
    loaded = load_config(
        SignatureConfig,
        "signature",
        environ={"MPS_SIGNATURE_LOCAL_FEATURE_POINTS": "512", "MPS_SIGNATURE_LOCAL_FEATURE_SIDE": "31"},
    )
    assert loaded.local_feature_settings() == ExtractorSettings(side=31, max_points=512)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"local_feature_side": 30}, "local_feature_side 30 is not in [31, 4096]"),
        ({"local_feature_side": 4097}, "local_feature_side 4097 is not in [31, 4096]"),
        ({"local_feature_points": 0}, "local_feature_points 0 is not in [1, 512]"),
        ({"local_feature_points": 513}, "local_feature_points 513 is not in [1, 512]"),
        ({"local_feature_threads": 0}, "local_feature_threads 0 is not >= 1"),
    ],
)
def test_settings_out_of_range_are_refused(settings, message):
    with pytest.raises(ConfigError) as error:
        SignatureConfig(**settings)
    assert str(error.value) == message
