"""Shared fixtures: real photos, real models, and the four real services on loopback (shared helpers
that are not fixtures live in tests/helpers.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import settings

from common.config import MODELS_DIR
from common.images import encode_png
from common.photos import load_photo
from detector_server.model import DetectorModel, ModelSpec
from signature_server.deep import DeepDescriptor, DeepSpec
from tests.helpers import Suite, start_suite

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
    from signature_server.bow import BowExtractor, BowSpec

    spec = BowSpec.load(MODELS_DIR / "colour-texture-bow")
    return BowExtractor(spec, spec.load_codebook(), select_kernels("cpu"))


@pytest.fixture(scope="session")
def signature_models():
    """The signature service's model repository over the real models (CPU kernels), loaded and warm:
    what a SignatureService in this process serves from."""
    from common.config import load_config
    from signature_server.config import SignatureConfig
    from signature_server.server import create_repository

    config = load_config(SignatureConfig, "signature", environ={}, intra_op_threads=2, kernels="cpu")
    repository = create_repository(config)
    yield repository
    repository.close()


@pytest.fixture(scope="session")
def suite() -> Iterator[Suite]:
    started = start_suite()
    yield started
    started.stop()


@pytest.fixture(scope="session")
def coffee_png(coffee) -> bytes:
    return encode_png(coffee)
