"""The CPU reference of each kernel against an independent, plainly written computation."""

import numpy as np
import pytest
from skimage.color import rgb2lab

from common.photos import load_photo
from kernels import spec
from kernels.cpu import CpuKernels

K = CpuKernels()


@pytest.fixture(scope="module")
def photo():
    return load_photo("coffee")[::4, ::4].copy()  # 100 x 150


def test_rgb_to_lab_matches_scikit_image(photo):
    lab = K.rgb_to_lab(photo)
    reference = rgb2lab(photo)  # L in [0, 100], a/b around 0
    expected = np.stack(
        [reference[..., 0] / 100, (reference[..., 1] + 128) / 255, (reference[..., 2] + 128) / 255], axis=-1
    )
    assert lab.dtype == np.float32 and lab.shape == photo.shape
    np.testing.assert_allclose(lab, expected, atol=2e-3)


def test_pyramid_halves_and_keeps_a_flat_image_flat():
    flat = np.full((37, 50, 3), 0.25, np.float32)
    down = K.pyr_down(flat)
    assert down.shape == (19, 25, 3)
    np.testing.assert_allclose(down, 0.25, atol=1e-6)


def test_basis_filters_are_band_pass_and_separable(photo):
    flat = np.full((40, 40, 3), 0.7, np.float32)
    np.testing.assert_allclose(K.filter_basis(flat), 0, atol=1e-5)
    image = K.rgb_to_lab(photo)
    basis = K.filter_basis(image)
    # Interior pixel, computed as a plain 2-D correlation with the outer product of the taps.
    y, x = 50, 70
    for b, (tx, ty) in enumerate(spec.BASIS):
        kernel = np.outer(spec.TAPS[ty], spec.TAPS[tx])
        window = image[y - 4 : y + 5, x - 4 : x + 5, 0]
        assert basis[b, y, x, 0] == pytest.approx(float((kernel * window).sum()), abs=1e-5)


def test_steering_at_zero_degrees_is_the_first_basis_pair_and_energy_is_rotation_aware():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(7, 5, 6, 3)).astype(np.float32)
    responses, amplitude = K.steer(basis)
    np.testing.assert_allclose(responses[..., 0], basis[0], atol=1e-5)  # G2 at 0 = G2a
    np.testing.assert_allclose(responses[..., 1], basis[3], atol=1e-5)  # H2 at 0 = H2a
    np.testing.assert_allclose(amplitude[0], np.hypot(basis[0, ..., 0], basis[3, ..., 0]), atol=1e-5)
    # Vertical stripes excite the 0-degree channel (x-derivatives) far more than the 90-degree one.
    stripes = np.tile(np.sin(np.arange(64) / 1.5)[None, :, None], (64, 1, 3)).astype(np.float32) * 0.3 + 0.5
    _, amp = K.steer(K.filter_basis(stripes))
    assert amp[0, 20:44, 20:44].mean() > 20 * amp[2, 20:44, 20:44].mean()


def test_keypoints_are_the_strict_local_maxima_above_threshold_most_salient_first():
    rng = np.random.default_rng(1)
    saliency = rng.random((30, 40)).astype(np.float32)
    points, values = K.select_keypoints(saliency, radius=2, threshold=0.5, max_count=1000)
    expected = []
    for y in range(30):
        for x in range(40):
            window = saliency[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3]
            if saliency[y, x] > 0.5 and saliency[y, x] >= window.max():
                expected.append((-saliency[y, x], y, x))
    expected.sort()
    assert [tuple(p) for p in points.tolist()] == [(y, x) for _, y, x in expected]
    assert np.all(np.diff(values) <= 0)
    capped, _ = K.select_keypoints(saliency, 2, 0.5, 5)
    np.testing.assert_array_equal(capped, points[:5])


def test_patch_histograms_equal_a_plain_loop():
    rng = np.random.default_rng(2)
    labs = [rng.random((40, 36, 3)).astype(np.float32), rng.random((20, 18, 3)).astype(np.float32)]
    responses = [rng.normal(size=lab.shape + (8,)).astype(np.float32) for lab in labs]
    keypoints = np.array([[0, 0], [39, 35], [20, 10]], np.int32)
    got = K.patch_histograms(labs, responses, keypoints).reshape(3, 3, 6, 2, 8)
    for k, (ky, kx) in enumerate(keypoints):
        for level, (lab, resp) in enumerate(zip(labs, responses)):
            expected = np.zeros((3, 6, 8))
            cy, cx = ky >> level, kx >> level
            for y in range(max(0, cy - 16), min(lab.shape[0], cy + 16)):
                for x in range(max(0, cx - 16), min(lab.shape[1], cx + 16)):
                    for c in range(3):
                        expected[c, min(int(lab[y, x, c] * 6), 5)] += np.abs(resp[y, x, c]) + spec.EPS
            np.testing.assert_allclose(got[k, :, :, level], expected, rtol=1e-5)


def test_nearest_words_are_the_nearest_centres_in_order():
    rng = np.random.default_rng(3)
    centres = rng.random((300, 576)).astype(np.float32)
    descriptors = rng.random((50, 576)).astype(np.float32)
    squared = ((descriptors[:, None, :].astype(np.float64) - centres[None]) ** 2).sum(-1)
    for m in (1, 5, 32):
        words, distances = K.nearest_words(descriptors, centres, (centres**2).sum(1), m)
        assert words.shape == distances.shape == (50, m) and words.dtype == np.int32
        # The m smallest distances in order, each word once; float32 sums may swap a near tie (1e-4).
        np.testing.assert_allclose(
            np.take_along_axis(squared, words, 1), np.sort(squared, axis=1)[:, :m], rtol=1e-6, atol=1e-4
        )
        assert all(len(set(row)) == m for row in words.tolist())
        assert (words == np.argsort(squared, axis=1, kind="stable")[:, :m]).mean() > 0.99
        # |c|^2 - 2 d.c: the squared distance less |d|^2.
        expected = np.take_along_axis(squared, words, 1) - (descriptors.astype(np.float64) ** 2).sum(1)[:, None]
        np.testing.assert_allclose(distances, expected, rtol=1e-4, atol=1e-3)
    empty = K.nearest_words(np.zeros((0, 576), np.float32), centres, (centres**2).sum(1), 4)
    assert empty[0].shape == empty[1].shape == (0, 4)


def test_nearest_words_break_ties_to_the_lowest_index():
    rng = np.random.default_rng(4)
    base = rng.random((6, 576)).astype(np.float32)
    centres = np.concatenate([base, base, base])  # every centre three times: indices j, j+6, j+12
    words, _ = K.nearest_words(base[:2], centres, (centres**2).sum(1), 3)
    assert words.tolist() == [[0, 6, 12], [1, 7, 13]]


@pytest.mark.parametrize("count", [0, 33, 301])
def test_nearest_words_refuses_a_count_it_cannot_find(count):
    centres = np.zeros((300, 576), np.float32)
    with pytest.raises(ValueError) as error:
        K.nearest_words(np.zeros((1, 576), np.float32), centres, np.zeros(300, np.float32), count)
    assert str(error.value) == f"{count} nearest words: the kernels find 1 to 32 (MAX_NEAREST 32, a 300-word codebook)"
