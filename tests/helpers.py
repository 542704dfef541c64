"""Helpers shared by the tests: ports and health waits, the four services in this process, scenes of
the bundled photos, inputs a user may send by mistake, and brute-force references for bag-of-words
signatures.

The references are written from the definitions (the paper, section 3.2: chi-squared distance
between L1-normalised word histograms), independently of the index's own formula, so that tests
hold the production code to them.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from common.bow_codec import BagOfWords
from common.config import load_config
from common.local_suite import free_port, wait_serving
from common.photos import load_photo
from detector_server.config import DetectorConfig
from gateway.config import GatewayConfig
from index_server.config import IndexConfig
from signature_server.config import SignatureConfig

__all__ = [
    "BAD_IMAGE_SAYS",
    "CUP_BOX",
    "MOTO_BOX",
    "Suite",
    "bad_images",
    "chi2",
    "chi2_distances",
    "dense",
    "free_port",
    "png_bomb",
    "shop_catalogue",
    "start_gateway",
    "start_suite",
    "tiles",
    "video_clip",
    "video_scene",
    "wait_serving",
]

# -- the services in this process -------------------------------------------------------------------


@dataclass
class Suite:
    """The four services, started in this process on free ports."""

    servers: dict[str, grpc.Server]
    addresses: dict[str, str]

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop(None)


def start_suite(**gateway_overrides: Any) -> Suite:
    """Detector, signature service, index (in memory) and a gateway over them; `gateway_overrides`
    are GatewayConfig fields, e.g. index_routes={"furniture": "127.0.0.1:50099"}."""
    from detector_server.server import create_server as detector_server
    from index_server.server import create_server as index_server
    from signature_server.server import create_server as signature_server

    servers: dict[str, grpc.Server] = {}
    ports: dict[str, int] = {}
    servers["detector"], ports["detector"] = detector_server(
        load_config(DetectorConfig, "detector", environ={}, port=0, intra_op_threads=2)
    )
    servers["signature"], ports["signature"] = signature_server(
        load_config(SignatureConfig, "signature", environ={}, port=0, intra_op_threads=2)
    )
    servers["index"], ports["index"] = index_server(load_config(IndexConfig, "index", environ={}, port=0, data_dir=""))
    addresses = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
    servers["gateway"], port = start_gateway(addresses, **gateway_overrides)
    addresses["gateway"] = f"127.0.0.1:{port}"
    return Suite(servers, addresses)


def start_gateway(addresses: dict[str, str], **overrides: Any) -> tuple[grpc.Server, int]:
    """A gateway in this process over the back ends at `addresses` ("detector", "signature",
    "index"); `overrides` are GatewayConfig fields (index_address among them)."""
    from gateway.server import create_server as gateway_server

    settings = {
        "detector_address": addresses["detector"],
        "signature_address": addresses["signature"],
        "index_address": addresses.get("index", ""),
        **overrides,
    }
    return gateway_server(load_config(GatewayConfig, "gateway", environ={}, port=0, **settings))


# -- scenes of the bundled photos ---------------------------------------------------------------------

CUP_BOX = (150, 23, 429, 310)  # the cup and saucer in the 600x400 "coffee" photo


def tiles(name: str, grid: int = 2) -> list[np.ndarray]:
    """The grid x grid tiles of a bundled photo."""
    image = load_photo(name)
    height, width = image.shape[:2]
    return [
        np.ascontiguousarray(
            image[r * height // grid : (r + 1) * height // grid, c * width // grid : (c + 1) * width // grid]
        )
        for r in range(grid)
        for c in range(grid)
    ]


MOTO_BOX = (55, 54, 697, 455)  # the motorbike in the "motorcycle_left" photo


def shop_catalogue(distractors: bool = True) -> list[Any]:
    """The products the end-to-end tests search for: "coffee-cup" (the cup of "coffee", mirrored) in
    "tableware" and "moto-left" (the motorbike of "motorcycle_left") in "vehicles", and, with
    `distractors`, centre crops of five other photos in both categories -> gateway.client.Product list."""
    from common.images import encode_jpeg
    from gateway.client import Product

    coffee, left = load_photo("coffee"), load_photo("motorcycle_left")
    x0, y0, x1, y1 = CUP_BOX
    a, b, c, d = MOTO_BOX
    products = [
        Product("coffee-cup", "tableware", encode_jpeg(coffee[y0:y1, x0:x1][:, ::-1]), {"title": "cup"}),
        Product("moto-left", "vehicles", encode_jpeg(left[b:d, a:c]), {"title": "bike"}),
    ]
    for name in ("chelsea", "astronaut", "rocket", "china.jpg", "flower.jpg") if distractors else ():
        photo = load_photo(name)
        h, w = photo.shape[:2]
        crop = encode_jpeg(photo[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4])
        products += [Product(f"{category}-{name}", category, crop, {}) for category in ("tableware", "vehicles")]
    return products


# -- a video clip of real photos ----------------------------------------------------------------------


def video_scene() -> tuple[np.ndarray, dict[str, tuple[int, int, int, int]]]:
    """A 1280x720 shop scene of real photos: the cup and saucer of "coffee" and the motorbike of
    "motorcycle_left" pasted on "china.jpg" -> (scene RGB, product -> its box in the scene)."""
    import cv2

    scene = cv2.resize(load_photo("china.jpg"), (1280, 720), interpolation=cv2.INTER_AREA)
    x0, y0, x1, y1 = CUP_BOX
    cup = load_photo("coffee")[y0:y1, x0:x1]
    x0, y0, x1, y1 = MOTO_BOX
    moto = cv2.resize(load_photo("motorcycle_left")[y0:y1, x0:x1], (449, 281), interpolation=cv2.INTER_AREA)
    boxes = {"cup": (140, 330, 140 + cup.shape[1], 330 + cup.shape[0]), "moto": (700, 380, 1149, 661)}
    for name, patch in (("cup", cup), ("moto", moto)):
        a, b, c, d = boxes[name]
        scene[b:d, a:c] = patch
    return scene, boxes


def video_clip(
    size: tuple[int, int] = (640, 360), pan: int = 20, zoom: int = 10, after_cut: int = 10
) -> tuple[list[np.ndarray], int]:
    """Frames (H, W, 3) uint8 RGB of `size` (width, height): a pan across video_scene(), a zoom into
    it, then a cut to the "motorcycle_right" photo, slowly panned -> (frames, index of the first
    frame after the cut)."""
    import cv2

    scene, _ = video_scene()
    frames = []
    for i in range(pan):  # a 1000x560 window moving right by 160 pixels
        x = round(160 * i / max(pan - 1, 1))
        frames.append(cv2.resize(scene[100:660, x : x + 1000], size, interpolation=cv2.INTER_AREA))
    for i in range(1, zoom + 1):  # then narrowing to 800x450 around the same centre
        w = round(1000 - 200 * i / zoom)
        h = round(w * 0.56)
        cx, cy = 160 + 500, 380
        frames.append(
            cv2.resize(scene[cy - h // 2 : cy + h // 2, cx - w // 2 : cx + w // 2], size, interpolation=cv2.INTER_AREA)
        )
    other = load_photo("motorcycle_right")
    cut = len(frames)
    for i in range(after_cut):
        x = 4 * i
        frames.append(cv2.resize(other[20:480, x : x + 700], size, interpolation=cv2.INTER_AREA))
    return [np.ascontiguousarray(f) for f in frames], cut


# -- bad input --------------------------------------------------------------------------------------


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming width x height pixels, with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def bad_images(coffee_png: bytes) -> dict[str, bytes]:
    """Inputs a user may send by mistake (or on purpose), by name."""
    rng = np.random.default_rng(1)
    return {
        "empty": b"",
        "truncated": coffee_png[: len(coffee_png) // 3],
        "random": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "zero_size_header": png_bomb(0, 10),
        "bomb": png_bomb(),
    }


# What common.images says of each of bad_images(), through every service that decodes it.
BAD_IMAGE_SAYS = {
    "empty": "image is empty: send the encoded file bytes",
    "truncated": "image cannot be decoded (OSError: 'image file is truncated')",
    "random": "image cannot be decoded (its bytes are in no image format this server reads)",
    "zero_size_header": "image cannot be decoded (its bytes are in no image format this server reads)",
    "bomb": "image is 100000x100000 = 10000000000 pixels, above the limit of 50000000: downscale it",
}


# -- brute-force references -------------------------------------------------------------------------


def dense(bag: BagOfWords) -> np.ndarray:
    """(V,) float64 L1-normalised word histogram of the bag."""
    out = np.zeros(bag.vocabulary, np.float64)
    out[bag.words] = bag.counts / bag.counts.sum()
    return out


def chi2(a: BagOfWords, b: BagOfWords) -> float:
    """Chi-squared distance in [0, 2] between two bags' L1-normalised histograms, by its definition:
    sum over words in either of (x_w - y_w)^2 / (x_w + y_w)."""
    return float(chi2_distances(dense(a)[None, :], dense(b)[None, :])[0, 0])


def chi2_distances(queries: np.ndarray, items: np.ndarray) -> np.ndarray:
    """(Q, V), (M, V) L1-normalised histograms -> (Q, M) float64 chi-squared distances; a word absent
    from both adds 0."""
    queries, items = np.asarray(queries, np.float64), np.asarray(items, np.float64)
    out = np.empty((len(queries), len(items)))
    for i, query in enumerate(queries):
        total, diff = query[None, :] + items, query[None, :] - items
        out[i] = np.divide(diff * diff, total, out=np.zeros_like(total), where=total > 0).sum(axis=1)
    return out
