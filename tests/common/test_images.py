import io

import cv2
import numpy as np
import pytest
from PIL import Image

from common.images import ImageError, decode_image, decode_photo, encode_jpeg, encode_png, raw_to_array
from common.photos import load_photo
from tests.conftest import bad_images, png_bomb


def test_decode_round_trip(coffee):
    assert np.array_equal(decode_image(encode_png(coffee), 10**8), coffee)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue(), 10**6).shape == (40, 20, 3)


@pytest.mark.parametrize("name", ["empty", "truncated", "random", "zero_size_header", "bomb"])
def test_bad_images_raise_a_clear_error(coffee_png, name):
    with pytest.raises(ImageError) as error:
        decode_image(bad_images(coffee_png)[name], 50_000_000)
    assert str(error.value)


def test_bomb_is_refused_before_decoding():
    with pytest.raises(ImageError, match="above the limit"):
        decode_image(png_bomb(), 50_000_000)


def test_raw_image_size_is_checked():
    assert raw_to_array(2, 1, bytes(6), 10).shape == (1, 2, 3)
    with pytest.raises(ImageError, match="needs 6 RGB bytes"):
        raw_to_array(2, 1, bytes(5), 10)
    with pytest.raises(ImageError, match="zero size"):
        raw_to_array(0, 1, b"", 10)


def test_a_large_jpeg_is_decoded_small_and_keeps_its_original_size():
    big = cv2.resize(load_photo("coffee"), (4000, 3000), interpolation=cv2.INTER_LINEAR)
    data = encode_jpeg(big, 90)
    photo = decode_photo(data, 10**9, 2000)
    assert photo.rgb.shape == (1500, 2000, 3) and (photo.width, photo.height) == (4000, 3000)
    assert photo.scale == 0.5
    reference = cv2.resize(big, (2000, 1500), interpolation=cv2.INTER_AREA)
    assert np.abs(photo.rgb.astype(int) - reference).mean() < 4  # the DCT-scaled decode is the same picture
    # EXIF orientation 6 (rotate 90 degrees clockwise): the photo is 3000 wide and 4000 high.
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(big).save(buffer, format="JPEG", exif=exif)
    turned = decode_photo(buffer.getvalue(), 10**9, 2000)
    assert (turned.width, turned.height) == (3000, 4000) and turned.rgb.shape == (2000, 1500, 3)
