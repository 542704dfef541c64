"""common/local_features.py: ORB extraction, geometric verification, fusion, and the wire form's checks."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import pytest

from common.local_features import (
    DESCRIPTOR_BYTES,
    EXTRACTOR,
    MAX_POINTS,
    NOT_VERIFIED,
    ExtractorSettings,
    Features,
    LocalFeaturesError,
    Verification,
    empty,
    extract,
    from_proto,
    fuse,
    to_proto,
    verify,
)
from common.photos import load_photo
from mps.common.v1 import common_pb2

COFFEE = load_photo("coffee")
CROP = COFFEE[30:330, 120:480]  # the cup: 360 x 300


def turned(image: np.ndarray, angle: float, scale: float) -> np.ndarray:
    """`image` rotated by `angle` degrees and scaled, on a canvas that holds all of it (white around)."""
    height, width = image.shape[:2]
    m = cv2.getRotationMatrix2D((width / 2, height / 2), angle, scale)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    out_w, out_h = int(width * cos + height * sin), int(height * cos + width * sin)
    m[0, 2] += out_w / 2 - width / 2
    m[1, 2] += out_h / 2 - height / 2
    return cv2.warpAffine(image, m, (out_w, out_h), flags=cv2.INTER_LINEAR, borderValue=(255, 255, 255))


@pytest.fixture(scope="module")
def crop_features() -> Features:
    return extract(CROP)


# --- extraction ------------------------------------------------------------------------------------


def test_a_textured_crop_gets_its_keypoints_at_the_described_size(crop_features):
    f = crop_features
    assert f.extractor == EXTRACTOR and (f.width, f.height) == (320, 267)  # 360 x 300 at 320 on the longer side
    assert len(f) == ExtractorSettings().max_points == 256
    assert f.points.dtype == np.uint16 and f.points.shape == (256, 2)
    assert f.descriptors.dtype == np.uint8 and f.descriptors.shape == (256, DESCRIPTOR_BYTES)
    assert int(f.points[:, 0].max()) < f.width and int(f.points[:, 1].max()) < f.height
    assert f.nbytes == 256 * 36 == 9216


def test_extraction_is_deterministic_and_grey_is_rgb_made_grey(crop_features):
    again = extract(CROP.copy())
    np.testing.assert_array_equal(again.points, crop_features.points)
    np.testing.assert_array_equal(again.descriptors, crop_features.descriptors)
    grey = extract(cv2.cvtColor(CROP, cv2.COLOR_RGB2GRAY))
    np.testing.assert_array_equal(grey.points, crop_features.points)
    np.testing.assert_array_equal(grey.descriptors, crop_features.descriptors)


def test_settings_choose_the_size_and_the_number_of_keypoints():
    small = extract(CROP, ExtractorSettings(side=160, max_points=40))
    assert (small.width, small.height) == (160, 133) and 0 < len(small) <= 40
    # More than the protocol allows is capped at its limit.
    big = extract(COFFEE, ExtractorSettings(side=640, max_points=5000))
    assert 256 < len(big) <= MAX_POINTS


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((1, 1, 3), (1, 1)),
        ((7, 300, 3), (300, 7)),  # under 8 pixels on a side: not even resized
        ((4, 4), (4, 4)),
    ],
)
def test_a_tiny_image_has_no_features(shape, size):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    f = extract(image)
    assert len(f) == 0 and (f.width, f.height) == size
    assert f.points.shape == (0, 2) and f.descriptors.shape == (0, DESCRIPTOR_BYTES)


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        # Thin strips stay thin at 320 pixels: 1 pixel used to fail in ORB's pyramid (cv2.error).
        ((8, 100_000, 3), (320, 1)),
        ((100_000, 8, 3), (1, 320)),
        ((9, 5000, 3), (320, 1)),
        ((16, 2000, 3), (320, 3)),
    ],
)
def test_a_thin_strip_has_no_features_and_no_error(shape, size):
    f = extract(np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8))
    assert len(f) == 0 and (f.width, f.height) == size


def test_a_plain_image_has_no_features():
    f = extract(np.full((300, 400, 3), 90, np.uint8))
    assert len(f) == 0 and (f.width, f.height) == (320, 240)


# --- the wire form ---------------------------------------------------------------------------------


def test_to_proto_and_back_is_the_same_features(crop_features):
    message = to_proto(crop_features)
    assert message.extractor == EXTRACTOR and message.descriptor_bytes == DESCRIPTOR_BYTES
    assert (message.width, message.height) == (320, 267)
    assert len(message.points_u16le) == 4 * 256 and len(message.descriptors) == 32 * 256
    # Little-endian uint16 (x, y) pairs, whatever the machine.
    assert int.from_bytes(message.points_u16le[:2], "little") == int(crop_features.points[0, 0])
    back = from_proto(common_pb2.LocalFeatures.FromString(message.SerializeToString()))
    assert (back.extractor, back.width, back.height) == (EXTRACTOR, 320, 267)
    assert back.points.dtype == np.uint16 and back.descriptors.dtype == np.uint8
    np.testing.assert_array_equal(back.points, crop_features.points)
    np.testing.assert_array_equal(back.descriptors, crop_features.descriptors)


def test_no_features_go_over_the_wire_and_back():
    message = to_proto(empty(320, 240))
    assert message.points_u16le == b"" and message.descriptors == b""
    back = from_proto(message)
    assert len(back) == 0 and (back.width, back.height) == (320, 240)
    # With no keypoints, no size is needed.
    assert len(from_proto(common_pb2.LocalFeatures(extractor=EXTRACTOR, descriptor_bytes=32))) == 0


def parts(count: int = 3, width: int = 100, height: int = 50, **fields: Any) -> common_pb2.LocalFeatures:
    """A well-formed message of `count` keypoints, with `fields` replaced."""
    xy = np.array([[i % 50, i % 40] for i in range(count)], "<u2")  # inside any size of 50 x 40 or more
    message = common_pb2.LocalFeatures(
        extractor=EXTRACTOR,
        width=width,
        height=height,
        points_u16le=xy.tobytes(),
        descriptors=bytes(32 * count),
        descriptor_bytes=32,
    )
    for name, value in fields.items():
        setattr(message, name, value)
    return message


@pytest.mark.parametrize(
    ("message", "says"),
    [
        (parts(extractor=""), "local_features.extractor must name the extractor (1 to 64 characters)"),
        (parts(extractor="x" * 65), "local_features.extractor must name the extractor (1 to 64 characters)"),
        (parts(points_u16le=bytes(6)), "local_features.points_u16le must hold (x, y) uint16 pairs: 4 bytes a keypoint"),
        (parts(points_u16le=bytes(13)), "4 bytes a keypoint"),
        (
            parts(count=MAX_POINTS + 1, width=1000, height=1000),
            f"local_features has {MAX_POINTS + 1} keypoints; at most {MAX_POINTS}",
        ),
        (
            parts(descriptors=bytes(95)),
            "local_features.descriptors holds 95 bytes; 3 keypoints of 32 bytes need 96",
        ),
        (parts(descriptors=b""), "local_features.descriptors holds 0 bytes; 3 keypoints of 32 bytes need 96"),
        (parts(descriptor_bytes=0), "local_features.descriptor_bytes 0 is not in 1..128"),
        (parts(descriptor_bytes=129), "local_features.descriptor_bytes 129 is not in 1..128"),
        (
            parts(points_u16le=np.array([[0, 0], [100, 0], [1, 1]], "<u2").tobytes()),
            "local_features has a keypoint outside its width x height",
        ),
        (
            parts(points_u16le=np.array([[0, 50], [0, 0], [1, 1]], "<u2").tobytes()),
            "local_features has a keypoint outside its width x height",
        ),
        (parts(width=0), "local_features.width and height must give the described size (1..65535)"),
        (parts(height=70_000), "local_features.width and height must give the described size (1..65535)"),
    ],
    ids=[
        "empty-extractor",
        "long-extractor",
        "odd-point-bytes",
        "point-bytes-not-pairs",
        "too-many-keypoints",
        "descriptors-a-byte-short",
        "no-descriptors",
        "descriptor-bytes-0",
        "descriptor-bytes-129",
        "x-outside",
        "y-outside",
        "no-width",
        "height-too-big",
    ],
)
def test_malformed_features_are_refused_naming_the_field(message, says):
    with pytest.raises(LocalFeaturesError) as error:
        from_proto(message)
    assert says in str(error.value)
    assert isinstance(error.value, ValueError)


def test_the_largest_well_formed_message_is_accepted():
    f = from_proto(parts(count=MAX_POINTS, width=65535, height=65535))
    assert len(f) == MAX_POINTS and f.descriptors.shape == (MAX_POINTS, 32)


# --- verification and fusion -----------------------------------------------------------------------


@pytest.mark.parametrize(("angle", "scale"), [(0, 1.0), (20, 0.7), (45, 1.3), (90, 1.0)])
def test_a_turned_and_scaled_copy_verifies_with_many_inliers(crop_features, angle, scale):
    check = verify(crop_features, extract(turned(CROP, angle, scale)))
    assert check.inliers >= 80 and check.matches >= check.inliers and check.spread > 0.3
    assert fuse(0.5, check) > 0.5 + 0.3


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "china.jpg"])
def test_an_unrelated_photo_does_not_verify(crop_features, name):
    check = verify(crop_features, extract(load_photo(name)))
    assert check.inliers < 8
    assert fuse(0.5, check) == 0.5


def test_verification_works_on_features_from_the_wire(crop_features):
    # from_proto's arrays are read-only views of the message's bytes.
    copy = from_proto(to_proto(extract(turned(CROP, 30, 0.8))))
    assert not copy.descriptors.flags.writeable
    assert verify(from_proto(to_proto(crop_features)), copy).inliers >= 80


def test_features_of_another_extractor_or_descriptor_width_are_not_verified(crop_features):
    other = Features(
        "sift-v1", crop_features.width, crop_features.height, crop_features.points, crop_features.descriptors
    )
    assert verify(crop_features, other) == NOT_VERIFIED
    assert verify(other, crop_features) == NOT_VERIFIED
    # The same extractor's name on descriptors of another width (a client's) used to raise cv2.error.
    narrow = from_proto(parts(count=40, width=320, height=320, descriptors=bytes(16 * 40), descriptor_bytes=16))
    assert verify(crop_features, narrow) == NOT_VERIFIED


def test_too_few_keypoints_or_matches_are_not_verified(crop_features):
    assert verify(crop_features, empty(320, 320)) == NOT_VERIFIED
    assert verify(empty(), crop_features) == NOT_VERIFIED
    one = Features(EXTRACTOR, 320, 267, crop_features.points[:1], crop_features.descriptors[:1])
    assert verify(one, crop_features) == NOT_VERIFIED
    # Five of its own keypoints: every match passes, but fewer than min_matches (6).
    five = Features(EXTRACTOR, 320, 267, crop_features.points[:5], crop_features.descriptors[:5])
    check = verify(five, crop_features)
    assert check.inliers == 0 and check.matches <= 5


def test_fuse_adds_a_bonus_that_grows_with_the_inliers():
    assert fuse(0.7, NOT_VERIFIED) == 0.7
    assert fuse(0.7, Verification(11, 50, 0.5)) == 0.7  # under min_inliers (12)
    assert fuse(0.7, Verification(100, 100, 0.005)) == 0.7  # all on one spot of the crop
    assert fuse(0.7, Verification(25, 30, 0.2)) == pytest.approx(0.7 + 0.5 * 25 / 50)
    bonuses = [fuse(0.0, Verification(n, n, 0.5)) for n in (12, 20, 50, 200, 512)]
    assert bonuses == sorted(bonuses) and bonuses[0] > 0 and bonuses[-1] < 0.5
    assert fuse(0.0, Verification(8, 8, 0.5), min_inliers=9) == 0.0
    assert fuse(0.0, Verification(8, 8, 0.5), min_inliers=8) > 0.0
    assert fuse(1.0, Verification(30, 30, 0.5), weight=1.0, half=30) == pytest.approx(1.5)
