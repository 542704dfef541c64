import numpy as np

from common.photos import load_photo

ESPRESSO = 967  # ImageNet class index


def test_imagenet_head_names_the_coffee_photo_an_espresso(deep_descriptor, coffee):
    assert int(deep_descriptor.classify([coffee])[0].argmax()) == ESPRESSO


def test_embeddings_are_unit_1280d_and_batch_independent(deep_descriptor, coffee):
    chelsea = load_photo("chelsea")
    batch = deep_descriptor.compute([coffee, chelsea, coffee])
    assert batch.shape == (3, 1280) and batch.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(batch[0], batch[2], atol=1e-6)
    np.testing.assert_allclose(deep_descriptor.compute([chelsea])[0], batch[1], atol=1e-5)


def test_a_crop_is_closer_to_its_photo_than_to_other_photos(deep_descriptor, coffee):
    others = [load_photo(n) for n in ("chelsea", "astronaut", "rocket", "motorcycle_left")]
    crop = coffee[40:360, 80:520]
    vectors = deep_descriptor.compute([crop, coffee, *others])
    similarity = vectors[1:] @ vectors[0]
    assert int(similarity.argmax()) == 0
