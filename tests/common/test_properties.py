"""Property tests of the two decoders that take bytes from users: images (common.images) and
bag-of-words signatures (common.bow_codec). Arbitrary bytes either decode or raise the decoder's own
error, never anything else; valid inputs of any size, mode and bit depth decode to what was encoded."""

from __future__ import annotations

import io
import re

import cv2
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from common.bow_codec import BagOfWords, BowFormatError, decode, encode
from common.images import ImageError, decode_image, decode_photo

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_PIXELS = 10**6

# Every message the decoders give: each says what is wrong (and, for images, what to send).
IMAGE_ERROR = re.compile(
    r"image (is empty: send the encoded file bytes \(JPEG, PNG, WebP\.\.\.\)"
    r"|has zero size \(\d+x\d+\): send an image with pixels"
    r"|is \d+x\d+ = \d+ pixels, above the limit of \d+: downscale it before sending"
    r"|cannot be decoded \(.+\); send a complete JPEG, PNG, WebP, BMP, GIF or TIFF file)",
    re.DOTALL,
)
BOW_ERROR = re.compile(
    r"signature (is \d+ bytes; a bag-of-words signature has at least 8"
    r"|format version \d+; this build reads version 1"
    r"|says its vocabulary has 0 words"
    r"|ends inside (a number|its word bitmap): it is truncated"
    r"|sets words beyond its vocabulary: it is corrupt"
    r"|says \d+ words but its bitmap holds \d+"
    r"|holds no words \(an empty bag cannot be compared\)"
    r"|holds (a number longer than 5 bytes|a count above 2\*\*32|a number not in its shortest form): it is corrupt"
    r"|has \d+ bytes after its last count: it is corrupt"
    r"|gives a present word a count of 0: it is corrupt)"
)

# Valid headers of each format followed by garbage reach deeper into the decoders than random bytes.
PREFIXES = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0",
    b"GIF89a",
    b"RIFF\x00\x00\x00\x00WEBP",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
]


@FAST
@given(st.sampled_from(PREFIXES), st.binary(max_size=2048), st.integers(0, 64))
def test_arbitrary_bytes_decode_or_raise_image_error(prefix, body, max_side):
    try:
        photo = decode_photo(prefix + body, MAX_PIXELS, max_side)
    except ImageError as error:
        assert IMAGE_ERROR.fullmatch(str(error)), str(error)
        assert len(str(error)) <= 600  # never echoes the data whole
        return
    height, width = photo.rgb.shape[:2]
    assert photo.rgb.dtype == np.uint8 and photo.rgb.shape[2] == 3 and width * height <= MAX_PIXELS


@st.composite
def encoded_images(draw):
    """-> (encoded bytes, (H, W, 3) float64 truth, tolerance in levels)."""
    height, width = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    form = draw(
        st.sampled_from(
            ["png8-rgb", "png8-grey", "png8-rgba", "png16-rgb", "png16-grey", "png16-rgba", "jpeg-rgb", "jpeg-grey"]
        )
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    channels = {"rgb": 3, "grey": 1, "rgba": 4}[form.split("-")[1]]
    if form.startswith("png16"):
        wide = rng.integers(0, 65536, (height, width, channels), dtype=np.uint16)
        truth = np.rint(wide.astype(np.float64) * 255 / 65535)
        if channels == 1:
            data = cv2.imencode(".png", wide[:, :, 0])[1].tobytes()
        else:
            data = cv2.imencode(".png", wide[:, :, [2, 1, 0, 3][:channels]])[1].tobytes()  # OpenCV is BGR(A)
        return data, _rgb(truth), 1
    if form.startswith("png8"):
        narrow = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
        buffer = io.BytesIO()
        Image.fromarray(narrow[:, :, 0] if channels == 1 else narrow, mode).save(buffer, format="PNG")
        return buffer.getvalue(), _rgb(narrow), 0
    # JPEG is lossy: the truth is what OpenCV's own decoder (an independent one) makes of the same
    # bytes; no chroma subsampling, so the two do not differ by their upsampling.
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels).save(buffer, format="JPEG", quality=90, subsampling=0)
    data = buffer.getvalue()
    reference = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return data, reference.astype(np.float64), 3


def _rgb(array: np.ndarray) -> np.ndarray:
    """(H, W, C) truth -> (H, W, 3): grey repeated, alpha dropped (as the decoder does)."""
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[:, :, :3]


@FAST
@given(encoded_images())
def test_valid_images_decode_to_their_shape_and_pixels(image):
    data, truth, tolerance = image
    decoded = decode_image(data, MAX_PIXELS)
    assert decoded.shape == truth.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(np.float64) - truth).max() <= tolerance


@st.composite
def bags(draw):
    vocabulary = draw(st.integers(1, 65535))
    words = draw(st.lists(st.integers(0, vocabulary - 1), min_size=1, max_size=64, unique=True))
    counts = draw(st.lists(st.integers(1, 2**32 - 1), min_size=len(words), max_size=len(words)))
    order = np.argsort(words)
    return BagOfWords(
        np.asarray(words, np.int32)[order],
        np.asarray(counts, np.uint32)[order],
        vocabulary,
        draw(st.integers(0, 2**32 - 1)),
    )


@FAST
@given(bags())
def test_bag_of_words_round_trip(bag):
    data = encode(bag)
    back = decode(data)
    assert (back.vocabulary, back.codebook) == (bag.vocabulary, bag.codebook)
    np.testing.assert_array_equal(back.words, bag.words)
    np.testing.assert_array_equal(back.counts, bag.counts)
    assert len(data) <= 5 + 2 + 5 + (bag.vocabulary + 7) // 8 + 5 * len(bag.words)


@FAST
@given(
    st.one_of(
        st.binary(max_size=256),
        bags()
        .map(encode)
        .flatmap(
            lambda data: st.tuples(st.just(data), st.integers(0, len(data)), st.binary(max_size=4)).map(
                lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + len(t[2]) :]
            )
        ),
    )
)
def test_arbitrary_bytes_decode_as_a_bag_or_raise_bow_format_error(data):
    # Random bytes, and valid signatures with a few bytes overwritten (they get past the header).
    try:
        bag = decode(data)
    except BowFormatError as error:
        assert BOW_ERROR.fullmatch(str(error)), str(error)
        return
    assert len(bag.words) == len(bag.counts) >= 1 and bag.counts.all()
    assert np.all(np.diff(bag.words) > 0) and bag.words[0] >= 0 and bag.words[-1] < bag.vocabulary
    assert encode(bag) == data  # a bag decoded from bytes is exactly those bytes
