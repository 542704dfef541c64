"""The BLCF signature format (common/blcf_codec.py): round trips, every refusal of corrupt bytes
with its message, the bag, cells as pixel boxes, and query regions."""

from __future__ import annotations

import numpy as np
import pytest

from common.blcf_codec import EMPTY, AssignmentMap, BlcfFormatError, decode, encode


def a_map(
    rows: int = 3, columns: int = 4, vocabulary: int = 1000, width: int = 640, height: int = 480
) -> AssignmentMap:
    words = (np.arange(rows * columns, dtype=np.uint16) * 7 % vocabulary).reshape(rows, columns)
    return AssignmentMap(words.astype(np.uint16), vocabulary, 0xDEADBEEF, width, height)


@pytest.mark.parametrize("shape", [(1, 1), (14, 14), (10, 14), (255, 3), (2, 255)])
def test_round_trip_keeps_every_field(shape):
    rng = np.random.default_rng(sum(shape))
    words = rng.integers(0, 25_000, shape).astype(np.uint16)
    if words.size > 1:
        words.reshape(-1)[::3] = EMPTY  # cells outside a region
        words.reshape(-1)[1] = 24_999
    amap = AssignmentMap(words, 25_000, 0x01020304, 1920, 1080)
    data = encode(amap)
    assert len(data) == 12 + 2 + 2 * shape[0] * shape[1]
    back = decode(data)
    np.testing.assert_array_equal(back.words, words)
    assert (back.vocabulary, back.fingerprint, back.width, back.height) == (25_000, 0x01020304, 1920, 1080)
    assert back.words.dtype == np.uint16 and back.words.flags.writeable
    assert encode(back) == data


def test_a_28_by_28_map_is_1582_bytes_little_endian():
    data = encode(a_map(28, 28))
    assert len(data) == 1582
    assert data[0] == 1 and data[1:5] == (0xDEADBEEF).to_bytes(4, "little")
    assert int.from_bytes(data[5:7], "little") == 1000 and data[11] == 1 and (data[12], data[13]) == (28, 28)
    assert int.from_bytes(data[14 + 2 : 14 + 4], "little") == 7  # cell (0, 1)


def pyramid() -> AssignmentMap:
    """A query of two levels: 2x3 then 4x6 cells of one 600x400 image."""
    fine = (np.arange(24, dtype=np.uint16) % 11).reshape(4, 6)
    return AssignmentMap(np.array([[1, 2, 3], [4, 5, 6]], np.uint16), 50, 9, 600, 400, (fine,))


def test_a_pyramid_round_trips_and_its_bag_counts_every_level():
    amap = pyramid()
    data = encode(amap)
    assert len(data) == 12 + (2 + 12) + (2 + 48) and data[11] == 2
    back = decode(data)
    assert back.levels == 2 and back.words.shape == (2, 3) and back.pyramid[0].shape == (4, 6)
    np.testing.assert_array_equal(back.pyramid[0], amap.pyramid[0])
    bag = back.bag()
    expected = np.bincount(np.concatenate([amap.words.ravel(), amap.pyramid[0].ravel()]), minlength=50)
    np.testing.assert_array_equal(bag.words, np.flatnonzero(expected))
    np.testing.assert_array_equal(bag.counts, expected[expected > 0])


def test_a_region_of_a_pyramid_masks_each_level_by_its_own_cells():
    masked = pyramid().region((0, 0, 300, 200))  # the top-left quarter of the image
    np.testing.assert_array_equal(masked.words, [[1, EMPTY, EMPTY], [EMPTY, EMPTY, EMPTY]])
    expected = np.full((4, 6), EMPTY, np.uint16)
    expected[:2, :3] = pyramid().pyramid[0][:2, :3]
    np.testing.assert_array_equal(masked.pyramid[0], expected)


def corrupt(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value) :]


GOOD = encode(a_map())
EMPTY_MAP = encode(AssignmentMap(np.full((2, 2), EMPTY, np.uint16), 10, 1, 8, 8))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "signature is 0 bytes; a BLCF signature has at least 16"),
        (GOOD[:15], "signature is 15 bytes; a BLCF signature has at least 16"),
        (corrupt(GOOD, 0, b"\x02"), "signature format version 2; this build reads version 1"),
        (corrupt(GOOD, 5, b"\x00\x00"), "signature says its vocabulary has 0 words"),
        (corrupt(GOOD, 7, b"\x00\x00"), "signature says its image is 0x480 pixels"),
        (corrupt(GOOD, 9, b"\x00\x00"), "signature says its image is 640x0 pixels"),
        (corrupt(GOOD, 11, b"\x00"), "signature says it holds 0 maps; a BLCF signature holds 1 to 8"),
        (corrupt(GOOD, 11, b"\x09"), "signature says it holds 9 maps; a BLCF signature holds 1 to 8"),
        (corrupt(GOOD, 12, b"\x00"), "signature says map 0 has 0x4 cells"),
        (corrupt(GOOD, 13, b"\x00"), "signature says map 0 has 3x0 cells"),
        (GOOD[:-1], "signature ends inside map 0 (3x4 cells): it is truncated"),
        (corrupt(GOOD, 11, b"\x02"), "signature ends before map 1 of 2: it is truncated"),
        (GOOD + b"\x00\x00", "signature has 2 bytes after its last map: it is corrupt"),
        (corrupt(GOOD, 12, b"\x04"), "signature ends inside map 0 (4x4 cells): it is truncated"),
        (EMPTY_MAP, "signature holds no words (an empty map cannot be compared)"),
        (corrupt(GOOD, 14, (1000).to_bytes(2, "little")), "signature holds word 1000, beyond its 1000-word vocabulary"),
    ],
)
def test_corrupt_bytes_are_refused_saying_what_is_wrong(data, message):
    with pytest.raises(BlcfFormatError) as caught:
        decode(data)
    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("amap", "message"),
    [
        (AssignmentMap(np.zeros((256, 1), np.uint16), 10, 1, 8, 8), "shape (256, 1) does not fit the format"),
        (AssignmentMap(np.zeros((0, 3), np.uint16), 10, 1, 8, 8), "shape (0, 3) does not fit the format"),
        (AssignmentMap(np.zeros(4, np.uint16), 10, 1, 8, 8), "shape (4,) does not fit the format"),
        (AssignmentMap(np.zeros((2, 2), np.uint16), 0, 1, 8, 8), "vocabulary of 0 words does not fit"),
        (AssignmentMap(np.zeros((2, 2), np.uint16), 65536, 1, 8, 8), "vocabulary of 65536 words does not fit"),
        (AssignmentMap(np.zeros((2, 2), np.uint16), 10, 1, 0, 8), "image size 0x8 does not fit the format"),
        (AssignmentMap(np.zeros((2, 2), np.uint16), 10, 1, 8, 70000), "image size 8x70000 does not fit the format"),
        (
            AssignmentMap(np.zeros((2, 2), np.uint16), 10, 1, 8, 8, (np.zeros((2, 2), np.uint16),) * 8),
            "9 levels do not fit the format (at most 8)",
        ),
    ],
)
def test_maps_the_format_cannot_hold_are_refused_at_encoding(amap, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        encode(amap)


def test_bag_counts_the_cells_of_each_word_leaving_empty_cells_out():
    words = np.array([[5, 5, EMPTY], [2, 5, 9]], np.uint16)
    bag = AssignmentMap(words, 10, 0xABCD, 30, 20).bag()
    assert bag.words.tolist() == [2, 5, 9] and bag.counts.tolist() == [1, 3, 1]
    assert (bag.vocabulary, bag.codebook) == (10, 0xABCD)


def test_cell_box_turns_cells_into_pixels():
    amap = a_map(3, 4, width=640, height=480)  # cells of 160 x 160 pixels
    assert amap.cell_box(0, 0, 3, 4) == (0, 0, 640, 480)
    assert amap.cell_box(1, 2, 2, 4) == (320, 160, 640, 320)
    odd = AssignmentMap(np.zeros((3, 3), np.uint16), 10, 1, 100, 50)
    assert odd.cell_box(1, 1, 2, 2) == pytest.approx((100 / 3, 50 / 3, 200 / 3, 100 / 3))


def test_region_keeps_the_cells_whose_centres_lie_inside():
    amap = a_map(3, 4, width=640, height=480)  # centres at x 80, 240, 400, 560 and y 80, 240, 400
    region = amap.region((200, 50, 600, 250))
    inside = region.words != EMPTY
    assert inside.tolist() == [[False, True, True, True], [False, True, True, True], [False, False, False, False]]
    np.testing.assert_array_equal(region.words[inside], amap.words[inside])
    assert (region.vocabulary, region.fingerprint, region.width, region.height) == (1000, 0xDEADBEEF, 640, 480)
    assert region.bag().counts.sum() == 6
    # A box holding no cell's centre keeps the cell under its own centre.
    small = amap.region((170, 10, 200, 40))
    assert np.argwhere(small.words != EMPTY).tolist() == [[0, 1]]
    # The whole image keeps everything; a box past the edges is clipped by the cells it holds.
    np.testing.assert_array_equal(amap.region((0, 0, 640, 480)).words, amap.words)
    assert (amap.region((-50, -50, 100, 100)).words != EMPTY).sum() == 1
    assert decode(encode(region)).bag().counts.sum() == 6  # a region's map is a valid signature


@pytest.mark.parametrize(
    "box",
    [(700, 0, 800, 100), (0, 500, 10, 600), (-20, -20, 0, 0), (100, 100, 100, 200), (300, 200, 100, 100)],
)
def test_a_region_that_does_not_overlap_the_image_is_refused(box):
    with pytest.raises(ValueError, match="does not overlap the 640x480 image"):
        a_map(3, 4).region(box)


def test_a_region_of_empty_cells_only_is_refused():
    words = np.array([[1, EMPTY], [EMPTY, EMPTY]], np.uint16)
    with pytest.raises(ValueError, match="region holds only cells without a word"):
        AssignmentMap(words, 10, 1, 20, 20).region((10, 10, 20, 20))
