"""Safe image decoding: every service turns `mps.common.v1.Image` into an RGB array here."""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image as PILImage
from PIL import ImageOps

from common.errors import quote


class ImageError(ValueError):
    """The image cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Photo:
    """A decoded photo, possibly downscaled: what a pipeline works on."""

    rgb: np.ndarray  # (h, w, 3) uint8, at most the decoder's max_side on its longer side
    width: int  # of the original, after EXIF orientation
    height: int

    @property
    def scale(self) -> float:
        """Pixels of `rgb` per pixel of the original (<= 1)."""
        return self.rgb.shape[1] / self.width

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """(..., 4) float xyxy in pixels of `rgb` -> the same in pixels of the original, clipped to it.

        Per axis: a strip 1 pixel thin stays 1 pixel thin when shrunk, so one scale does not fit both.
        """
        height, width = self.rgb.shape[:2]
        factors = np.array([self.width / width, self.height / height] * 2, np.float64)
        limits = np.array([self.width, self.height] * 2, np.float64)
        return np.clip(np.asarray(boxes, np.float64) * factors, 0, limits)

    def to_shrunk(self, boxes: np.ndarray) -> np.ndarray:
        """(..., 4) float xyxy in pixels of the original -> the same in pixels of `rgb`, clipped to it."""
        height, width = self.rgb.shape[:2]
        factors = np.array([width / self.width, height / self.height] * 2, np.float64)
        limits = np.array([width, height] * 2, np.float64)
        return np.clip(np.asarray(boxes, np.float64) * factors, 0, limits)


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decodes encoded image bytes to (H, W, 3) uint8 RGB at full size, applying EXIF orientation.

    The pixel count is checked from the header, before any pixel is decoded, so a
    decompression bomb costs nothing.
    """
    return decode_photo(data, max_pixels).rgb


def decode_photo(data: bytes, max_pixels: int, max_side: int = 0) -> Photo:
    """Decodes encoded image bytes to a Photo at most `max_side` pixels on its longer side (0 = any).

    A large JPEG is decoded at a reduced DCT scale (Pillow's draft(): 1/2, 1/4 or 1/8) no smaller
    than needed, so a 12-megapixel photo costs a fraction of a full decode; what is still larger
    is then shrunk by area averaging. `max_pixels` is checked on the header first, whatever
    Pillow's own limit (which this module leaves as it is: see _open).
    """
    if not data:
        raise ImageError("image is empty: send the encoded file bytes (JPEG, PNG, WebP...)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = _open(data)
            width, height = image.size
            if width <= 0 or height <= 0:
                raise ImageError(f"image has zero size ({width}x{height}): send an image with pixels")
            if width * height > max_pixels:
                raise ImageError(
                    f"image is {width}x{height} = {width * height} pixels, above the limit of "
                    f"{max_pixels}: downscale it before sending"
                )
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientation turns it
                width, height = height, width
            longest = max(width, height)
            if max_side and longest > max_side and image.format == "JPEG":
                factor = max_side / longest
                image.draft("RGB", (max(1, int(image.size[0] * factor)), max(1, int(image.size[1] * factor))))
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = to_rgb8(image)
    except ImageError:
        raise
    except Exception as exc:  # Pillow raises many types for corrupt data
        # Pillow's text may quote the data or a path: bounded, never echoed whole.
        why = (
            "its bytes are in no image format this server reads"
            if isinstance(exc, PILImage.UnidentifiedImageError)
            else f"{type(exc).__name__}: {quote(str(exc), 120)}"
        )
        raise ImageError(
            f"image cannot be decoded ({why}); send a complete JPEG, PNG, WebP, BMP, GIF or TIFF file"
        ) from exc
    return Photo(shrink(rgb, max_side), width, height)


# Held while Pillow's own pixel limit is lifted for one header read (see _open).
_PILLOW_LIMIT = threading.Lock()


@contextlib.contextmanager
def _without_pillow_limit() -> Iterator[None]:
    with _PILLOW_LIMIT:
        saved = PILImage.MAX_IMAGE_PIXELS
        PILImage.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            PILImage.MAX_IMAGE_PIXELS = saved


def _open(data: bytes) -> PILImage.Image:
    """Pillow's lazy open (the header only), so the caller can check the size against its own limit.

    Pillow's limit (PIL.Image.MAX_IMAGE_PIXELS) is left as it is for everyone else: under it, or up
    to twice it (Pillow only warns), this is a plain open. Beyond twice it Pillow refuses the header
    with a DecompressionBombError that does not give the size; then the header alone is read again
    with Pillow's limit lifted for that one read, so the caller's own limit decides and its message
    names the image's size.
    """
    try:
        return PILImage.open(io.BytesIO(data))
    except PILImage.DecompressionBombError:
        with _without_pillow_limit():
            return PILImage.open(io.BytesIO(data))


# Pillow's modes for one channel of more than 8 bits (16-bit grayscale PNG and TIFF): its own
# convert("RGB") clips them at 255, so a 16-bit photo would come out white.
_WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb8(image: PILImage.Image) -> np.ndarray:
    """A loaded Pillow image of any mode -> (H, W, 3) uint8 RGB, 16-bit channels scaled by 255/65535.

    Pillow already keeps the high byte of 16-bit RGB, RGBA and grey+alpha PNGs (modes RGB, RGBA,
    LA); palette, CMYK and the rest convert as Pillow does (alpha is dropped, not composited).
    """
    if image.mode in _WIDE_GREY:
        # "I" is how Pillow holds 16-bit grey from several formats; values past 16 bits are clipped.
        grey = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        grey8 = ((grey * 255 + 32767) // 65535).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey8[:, :, None], 3, axis=2))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def shrink(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """(H, W, 3) uint8 -> the same, at most `max_side` on its longer side (0 = unchanged)."""
    longest = max(rgb.shape[:2])
    if not max_side or longest <= max_side:
        return rgb
    factor = max_side / longest
    size = (max(1, round(rgb.shape[1] * factor)), max(1, round(rgb.shape[0] * factor)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def raw_photo(width: int, height: int, rgb: bytes, max_pixels: int, max_side: int = 0) -> Photo:
    """Raw RGB bytes -> a Photo at most `max_side` pixels on its longer side (0 = any)."""
    return Photo(shrink(raw_to_array(width, height, rgb, max_pixels), max_side), width, height)


def raw_to_array(width: int, height: int, rgb: bytes, max_pixels: int) -> np.ndarray:
    """Checks and reshapes raw RGB bytes to (H, W, 3) uint8."""
    if width == 0 or height == 0:
        raise ImageError(
            f"raw image has zero size ({width}x{height}): set raw.width and raw.height to the image's size in pixels"
        )
    if width * height > max_pixels:
        raise ImageError(
            f"raw image is {width}x{height}, above the limit of {max_pixels} pixels: downscale it before sending"
        )
    expected = width * height * 3
    if len(rgb) != expected:
        raise ImageError(
            f"raw image of {width}x{height} needs {expected} RGB bytes, got {len(rgb)}: "
            "send width x height x 3 bytes, row by row, R G B per pixel"
        )
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
