import io

import cv2
import numpy as np
import pytest
from PIL import Image

from common.images import ImageError, decode_image, decode_photo, encode_jpeg, encode_png, raw_to_array
from common.photos import load_photo
from tests.helpers import BAD_IMAGE_SAYS, bad_images, png_bomb


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
    assert str(error.value).startswith(BAD_IMAGE_SAYS[name])


def test_the_callers_pixel_limit_is_checked_on_the_header_before_decoding():
    # Far beyond Pillow's own limit (twice 89 M pixels), and just above the caller's.
    with pytest.raises(ImageError) as error:
        decode_image(png_bomb(), 50_000_000)
    assert str(error.value) == (
        "image is 100000x100000 = 10000000000 pixels, above the limit of 50000000: downscale it before sending"
    )
    with pytest.raises(ImageError) as error:
        decode_image(png_bomb(300, 300), 89_999)
    assert str(error.value).startswith("image is 300x300 = 90000 pixels, above the limit of 89999")
    # A caller allowing more than Pillow would: the header passes, and this one's data is missing.
    with pytest.raises(ImageError) as error:
        decode_image(png_bomb(20_000, 10_000), 10**9)
    assert str(error.value).startswith("image cannot be decoded (")


def test_importing_and_decoding_leave_pillows_own_limit_as_it_is():
    default = Image.MAX_IMAGE_PIXELS
    assert default is not None and default < 10**9  # nothing (this module included) lifted it
    with pytest.raises(ImageError):
        decode_image(png_bomb(), 50_000_000)
    after = Image.MAX_IMAGE_PIXELS
    assert after == default
    with pytest.raises(Image.DecompressionBombError):  # Pillow still refuses it to anyone else
        Image.open(io.BytesIO(png_bomb()))


def test_raw_image_size_is_checked():
    assert raw_to_array(2, 1, bytes(6), 10).shape == (1, 2, 3)
    with pytest.raises(ImageError) as error:
        raw_to_array(2, 1, bytes(5), 10)
    assert str(error.value).startswith("raw image of 2x1 needs 6 RGB bytes, got 5: send width x height x 3 bytes")
    with pytest.raises(ImageError) as error:
        raw_to_array(0, 1, b"", 10)
    assert str(error.value).startswith("raw image has zero size (0x1): set raw.width and raw.height")
    with pytest.raises(ImageError) as error:
        raw_to_array(4, 3, bytes(36), 10)
    assert str(error.value) == "raw image is 4x3, above the limit of 10 pixels: downscale it before sending"


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


def png16(array16: np.ndarray) -> bytes:
    """(H, W) grey, or (H, W, 3|4) RGB(A), uint16 -> a 16-bit PNG (OpenCV writes BGR order)."""
    if array16.ndim == 3:
        array16 = cv2.cvtColor(array16, cv2.COLOR_RGB2BGR if array16.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
    ok, data = cv2.imencode(".png", array16)
    assert ok
    return data.tobytes()


def truth8(array16: np.ndarray) -> np.ndarray:
    return np.rint(array16.astype(np.float64) * 255 / 65535)


def test_16_bit_pngs_scale_to_8_bits_not_white():
    rng = np.random.default_rng(7)
    rgb16 = rng.integers(0, 65536, (30, 40, 3), dtype=np.uint16)
    grey16 = rng.integers(0, 65536, (30, 40), dtype=np.uint16)
    rgba16 = np.concatenate([rgb16, rng.integers(0, 65536, (30, 40, 1), dtype=np.uint16)], axis=2)
    for name, array16, expected in [
        ("rgb", rgb16, truth8(rgb16)),
        ("grey", grey16, np.repeat(truth8(grey16)[:, :, None], 3, axis=2)),
        ("rgba", rgba16, truth8(rgb16)),
    ]:
        decoded = decode_image(png16(array16), 10**6)
        assert decoded.shape == (30, 40, 3) and decoded.dtype == np.uint8, name
        assert np.abs(decoded - expected).max() <= 1, name
    # A mid-grey 16-bit photo is mid-grey, not white (the bug).
    assert decode_image(png16(np.full((4, 4), 32768, np.uint16)), 10**6).max() == 128


def grey_alpha_png16(grey16: np.ndarray, alpha16: np.ndarray) -> bytes:
    """A 16-bit grey + alpha PNG (colour type 4), written by hand: neither Pillow nor OpenCV writes one."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = grey16.shape
    pixels = np.stack([grey16, alpha16], axis=2).astype(">u2").reshape(height, -1).view(np.uint8)
    rows = b"".join(b"\x00" + row.tobytes() for row in pixels)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 4, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_16_bit_grey_with_alpha_and_exif_orientation():
    rng = np.random.default_rng(8)
    grey16 = rng.integers(0, 65536, (20, 10), dtype=np.uint16)
    decoded = decode_image(grey_alpha_png16(grey16, np.full_like(grey16, 40000)), 10**6)
    assert decoded.shape == (20, 10, 3) and np.abs(decoded - truth8(grey16)[:, :, None]).max() <= 1
    # 16-bit grey turned by its EXIF orientation.
    image = Image.frombytes("I;16", (10, 20), grey16.astype("<u2").tobytes())
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    turned = decode_image(buffer.getvalue(), 10**6)
    expected = np.rot90(truth8(grey16), k=-1)
    assert turned.shape == (10, 20, 3) and np.abs(turned[:, :, 1] - expected).max() <= 1


def test_palette_cmyk_and_alpha_still_decode():
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:, 4:] = (200, 30, 60)
    for mode in ("P", "CMYK", "RGBA", "LA", "1"):
        buffer = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(buffer, format="TIFF" if mode == "CMYK" else "PNG")
        decoded = decode_image(buffer.getvalue(), 10**6)
        assert decoded.shape == (8, 8, 3) and decoded.dtype == np.uint8, mode
        assert decoded[:, :4].max() <= 1, mode  # black stays black
    # An adaptive palette holds both colours exactly.
    buffer = io.BytesIO()
    Image.fromarray(rgb).quantize(4).save(buffer, format="PNG")
    assert np.array_equal(decode_image(buffer.getvalue(), 10**6), rgb)
