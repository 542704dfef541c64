"""CUDA kernels against their CPU reference, kernel by kernel and end to end (skips without a GPU).

Tolerances: float32 sums in another order, so values agree to 1e-4 relative; keypoints, words and
histograms are compared as sets/counts, allowing the rare near-tie to fall the other way.
"""

import numpy as np
import pytest

from common.photos import load_photo
from kernels import KernelUnavailable, select_kernels
from kernels.cpu import CpuKernels
from tests.helpers import chi2

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu():
    try:
        return select_kernels("cuda")
    except KernelUnavailable as exc:
        pytest.skip(f"no CUDA kernels here: {exc}")


CPU = CpuKernels()


@pytest.fixture(scope="module")
def lab():
    return CPU.rgb_to_lab(load_photo("coffee")[::2, ::2].copy())


def test_colour(gpu):
    rgb = load_photo("astronaut")
    np.testing.assert_allclose(gpu.rgb_to_lab(rgb), CPU.rgb_to_lab(rgb), atol=1e-5)


def test_pyramid_and_filters(gpu, lab):
    np.testing.assert_allclose(gpu.pyr_down(lab), CPU.pyr_down(lab), atol=1e-5)
    np.testing.assert_allclose(gpu.filter_basis(lab), CPU.filter_basis(lab), atol=1e-4)


def test_orientation_and_saliency(gpu, lab):
    basis = CPU.filter_basis(lab)
    (r_gpu, a_gpu), (r_cpu, a_cpu) = gpu.steer(basis), CPU.steer(basis)
    np.testing.assert_allclose(r_gpu, r_cpu, atol=1e-5)
    np.testing.assert_allclose(a_gpu, a_cpu, atol=1e-5)
    amps = [a_cpu, a_cpu[:, ::2, ::2].copy()]
    np.testing.assert_allclose(gpu.saliency(amps), CPU.saliency(amps), rtol=1e-4, atol=1e-6)


def test_keypoints(gpu):
    saliency = np.random.default_rng(0).random((120, 90)).astype(np.float32)
    for a, b in zip(gpu.select_keypoints(saliency, 2, 0.3, 512), CPU.select_keypoints(saliency, 2, 0.3, 512)):
        np.testing.assert_array_equal(a, b)


def test_histograms_and_assignment(gpu, lab):
    labs = [lab, CPU.pyr_down(lab)]
    responses = [CPU.steer(CPU.filter_basis(x))[0] for x in labs]
    points = np.array([[0, 0], [50, 60], [lab.shape[0] - 1, lab.shape[1] - 1]], np.int32)
    np.testing.assert_allclose(
        gpu.patch_histograms(labs, responses, points), CPU.patch_histograms(labs, responses, points), rtol=1e-4
    )
    rng = np.random.default_rng(1)
    centres, descriptors = rng.random((5000, 576)).astype(np.float32), rng.random((300, 576)).astype(np.float32)
    norms = (centres**2).sum(1)
    for m in (1, 20, 32):
        (w_gpu, d_gpu), (w_cpu, d_cpu) = (k.nearest_words(descriptors, centres, norms, m) for k in (gpu, CPU))
        assert w_gpu.shape == w_cpu.shape == (300, m)
        assert (w_gpu == w_cpu).mean() > 0.99  # a near tie may fall the other way in another sum order
        np.testing.assert_allclose(d_gpu, d_cpu, rtol=1e-4, atol=1e-3)
    # Exact ties (duplicate centres) go to the lowest index on both.
    twice = np.concatenate([centres[:100], centres[:100]])
    words, _ = gpu.nearest_words(centres[:5], twice, (twice**2).sum(1), 2)
    assert words.tolist() == [[j, j + 100] for j in range(5)]


def test_end_to_end_same_words(gpu, bow_extractor):
    from signature_server.bow import BowExtractor

    on_gpu = BowExtractor(bow_extractor.spec, bow_extractor.codebook, gpu)
    for name in ("coffee", "chelsea", "china.jpg"):
        photo = load_photo(name)
        a, b = on_gpu.bag(photo), bow_extractor.bag(photo)
        same = len(np.intersect1d(a.words, b.words)) / max(len(a.words), len(b.words))
        # Each descriptor shares out `units`: totals differ by the rare keypoint that falls the other way.
        units = bow_extractor.codebook.assignment.units
        assert same > 0.95 and abs(int(a.counts.sum()) - int(b.counts.sum())) <= 2 * units
        assert chi2(a, b) < 0.05
