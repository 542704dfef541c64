"""Bags of local convolutional features (signature_server/blcf.py) on real photos and the real network:
map sizes, determinism, regions, invariance to a mirror and a rescale, the vocabulary's fingerprint
and file, other feature tensors of the same graph, the nearest words against brute force, and the
training command. Nothing here depends on the vocabulary's size (the shipped one is retrained)."""

from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest

from common.blcf_codec import EMPTY, AssignmentMap, decode, encode
from common.config import MODELS_DIR
from common.photos import load_photo
from kernels import select_kernels
from signature_server.blcf import (
    MAX_IMAGE_SIDE,
    BlcfExtractor,
    BlcfModel,
    BlcfSpec,
    FeatureNetwork,
    Vocabulary,
    cells,
    region_problem,
    vocabulary_fingerprint,
)
from signature_server.config import latest_source

BLCF_DIR = MODELS_DIR / "blcf"


@pytest.fixture(scope="module")
def model() -> BlcfModel:
    return BlcfModel.from_source(latest_source(BLCF_DIR), select_kernels("cpu"), intra_op_threads=2)


@pytest.fixture(scope="module")
def extractor(model) -> BlcfExtractor:
    return model.extractor


def cosine(a: AssignmentMap, b: AssignmentMap) -> float:
    """Cosine of the two maps' word counts (no idf: what two bags share)."""
    counts = [np.bincount(m.words[m.words != EMPTY].astype(np.int64), minlength=m.vocabulary) for m in (a, b)]
    x, y = (c.astype(np.float64) for c in counts)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


@pytest.mark.parametrize(
    ("height", "width"),
    [(400, 600), (600, 400), (300, 300), (1000, 100), (1, 3000), (1, 1), (427, 640), (2000, 1500)],
)
def test_map_shape_follows_the_aspect_and_keeps_the_image_size(extractor, height, width):
    s = extractor.spec
    image = np.random.default_rng(height * 7 + width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    described = extractor.map(image)
    input_height, input_width = s.input_size(height, width)
    assert input_height % s.multiple == 0 and input_width % s.multiple == 0
    assert max(input_height, input_width) == s.long_side  # 448 is a multiple of 32
    assert described.words.shape == (input_height // s.stride, input_width // s.stride)
    assert described.words.dtype == np.uint16 and int(described.words.max()) < extractor.vocabulary.size
    assert (described.width, described.height) == (width, height)
    assert described.vocabulary == extractor.vocabulary.size
    assert described.fingerprint == extractor.vocabulary.fingerprint
    assert encode(decode(encode(described))) == encode(described)


def test_map_shapes_of_common_aspects(extractor):
    # 448 / 16 = 28 cells on the longer side; the shorter rounded to a multiple of 32 pixels.
    assert extractor.map(np.zeros((400, 600, 3), np.uint8)).words.shape == (18, 28)
    assert extractor.map(np.zeros((600, 400, 3), np.uint8)).words.shape == (28, 18)
    assert extractor.map(np.zeros((10, 1000, 3), np.uint8)).words.shape == (2, 28)


def test_deterministic_and_a_batch_equals_one_image_at_a_time(extractor):
    photos = [load_photo(name) for name in ("coffee", "chelsea", "astronaut", "china.jpg")]
    first = [extractor.map(p) for p in photos]
    again = [extractor.map(p.copy()) for p in photos]
    batched = extractor.compute(photos + photos[:2])  # coffee, chelsea and china share one input size
    for a, b, c in zip(first + first[:2], again + again[:2], batched):
        assert encode(a) == encode(b) == encode(c)


def test_words_are_the_nearest_centres_by_brute_force(extractor, coffee):
    features = extractor.network.describe([coffee])[0]
    words = extractor.words(features)
    v = extractor.vocabulary
    x = cells(features).astype(np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    y = (x - v.mean) @ v.projection.T.astype(np.float64)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    centres = v.centres.astype(np.float64)
    # Squared distances in float64 ((n, V): no (n, V, d) array, whatever the vocabulary's size).
    distances = (y**2).sum(axis=1)[:, None] - 2 * y @ centres.T + (centres**2).sum(axis=1)[None, :]
    expected = distances.argmin(axis=1).reshape(words.shape)
    # float32 against float64: a near tie may go either way, nothing more.
    agree = float((words == expected).mean())
    assert agree > 0.97, agree
    rows = np.arange(len(y))
    chosen = distances[rows, words.ravel()]
    assert np.allclose(chosen, distances.min(axis=1), atol=1e-4)


def test_a_mirrored_or_rescaled_copy_shares_most_words_and_another_photo_few(extractor):
    # Photos the vocabulary was not trained on (bench/signature.py's held-out ones) and trained ones.
    names = ("china.jpg", "flower.jpg", "chelsea", "astronaut", "coffee", "rocket")
    originals = {name: extractor.map(load_photo(name)) for name in names}
    for name in names:
        photo = load_photo(name)
        copies = {
            "mirrored": extractor.map(np.ascontiguousarray(photo[:, ::-1])),
            "rescaled": extractor.map(cv2.resize(photo, None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA)),
        }
        for how, copy in copies.items():
            own = cosine(copy, originals[name])
            others = max(cosine(copy, originals[n]) for n in names if n != name)
            assert own >= 0.3 and others <= 0.25 and own > 2 * others, (name, how, own, others)


def test_a_region_is_a_pyramid_of_the_whole_maps_cells_at_each_query_scale(extractor):
    photo = load_photo("astronaut")
    height, width = photo.shape[:2]
    regions = [(100.0, 50.0, 260.0, 180.0), (0.0, 0.0, 512.0, 512.0), (300.5, 400.2, 301.0, 400.9)]
    signed = extractor.maps(photo, regions)
    assert len(signed) == len(regions)
    for box, region in zip(regions, signed):
        # Each region at its own scales, whatever the other regions of the call.
        scales = extractor.spec.query_long_sides(width, height, [box])
        assert region.levels == len(scales)
        assert encode(region) == encode(extractor.maps(photo, [box])[0])
        levels = [extractor.map(photo, scale) for scale in scales]
        for got, whole in zip((region.words, *region.pyramid), levels):
            expected = whole.region(box).words
            np.testing.assert_array_equal(got, expected)
        assert (region.width, region.height) == (width, height)
        decoded = decode(encode(region))
        assert decoded.levels == region.levels and np.array_equal(decoded.bag().counts, region.bag().counts)
    # The tiny box keeps the one cell under its centre, in each level.
    assert all((level != EMPTY).sum() == 1 for level in (signed[2].words, *signed[2].pyramid))


def test_each_level_describes_the_largest_region_at_its_query_side(extractor):
    s = extractor.spec
    small, large = s.query_sides[0], s.query_sides[-1]
    assert s.query_long_sides(600, 400, [(0, 0, 600, 400)]) == list(s.query_sides)
    assert s.query_long_sides(600, 400, [(0, 0, 300, 100)])[0] == round(small * 600 / 300)
    # Small regions are capped at region_max_side (levels that meet there are one); partly outside
    # ones are clipped first.
    assert s.query_long_sides(600, 400, [(10, 10, 20, 20)]) == [s.region_max_side]
    assert s.query_long_sides(600, 400, [(-1000, -1000, 2000, 2000)]) == list(s.query_sides)
    # A small region spans several cells at its finest level.
    photo = load_photo("coffee")
    (region,) = extractor.maps(photo, [(250.0, 100.0, 400.0, 200.0)])
    finest = region.pyramid[-1] if region.pyramid else region.words
    assert (finest != EMPTY).sum() >= (large // s.stride // 2) ** 2 // 2, large


def test_an_object_pasted_in_a_scene_is_found_by_its_region(extractor):
    """The region holding a pasted photo is nearer that photo's own map than regions of the same
    size elsewhere in the scene (not overlapping it), and nearer than the whole scene is (ranks: no threshold that a
    larger vocabulary would move)."""
    scene = load_photo("china.jpg")  # 640x427
    for name in ("chelsea", "astronaut"):
        thing = load_photo(name)
        thing = cv2.resize(thing, (200, 200 * thing.shape[0] // thing.shape[1]), interpolation=cv2.INTER_AREA)
        h, w = thing.shape[:2]
        composite = scene.copy()
        composite[150 : 150 + h, 300 : 300 + w] = thing
        boxes = [(300.0, 150.0, 300.0 + w, 150.0 + h)]
        boxes += [(float(x), float(y), float(x + w), float(y + h)) for x, y in ((20, 20), (20, 220))]
        regions = extractor.maps(composite, boxes)
        alone = extractor.map(thing)
        similarity = [cosine(region, alone) for region in regions]
        assert similarity[0] > 0 and similarity[0] == max(similarity), (name, similarity)
        assert similarity[0] > 2 * max(similarity[1:]) and similarity[0] > cosine(extractor.map(composite), alone)


@pytest.mark.parametrize(
    ("box", "says"),
    [
        ((10, 10, 5, 20), "empty or inverted"),
        ((10, 10, 10, 20), "empty or inverted"),
        ((float("nan"), 0, 5, 5), "not a finite number"),
        ((0, 0, float("inf"), 5), "not a finite number"),
        ((700, 0, 800, 50), "outside the 600x400 image"),
        ((-50, -50, 0, 0), "outside the 600x400 image"),
    ],
)
def test_region_problems_say_what_is_wrong(box, says):
    assert says in region_problem(box, 600, 400)


def test_partly_outside_and_whole_image_regions_are_usable():
    assert region_problem((-10, -10, 50, 50), 600, 400) == ""
    assert region_problem((0, 0, 600, 400), 600, 400) == ""


def test_maps_refuses_a_bad_region_naming_it(extractor, coffee):
    with pytest.raises(ValueError, match=r"regions\[1\]: region .* is empty or inverted"):
        extractor.maps(coffee, [(0, 0, 10, 10), (5, 5, 1, 1)])


def small_vocabulary(seed: int = 0) -> Vocabulary:
    rng = np.random.default_rng(seed)
    return Vocabulary(
        rng.normal(size=8).astype(np.float32),
        rng.normal(size=(4, 8)).astype(np.float32),
        rng.normal(size=(5, 4)).astype(np.float16),
        "features",
        32,
    )


def test_the_fingerprint_covers_the_arrays_the_tensor_and_the_stride(tmp_path):
    v = small_vocabulary()
    moved = v.stored_centres.copy()
    moved[0, 0] += np.float16(0.5)
    changed = [
        Vocabulary(v.mean, v.projection, moved, "features", 32),
        Vocabulary(v.mean, v.projection * 2, v.stored_centres, "features", 32),
        Vocabulary(v.mean + 1, v.projection, v.stored_centres, "features", 32),
        Vocabulary(v.mean, v.projection, v.stored_centres, "/_blocks.10/Add_output_0", 32),
        Vocabulary(v.mean, v.projection, v.stored_centres, "features", 16),
        Vocabulary(v.mean, v.projection, v.stored_centres[::-1], "features", 32),
    ]
    assert len({v.fingerprint, *(c.fingerprint for c in changed)}) == 1 + len(changed)
    assert 0 <= v.fingerprint < 2**32
    assert v.fingerprint == vocabulary_fingerprint(v.mean, v.projection, v.stored_centres, "features", 32)
    # The stored file gives the same vocabulary, centres float16.
    path = tmp_path / "vocabulary.npz"
    v.save(path)
    loaded = Vocabulary.load(path, "features", 32)
    assert loaded.fingerprint == v.fingerprint and loaded.stored_centres.dtype == np.float16
    np.testing.assert_array_equal(loaded.projection, v.projection)


def test_a_file_that_is_no_vocabulary_is_refused_saying_why(tmp_path):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip" * 50)
    with pytest.raises(ValueError, match="cannot be read as a vocabulary"):
        Vocabulary.load(corrupt, "features", 32)
    partial = tmp_path / "partial.npz"
    np.savez(partial, mean=np.zeros(8, np.float32))
    with pytest.raises(ValueError, match=r"no \['centres', 'projection'\]"):
        Vocabulary.load(partial, "features", 32)
    wide = tmp_path / "wide.npz"
    v = small_vocabulary()
    np.savez(wide, mean=v.mean, projection=v.projection, centres=v.centres)  # float32 centres
    with pytest.raises(ValueError, match="float16"):
        Vocabulary.load(wide, "features", 32)
    with pytest.raises(FileNotFoundError, match="train_blcf"):
        Vocabulary.load(tmp_path / "absent.npz", "features", 32)
    with pytest.raises(ValueError, match="projection"):
        Vocabulary(np.zeros(8), np.zeros((4, 7)), np.zeros((5, 4), np.float16), "features", 32)


def test_projected_cells_are_unit_vectors():
    v = small_vocabulary()
    projected = v.project(np.abs(np.random.default_rng(1).normal(size=(20, 8))).astype(np.float32))
    np.testing.assert_allclose(np.linalg.norm(projected, axis=1), 1, atol=1e-5)


def test_another_tensor_of_the_same_graph_is_an_output_in_memory(extractor, coffee):
    spec = extractor.spec
    assert (spec.tensor, spec.stride) == ("/_blocks.10/Add_output_0", 16)  # the shipped version's
    (features,) = extractor.network.describe([coffee])
    height, width = spec.input_size(*coffee.shape[:2])
    assert features.shape == (112, height // 16, width // 16) and np.isfinite(features).all()
    # The file on disk is unchanged: the tensor is not one of its outputs.
    import onnx

    on_disk = onnx.load(str(spec.network.model_path), load_external_data=False)
    assert spec.tensor not in {o.name for o in on_disk.graph.output}
    # The graph's own `features` output (stride 32, 1280 channels) serves as well.
    last = FeatureNetwork(dataclasses.replace(spec, tensor="features", stride=32), intra_op_threads=2)
    (features,) = last.describe([coffee])
    assert features.shape == (1280, height // 32, width // 32)
    # A stride that is not the tensor's, and a tensor the graph has not, are refused saying so.
    wrong = FeatureNetwork(dataclasses.replace(spec, stride=32), intra_op_threads=2)
    with pytest.raises(ValueError, match="the config's stride is not this tensor's"):
        wrong.describe([coffee])
    with pytest.raises(ValueError, match="has no tensor 'no-such-tensor'"):
        FeatureNetwork(dataclasses.replace(spec, tensor="no-such-tensor"), intra_op_threads=2)
    # A vocabulary of another tensor is refused by the extractor.
    with pytest.raises(ValueError, match=r"vocabulary of tensor '/_blocks\.10/Add_output_0'"):
        BlcfExtractor(last, extractor.vocabulary)


def test_spec_settings_that_cannot_work_are_refused():
    source = latest_source(BLCF_DIR)
    for change, says in [
        ({"multiple": 40}, "multiple 40 is not a positive multiple"),
        ({"long_side": 1000, "region_max_side": 896}, "long_side 1000 <= region_max_side 896"),
        ({"region_max_side": 9000}, "more than 255 cells a side"),
        ({"stride": "32"}, "stride '32' is not an integer"),
        ({"network": "../elsewhere"}, "is not a folder name"),
        ({"tensor": ""}, "tensor is empty"),
        ({"query_sides": [160, 2000]}, r"query_sides \[160, 2000\]: give 1 to 8 sides"),
        ({"query_sides": []}, r"query_sides \[\]: give 1 to 8 sides"),
        ({"query_sides": "160"}, "query_sides '160' is not a list of integers"),
    ]:
        with pytest.raises(ValueError, match=says):
            BlcfSpec.from_settings("blcf", "1", source.folder, source.settings | change)


def test_the_shipped_version_is_a_versioned_artefact_with_provenance(extractor):
    s = extractor.spec
    folder = BLCF_DIR / s.version
    provenance = json.loads((folder / "provenance.json").read_text())
    own = json.loads((folder / "config.json").read_text())
    assert provenance["fingerprint"] == extractor.vocabulary.fingerprint
    assert own == s.settings()  # the representation it was trained with, network version included
    assert "train_blcf" in provenance["command"] and provenance["sources"]
    held_out = {"china.jpg", "flower.jpg", "hubble_deep_field", "retina"}
    assert {source["photo"] for source in provenance["sources"]}.isdisjoint(held_out)
    assert extractor.vocabulary.stored_centres.dtype == np.float16
    assert (folder / "vocabulary.npz").stat().st_size < 16 * 2**20


def test_warm_up_and_the_model_facts(model):
    model.warm_up()
    assert model.max_batch >= 1 and model.provider
    assert MAX_IMAGE_SIDE == 65535


def test_training_command_builds_a_vocabulary(tmp_path):
    from signature_server.train_blcf import main

    out = tmp_path / "7"
    main(
        ["--out", str(out), "--words", "16", "--dims", "8", "--crops-per-photo", "1", "--iterations", "2"]
        + ["--photos", "coffee", "chelsea", "--tensor", "/_blocks.10/Add_output_0", "--stride", "16"]
    )
    provenance = json.loads((out / "provenance.json").read_text())
    own = json.loads((out / "config.json").read_text())
    assert own["tensor"] == "/_blocks.10/Add_output_0" and own["stride"] == 16 and own["network_version"]
    vocabulary = Vocabulary.load(out / "vocabulary.npz", own["tensor"], own["stride"])
    assert vocabulary.size == 16 and vocabulary.dims == 8 and vocabulary.channels == 112
    assert provenance["fingerprint"] == vocabulary.fingerprint
    assert provenance["parameters"]["words"] == 16 and provenance["objective"] > 0
    assert {s["photo"] for s in provenance["sources"]} == {"coffee", "chelsea"}
    assert provenance["libraries"]["faiss"] and provenance["network"]["sha256"]


def test_load_builds_the_extractor_the_server_serves(extractor, coffee):
    loaded = BlcfExtractor.load(BLCF_DIR, "cpu", intra_op_threads=2)
    assert loaded.vocabulary.fingerprint == extractor.vocabulary.fingerprint
    assert encode(loaded.map(coffee)) == encode(extractor.map(coffee))
