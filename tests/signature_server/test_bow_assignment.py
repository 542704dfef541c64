"""Words of the colour-texture signature: soft assignment against a reference written from its
definition, words per image, the size bound, fingerprints, versions, and the refusal of version 1's
signatures by an index of version 2's."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from common.bow_codec import BagOfWords, decode, encode
from common.config import MODELS_DIR
from common.model_repository import read_source
from common.photos import load_photo
from index_server.domain import SignatureError
from index_server.inverted import BowIndex
from kernels import select_kernels
from signature_server.bow import (
    SIGNATURE_BYTES,
    Assignment,
    BowExtractor,
    BowModel,
    BowSpec,
    Codebook,
    fingerprint,
    limit_bytes,
)
from tests.helpers import chi2

BOW = "colour-texture-bow"
CPU = select_kernels("cpu")


def extractor_of(version: str) -> BowExtractor:
    spec = BowSpec.from_source(read_source(MODELS_DIR, BOW, version))
    return BowExtractor(spec, spec.load_codebook(), CPU)


@pytest.fixture(scope="module")
def v1() -> BowExtractor:
    return extractor_of("1")


@pytest.fixture(scope="module")
def v2() -> BowExtractor:
    return extractor_of("2")


def reference_bag(descriptors: np.ndarray, centres: np.ndarray, assignment: Assignment) -> BagOfWords:
    """From the definition, one descriptor at a time in float64: its `nearest` centres by squared
    distance (ties to the lower index), weights exp(-(d_i^2 - d_1^2) / (2 sigma^2)), `units` units
    shared in proportion, floors first, then one more unit to each of the largest fractions (nearer
    words first on ties) until all are given."""
    vocabulary = len(centres)
    counts = np.zeros(vocabulary, np.int64)
    centres64 = centres.astype(np.float64)
    for d in descriptors.astype(np.float64):
        squared = ((centres64 - d) ** 2).sum(axis=1)
        nearest = sorted(range(vocabulary), key=lambda j: (squared[j], j))[: assignment.nearest]
        weights = [np.exp(-(squared[j] - squared[nearest[0]]) / (2 * assignment.sigma**2)) for j in nearest]
        shares = [assignment.units * w / sum(weights) for w in weights]
        units = [int(np.floor(s)) for s in shares]
        by_fraction = sorted(range(len(nearest)), key=lambda i: (-(shares[i] - units[i]), i))
        for i in by_fraction[: assignment.units - sum(units)]:
            units[i] += 1
        for j, u in zip(nearest, units):
            counts[j] += u
    words = np.flatnonzero(counts)
    return BagOfWords(words.astype(np.int32), counts[words].astype(np.uint32), vocabulary, 0)


def test_soft_assignment_is_its_definition(v2):
    descriptors = v2.describe(load_photo("coffee")[100:300, 150:400]).descriptors[:120]
    got = v2.words(descriptors)
    expected = reference_bag(descriptors, v2.codebook.centres, v2.codebook.assignment)
    assert got.counts.sum() == expected.counts.sum() == len(descriptors) * v2.codebook.assignment.units
    # float32 distances against float64: a unit may change hands at a near tie, rarely.
    same = np.intersect1d(got.words, expected.words)
    assert len(same) >= 0.98 * max(len(got.words), len(expected.words))
    assert chi2(got, expected) < 1e-3


def test_soft_assignment_on_a_small_codebook_matches_exactly():
    rng = np.random.default_rng(7)
    centres = rng.random((40, 576)).astype(np.float32)
    descriptors = rng.random((25, 576)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    spec = dataclasses.replace(extractor_of("2").spec, assignment=Assignment(6, 0.5, 13))
    got = BowExtractor(spec, Codebook(centres), CPU).words(descriptors)
    expected = reference_bag(descriptors, centres, spec.assignment)
    np.testing.assert_array_equal(got.words, expected.words)
    np.testing.assert_array_equal(got.counts, expected.counts)


def test_hard_assignment_is_version_1_unchanged(v1):
    assert v1.codebook.assignment == Assignment() and v1.codebook.assignment.hard
    # Version 1's fingerprint is its centres' alone, as before soft assignment existed.
    assert v1.codebook.fingerprint == v1.codebook.provenance["fingerprint"] == 3573396850
    descriptors = v1.describe(load_photo("chelsea")).descriptors
    c = v1.codebook
    nearest = (c.norms[None, :] - 2 * descriptors @ c.centres.T).argmin(axis=1)
    assert encode(v1.words(descriptors)) == encode(BagOfWords.from_words(nearest, c.vocabulary, c.fingerprint))


@pytest.mark.parametrize("name", ["coffee", "chelsea", "astronaut"])
def test_a_real_crop_has_at_least_150_distinct_words(v1, v2, name):
    photo = load_photo(name)
    h, w = photo.shape[:2]
    crop = photo[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4]
    bag = decode(v2.compute([crop])[0])
    assert len(bag.words) >= 150, len(bag.words)
    assert len(bag.words) > 3 * len(v1.bag(crop).words)


def test_the_worst_case_signature_fits_3500_bytes(v2):
    # Colour noise: every patch differs, 512 keypoints, each shares its units over 20 words.
    noise = np.random.default_rng(0).integers(0, 256, (768, 768, 3), dtype=np.uint8)
    described = v2.describe(noise)
    assert len(described.keypoints) == v2.spec.max_keypoints == 512
    bag = v2.words(described.descriptors)
    assert len(encode(bag)) <= SIGNATURE_BYTES
    for name in ("astronaut", "coffee", "china.jpg", "retina", "hubble_deep_field"):
        assert len(encode(v2.bag(load_photo(name)))) <= SIGNATURE_BYTES


def test_a_bag_too_large_keeps_its_largest_counts_within_the_limit():
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 300, 5000).astype(np.uint32)
    bag = BagOfWords(np.arange(5000, dtype=np.int32), counts, 5000, 9)
    assert len(encode(bag)) > SIGNATURE_BYTES
    cut = limit_bytes(bag, SIGNATURE_BYTES)
    assert len(encode(cut)) <= SIGNATURE_BYTES and len(encode(cut)) > SIGNATURE_BYTES - 3
    assert cut.counts.min() >= counts[np.setdiff1d(np.arange(5000), cut.words)].max()
    assert np.all(np.diff(cut.words) > 0) and (cut.vocabulary, cut.codebook) == (5000, 9)
    small = BagOfWords(np.array([3], np.int32), np.array([7], np.uint32), 5000, 9)
    assert limit_bytes(small, SIGNATURE_BYTES) is small


def test_the_fingerprint_changes_with_the_centres_and_with_each_assignment_parameter(v1, v2):
    centres = v2.codebook.centres
    base = Assignment(20, 0.2, 40)
    variants = [
        base,
        Assignment(),
        dataclasses.replace(base, nearest=19),
        dataclasses.replace(base, sigma=0.25),
        dataclasses.replace(base, units=41),
        dataclasses.replace(base, max_signature_bytes=3000),
    ]
    prints = [fingerprint(centres, a) for a in variants]
    assert len(set(prints)) == len(prints)
    assert fingerprint(centres, Assignment(max_signature_bytes=2000)) != fingerprint(centres, Assignment())
    assert fingerprint(np.roll(centres, 1, axis=0), base) != prints[0]
    assert v2.codebook.fingerprint == fingerprint(centres, v2.codebook.assignment)
    assert v1.codebook.fingerprint != v2.codebook.fingerprint
    # The same centres loaded without the version's assignment are other words: another fingerprint.
    assert Codebook(centres).fingerprint != v2.codebook.fingerprint
    assert Codebook(centres).with_assignment(v2.codebook.assignment).fingerprint == v2.codebook.fingerprint


def test_an_index_of_version_2_refuses_a_version_1_signature_saying_so(v1, v2):
    crop = load_photo("coffee")[50:350, 100:450]
    new, old = v2.bag(crop), decode(v1.compute([crop])[0])
    assert new.vocabulary == old.vocabulary == 5000  # the vocabulary alone would not tell them apart
    index = BowIndex(v2.codebook.vocabulary, v2.codebook.fingerprint)
    index.add("item", new, {})
    assert index.search(new, 1)[0].item_id == "item"
    expected = (
        f"signature was made with codebook {v1.codebook.fingerprint:08x}; this database holds codebook "
        f"{v2.codebook.fingerprint:08x} signatures (re-sign with the same codebook)"
    )
    for refused in (lambda: index.search(old, 1), lambda: index.add("old", old, {})):
        with pytest.raises(SignatureError) as error:
            refused()
        assert str(error.value) == expected
    assert len(index) == 1


def test_version_2_is_served_with_its_provenance(v2):
    config = json.loads((MODELS_DIR / BOW / "config.json").read_text())
    # The highest version serves (version 1, hard assignment, stays on disk for older indexes).
    assert config["version_policy"] == {"latest": 1} and "assignment" not in config
    assert BowSpec.load(MODELS_DIR / BOW).version == 2
    provenance = v2.codebook.provenance
    assert provenance["assignment"] == dataclasses.asdict(v2.codebook.assignment)
    assert provenance["fingerprint"] == v2.codebook.fingerprint
    assert provenance["centres_fingerprint"] == Codebook(v2.codebook.centres).fingerprint
    assert provenance["centres"] == v2.codebook.vocabulary == 5000
    own = json.loads((MODELS_DIR / BOW / "2" / "config.json").read_text())
    assert own == {"assignment": provenance["assignment"]}


def copy_version(tmp_path: Path, version: str) -> Path:
    root = tmp_path / "models"
    (root / BOW).mkdir(parents=True)
    shutil.copy(MODELS_DIR / BOW / "config.json", root / BOW / "config.json")
    shutil.copytree(MODELS_DIR / BOW / version, root / BOW / version)
    return root


def test_a_version_whose_assignment_changed_after_training_is_refused(tmp_path):
    root = copy_version(tmp_path, "2")
    own = root / BOW / "2" / "config.json"
    settings = json.loads(own.read_text())
    settings["assignment"]["sigma"] = 0.3
    own.write_text(json.dumps(settings))
    with pytest.raises(ValueError) as error:
        BowModel.from_source(read_source(root, BOW, "2"), CPU)
    message = str(error.value)
    assert message.startswith("colour-texture-bow version 2: provenance.json records fingerprint ")
    assert "changed after training; train a new version instead" in message


@pytest.mark.parametrize(
    ("assignment", "says"),
    [
        ({"nearest": 0}, "assignment nearest 0 is not in 1..32"),
        ({"nearest": 33, "sigma": 0.2}, "assignment nearest 33 is not in 1..32"),
        ({"nearest": 4}, "assignment sigma 0.0 must be above 0 when nearest > 1"),
        ({"nearest": 4, "sigma": 0.2, "units": 0}, "assignment units 0 is not at least 1"),
        ({"nearest": 4, "sigma": 0.2, "units": 200}, "could count a word above 65535, which no posting holds"),
        ({"nearest": "4"}, "assignment nearest '4' is not an integer"),
        ({"nearest": 4, "sigma": True}, "assignment sigma True is not a number"),
        ({"nearest": 4, "sigma": 0.2, "weights": "gauss"}, "assignment has unknown keys ['weights']"),
        ([4], "assignment [4] is not an object"),
    ],
)
def test_a_bad_assignment_in_config_is_refused_naming_it(tmp_path, assignment, says):
    root = copy_version(tmp_path, "2")
    (root / BOW / "2" / "config.json").write_text(json.dumps({"assignment": assignment}))
    with pytest.raises(ValueError) as error:
        BowSpec.from_source(read_source(root, BOW, "2"))
    assert str(error.value).startswith("config.json of colour-texture-bow version 2: ")
    assert says in str(error.value)


def test_a_signature_limit_too_small_for_the_bitmap_is_refused(tmp_path):
    root = copy_version(tmp_path, "2")
    (root / BOW / "2" / "config.json").write_text(
        json.dumps({"assignment": {"nearest": 4, "sigma": 0.2, "units": 8, "max_signature_bytes": 600}})
    )
    with pytest.raises(ValueError) as error:
        BowModel.from_source(read_source(root, BOW, "2"), CPU)
    assert "max_signature_bytes 600 cannot hold a signature of a 5000-word codebook (at least 636 bytes)" in str(
        error.value
    )
