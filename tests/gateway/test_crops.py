import numpy as np

from gateway.crops import crop, valid_box


def test_crop_rounds_outwards_and_clips():
    image = np.arange(100 * 200 * 3, dtype=np.uint32).reshape(100, 200, 3).astype(np.uint8)
    out = crop(image, np.array([10.4, 20.6, 50.2, 60.0]), 512)
    assert out.shape == (40, 41, 3)
    assert np.array_equal(out, image[20:60, 10:51])
    assert crop(image, np.array([-10, -10, 500, 500]), 512).shape == (100, 200, 3)


def test_crop_is_never_empty_and_is_shrunk_to_max_side():
    image = np.zeros((1000, 2000, 3), dtype=np.uint8)
    assert crop(image, np.array([5, 5, 5, 5]), 512).shape == (1, 1, 3)
    assert crop(image, np.array([0, 0, 2000, 1000]), 512).shape == (256, 512, 3)


def test_valid_box():
    assert valid_box(np.array([0, 0, 10, 10]), 100, 100) == ""
    assert "empty" in valid_box(np.array([10, 0, 10, 10]), 100, 100)
    assert "outside" in valid_box(np.array([200, 200, 300, 300]), 100, 100)
    assert "NaN" in valid_box(np.array([np.nan, 0, 10, 10]), 100, 100)


def test_a_catalogue_shot_on_a_plain_backdrop_is_told_from_a_photo():
    from common.photos import load_photo
    from gateway.crops import plain_background

    cup = load_photo("coffee")[23:310, 150:429]
    shot = np.full((400, 400, 3), 250, np.uint8)
    shot[60:347, 60:339] = cup
    assert plain_background(shot)
    assert not plain_background(load_photo("coffee")) and not plain_background(load_photo("china.jpg"))
