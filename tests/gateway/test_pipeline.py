"""The pipeline's signing in chunks, against a fake signature service with a limit (no gRPC): crops,
and BLCF's query by region (the photo once, every item's box a region)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from common.errors import ResourceExhausted
from common.images import Photo
from common.serving import Deadline
from gateway.config import GatewayConfig
from gateway.pipeline import Pipeline, Timings, split_calls


class LimitedSigner:
    """Signs at most `limit` images per call (as the signature server does) and says so or not."""

    def __init__(self, limit: int, advertised: bool):
        self.limit, self.advertised = limit, advertised
        self.calls: list[int] = []
        self.timeouts: list[float] = []
        self.images: list[tuple[int, ...]] = []  # the image of each region call
        self.running = self.most_at_once = 0
        self.lock = threading.Lock()

    def images_per_call(self, timeout_s: float) -> int:
        return self.limit if self.advertised else 0

    def sign(self, crops, kinds, timeout_s):
        if len(crops) > self.limit:
            raise ResourceExhausted(f"{len(crops)} images in one call; at most {self.limit}: split it")
        with self.lock:
            self.calls.append(len(crops))
            self.timeouts.append(timeout_s)
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(0.05)
        with self.lock:
            self.running -= 1
        return [[f"{int(c[0, 0, 0])}:{kind}" for kind in kinds] for c in crops]

    def sign_regions(self, rgb, regions, timeout_s):
        """As the signature server: at most `limit` regions per call; one signature per region."""
        if len(regions) > self.limit:
            raise ResourceExhausted(f"{len(regions)} regions in one call; at most {self.limit}: split it")
        with self.lock:
            self.calls.append(len(regions))
            self.images.append(rgb.shape)
        return [tuple(np.round(box, 1).tolist()) for box in regions]


def crops(n: int) -> list[np.ndarray]:
    return [np.full((8, 8, 3), i, np.uint8) for i in range(n)]


def sign_with(signer: LimitedSigner, n: int, **config) -> list:
    with ThreadPoolExecutor(8) as pool:
        # Only the signer is used by _sign: no detector, locator or index.
        pipeline = Pipeline(GatewayConfig(**config), None, None, signer, None, pool)  # type: ignore[arg-type]  # see above
        return pipeline._sign(crops(n), ["deep", "bow"], Deadline(10.0), Timings())


def test_an_advertised_limit_splits_the_calls_evenly_and_in_parallel():
    signer = LimitedSigner(limit=4, advertised=True)
    out = sign_with(signer, 10, signature_call_images=64)  # the configured 64 would be refused
    assert sorted(signer.calls) == [3, 3, 4]
    assert signer.most_at_once > 1
    assert out == [[f"{i}:deep", f"{i}:bow"] for i in range(10)]  # in order, every crop
    assert all(0 < t <= 10.0 for t in signer.timeouts)  # the request's deadline, shared


def test_without_an_advertised_limit_the_configured_one_is_used():
    signer = LimitedSigner(limit=8, advertised=False)
    sign_with(signer, 20, signature_call_images=8)
    assert sorted(signer.calls) == [6, 7, 7]
    with pytest.raises(ResourceExhausted):
        sign_with(LimitedSigner(limit=8, advertised=False), 20, signature_call_images=32)


@pytest.mark.parametrize(
    "n, limit, max_bytes, sizes",
    [
        (40, 32, 10**9, [20, 20]),
        (64, 64, 10**9, [64]),
        (1, 32, 10**9, [1]),
        (6, 32, 3 * 192, [3, 3]),  # 8x8x3 bytes each: the byte bound splits too
    ],
)
def test_split_calls(n, limit, max_bytes, sizes):
    chunks = split_calls(crops(n), limit, max_bytes)
    assert [len(c) for c in chunks] == sizes
    assert [int(c[0, 0, 0]) for chunk in chunks for c in chunk] == list(range(n))


def test_blcf_regions_go_with_the_photo_shrunk_once_in_calls_under_the_limit():
    signer = LimitedSigner(limit=4, advertised=True)
    # A 1200x800 original decoded at 900x600 (decode_max_side): boxes are in the decoded pixels.
    photo = Photo(np.zeros((600, 900, 3), np.uint8), 1200, 800)
    boxes = [np.array([9 * i, 6 * i, 9 * i + 90, 6 * i + 60], np.float32) for i in range(10)]
    with ThreadPoolExecutor(8) as pool:
        pipeline = Pipeline(GatewayConfig(blcf_side=450), None, None, signer, None, pool)
        out = pipeline._sign_boxes(photo, boxes, "blcf", Deadline(10.0), Timings())
    assert sorted(signer.calls) == [3, 3, 4] and set(signer.images) == {(300, 450, 3)}
    # One signature per box, in order, each box in pixels of the 450x300 copy that was sent.
    assert out == [(4.5 * i, 3.0 * i, 4.5 * i + 45, 3.0 * i + 30) for i in range(10)]


def test_other_kinds_sign_crops_not_regions():
    signer = LimitedSigner(limit=4, advertised=True)
    photo = Photo(np.full((60, 90, 3), 7, np.uint8), 90, 60)
    with ThreadPoolExecutor(8) as pool:
        pipeline = Pipeline(GatewayConfig(), None, None, signer, None, pool)
        out = pipeline._sign_boxes(photo, [np.array([0, 0, 30, 30], np.float32)], "bow", Deadline(10.0), Timings())
    assert out == ["7:bow"] and not signer.images
