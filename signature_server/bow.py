"""The Cortexica paper's colour-texture signature (section 3.1): keypoints, 576-d descriptors, words.

image -> resize (longer side = working_size) -> CIE Lab in [0, 1] -> 4-level pyramid -> per level the
G2/H2 steerable basis, steered to 4 orientations (even and odd) -> saliency from the lightness
orientation channels -> at most 512 keypoints -> per keypoint and level a 32x32 patch's
texture-weighted colour histograms (3 x 6 x 4 x 4 x 2 = 576) -> L1 then square root (Hellinger, so
Euclidean k-means compares distributions) -> words -> bag of words.

Words (`Assignment`, a version's config.json "assignment"): each descriptor's `nearest` codebook
centres share `units` integer units, in proportion to exp(-(d_i^2 - d_1^2) / (2 sigma^2)) (d_i the
distance to the i-th nearest), rounded by largest remainder; a word's count is the sum of its units.
Counts stay integers, so the codec and the index keep theirs. nearest 1, units 1 is hard assignment
(version 1: a median 24 distinct words per image on bench/signature.py; version 2's soft assignment 183).
A signature never exceeds `max_signature_bytes`: a bag that would is cut to its largest counts.

Each heavy step is a kernel of the chosen backend (kernels/: CUDA, or its CPU reference); this module
only composes them and holds no grpc.

Served from the model repository (common/model_repository.py): models/colour-texture-bow/<version>/
holds the codebook (`codebook`, `provenance`), config.json the parameters above. Each version's
codebook is its own vocabulary: its signatures carry the codebook's fingerprint, and an index built
with another codebook refuses them rather than comparing words of different vocabularies. The
fingerprint covers the centres and the assignment parameters (the same centres assigned another way
are other words); hard assignment's is the centres' alone, as version 1's signatures carry.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from common.bow_codec import BagOfWords, encode
from common.model_repository import ModelSource
from kernels import Kernels, check_nearest, spec
from signature_server.config import latest_source

# The paper's budget for one signature (bytes); the codec's header and bitmap must leave room in it.
SIGNATURE_BYTES = 3500
_HEADER_BYTES = 7
# A posting holds a word's count in a uint16 (index_server/inverted.py).
_MAX_WORD_COUNT = 65535


@dataclass(frozen=True)
class Assignment:
    """How descriptors become word counts (see the module): the `nearest` centres of each descriptor
    share `units` units by Gaussian weights of width `sigma` (in Hellinger distance); a bag is cut to
    at most `max_signature_bytes` encoded. The default is hard assignment (version 1)."""

    nearest: int = 1
    sigma: float = 0.0
    units: int = 1
    max_signature_bytes: int = SIGNATURE_BYTES

    @property
    def hard(self) -> bool:
        """Version 1's assignment: one unit to the nearest word (sigma then has no effect)."""
        return self.nearest == 1 and self.units == 1 and self.max_signature_bytes == SIGNATURE_BYTES

    @staticmethod
    def parse(raw: Any, where: str) -> Assignment:
        """config.json's "assignment" object (absent: hard) -> Assignment; ValueError naming the key."""
        if raw is None:
            return Assignment()
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: assignment {raw!r} is not an object")
        unknown = sorted(set(raw) - {"nearest", "sigma", "units", "max_signature_bytes"})
        if unknown:
            raise ValueError(f"{where}: assignment has unknown keys {unknown}")

        def number(key: str, kind: type, default: Any) -> Any:
            value = raw.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                raise ValueError(
                    f"{where}: assignment {key} {value!r} is not {'a number' if kind is float else 'an integer'}"
                )
            return kind(value)

        assignment = Assignment(
            number("nearest", int, 1),
            number("sigma", float, 0.0),
            number("units", int, 1),
            number("max_signature_bytes", int, SIGNATURE_BYTES),
        )
        assignment.check(where)
        return assignment

    def check(self, where: str, vocabulary: int | None = None, max_keypoints: int | None = None) -> None:
        """ValueError saying which parameter cannot work (with this vocabulary and keypoint count)."""
        if not 1 <= self.nearest <= spec.MAX_NEAREST:
            raise ValueError(f"{where}: assignment nearest {self.nearest} is not in 1..{spec.MAX_NEAREST}")
        if self.nearest > 1 and not self.sigma > 0:
            raise ValueError(f"{where}: assignment sigma {self.sigma} must be above 0 when nearest > 1")
        if self.units < 1:
            raise ValueError(f"{where}: assignment units {self.units} is not at least 1")
        if vocabulary is not None:
            check_nearest(self.nearest, vocabulary)
            # The header, the count of words, the bitmap and at least one word must fit.
            least = _HEADER_BYTES + 3 + (vocabulary + 7) // 8 + 1
            if self.max_signature_bytes < least:
                raise ValueError(
                    f"{where}: max_signature_bytes {self.max_signature_bytes} cannot hold a signature of a "
                    f"{vocabulary}-word codebook (at least {least} bytes)"
                )
        if max_keypoints is not None and self.units * max_keypoints > _MAX_WORD_COUNT:
            raise ValueError(
                f"{where}: assignment units {self.units} x max_keypoints {max_keypoints} could count a word "
                f"above {_MAX_WORD_COUNT}, which no posting holds"
            )


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
    assignment: Assignment = field(default_factory=Assignment)

    @staticmethod
    def load(model_dir: Path) -> BowSpec:
        """The highest version on disk of models/<name>/ (tests, benches, train_codebook)."""
        return BowSpec.from_source(latest_source(model_dir))

    @staticmethod
    def from_source(source: ModelSource) -> BowSpec:
        """ValueError or FileNotFoundError saying what is missing or wrong in the version's settings."""
        c = source.settings
        where = f"config.json of {source.name} version {source.version}"
        try:
            bow_spec = BowSpec(
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
                Assignment.parse(c.get("assignment"), where),
            )
        except KeyError as exc:
            raise ValueError(f"{where} has no {exc.args[0]!r}") from None
        bow_spec.assignment.check(where, max_keypoints=bow_spec.max_keypoints)
        return bow_spec

    def load_codebook(self) -> Codebook:
        """This version's codebook with its assignment (and so its signatures' fingerprint)."""
        return Codebook.load(self.codebook_path, self.provenance_path, self.assignment)


class Codebook:
    """(V, 576) float32 k-means centres, stored as uint8 / 255 (the stored values are the codebook),
    with the assignment that turns descriptors into its words."""

    def __init__(self, centres: np.ndarray, provenance: dict | None = None, assignment: Assignment | None = None):
        if centres.ndim != 2 or centres.shape[1] != spec.DIMENSION:
            raise ValueError(f"codebook has shape {centres.shape}; expected (V, {spec.DIMENSION})")
        self.centres = np.ascontiguousarray(centres, dtype=np.float32)
        self.norms = (self.centres**2).sum(axis=1)
        self.provenance = provenance or {}
        self.assignment = assignment or Assignment()
        # Signatures carry this so a signature of another codebook is refused, not silently compared.
        self.fingerprint = fingerprint(self.centres, self.assignment)

    def with_assignment(self, assignment: Assignment) -> Codebook:
        """The same centres (shared, not copied) assigned another way: another fingerprint."""
        return self if assignment == self.assignment else Codebook(self.centres, self.provenance, assignment)

    @property
    def vocabulary(self) -> int:
        return len(self.centres)

    @staticmethod
    def quantise(centres: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(centres * 255), 0, 255).astype(np.uint8)

    def save(self, path: Path) -> None:
        np.savez_compressed(path, centres_u8=self.quantise(self.centres))

    @staticmethod
    def load(path: Path, provenance_path: Path | None = None, assignment: Assignment | None = None) -> Codebook:
        with np.load(path) as archive:
            centres = archive["centres_u8"].astype(np.float32) / np.float32(255)
        provenance = json.loads(provenance_path.read_text()) if provenance_path and provenance_path.exists() else {}
        return Codebook(centres, provenance, assignment)

    def check_provenance(self, where: str) -> None:
        """ValueError when the provenance records another fingerprint than these centres with this
        assignment give: the files or the version's config.json changed after training."""
        recorded = self.provenance.get("fingerprint")
        if recorded is not None and recorded != self.fingerprint:
            raise ValueError(
                f"{where}: provenance.json records fingerprint {int(recorded):08x} but the codebook with "
                f"assignment {asdict(self.assignment)} has {self.fingerprint:08x}: its centres or assignment "
                "changed after training; train a new version instead"
            )


def fingerprint(centres: np.ndarray, assignment: Assignment) -> int:
    """uint32 of sha256 over the float32 centres, then (unless hard) the assignment as sorted JSON."""
    digest = hashlib.sha256(np.ascontiguousarray(centres, np.float32).tobytes())
    if not assignment.hard:
        digest.update(json.dumps(asdict(assignment), sort_keys=True).encode())
    return int.from_bytes(digest.digest()[:4], "little")


def _varint_bytes(values: np.ndarray) -> np.ndarray:
    """(n,) non-negative ints -> (n,) bytes of each as a varint (common/bow_codec.py)."""
    out = np.ones(len(values), np.int64)
    for shift in (7, 14, 21, 28):
        out += values >= (1 << shift)
    return out


def soft_counts(words: np.ndarray, distances: np.ndarray, assignment: Assignment, vocabulary: int) -> BagOfWords:
    """(K, m) nearest words, nearest first, and their distances (less any per-row constant) -> the bag
    (fingerprint 0: the caller's codebook sets it). Host code shared by every kernel backend, so
    equal nearest lists give equal bags."""
    rows, m = words.shape
    if m == 1 or rows == 0:
        units = np.full((rows, m), assignment.units, np.int64)
    else:
        spread = distances.astype(np.float64) - distances[:, :1].astype(np.float64)
        weights = np.exp(-np.maximum(spread, 0.0) / (2.0 * assignment.sigma**2))
        shares = assignment.units * weights / weights.sum(axis=1, keepdims=True)
        units = np.floor(shares).astype(np.int64)
        # Largest remainder: the units floor() left go to the largest fractions, nearer words first on ties.
        left = assignment.units - units.sum(axis=1)
        order = np.argsort(-(shares - units), axis=1, kind="stable")
        ranked = np.take_along_axis(units, order, axis=1) + (np.arange(m)[None, :] < left[:, None])
        np.put_along_axis(units, order, ranked, axis=1)
    counts = np.bincount(words.ravel(), weights=units.ravel(), minlength=vocabulary).astype(np.int64)
    present = np.flatnonzero(counts)
    bag = BagOfWords(present.astype(np.int32), counts[present].astype(np.uint32), vocabulary, 0)
    return limit_bytes(bag, assignment.max_signature_bytes)


def limit_bytes(bag: BagOfWords, limit: int) -> BagOfWords:
    """The bag, or, if its encoding would exceed `limit` bytes, its largest counts that fit (ties to
    the lower word): what leaves out the least weight."""
    n = len(bag.words)
    fixed = _HEADER_BYTES + (bag.vocabulary + 7) // 8
    sizes = _varint_bytes(bag.counts.astype(np.int64))
    if fixed + int(_varint_bytes(np.array([n]))[0]) + int(sizes.sum()) <= limit:
        return bag
    order = np.lexsort((bag.words, -bag.counts.astype(np.int64)))
    kept = np.arange(1, n + 1)
    total = fixed + _varint_bytes(kept) + np.cumsum(sizes[order])
    keep = max(1, int((total <= limit).sum()))  # total rises with each word kept
    chosen = np.sort(order[:keep])
    return BagOfWords(bag.words[chosen], bag.counts[chosen], bag.vocabulary, bag.codebook)


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
    """Colour-texture bag-of-words signatures with one kernel backend; thread-safe. Words are assigned
    as the spec says: `self.codebook` is the given centres with the spec's assignment (and its
    fingerprint), whatever assignment the given codebook was loaded with."""

    def __init__(self, bow_spec: BowSpec, codebook: Codebook, kernels: Kernels, threads: int = 2):
        where = f"{bow_spec.name} version {bow_spec.version}"
        bow_spec.assignment.check(where, codebook.vocabulary, bow_spec.max_keypoints)
        self.spec = bow_spec
        self.codebook = codebook.with_assignment(bow_spec.assignment)
        self.codebook.check_provenance(where)
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
        return self.words(self.describe(image).descriptors)

    def words(self, descriptors: np.ndarray) -> BagOfWords:
        """(K, 576) descriptors -> their bag, by the codebook's assignment."""
        c = self.codebook
        words, distances = self.kernels.nearest_words(descriptors, c.centres, c.norms, c.assignment.nearest)
        return replace(soft_counts(words, distances, c.assignment, c.vocabulary), codebook=c.fingerprint)

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
        codebook = bow_spec.load_codebook()
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
