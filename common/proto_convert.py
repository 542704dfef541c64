"""Conversions between protobuf messages and numpy values that several services share."""

from __future__ import annotations

import numpy as np

from common.errors import InvalidArgument
from common.images import ImageError, Photo, decode_photo, raw_photo
from mps.common.v1 import common_pb2, models_pb2

# A model version's state (common.model_repository) as mps.common.v1.ModelState.
MODEL_STATES = {
    "LOADING": models_pb2.MODEL_STATE_LOADING,
    "READY": models_pb2.MODEL_STATE_READY,
    "DRAINING": models_pb2.MODEL_STATE_DRAINING,
    "UNLOADED": models_pb2.MODEL_STATE_UNLOADED,
    "FAILED": models_pb2.MODEL_STATE_FAILED,
}

# mps.common.v1.DenseVector.values_f32le: IEEE-754 float32, little-endian whatever the host's order.
LITTLE_ENDIAN_F32 = np.dtype("<f4")


def kind_name(kind: int) -> str:
    """A SignatureKind's name (SIGNATURE_KIND_DEEP), or its number when this build knows none."""
    return common_pb2.SignatureKind.Name(kind) if kind in common_pb2.SignatureKind.values() else str(kind)


def image_from_proto(image: common_pb2.Image, max_pixels: int) -> np.ndarray:
    """`mps.common.v1.Image` -> (H, W, 3) uint8 RGB at full size; raises ImageError on bad input."""
    return photo_from_proto(image, max_pixels).rgb


def photo_from_proto(image: common_pb2.Image, max_pixels: int, max_side: int = 0) -> Photo:
    """`mps.common.v1.Image` -> a Photo at most `max_side` on its longer side (0 = any), decoded
    once and small (see decode_photo); raises ImageError on bad input."""
    source = image.WhichOneof("source")
    if source == "encoded":
        return decode_photo(image.encoded, max_pixels, max_side)
    if source == "raw":
        return raw_photo(image.raw.width, image.raw.height, image.raw.rgb, max_pixels, max_side)
    raise ImageError("no image given: set image.encoded (file bytes) or image.raw (RGB pixels)")


def image_to_proto(rgb: np.ndarray) -> common_pb2.Image:
    """(H, W, 3) uint8 RGB -> raw `mps.common.v1.Image` (no re-encoding)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    height, width = rgb.shape[:2]
    return common_pb2.Image(raw=common_pb2.RawImage(width=width, height=height, rgb=rgb.tobytes()))


def box_to_proto(box: np.ndarray) -> common_pb2.Box:
    """(4,) float xyxy -> Box."""
    return common_pb2.Box(x_min=float(box[0]), y_min=float(box[1]), x_max=float(box[2]), y_max=float(box[3]))


def box_from_proto(box: common_pb2.Box) -> np.ndarray:
    """Box -> (4,) float32 xyxy."""
    return np.array([box.x_min, box.y_min, box.x_max, box.y_max], dtype=np.float32)


def dense_to_proto(vector: np.ndarray) -> common_pb2.Signature:
    """(D,) float -> deep Signature carrying D little-endian float32 in `dense.values_f32le`."""
    data = np.ascontiguousarray(vector, dtype=LITTLE_ENDIAN_F32).tobytes()
    return common_pb2.Signature(kind=common_pb2.SIGNATURE_KIND_DEEP, dense=common_pb2.DenseVector(values_f32le=data))


def dense_from_proto(signature: common_pb2.Signature) -> np.ndarray:
    """A deep Signature's vector as (D,) float32, writable (empty when it carries none): from
    `dense.values_f32le`, or from the deprecated `dense.values` when that is unset (messages
    written before, e.g. in an index's write-ahead log); raises InvalidArgument when
    `dense.values_f32le` is not a whole number of float32."""
    data = signature.dense.values_f32le
    if not data:
        return np.asarray(signature.dense.values, dtype=np.float32)  # the deprecated field
    if len(data) % 4:
        raise InvalidArgument(
            f"dense.values_f32le is {len(data)} bytes, not a multiple of 4: send the vector as D "
            "little-endian float32 (4 x D bytes)",
            violations=[("dense.values_f32le", f"{len(data)} bytes is not a multiple of 4")],
        )
    return np.frombuffer(data, dtype=LITTLE_ENDIAN_F32).astype(np.float32)
