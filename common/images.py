"""Safe image decoding: every service turns `mps.common.v1.Image` into an RGB array here."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image as PILImage
from PIL import ImageOps

# Pillow's own bomb check is a warning up to 2x its limit; we enforce ours before decoding.
PILImage.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """The image cannot be used; the message says why and what to do."""


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decodes encoded image bytes to (H, W, 3) uint8 RGB, applying EXIF orientation.

    The pixel count is checked from the header, before any pixel is decoded, so a
    decompression bomb costs nothing.
    """
    if not data:
        raise ImageError("image is empty: send the encoded file bytes (JPEG, PNG, WebP...)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = PILImage.open(io.BytesIO(data))
            width, height = image.size
            if width <= 0 or height <= 0:
                raise ImageError(f"image has zero size ({width}x{height})")
            if width * height > max_pixels:
                raise ImageError(
                    f"image is {width}x{height} = {width * height} pixels, above the limit of "
                    f"{max_pixels}: downscale it before sending")
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = image.convert("RGB")
    except ImageError:
        raise
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise ImageError(f"image cannot be decoded ({type(exc).__name__}: {exc}); "
                         "send a complete JPEG, PNG, WebP, BMP, GIF or TIFF file") from exc
    return np.asarray(rgb, dtype=np.uint8)


def raw_to_array(width: int, height: int, rgb: bytes, max_pixels: int) -> np.ndarray:
    """Checks and reshapes raw RGB bytes to (H, W, 3) uint8."""
    if width == 0 or height == 0:
        raise ImageError(f"raw image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(f"raw image is {width}x{height}, above the limit of {max_pixels} pixels")
    expected = width * height * 3
    if len(rgb) != expected:
        raise ImageError(f"raw image of {width}x{height} needs {expected} RGB bytes, got {len(rgb)}")
    return np.frombuffer(rgb, dtype=np.uint8).reshape(height, width, 3)


def encode_png(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 RGB -> PNG bytes."""
    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_jpeg(rgb: np.ndarray, quality: int = 92) -> bytes:
    """(H, W, 3) uint8 RGB -> JPEG bytes."""
    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
