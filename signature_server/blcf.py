"""Bags of local convolutional features (SIGNATURE_KIND_BLCF, after Mohedano et al. 2016): an image's assignment map.

image -> resized keeping its aspect, longer side `long_side` (448), both sides multiples of
`multiple` (32) -> the deep descriptor's own network (models/efficientnet-lite0, the same ONNX
file: no new weights) -> one feature tensor of its graph (`tensor`, default `features`, the
stride-32 1280-channel map; any other tensor, e.g. "/_blocks.10/Add_output_0" at stride 16 with
112 channels, is made a graph output in memory) -> each cell's feature L2-normalised, minus the
vocabulary's mean, PCA-whitened (`projection`), L2-normalised -> the nearest of the vocabulary's
centres by Euclidean distance -> a (rows, columns) map of words (common/blcf_codec.py). Its word
histogram is the bag the inverted index searches (tf-idf cosine); the map itself lets a query be a
region of its image and a match be found in a window of a catalogue photo.

A query by region is a pyramid: its image is described once per `query_sides` entry, at the scale
where the region's longer side spans that many pixels (the image's longer side at most
`region_max_side`; regions of one call share the passes at equal sizes), and the region keeps, in
every level, the cells whose centres it holds. A
product's scale in a catalogue photo is not known at query time (a small instance in a room, or a
packshot that fills the frame): the query's bag holds its words at each scale, and the first level
is the map a window refers to. Catalogue photos are one map at `long_side`.

Served from the model repository (common/model_repository.py): models/blcf/config.json names the
network, the tensor and its stride, the sizes and the file names; each version folder holds its
vocabulary (`vocabulary.npz`: `mean` (C,) float32, `projection` (d, C) float32, `centres` (V, d)
float16), its own config.json (the representation it was trained with, network version included:
a vocabulary means nothing on another network's features) and provenance.json
(signature_server/train_blcf.py writes all three). Its fingerprint (BLAKE2b over the arrays, the
tensor and the stride) marks every signature, so maps of different vocabularies never mix.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from common.blcf_codec import EMPTY, MAX_LEVELS, AssignmentMap, region_cells
from common.model_repository import ModelSource, read_source, versions_on_disk
from common.onnx_session import GatedSession, active_provider, create_session
from kernels import Kernels, select_kernels, spec
from kernels.cpu import CpuKernels
from signature_server.config import latest_source
from signature_server.deep import INPUT, DeepSpec, preprocess, textured_image
from signature_server.saliency import feature_input_size

DEFAULT_NETWORK = "efficientnet-lite0"
DEFAULT_TENSOR = "features"
# The codec's limits: uint16 image sides, uint8 map sides, uint16 words with 0xFFFF = no word.
MAX_IMAGE_SIDE = 0xFFFF
MAX_MAP_SIDE = 255
MAX_VOCABULARY = EMPTY
# A (x_min, y_min, x_max, y_max) box in pixels of an image.
Box = tuple[float, float, float, float]
_EPS = np.float32(1e-12)


@dataclass(frozen=True)
class BlcfSpec:
    """One version of the BLCF model, as its settings say (paths resolved)."""

    name: str
    version: str
    # The network whose feature map is described: its version's file and normalisation.
    network: DeepSpec
    tensor: str
    stride: int
    long_side: int
    multiple: int
    region_max_side: int
    vocabulary_path: Path
    provenance_path: Path
    # A query's pyramid: the region's longer side, in pixels, at each level (see the module docstring).
    query_sides: tuple[int, ...] = (160, 320)

    @staticmethod
    def load(model_dir: Path) -> BlcfSpec:
        """The highest version on disk of models/<name>/ (tests, benches)."""
        return BlcfSpec.from_source(latest_source(model_dir))

    @staticmethod
    def from_source(source: ModelSource) -> BlcfSpec:
        """ValueError or FileNotFoundError saying what is missing or wrong in the version's settings."""
        return BlcfSpec.from_settings(source.name, source.version, source.folder, source.settings)

    @staticmethod
    def from_settings(
        name: str, version: str, folder: Path, settings: dict[str, Any], root: Path | None = None
    ) -> BlcfSpec:
        """A spec from settings as a version's (the model's config.json updated with the version's)
        whose files are in `folder` (models/<name>/<version>/); the network is read from the model
        repository `root` (by default the one `folder` is in). The vocabulary file need not exist
        yet (train_blcf builds one)."""
        where = f"config.json of {name} version {version}"
        root = root or folder.parent.parent
        network = str(settings.get("network", DEFAULT_NETWORK))
        if not network or "/" in network or "\\" in network or network.startswith("."):
            raise ValueError(f"{where}: network {network!r} is not a folder name of the model repository")
        network_version = str(settings.get("network_version") or "")
        if not network_version:
            on_disk = versions_on_disk(root / network)
            if not on_disk:
                raise FileNotFoundError(f"{where}: network {network!r} has no version under {root}: run `make models`")
            network_version = on_disk[-1]
        try:
            network_spec = DeepSpec.from_source(read_source(root, network, network_version))
            blcf_spec = BlcfSpec(
                name,
                version,
                network_spec,
                str(settings.get("tensor", DEFAULT_TENSOR)),
                _integer(settings, "stride", where),
                _integer(settings, "long_side", where),
                _integer(settings, "multiple", where),
                _integer(settings, "region_max_side", where),
                folder / str(settings.get("vocabulary", "vocabulary.npz")),
                folder / str(settings.get("provenance", "provenance.json")),
                _sides(settings, "query_sides", where),
            )
        except KeyError as exc:
            raise ValueError(f"{where} has no {exc.args[0]!r}") from None
        blcf_spec.check(where)
        return blcf_spec

    def check(self, where: str) -> None:
        """ValueError naming a size that cannot work (the codec's map holds at most 255 cells a side)."""
        if not self.tensor:
            raise ValueError(f"{where}: tensor is empty: name a tensor of the network's graph (e.g. 'features')")
        if self.stride < 1 or self.multiple < 1 or self.multiple % self.stride:
            raise ValueError(
                f"{where}: multiple {self.multiple} is not a positive multiple of the tensor's stride {self.stride}"
            )
        if not self.multiple <= self.long_side <= self.region_max_side:
            raise ValueError(
                f"{where}: sizes must satisfy multiple {self.multiple} <= long_side {self.long_side} "
                f"<= region_max_side {self.region_max_side}"
            )
        if not self.query_sides or not all(self.multiple <= side <= self.region_max_side for side in self.query_sides):
            raise ValueError(
                f"{where}: query_sides {list(self.query_sides)}: give 1 to {MAX_LEVELS} sides, each within "
                f"multiple {self.multiple} and region_max_side {self.region_max_side}"
            )
        if len(self.query_sides) > MAX_LEVELS:
            raise ValueError(f"{where}: query_sides {list(self.query_sides)}: at most {MAX_LEVELS} levels")
        if _snap(self.region_max_side, self.multiple) // self.stride > MAX_MAP_SIDE:
            raise ValueError(
                f"{where}: region_max_side {self.region_max_side} at stride {self.stride} makes maps of more than "
                f"{MAX_MAP_SIDE} cells a side (the signature's limit)"
            )

    def settings(self) -> dict[str, Any]:
        """The representation this spec describes with, as a version's config.json keeps it."""
        return {
            "network": self.network.name,
            "network_version": self.network.version,
            "tensor": self.tensor,
            "stride": self.stride,
            "long_side": self.long_side,
            "multiple": self.multiple,
        }

    def input_size(self, height: int, width: int, long_side: int | None = None) -> tuple[int, int]:
        """(h, w) the network sees an image of height x width at: longer side `long_side` (the
        spec's by default), both sides multiples of `multiple`, at least one of them."""
        return feature_input_size(height, width, long_side or self.long_side, self.multiple)

    def query_long_sides(self, width: int, height: int, regions: Sequence[Box]) -> list[int]:
        """Per pyramid level, the image's longer side at which the largest of `regions` (one, for
        `maps`) spans that level's query side, at most region_max_side (regions clipped to the
        image; levels that come out alike are one)."""
        largest = max(_clip_side(box, width, height) for box in regions)
        sides = [
            round(min(max(side * max(width, height) / max(largest, 1e-6), self.multiple), self.region_max_side))
            for side in self.query_sides
        ]
        return list(dict.fromkeys(sides))


def _sides(settings: dict[str, Any], key: str, where: str) -> tuple[int, ...]:
    value = settings.get(key, [160, 320])
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{where}: {key} {value!r} is not a list of integers (pixels)")
    return tuple(value)


def _integer(settings: dict[str, Any], key: str, where: str) -> int:
    value = settings[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {key} {value!r} is not an integer")
    return value


def _snap(side: float, multiple: int) -> int:
    return max(multiple, round(side / multiple) * multiple)


def _clip_side(box: Box, width: int, height: int) -> float:
    x0, y0, x1, y1 = box
    return max(min(x1, width) - max(x0, 0.0), min(y1, height) - max(y0, 0.0))


def region_problem(box: Box, width: int, height: int) -> str:
    """What makes `box` unusable as a region of a width x height image ("" when nothing): a
    coordinate that is not a finite number, an empty or inverted box, or one wholly outside the
    image. A box partly outside is clipped to the image."""
    x0, y0, x1, y1 = box
    shown = f"({x0:g}, {y0:g}, {x1:g}, {y1:g})"
    if not all(math.isfinite(v) for v in box):
        return f"region {shown} has a coordinate that is not a finite number"
    if not (x1 > x0 and y1 > y0):
        return f"region {shown} is empty or inverted: give x_min < x_max and y_min < y_max"
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        return f"region {shown} lies outside the {width}x{height} image: give pixels of the image"
    return ""


class Vocabulary:
    """The visual words: `mean` (C,) float32 and `projection` (d, C) float32 (PCA-whitening rows) map
    a cell's L2-normalised feature to the d-dimensional space of `centres` (V, d) (stored float16;
    the stored values are the vocabulary), for the feature tensor `tensor` at stride `stride`."""

    def __init__(self, mean: np.ndarray, projection: np.ndarray, centres: np.ndarray, tensor: str, stride: int):
        mean = np.asarray(mean)
        projection = np.asarray(projection)
        centres = np.asarray(centres)
        if mean.ndim != 1 or projection.ndim != 2 or projection.shape[1] != mean.shape[0]:
            raise ValueError(f"vocabulary: projection {projection.shape} does not map the {mean.shape} mean's space")
        if centres.ndim != 2 or centres.shape[1] != projection.shape[0]:
            raise ValueError(f"vocabulary: centres {centres.shape} are not in the projection's {projection.shape[0]}-d")
        if not 1 <= len(centres) <= MAX_VOCABULARY:
            raise ValueError(f"vocabulary of {len(centres)} words: a signature holds 1 to {MAX_VOCABULARY}")
        self.mean = np.ascontiguousarray(mean, np.float32)
        self.projection = np.ascontiguousarray(projection, np.float32)
        self.stored_centres = np.ascontiguousarray(centres, np.float16)
        if not all(np.isfinite(a).all() for a in (self.mean, self.projection, self.stored_centres)):
            raise ValueError("vocabulary holds values that are not finite numbers (as stored: centres in float16)")
        # Distances are computed in float32 from the stored float16 values.
        self.centres = self.stored_centres.astype(np.float32)
        self.norms = (self.centres**2).sum(axis=1)
        self.tensor = tensor
        self.stride = stride
        self.fingerprint = vocabulary_fingerprint(self.mean, self.projection, self.stored_centres, tensor, stride)

    @property
    def size(self) -> int:
        return len(self.centres)

    @property
    def channels(self) -> int:
        return len(self.mean)

    @property
    def dims(self) -> int:
        return int(self.projection.shape[0])

    def save(self, path: Path) -> None:
        np.savez_compressed(path, mean=self.mean, projection=self.projection, centres=self.stored_centres)

    @staticmethod
    def load(path: Path, tensor: str, stride: int) -> Vocabulary:
        """ValueError saying what is wrong with a file that is not a vocabulary; FileNotFoundError."""
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: train a vocabulary (python -m signature_server.train_blcf)"
            )
        try:
            with np.load(path, allow_pickle=False) as archive:
                missing = sorted({"mean", "projection", "centres"} - set(archive.files))
                if missing:
                    raise ValueError(f"{path} has no {missing}: not a BLCF vocabulary")
                mean, projection, centres = archive["mean"], archive["projection"], archive["centres"]
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise ValueError(f"{path} cannot be read as a vocabulary ({type(exc).__name__}: {exc})") from None
        if centres.dtype != np.float16:
            raise ValueError(f"{path}: centres are {centres.dtype}; a vocabulary stores them as float16")
        return Vocabulary(mean, projection, centres, tensor, stride)

    def check_provenance(self, provenance_path: Path, where: str) -> None:
        """ValueError when provenance.json records another fingerprint: the vocabulary, the tensor or
        the stride changed after training."""
        if not provenance_path.is_file():
            return
        try:
            recorded = json.loads(provenance_path.read_text()).get("fingerprint")
        except (OSError, json.JSONDecodeError, AttributeError) as exc:
            raise ValueError(f"{where}: {provenance_path.name} cannot be read: {exc}") from None
        if recorded is not None and recorded != self.fingerprint:
            raise ValueError(
                f"{where}: provenance.json records fingerprint {int(recorded):08x} but the vocabulary with tensor "
                f"{self.tensor!r} at stride {self.stride} has {self.fingerprint:08x}: its file or its settings "
                "changed after training; train a new version instead"
            )

    def project(self, cells: np.ndarray) -> np.ndarray:
        """(n, C) cell features -> (n, d) float32 unit vectors: L2-normalised, minus the mean,
        projected (PCA-whitened), L2-normalised."""
        x = np.asarray(cells, np.float32)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)
        y = (x - self.mean) @ self.projection.T
        return (y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), _EPS)).astype(np.float32)


def vocabulary_fingerprint(
    mean: np.ndarray, projection: np.ndarray, centres: np.ndarray, tensor: str, stride: int
) -> int:
    """uint32 of BLAKE2b over the arrays as stored (shapes included), the tensor's name and the stride."""
    digest = hashlib.blake2b(digest_size=8)
    for array, dtype in ((mean, np.float32), (projection, np.float32), (centres, np.float16)):
        stored = np.ascontiguousarray(array, dtype)
        digest.update(np.asarray(stored.shape, "<i8").tobytes())
        digest.update(stored.astype(stored.dtype.newbyteorder("<")).tobytes())
    digest.update(tensor.encode("utf-8") + b"\x00" + int(stride).to_bytes(4, "little"))
    return int.from_bytes(digest.digest()[:4], "little")


def cells(features: np.ndarray) -> np.ndarray:
    """(C, rows, columns) feature map -> (rows x columns, C) float32 row-major cells."""
    channels = features.shape[0]
    return np.ascontiguousarray(features.reshape(channels, -1).T, np.float32)


def open_session(
    model_path: Path,
    tensor: str,
    providers: Sequence[str | tuple[str, dict[str, Any]]],
    intra_op_threads: int = 0,
    concurrency: int = 1,
) -> GatedSession:
    """A session over the network's graph whose outputs include `tensor`: the file as it is when the
    tensor is an output already; else the same graph (the same weights, nothing written to disk)
    with the tensor added as an output in memory. ValueError when the graph has no such tensor."""
    session = create_session(model_path, providers, intra_op_threads, concurrency)
    if tensor in {o.name for o in session.get_outputs()}:
        return session
    import onnx  # only for a tensor that is not an output: the graph is edited in memory

    model = onnx.load(str(model_path))
    produced = {name for node in model.graph.node for name in node.output}
    if tensor not in produced:
        adds = sorted(name for name in produced if name.endswith("/Add_output_0"))
        raise ValueError(
            f"{model_path.name} has no tensor {tensor!r}: name one of its outputs "
            f"{[o.name for o in model.graph.output]} or a node output such as {adds[-3:]}"
        )
    model.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    data = model.SerializeToString()
    # The provider the file itself started on (create_session tried them in order) runs the edited graph.
    chosen = active_provider(session)
    options = dict(next((o for p, o in _named(providers) if p == chosen), {}))
    sess_options = ort.SessionOptions()
    sess_options.intra_op_num_threads = intra_op_threads
    sess_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    chain: list[str | tuple[str, dict[str, Any]]] = [(chosen, options)]
    if chosen != "CPUExecutionProvider":
        chain.append("CPUExecutionProvider")
    del session
    return GatedSession(ort.InferenceSession(data, sess_options=sess_options, providers=chain), concurrency)


def _named(providers: Sequence[str | tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    return [(p, {}) if isinstance(p, str) else (p[0], p[1]) for p in providers]


class FeatureNetwork:
    """The network's feature tensor over images; thread-safe (the session gates its runs)."""

    def __init__(
        self,
        blcf_spec: BlcfSpec,
        providers: Sequence[str | tuple[str, dict[str, Any]]] = (("CPUExecutionProvider", {}),),
        intra_op_threads: int = 0,
        concurrency: int = 1,
    ):
        self.spec = blcf_spec
        self.session = open_session(
            blcf_spec.network.model_path, blcf_spec.tensor, providers, intra_op_threads, concurrency
        )
        self.provider = active_provider(self.session)
        if INPUT not in {i.name for i in self.session.get_inputs()}:
            raise ValueError(f"{blcf_spec.network.model_path.name} has no input {INPUT!r}")

    def run(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, h, w) float32 preprocessed -> (N, C, h / stride, w / stride) float32 feature maps;
        ValueError when the tensor's map is not at the spec's stride."""
        out = self.session.run([self.spec.tensor], {INPUT: batch})[0]
        expected = (batch.shape[2] // self.spec.stride, batch.shape[3] // self.spec.stride)
        if out.ndim != 4 or out.shape[0] != len(batch) or tuple(out.shape[2:]) != expected:
            raise ValueError(
                f"tensor {self.spec.tensor!r} is {tuple(out.shape)} for a {tuple(batch.shape)} input; "
                f"at stride {self.spec.stride} it would be (N, C, {expected[0]}, {expected[1]}): "
                "the config's stride is not this tensor's"
            )
        return np.asarray(out, np.float32)

    def describe(
        self, images: Sequence[np.ndarray], long_side: int | None = None, max_batch: int = 8
    ) -> list[np.ndarray]:
        """N images (H, W, 3) uint8 RGB -> N (C, rows, columns) feature maps, each image resized to
        `long_side` (the spec's by default); images of one input size share forward passes of up
        to `max_batch`."""
        sizes = [self.spec.input_size(image.shape[0], image.shape[1], long_side) for image in images]
        out: list[np.ndarray | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(sizes):
            by_size.setdefault(size, []).append(i)
        for size, members in by_size.items():
            for start in range(0, len(members), max(1, max_batch)):
                chunk = members[start : start + max(1, max_batch)]
                batch = np.stack([preprocess(images[i], self.spec.network, size) for i in chunk])
                for i, features in zip(chunk, self.run(batch)):
                    out[i] = features
        return [features for features in out if features is not None]


class BlcfExtractor:
    """Assignment maps of images with one vocabulary; thread-safe.

    Words are the nearest centres by the project's nearest-words kernel (kernels/): the CPU
    reference takes any width; the CUDA kernel is compiled for the colour-texture descriptor's 576
    dimensions, so it assigns only a vocabulary of that width and the CPU reference the others."""

    def __init__(
        self, network: FeatureNetwork, vocabulary: Vocabulary, kernels: Kernels | None = None, max_batch: int = 8
    ):
        self.spec = network.spec
        self.network = network
        self.vocabulary = vocabulary
        if (vocabulary.tensor, vocabulary.stride) != (self.spec.tensor, self.spec.stride):
            raise ValueError(
                f"vocabulary of tensor {vocabulary.tensor!r} at stride {vocabulary.stride} given to a model of "
                f"{self.spec.tensor!r} at stride {self.spec.stride}"
            )
        fits = kernels is not None and (kernels.name == "cpu" or vocabulary.dims == spec.DIMENSION)
        self.kernels: Kernels = kernels if fits and kernels is not None else CpuKernels()
        self.max_batch = max(1, max_batch)

    @staticmethod
    def load(
        model_dir: Path, kernels: Kernels | str | None = None, intra_op_threads: int = 0, max_batch: int = 8
    ) -> BlcfExtractor:
        """The highest version on disk of models/<name>/ on the CPU (tests, benches, tools);
        `kernels` a backend or its name (kernels.select_kernels)."""
        blcf_spec = BlcfSpec.load(model_dir)
        vocabulary = Vocabulary.load(blcf_spec.vocabulary_path, blcf_spec.tensor, blcf_spec.stride)
        vocabulary.check_provenance(blcf_spec.provenance_path, f"{blcf_spec.name} version {blcf_spec.version}")
        chosen = select_kernels(kernels) if isinstance(kernels, str) else kernels
        return BlcfExtractor(
            FeatureNetwork(blcf_spec, intra_op_threads=intra_op_threads), vocabulary, chosen, max_batch
        )

    @property
    def provider(self) -> str:
        return self.network.provider

    def words(self, features: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
        """(C, rows, columns) feature map -> (rows, columns) uint16 nearest words; with `keep`
        ((rows, columns) bool), only those cells are assigned (the nearest-word search is most of
        a signature's time) and the others are EMPTY."""
        channels, rows, columns = features.shape
        if channels != self.vocabulary.channels:
            raise ValueError(
                f"tensor {self.spec.tensor!r} has {channels} channels; the vocabulary was trained on "
                f"{self.vocabulary.channels}: a vocabulary of another tensor or network"
            )
        v = self.vocabulary
        described = cells(features)
        if keep is not None:
            described = described[keep.reshape(-1)]
        nearest, _ = self.kernels.nearest_words(v.project(described), v.centres, v.norms, 1)
        if keep is None:
            return nearest[:, 0].astype(np.uint16).reshape(rows, columns)
        out = np.full((rows, columns), EMPTY, np.uint16)
        out[keep] = nearest[:, 0]
        return out

    def _map(self, features: np.ndarray, height: int, width: int) -> AssignmentMap:
        v = self.vocabulary
        return AssignmentMap(self.words(features), v.size, v.fingerprint, width, height)

    def map(self, image: np.ndarray, long_side: int | None = None) -> AssignmentMap:
        """(H, W, 3) uint8 RGB -> its assignment map, described at `long_side` (the spec's by default);
        width and height are the image's own."""
        (features,) = self.network.describe([image], long_side, 1)
        return self._map(features, *image.shape[:2])

    def compute(self, images: Sequence[np.ndarray]) -> list[AssignmentMap]:
        """N images -> N assignment maps at the spec's long side (batched where sizes agree)."""
        features = self.network.describe(images, None, self.max_batch)
        return [self._map(f, *image.shape[:2]) for f, image in zip(features, images)]

    def maps(self, image: np.ndarray, regions: Sequence[Box]) -> list[AssignmentMap]:
        """One image, N regions (x_min, y_min, x_max, y_max pixels of it) -> N query pyramids, each
        the image's maps at the region's own `query_long_sides` (levels that come out at the same
        input size are one) with only the region's cells kept (and only they assigned to words);
        one forward pass per distinct input size, shared by the regions. ValueError for a region
        that region_problem refuses."""
        height, width = image.shape[:2]
        if not regions:
            raise ValueError("no regions given")
        for i, box in enumerate(regions):
            problem = region_problem(box, width, height)
            if problem:
                raise ValueError(f"regions[{i}]: {problem}")
        v = self.vocabulary
        described: dict[tuple[int, int], np.ndarray] = {}  # input size -> features: one pass per size
        out = []
        for box in regions:
            # Each region at its own scales (a small product is not described at a large one's).
            sizes: dict[tuple[int, int], int] = {}
            for side in self.spec.query_long_sides(width, height, [box]):
                sizes.setdefault(self.spec.input_size(height, width, side), side)
            levels = []
            for size, side in sizes.items():
                if size not in described:
                    (described[size],) = self.network.describe([image], side, 1)
                features = described[size]
                levels.append(self.words(features, region_cells(features.shape[1:], width, height, box)))
            out.append(AssignmentMap(levels[0], v.size, v.fingerprint, width, height, tuple(levels[1:])))
        return out


class BlcfModel:
    """The BLCF model as the signature service serves it (common.model_repository.ServedModel): one
    version's vocabulary over its own session of the network's graph."""

    def __init__(self, extractor: BlcfExtractor):
        self.extractor = extractor

    @staticmethod
    def from_source(
        source: ModelSource, kernels: Kernels | None = None, intra_op_threads: int = 0, inference_concurrency: int = 1
    ) -> BlcfModel:
        """Builds one version (not yet warm); ValueError or FileNotFoundError if it cannot serve."""
        blcf_spec = BlcfSpec.from_source(source)
        where = f"{source.name} version {source.version}"
        vocabulary = Vocabulary.load(blcf_spec.vocabulary_path, blcf_spec.tensor, blcf_spec.stride)
        vocabulary.check_provenance(blcf_spec.provenance_path, where)
        network = FeatureNetwork(blcf_spec, source.providers, intra_op_threads, inference_concurrency)
        return BlcfModel(BlcfExtractor(network, vocabulary, kernels, source.batching.max_batch))

    @property
    def provider(self) -> str:
        return self.extractor.provider

    @property
    def max_batch(self) -> int:
        return self.extractor.max_batch

    def warm_up(self) -> None:
        """A map at the long side (the tensor's channels must be the vocabulary's: ValueError), a
        batch of max_batch, and a small region's query pyramid: each shape runs once and the
        nearest-words kernel compiles before the first request."""
        s = self.extractor.spec
        image = textured_image(s.long_side * 3 // 4, s.long_side)
        described = self.extractor.compute([image] * self.max_batch)
        if not all(m.words.shape == described[0].words.shape for m in described):
            raise ValueError(f"{s.name} version {s.version}: a batch gave maps of different shapes")
        small = (image.shape[1] * 0.1, image.shape[0] * 0.1, image.shape[1] * 0.3, image.shape[0] * 0.3)
        self.extractor.maps(image, [small])
        # Other aspects (portrait, square): each new input shape's first run is slower.
        for height, width in ((s.long_side, s.long_side * 3 // 4), (s.long_side, s.long_side)):
            self.extractor.compute([textured_image(height, width)])

    def close(self) -> None:
        """Nothing to stop: the session goes with the object."""
