"""Fixtures of the signature server's tests: the object locator on the real descriptor."""

from __future__ import annotations

import pytest

from common.config import MODELS_DIR
from signature_server.saliency import LocateSpec, ObjectLocator


@pytest.fixture(scope="session")
def locate_spec() -> LocateSpec:
    return LocateSpec.load(MODELS_DIR / "efficientnet-lite0")


@pytest.fixture(scope="session")
def locator(deep_descriptor, locate_spec) -> ObjectLocator:
    return ObjectLocator(deep_descriptor, locate_spec)
