import numpy as np

from detector_server.letterbox import PAD_VALUE, letterbox, unletterbox_boxes


def test_keeps_aspect_and_centres():
    image = np.full((200, 400, 3), 255, dtype=np.uint8)
    tensor, scale, (pad_x, pad_y) = letterbox(image, (416, 416))
    assert tensor.shape == (3, 416, 416) and tensor.dtype == np.float32
    assert scale == 416 / 400 and pad_x == 0 and pad_y == 0.5 * (416 - 208)
    assert np.allclose(tensor[:, 0, :], PAD_VALUE) and np.allclose(tensor[:, 208, :], 1.0)


def test_boxes_map_back_to_original_pixels():
    image = np.zeros((300, 600, 3), dtype=np.uint8)
    _, scale, pad = letterbox(image, (416, 416))
    original = np.array([[60, 30, 540, 270]], dtype=np.float32)
    network = original * scale + np.array([pad[0], pad[1], pad[0], pad[1]], dtype=np.float32)
    assert np.allclose(unletterbox_boxes(network, scale, pad, (300, 600)), original, atol=1e-3)


def test_boxes_are_clipped_to_the_image():
    boxes = unletterbox_boxes(np.array([[-50, -50, 900, 900]], dtype=np.float32), 1.0, (0, 0), (100, 200))
    assert boxes.tolist() == [[0, 0, 200, 100]]
