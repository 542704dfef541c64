"""Shared fixtures: real photos, real models, and the four real services on loopback."""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from hypothesis import settings

from common.config import MODELS_DIR, load_config
from common.images import encode_png
from common.photos import load_photo
from detector_server.config import DetectorConfig
from detector_server.model import DetectorModel, ModelSpec
from gateway.config import GatewayConfig
from index_server.config import IndexConfig
from signature_server.config import SignatureConfig
from signature_server.deep import DeepDescriptor, DeepSpec

# Property tests draw the same examples on every run (a green CI stays green, a red one reproduces);
# HYPOTHESIS_PROFILE=explore draws new ones each run, to look for more.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(scope="session")
def coffee() -> np.ndarray:
    return load_photo("coffee")


@pytest.fixture(scope="session")
def detector_model() -> DetectorModel:
    return DetectorModel(ModelSpec.load(MODELS_DIR / "yolov3-tiny"), intra_op_threads=2)


@pytest.fixture(scope="session")
def deep_descriptor() -> DeepDescriptor:
    return DeepDescriptor(DeepSpec.load(MODELS_DIR / "efficientnet-lite0"), intra_op_threads=2)


@pytest.fixture(scope="session")
def locate_spec():
    from signature_server.saliency import LocateSpec

    return LocateSpec.load(MODELS_DIR / "efficientnet-lite0")


@pytest.fixture(scope="session")
def locator(deep_descriptor, locate_spec):
    from signature_server.saliency import ObjectLocator

    return ObjectLocator(deep_descriptor, locate_spec)


@pytest.fixture(scope="session")
def bow_extractor():
    from kernels import select_kernels
    from signature_server.bow import BowExtractor, BowSpec, Codebook

    spec = BowSpec.load(MODELS_DIR / "colour-texture-bow")
    return BowExtractor(spec, Codebook.load(spec.codebook_path, spec.provenance_path), select_kernels("cpu"))


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming width x height pixels, with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def bad_images(coffee_png: bytes) -> dict[str, bytes]:
    """Inputs a user may send by mistake (or on purpose)."""
    rng = np.random.default_rng(1)
    return {
        "empty": b"",
        "truncated": coffee_png[: len(coffee_png) // 3],
        "random": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "zero_size_header": png_bomb(0, 10),
        "bomb": png_bomb(),
    }


@dataclass
class Suite:
    """The four services, started in this process on free ports."""

    servers: dict[str, grpc.Server]
    addresses: dict[str, str]

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop(None)


def start_suite(**gateway_overrides) -> Suite:
    from detector_server.server import create_server as detector_server
    from gateway.server import create_server as gateway_server
    from index_server.server import create_server as index_server
    from signature_server.server import create_server as signature_server

    servers, addresses = {}, {}
    for name, create, config in (
        ("detector", detector_server, load_config(DetectorConfig, "detector", environ={}, port=0, intra_op_threads=2)),
        (
            "signature",
            signature_server,
            load_config(SignatureConfig, "signature", environ={}, port=0, intra_op_threads=2),
        ),
        ("index", index_server, load_config(IndexConfig, "index", environ={}, port=0, data_dir="")),
    ):
        servers[name], port = create(config)
        addresses[name] = f"127.0.0.1:{port}"
    config = load_config(
        GatewayConfig,
        "gateway",
        environ={},
        port=0,
        detector_address=addresses["detector"],
        signature_address=addresses["signature"],
        index_address=addresses["index"],
        **gateway_overrides,
    )
    servers["gateway"], port = gateway_server(config)
    addresses["gateway"] = f"127.0.0.1:{port}"
    return Suite(servers, addresses)


@pytest.fixture(scope="session")
def suite() -> Suite:
    started = start_suite()
    yield started
    started.stop()


@pytest.fixture(scope="session")
def coffee_png(coffee) -> bytes:
    return encode_png(coffee)
