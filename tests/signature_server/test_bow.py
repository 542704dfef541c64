"""The colour-texture descriptor and its bag of words, on real photos."""

import json

import numpy as np
import pytest

from common.bow_codec import decode, encode
from common.photos import load_photo
from kernels import spec
from tests.helpers import chi2


def test_descriptors_are_576_finite_unit_vectors(bow_extractor, coffee):
    described = bow_extractor.describe(coffee)
    count = len(described.keypoints)
    assert 16 <= count <= 512
    assert described.descriptors.shape == (count, spec.DIMENSION) == (count, 576)
    assert np.isfinite(described.descriptors).all()
    np.testing.assert_allclose(np.linalg.norm(described.descriptors, axis=1), 1, atol=1e-5)
    assert np.all(np.diff(described.saliency) <= 0)  # most salient first


def test_a_uniform_image_still_gets_a_valid_signature(bow_extractor):
    flat = np.full((200, 300, 3), (200, 40, 40), np.uint8)
    described = bow_extractor.describe(flat)
    assert len(described.keypoints) > 0 and np.isfinite(described.descriptors).all()
    # Smooth texture: every filter weighs the same single colour bin per channel.
    assert np.count_nonzero(described.descriptors[0]) == 3 * 4 * 8
    bag = bow_extractor.bag(flat)
    units = bow_extractor.codebook.assignment.units  # each descriptor shares out this many
    assert decode(encode(bag)).counts.sum() == len(described.keypoints) * units


def test_same_image_same_signature_and_small_shift_mostly_same_words(bow_extractor):
    photo = load_photo("chelsea")
    assert encode(bow_extractor.bag(photo)) == encode(bow_extractor.bag(photo.copy()))
    base = bow_extractor.bag(photo[:, :-4])
    shifted = bow_extractor.bag(photo[:, 4:])
    shared = len(np.intersect1d(base.words, shifted.words))
    assert shared / len(base.words) > 0.6
    assert chi2(base, shifted) < 0.8


def test_signature_is_small(bow_extractor):
    for name in ("astronaut", "coffee", "china.jpg", "retina"):
        assert len(encode(bow_extractor.bag(load_photo(name)))) <= 3500


def test_a_crop_of_a_catalogue_photo_finds_that_photo_first(bow_extractor):
    names = ("china.jpg", "flower.jpg", "astronaut", "chelsea", "rocket", "coffee", "hubble_deep_field")
    catalogue = {name: bow_extractor.bag(load_photo(name)) for name in names}
    for name in ("china.jpg", "rocket", "coffee"):
        photo = load_photo(name)
        h, w = photo.shape[:2]
        query = bow_extractor.bag(photo[h // 5 : 4 * h // 5, w // 5 : 4 * w // 5])
        ranking = sorted(catalogue, key=lambda n: chi2(query, catalogue[n]))
        assert ranking[0] == name, (name, ranking)


def test_codebook_is_the_versioned_artefact_with_provenance(bow_extractor):
    codebook = bow_extractor.codebook
    assert codebook.vocabulary == 5000 and codebook.centres.shape == (5000, 576)
    provenance = codebook.provenance
    assert provenance["fingerprint"] == codebook.fingerprint
    assert provenance["centres"] == 5000 and "train_codebook" in provenance["command"]
    assert provenance["assignment"] == {"nearest": 20, "sigma": 0.2, "units": 40, "max_signature_bytes": 3500}
    assert {s["photo"] for s in provenance["sources"]}.isdisjoint({"china.jpg", "flower.jpg", "retina"})
    bag = bow_extractor.bag(load_photo("coffee"))
    assert bag.codebook == codebook.fingerprint and bag.vocabulary == 5000


def test_training_command_builds_a_codebook(tmp_path):
    from signature_server.bow import Assignment, Codebook
    from signature_server.train_codebook import main

    main(
        [
            "--out",
            str(tmp_path),
            "--centres",
            "20",
            "--nearest",
            "4",
            "--sigma",
            "0.3",
            "--units",
            "9",
            "--crops-per-photo",
            "2",
            "--iterations",
            "3",
            "--photos",
            "coffee",
            "chelsea",
        ]
    )
    provenance = json.loads((tmp_path / "provenance.json").read_text())
    own = json.loads((tmp_path / "config.json").read_text())
    assignment = Assignment(**own["assignment"])
    assert assignment == Assignment(4, 0.3, 9) and provenance["assignment"] == own["assignment"]
    codebook = Codebook.load(tmp_path / "codebook.npz", tmp_path / "provenance.json", assignment)
    assert codebook.centres.shape == (20, 576) and provenance["fingerprint"] == codebook.fingerprint
    assert provenance["centres_fingerprint"] == Codebook(codebook.centres).fingerprint != codebook.fingerprint
    assert [s["photo"] for s in provenance["sources"]] == ["coffee", "chelsea"]


def test_training_refuses_an_assignment_the_codebook_cannot_serve(tmp_path):
    from signature_server.train_codebook import main

    with pytest.raises(ValueError) as error:
        main(["--out", str(tmp_path), "--centres", "10", "--nearest", "12"])
    assert str(error.value) == "12 nearest words: the kernels find 1 to 10 (MAX_NEAREST 32, a 10-word codebook)"
    assert not any(tmp_path.iterdir())


def test_grid_points_cover_a_strip_thinner_than_half_a_step():
    from signature_server.bow import grid_points

    assert grid_points(1, 192, 24).tolist() == [[0, x] for x in range(12, 192, 24)]
    assert grid_points(192, 3, 24).tolist() == [[y, 1] for y in range(12, 192, 24)]
    assert grid_points(1, 1, 24).tolist() == [[0, 0]]


@pytest.mark.parametrize("shape", [(1, 100_000, 3), (100_000, 1, 3), (5, 1000, 3), (1000, 12, 3), (1, 1, 3)])
def test_a_plain_thin_strip_gets_a_bag_of_words(bow_extractor, shape):
    # No keypoint fires on a plain strip and it used to have no grid row either ("cannot reshape").
    bag = decode(bow_extractor.compute([np.full(shape, 128, np.uint8)])[0])
    assert bag.counts.sum() >= 1 and bag.vocabulary == bow_extractor.codebook.vocabulary
