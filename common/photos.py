"""Real photos that ship inside installed packages (scikit-image, scikit-learn), loaded by name.

The demo catalogue, the codebook training and the benchmarks use them, so nothing is downloaded.
"""

from __future__ import annotations

import numpy as np

# Colour photos by name; ".jpg" names are scikit-learn's sample images.
SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle_left",
    "motorcycle_right",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "colorwheel",
    "logo",
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


def load_photo(name: str) -> np.ndarray:
    """A bundled photo by name -> (H, W, 3) uint8 RGB."""
    if name.endswith(".jpg"):
        from sklearn.datasets import load_sample_image

        return np.ascontiguousarray(load_sample_image(name))
    import skimage.data

    image = (
        skimage.data.stereo_motorcycle()[0 if name == "motorcycle_left" else 1]
        if name.startswith("motorcycle")
        else getattr(skimage.data, name)()
    )
    if image.shape[-1] == 4:  # RGBA (the logo): composite over white
        alpha = image[..., 3:4].astype(np.float32) / 255
        image = (image[..., :3] * alpha + 255 * (1 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(image[..., :3])
