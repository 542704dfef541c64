"""The Cortexica paper's colour-texture signature (section 3.1): keypoints, 576-d descriptors, words.

image -> resize (longer side = working_size) -> CIE Lab in [0, 1] -> 4-level pyramid -> per level the
G2/H2 steerable basis, steered to 4 orientations (even and odd) -> saliency from the lightness
orientation channels -> at most 512 keypoints -> per keypoint and level a 32x32 patch's
texture-weighted colour histograms (3 x 6 x 4 x 4 x 2 = 576) -> L1 then square root (Hellinger, so
Euclidean k-means compares distributions) -> nearest of the codebook's centres -> bag of words.

Each heavy step is a kernel of the chosen backend (kernels/: CUDA, or its CPU reference); this module
only composes them and holds no grpc.

Served from the model repository (common/model_repository.py): models/colour-texture-bow/<version>/
holds the codebook (`codebook`, `provenance`), config.json the parameters above. Each version's
codebook is its own vocabulary: its signatures carry the codebook's fingerprint, and an index built
with another codebook refuses them rather than comparing words of different vocabularies.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from common.bow_codec import BagOfWords, encode
from common.model_repository import ModelSource
from kernels import Kernels, spec
from signature_server.config import latest_source


@dataclass(frozen=True)
class BowSpec:
    name: str
    version: int
    working_size: int
    max_keypoints: int
    nms_radius: int
    relative_threshold: float
    absolute_threshold: float
    min_keypoints: int
    grid_step: int
    codebook_path: Path
    provenance_path: Path

    @staticmethod
    def load(model_dir: Path) -> BowSpec:
        """The highest version on disk of models/<name>/ (tests, benches, train_codebook)."""
        return BowSpec.from_source(latest_source(model_dir))

    @staticmethod
    def from_source(source: ModelSource) -> BowSpec:
        """ValueError or FileNotFoundError saying what is missing or wrong in the version's settings."""
        c = source.settings
        try:
            return BowSpec(
                source.name,
                int(source.version),
                int(c["working_size"]),
                int(c["max_keypoints"]),
                int(c["nms_radius"]),
                float(c["relative_threshold"]),
                float(c["absolute_threshold"]),
                int(c["min_keypoints"]),
                int(c["grid_step"]),
                source.path("codebook"),
                source.folder / str(c.get("provenance", "provenance.json")),
            )
        except KeyError as exc:
            raise ValueError(f"config.json of {source.name} version {source.version} has no {exc.args[0]!r}") from None


class Codebook:
    """(V, 576) float32 k-means centres, stored as uint8 / 255 (the stored values are the codebook)."""

    def __init__(self, centres: np.ndarray, provenance: dict | None = None):
        if centres.ndim != 2 or centres.shape[1] != spec.DIMENSION:
            raise ValueError(f"codebook has shape {centres.shape}; expected (V, {spec.DIMENSION})")
        self.centres = np.ascontiguousarray(centres, dtype=np.float32)
        self.norms = (self.centres**2).sum(axis=1)
        self.provenance = provenance or {}
        # Signatures carry this so a signature of another codebook is refused, not silently compared.
        self.fingerprint = int.from_bytes(hashlib.sha256(self.centres.tobytes()).digest()[:4], "little")

    @property
    def vocabulary(self) -> int:
        return len(self.centres)

    @staticmethod
    def quantise(centres: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(centres * 255), 0, 255).astype(np.uint8)

    def save(self, path: Path) -> None:
        np.savez_compressed(path, centres_u8=self.quantise(self.centres))

    @staticmethod
    def load(path: Path, provenance_path: Path | None = None) -> Codebook:
        with np.load(path) as archive:
            centres = archive["centres_u8"].astype(np.float32) / np.float32(255)
        provenance = json.loads(provenance_path.read_text()) if provenance_path and provenance_path.exists() else {}
        return Codebook(centres, provenance)


@dataclass
class Described:
    """(K, 2) int32 (y, x) keypoints on the working image, (K,) saliency, (K, 576) descriptors."""

    keypoints: np.ndarray
    saliency: np.ndarray
    descriptors: np.ndarray


def working_image(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> the same with its longer side = size (area when shrinking)."""
    height, width = image.shape[:2]
    scale = size / max(height, width)
    shape = (max(1, round(width * scale)), max(1, round(height * scale)))
    if shape == (width, height):
        return np.ascontiguousarray(image)
    return cv2.resize(image, shape, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def grid_points(height: int, width: int, step: int) -> np.ndarray:
    """(K, 2) int32 (y, x) points every `step` pixels; an image thinner than half a step (a
    100000x1 strip is 192x1 when working) gets its middle row or column, so it is still described."""
    ys = np.arange(step // 2, height, step) if height > step // 2 else np.array([height // 2])
    xs = np.arange(step // 2, width, step) if width > step // 2 else np.array([width // 2])
    return np.stack(np.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2).astype(np.int32)


def normalise_descriptors(raw: np.ndarray) -> np.ndarray:
    """(K, 576) histogram sums -> Hellinger form: sqrt(h / sum(h)), unit L2 norm."""
    totals = raw.sum(axis=1, keepdims=True)
    return np.sqrt(raw / np.maximum(totals, np.float32(1e-12))).astype(np.float32)


class BowExtractor:
    """Colour-texture bag-of-words signatures with one kernel backend; thread-safe."""

    def __init__(self, bow_spec: BowSpec, codebook: Codebook, kernels: Kernels, threads: int = 2):
        self.spec = bow_spec
        self.codebook = codebook
        self.kernels = kernels
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="bow")

    def describe(self, image: np.ndarray) -> Described:
        k = self.kernels
        rgb = working_image(image, self.spec.working_size)
        labs = [k.rgb_to_lab(rgb)]
        for _ in range(spec.LEVELS - 1):
            labs.append(k.pyr_down(labs[-1]))
        responses, amplitudes = [], []
        for lab in labs:
            r, a = k.steer(k.filter_basis(lab))
            responses.append(r)
            amplitudes.append(a)
        saliency = k.saliency(amplitudes)
        threshold = max(self.spec.absolute_threshold, self.spec.relative_threshold * float(saliency.max()))
        points, values = k.select_keypoints(saliency, self.spec.nms_radius, threshold, self.spec.max_keypoints)
        if len(points) < max(1, self.spec.min_keypoints):
            # A plain or nearly plain crop: describe it on a regular grid so it still gets a signature
            # (never an empty bag: the codec refuses one, and the kernels have nothing to work on).
            height, width = saliency.shape
            grid = grid_points(height, width, self.spec.grid_step)[: self.spec.max_keypoints - len(points)]
            points = np.concatenate([points, grid])
            values = np.concatenate([values, saliency[grid[:, 0], grid[:, 1]]])
        raw = k.patch_histograms(labs, responses, points)
        return Described(points, values, normalise_descriptors(raw))

    def bag(self, image: np.ndarray) -> BagOfWords:
        described = self.describe(image)
        words = self.kernels.assign_words(described.descriptors, self.codebook.centres, self.codebook.norms)
        return BagOfWords.from_words(words, self.codebook.vocabulary, self.codebook.fingerprint)

    def compute(self, images: list[np.ndarray]) -> list[bytes]:
        """N images (H, W, 3) uint8 RGB -> N encoded signatures (common.bow_codec format)."""
        return [encode(b) for b in self._pool.map(self.bag, images)]

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def warm_up_images() -> list[np.ndarray]:
    """A textured image of a crop's usual size (keypoints fire at every pyramid level) and a plain
    one (the grid path): together they run every kernel once, so numba compiles (or loads from its
    cache) before the first request."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:224, 0:224]
    stripes = (127 + 100 * np.sin(xs / 3.0 + ys / 5.0))[..., None] * np.array([1.0, 0.6, 0.3])
    textured = np.clip(stripes + rng.normal(0, 20, stripes.shape), 0, 255).astype(np.uint8)
    return [textured, np.full((48, 64, 3), 128, np.uint8)]


class BowModel:
    """The colour-texture model as the signature service serves it (common.model_repository.ServedModel):
    one version's parameters and codebook on the server's kernels."""

    def __init__(self, extractor: BowExtractor, max_batch: int = 1):
        self.extractor = extractor
        self._max_batch = max_batch

    @staticmethod
    def from_source(source: ModelSource, kernels: Kernels, threads: int = 2) -> BowModel:
        """Builds one version (not yet warm); ValueError or FileNotFoundError if it cannot serve."""
        bow_spec = BowSpec.from_source(source)
        codebook = Codebook.load(bow_spec.codebook_path, bow_spec.provenance_path)
        return BowModel(BowExtractor(bow_spec, codebook, kernels, threads), source.batching.max_batch)

    @property
    def provider(self) -> str:
        return self.extractor.kernels.detail

    @property
    def max_batch(self) -> int:
        return self._max_batch

    def warm_up(self) -> None:
        """Signs warm_up_images() (the kernels compile; a codebook the kernels cannot use raises),
        then the textured one a few times more: the first runs at a size also pay for first-touch
        memory and the interpreter's specialisation (measured: 1.6x a warm call after one run)."""
        images = warm_up_images()
        self.extractor.compute(images)
        for _ in range(3):
            self.extractor.compute(images[:1])

    def close(self) -> None:
        self.extractor.close()
