"""The bag-of-words wire format, and the histogram the index's distance sees."""

import numpy as np
import pytest

from common.bow_codec import BagOfWords, BowFormatError, decode, encode


def bag(words, counts, vocabulary=5000, codebook=0xABCD1234):
    return BagOfWords(np.asarray(words, np.int32), np.asarray(counts, np.uint32), vocabulary, codebook)


def random_bag(rng, n=300, vocabulary=5000):
    return BagOfWords.from_words(rng.integers(0, vocabulary, n), vocabulary, 7)


def test_round_trip_is_lossless_and_small():
    rng = np.random.default_rng(0)
    for n in (1, 50, 512, 2500):
        b = random_bag(rng, n)
        data = encode(b)
        back = decode(data)
        np.testing.assert_array_equal(back.words, b.words)
        np.testing.assert_array_equal(back.counts, b.counts)
        assert (back.vocabulary, back.codebook) == (5000, 7)
    # 512 keypoints, all different words, is the largest a server signature gets: under 3.5 kB.
    assert len(encode(bag(np.arange(0, 5000, 9)[:512], [300] + [1] * 511))) <= 1900
    big = bag([0, 4999], [70000, 1])
    assert decode(encode(big)).counts.tolist() == [70000, 1]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d[:5], "signature is 5 bytes; a bag-of-words signature has at least 8"),
        (lambda d: bytes([2]) + d[1:], "signature format version 2; this build reads version 1"),
        (lambda d: d[:-1], "signature ends inside a number: it is truncated"),
        (lambda d: d + b"\x01", "signature has 1 bytes after its last count: it is corrupt"),
        (lambda d: d[:7] + bytes([5]) + d[8:], "signature says 5 words but its bitmap holds 3"),
        (lambda d: d[:5] + (0).to_bytes(2, "little") + d[7:], "signature says its vocabulary has 0 words"),
    ],
)
def test_corrupt_signatures_are_refused_with_a_reason(mutate, message):
    data = encode(bag([3, 10, 4000], [2, 1, 5]))
    with pytest.raises(BowFormatError) as error:
        decode(mutate(data))
    assert str(error.value) == message


def test_empty_bag_is_refused():
    with pytest.raises(BowFormatError) as error:
        decode(encode(bag([], [])))
    assert str(error.value) == "signature holds no words (an empty bag cannot be compared)"


def test_histogram_is_l1_normalised_and_scale_free():
    np.testing.assert_allclose(bag([1, 5, 9], [1, 3, 4]).histogram(), [0.125, 0.375, 0.5])
    assert bag([1, 5, 9], [1, 3, 4]).histogram().dtype == np.float32
    np.testing.assert_array_equal(bag([1, 5, 9], [2, 6, 8]).histogram(), bag([1, 5, 9], [1, 3, 4]).histogram())


def test_a_number_padded_with_empty_continuation_bytes_is_refused():
    """0x81 0x00 also reads as 1: refusing it keeps one encoding per bag."""
    data = encode(BagOfWords(np.array([3], np.int32), np.array([1], np.uint32), 16, 7))
    assert data[-1] == 1
    with pytest.raises(BowFormatError) as error:
        decode(data[:-1] + b"\x81\x00")
    assert str(error.value) == "signature holds a number not in its shortest form: it is corrupt"
