"""The bag-of-words wire format and the chi-squared distance."""

import numpy as np
import pytest

from common.bow_codec import BagOfWords, BowFormatError, chi2, decode, encode, similarity


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
    "mutate, fragment",
    [
        (lambda d: d[:5], "at least"),
        (lambda d: bytes([2]) + d[1:], "version 2"),
        (lambda d: d[:-1], "truncated"),
        (lambda d: d + b"\x01", "after its last count"),
        (lambda d: d[:7] + bytes([5]) + d[8:], "says 5 words"),
        (lambda d: d[:5] + (0).to_bytes(2, "little") + d[7:], "0 words"),
    ],
)
def test_corrupt_signatures_are_refused_with_a_reason(mutate, fragment):
    data = encode(bag([3, 10, 4000], [2, 1, 5]))
    with pytest.raises(BowFormatError, match=fragment):
        decode(mutate(data))


def test_empty_bag_is_refused():
    with pytest.raises(BowFormatError, match="no words"):
        decode(encode(bag([], [])))


def test_chi2_properties():
    rng = np.random.default_rng(1)
    a, b, c = random_bag(rng), random_bag(rng), random_bag(rng)
    assert chi2(a, a) == pytest.approx(0, abs=1e-9)
    assert chi2(a, b) == pytest.approx(chi2(b, a))
    assert 0 < chi2(a, b) < 2
    assert chi2(bag([1, 2], [1, 1]), bag([3], [4])) == 2.0  # nothing in common
    # Equals the textbook definition on the dense L1-normalised histograms.
    x, y = a.dense().astype(np.float64), c.dense().astype(np.float64)
    s = x + y
    assert chi2(a, c) == pytest.approx(float(((x - y)[s > 0] ** 2 / s[s > 0]).sum()), abs=1e-6)
    # Scale-free: doubling every count changes nothing (histograms are L1-normalised).
    assert chi2(a, BagOfWords(a.words, a.counts * 2, 5000, 7)) == pytest.approx(0, abs=1e-9)
    assert similarity(0.0) == 1.0 and similarity(2.0) == 0.0


def test_a_number_padded_with_empty_continuation_bytes_is_refused():
    """0x81 0x00 also reads as 1: refusing it keeps one encoding per bag."""
    data = encode(BagOfWords(np.array([3], np.int32), np.array([1], np.uint32), 16, 7))
    assert data[-1] == 1
    with pytest.raises(BowFormatError, match="shortest form"):
        decode(data[:-1] + b"\x81\x00")
