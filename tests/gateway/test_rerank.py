"""The second stage on its own: real photos' local features, candidates re-ordered by geometric
evidence, the rest left in their first-stage order."""

from __future__ import annotations

import cv2
import numpy as np

from common import local_features
from common.config import load_config
from common.photos import load_photo
from gateway.config import GatewayConfig
from gateway.ports import CatalogueMatch, item_id_of
from gateway.rerank import RerankSettings, candidates, rerank
from tests.helpers import CUP_BOX

SETTINGS = RerankSettings.of(load_config(GatewayConfig, "gateway", environ={}))


def described(image: np.ndarray) -> local_features.Features:
    return local_features.extract(image, SETTINGS.extractor)


def match(product: str, score: float) -> CatalogueMatch:
    return CatalogueMatch(product, "img", score, {}, None)


def test_the_verified_candidate_moves_up_and_the_rest_keep_their_order():
    coffee = load_photo("coffee")
    x0, y0, x1, y1 = CUP_BOX
    cup = coffee[y0:y1, x0:x1]
    turned = cv2.warpAffine(
        cup, cv2.getRotationMatrix2D((cup.shape[1] / 2, cup.shape[0] / 2), 12, 0.8), (cup.shape[1], cup.shape[0])
    )
    stored = {
        item_id_of("cup", "img"): described(cup),
        item_id_of("cat", "img"): described(load_photo("chelsea")),
        item_id_of("rocket", "img"): described(load_photo("rocket")),
    }
    first = [match("cat", 0.80), match("rocket", 0.78), match("cup", 0.70), match("unstored", 0.60), match("late", 0.5)]
    out = rerank(first, described(turned), stored, k=4, settings=SETTINGS)
    assert [m.product_id for m in out] == ["cup", "cat", "rocket", "unstored", "late"]
    cup_match = out[0]
    assert cup_match.inliers >= SETTINGS.min_inliers and cup_match.first_stage_score == 0.70
    assert cup_match.score > 0.80  # fused: above the others
    assert cup_match.inliers > 2 * max(m.inliers for m in out[1:])
    assert out[1].first_stage_score == 0.80 and out[1].score < cup_match.score
    assert out[3].first_stage_score is None and out[3].inliers == 0  # nothing stored: untouched
    assert out[4].first_stage_score is None  # past k: untouched


def test_only_the_first_k_are_verified():
    coffee = load_photo("coffee")
    stored = {item_id_of("cup", "img"): described(coffee)}
    first = [match("other", 0.9), match("cup", 0.5)]
    assert rerank(first, described(coffee), stored, k=1, settings=SETTINGS)[0].product_id == "other"
    assert rerank(first, described(coffee), stored, k=2, settings=SETTINGS)[0].product_id == "cup"
    assert candidates(first, 1) == [item_id_of("other", "img")]


def test_features_of_another_extractor_are_never_compared():
    coffee = load_photo("coffee")
    mine = described(coffee)
    theirs = local_features.Features("sift-v9", mine.width, mine.height, mine.points, mine.descriptors)
    out = rerank([match("cup", 0.5)], mine, {item_id_of("cup", "img"): theirs}, k=5, settings=SETTINGS)
    assert out[0].inliers == 0 and out[0].score == 0.5
