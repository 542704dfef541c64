"""Two-stage retrieval, the second stage: the first k matches of an item re-scored by local features
with geometric verification (common.local_features) and re-ordered by the fused score.

The catalogue side never decodes a photo here: each catalogue image's features were computed once
at ingest (by the signature service) and stored with it at the index, which hands them back by item
id. The query side is the item's crop, described here with the same extractor and settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common import local_features
from common.local_features import ExtractorSettings, Features
from gateway.config import GatewayConfig
from gateway.ports import CatalogueMatch, item_id_of


@dataclass(frozen=True)
class RerankSettings:
    extractor: ExtractorSettings
    min_inliers: int
    weight: float
    half: int

    @staticmethod
    def of(config: GatewayConfig) -> RerankSettings:
        return RerankSettings(
            ExtractorSettings(side=config.rerank_side, max_points=config.rerank_points),
            config.rerank_min_inliers,
            config.rerank_weight,
            config.rerank_half,
        )


def candidates(matches: Sequence[CatalogueMatch], k: int) -> list[str]:
    """The item ids of the first k matches (best first): the ones whose features are needed."""
    return [item_id_of(m.product_id, m.image_id) for m in matches[:k]]


def rerank(
    matches: Sequence[CatalogueMatch],
    query: Features,
    stored: Mapping[str, Features],
    k: int,
    settings: RerankSettings,
) -> list[CatalogueMatch]:
    """`matches` (best first by the signature's score) with the first k re-scored: each against
    its catalogue image's stored features (none stored: kept as it is), score = the fused score,
    first_stage_score = the signature's first-stage score (a BLCF match spatially re-ranked by the
    index keeps the one it came with: its score is then its best window's), inliers = the
    verification's, verified; then all of them sorted by score (ties by the first-stage order).
    Fused scores only add to the first score, so a match past the first k never overtakes one it
    was behind, unless that one was verified."""
    found = {position: stored[item_id] for position, item_id in enumerate(candidates(matches, k)) if item_id in stored}
    checks = dict(zip(found, local_features.verify_many(query, list(found.values()))))
    out: list[CatalogueMatch] = []
    for position, match in enumerate(matches):
        check = checks.get(position)
        if check is None:
            out.append(match)
            continue
        fused = local_features.fuse(match.score, check, settings.min_inliers, settings.weight, settings.half)
        first = match.score if match.first_stage_score is None else match.first_stage_score
        out.append(
            dataclasses.replace(match, score=fused, first_stage_score=first, inliers=check.inliers, verified=True)
        )
    order = sorted(range(len(out)), key=lambda i: (-out[i].score, i))
    return [out[i] for i in order]
